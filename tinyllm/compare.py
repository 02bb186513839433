"""
The comparison behind `python -m tinyllm compare`: five fine-tuning methods, one pretrained model, one
task, the same step budget, and every claim an introduction to fine-tuning makes turned into a number.

    results = compare(task="record", steps=200)        # writes runs/compare/{results.json, report.md, *.png}
    for c in results["claims"]: print(c["claim"], c["verdict"])

The steps:
  1. load the pretrained checkpoint (pretrain one first if there is none)
  2. per task: measure the base model (test accuracy, knowledge), and few-shot prompting of it
  3. fine-tune full, LoRA, prefix, prompt and adapter (tinyllm.finetune.finetune), for each seed
  4. a few variations of LoRA (rank, placement) and prefix tuning (length, initialisation)
  5. compute the claims' verdicts from the numbers, by the rules written below (CLAIMS)
  6. write results.json, the plots and report.md; print the table

Every verdict is computed: a rule reads the measured numbers and returns supported, not supported, mixed
or not measured (when the run did not include what the claim needs, e.g. a classification task).
"""
import copy
import dataclasses
import json
import math
import os
import re
import time

import numpy as np

from .checkpoint import load_pretrained
from .data import World
from .finetune import finetune, knowledge_probe, measure_base, task_batches
from .model import GPT2_SMALL, GPTConfig, param_shapes
from .optim import AdamW, clip_grad_norm
from .peft import (AdapterConfig, FullFineTuningConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                   get_peft_model)
from .peft.peft_model import reserved_positions
from .tasks import RECORD_FIELDS, TASKS, evaluate, few_shot_task, get_task
from .train import PRETRAIN_OUT, default_out, duration, pretrain

DEFAULT_CHECKPOINT = PRETRAIN_OUT
DEFAULT_OUT = "runs/compare"
METHODS = ("full", "lora", "prefix", "prompt", "adapter")


def method_config(name):
    """A fresh config for one of METHODS, with the sizes the comparison uses."""
    return {"full": lambda: FullFineTuningConfig(),
            "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]),
            "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=10),
            "prompt": lambda: PromptTuningConfig(num_virtual_tokens=10),
            "adapter": lambda: AdapterConfig(bottleneck_size=16)}[name]()


# Peak learning rates, tuned per method: final val loss (nats per answer token) on the record task after
# 200 steps of 8 from the default pretrained model, seed 0, for each lr tried (the best is the default):
#   full     1e-3 0.289   3e-3 0.265   1e-2 0.454
#   LoRA     3e-3 1.785   1e-2 1.463   3e-2 2.403
#   prefix   1e-2 4.085   3e-2 2.441   1e-1 1.928   3e-1 1.793   1.0 2.171
#   prompt   1e-2 4.463   3e-2 3.527   1e-1 3.364   3e-1 3.171   1.0 3.233
#   adapter  3e-3 1.922   1e-2 1.474   3e-2 1.372   1e-1 1.687
# The fewer numbers a method trains, the larger the step each of them wants. Checked on qa (100 steps of 8):
# the same lrs win or come within 1%, except full, which prefers 1e-3 there (val 1.130 against 1.705 at 3e-3).
LRS = {"full": 3e-3, "lora": 1e-2, "prefix": 3e-1, "prompt": 3e-1, "adapter": 3e-2}

# The variations the tuning claims need, run on the first task with seed 0: {group: (method, {label:
# make(task) -> config})}, where None is the method's own config in the main comparison (it runs once for
# all groups). LoRA keeps lora_alpha = 2r, so only the rank changes, not the scale of its update.
VARIANTS = {
    "lora_rank": ("lora", {"r=2": lambda task: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]),
                           "r=8": None,
                           "r=32": lambda task: LoraConfig(r=32, lora_alpha=64, target_modules=["c_attn"])}),
    "lora_place": ("lora", {"c_attn": None,
                            "q,v": lambda task: LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn.q", "c_attn.v"]),
                            "mlp": lambda task: LoraConfig(r=8, lora_alpha=16, target_modules=["c_fc", "mlp.c_proj"])}),
    # P=25 is about the most that leaves room for the longest examples (100 tokens) in a context of 128
    "prefix_length": ("prefix", {"P=3": lambda task: PrefixTuningConfig(num_virtual_tokens=3), "P=10": None,
                                 "P=25": lambda task: PrefixTuningConfig(num_virtual_tokens=25)}),
    # text: the keys and values of a real training example (its first 10 tokens), as the paper initialises
    "prefix_init": ("prefix", {"random": None, "text": lambda task: PrefixTuningConfig(
        num_virtual_tokens=10, init="text", init_text="".join(task.train[0]))}),
}


@dataclasses.dataclass
class Settings:
    steps: int = 200              # optimizer steps per method (the same budget for every method)
    batch_size: int = 8           # examples per step
    eval_interval: int = 25       # steps between validation losses
    variant_steps: int = 50       # steps of each variant run (they are compared with each other only)
    n_test: int | None = None     # test examples per task (None: all of them)
    n_val: int = 64               # val examples in the validation loss
    n_recall: int | None = None   # facts in the fact-recall probe (None: all, 6 per person)
    probe_windows: int = 16       # corpus windows in the knowledge probe
    max_shots: int = 8            # the largest k tried for few-shot prompting
    timing_rounds: int = 20       # rounds of interleaved step timing (one step of every method per round)


# The default budget fits the main command in about 5 minutes on 2 cores, pretraining included. Measured end to
# end with no checkpoint (2 cores shared with other jobs, load average ~3): 6m06s wall, of which pretraining
# 2m52s and fine-tuning plus evaluation 3m14s; 4m24s of CPU time in all, what an idle machine would take.
# The fine-tuning part alone: 130 CPU seconds (5 methods x 200 steps, 8 variant runs x 50 steps, evaluations).
DEFAULT_SETTINGS = Settings()
QUICK_SETTINGS = Settings(steps=4, batch_size=2, eval_interval=2, variant_steps=1, n_test=4, n_val=4, n_recall=4,
                          probe_windows=2, max_shots=2, timing_rounds=2)


# ----------------------------------------------------------------------------------------------------
# extra measurements: few-shot prompting, and the structure of the record task's answers

def few_shot_baseline(model, tokenizer, task, base_accuracy, max_shots):
    """The base model prompted with k solved examples, for k = 0, 1, ... while they fit in the context.

    Returns: list of {k, tokens_per_query (mean prompt tokens), fits, accuracy (None when it does not fit)};
    the last row is the first k that does not fit (or max_shots).
    """
    block_size = model.config.block_size
    rows = []
    for k in range(max_shots + 1):
        shot = few_shot_task(task, k) if k else task
        sizes = [(len(tokenizer.encode(p)), len(tokenizer.encode(a))) for p, a in shot.test]
        fits = all(p + a - 1 <= block_size for p, a in sizes)      # the prompt and its answer, as generated
        accuracy = (base_accuracy if k == 0 else evaluate(model, tokenizer, shot)["accuracy"]) if fits else None
        rows.append({"k": k, "tokens_per_query": float(np.mean([p for p, _ in sizes])), "fits": fits,
                     "accuracy": accuracy})
        if not fits:
            break
    return rows


RECORD_LINE = re.compile(r" name=[a-z]+(\|(" + "|".join(RECORD_FIELDS) + r")=[a-z0-9]+)+\n")


def record_scores(predictions, answers):
    """For the record task: how often the answer has the record's structure, and how many fields are right.

    format_rate     predictions that read ' name=...|field=value|...\\n' with known fields
    field_accuracy  the answers' key=value pairs (name included) that the prediction contains
    """
    formatted = [bool(RECORD_LINE.fullmatch(p)) for p in predictions]
    hits, total = 0, 0
    for pred, answer in zip(predictions, answers):
        want = answer.strip().split("|")
        got = set(pred.strip().split("|"))
        hits, total = hits + sum(w in got for w in want), total + len(want)
    return {"format_rate": float(np.mean(formatted)), "field_accuracy": hits / total}


def interleaved_step_times(base, tokenizer, task, lrs, batch_size, rounds, seed=0):
    """Seconds per training step of every method, timed in turns: one step of each method, then again, for
    `rounds` rounds, all on the same batches. When other programs load the machine, every method is slowed
    alike, which timing the methods one after the other (as the training runs are) cannot promise.

    A step is what train() does: forward, backward, gradient clipping, AdamW. The first round warms up
    and is not counted. Returns {method: {median, q1, q3}} in seconds.
    """
    block_size = base.config.block_size
    steppers = {}
    for m in METHODS:
        pm = get_peft_model(copy.deepcopy(base), method_config(m), tokenizer=tokenizer, seed=seed)
        steppers[m] = (pm, AdamW(pm.trainable_parameters(), lr=lrs[m]))
    room = max(reserved_positions(method_config(m)) for m in METHODS)
    get_batch = task_batches(tokenizer, task, block_size, batch_size, reserved=room)
    rng = np.random.default_rng(seed)
    times = {m: [] for m in METHODS}
    for _ in range(rounds + 1):
        x, y = get_batch("train", rng)
        for m, (pm, optimizer) in steppers.items():
            start = time.perf_counter()
            pm.forward(x, y)
            grads = pm.backward()
            clip_grad_norm(grads, 1.0)
            optimizer.step(grads)
            times[m].append(time.perf_counter() - start)
    return {m: dict(zip(("q1", "median", "q3"), map(float, np.percentile(t[1:], [25, 50, 75]))))
            for m, t in times.items()}


# ----------------------------------------------------------------------------------------------------
# the claims, and the rules that decide them

SUPPORTED, NOT_SUPPORTED, MIXED, NOT_MEASURED = "supported", "not supported", "mixed", "not measured"
FORGET_LOSS = 0.05      # forgetting: the corpus loss rises by 5% or more ...
FORGET_RECALL = 0.05    # ... or fact recall falls by 5 percentage points or more
TUNE_SPREAD = 0.10      # a setting "needs tuning" when its values' final val losses differ by 10% or more


def all_or_some(flags):
    """supported if every case holds, not supported if none, mixed otherwise; not measured if no case."""
    flags = list(flags)
    if not flags:
        return NOT_MEASURED
    return SUPPORTED if all(flags) else NOT_SUPPORTED if not any(flags) else MIXED


def both(a, b):
    """Two conditions of one claim: supported if both, mixed if one, not supported if neither."""
    return SUPPORTED if a and b else MIXED if a or b else NOT_SUPPORTED


def noise(p, n):
    """Two standard errors of the difference of two accuracies near p, each measured on n examples,
    sqrt(2 p (1 - p) / n); p is kept at least 3/n from 0 and 1, so a handful of examples never counts.
    Differences smaller than this are not told apart from luck."""
    p = min(max(p, 3 / n), 1 - 3 / n) if n > 6 else 0.5
    return 2.0 * math.sqrt(2 * p * (1 - p) / n)


def clearly_above(a, b, n):
    return a - b > noise((a + b) / 2, n)


def forgot(m, base):
    return (m["corpus_loss"] - base["corpus_loss"]) / base["corpus_loss"] >= FORGET_LOSS \
        or base["fact_recall"] - m["fact_recall"] >= FORGET_RECALL


def spread(losses):
    return (max(losses) - min(losses)) / min(losses)


def peft(facts):
    return [m for m in facts["methods"] if m != "full"]


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def claim_more_examples(F):
    """The distinct training examples fine-tuning saw exceed the largest k whose k-shot prompts fit in the
    context, on every task."""
    parts, flags = [], []
    for t, f in F.items():
        k_max = max(r["k"] for r in f["few_shot"] if r["fits"])
        seen = min(f["steps"] * f["batch_size"], f["n_train"])
        best_shot = max(r["accuracy"] for r in f["few_shot"] if r["fits"])
        best_ft = max(m["accuracy"] for m in f["methods"].values())
        parts.append(f"{t}: up to {seen} examples fine-tuned vs k <= {k_max} shots fit in {f['block_size']} tokens "
                     f"(best accuracy {best_ft:.2f} fine-tuned, {best_shot:.2f} few-shot)")
        flags.append(seen > k_max)
    return "; ".join(parts), all_or_some(flags)


def claim_shorter_inputs(F):
    """Every fine-tuned method's context per query (prompt + virtual tokens) is shorter than a 1-shot prompt's,
    on every task."""
    parts, flags = [], []
    for t, f in F.items():
        one_shot = next(r for r in f["few_shot"] if r["k"] == 1)["tokens_per_query"]
        longest = max(m["tokens_per_query"] for m in f["methods"].values())
        parts.append(f"{t}: {f['base']['tokens_per_query']:.0f}-{longest:.0f} positions per query fine-tuned "
                     f"(virtual tokens included) vs {one_shot:.0f} for 1 shot")
        flags += [m["tokens_per_query"] < one_shot for m in f["methods"].values()]
    return "; ".join(parts), all_or_some(flags)


def claim_complex_instructions(F):
    """On the record task (a rewrite into a fixed format), the best method's exact-match accuracy is clearly
    above the base model's (2 binomial standard errors): mixed, or supported if it also reaches 0.5."""
    if "record" not in F:
        return "needs the record task", NOT_MEASURED
    f = F["record"]
    best = max(f["methods"], key=lambda m: f["methods"][m]["accuracy"])
    acc, base = f["methods"][best]["accuracy"], f["base"]["accuracy"]
    measured = f"record exact match: best {best} {acc:.2f} vs base {base:.2f} (n={f['n_test']})"
    if not clearly_above(acc, base, f["n_test"]):
        return measured, NOT_SUPPORTED
    return measured, SUPPORTED if acc >= 0.5 else MIXED


def claim_structure(F):
    """On the record task, the share of answers in the record's structure rises by at least 0.5 over the base
    model's for the best method: supported; clearly (2 s.e.) but less: mixed. No task here measures tone."""
    if "record" not in F:
        return "needs the record task", NOT_MEASURED
    f = F["record"]
    rates = {m: v["format_rate"] for m, v in f["methods"].items()}
    base = f["base"]["format_rate"]
    best = max(rates, key=rates.get)
    measured = (f"answers in record format: base {base:.2f}; " + ", ".join(f"{m} {r:.2f}" for m, r in rates.items())
                + f"; field accuracy best {max(v['field_accuracy'] for v in f['methods'].values()):.2f}"
                + " (tone: not measured)")
    if rates[best] - base >= 0.5:
        return measured, SUPPORTED
    return measured, MIXED if clearly_above(rates[best], base, f["n_test"]) else NOT_SUPPORTED


def claim_full_expensive(F):
    """Full fine-tuning's seconds per step (median, timed in turns) exceed every PEFT method's, and its
    optimizer state exceeds every PEFT method's. Both: supported; one: mixed."""
    parts, slower, bigger = [], [], []
    for t, f in F.items():
        full = f["methods"]["full"]
        slower += [full["seconds_per_step"] > f["methods"][m]["seconds_per_step"] for m in peft(f)]
        bigger += [full["optimizer_state_bytes"] > f["methods"][m]["optimizer_state_bytes"] for m in peft(f)]
        ms = [f["methods"][m]["seconds_per_step"] * 1e3 for m in peft(f)]
        parts.append(f"{t}: full {full['seconds_per_step'] * 1e3:.0f} ms/step vs PEFT {min(ms):.0f}-{max(ms):.0f} ms; "
                     f"optimizer state {fmt_bytes(full['optimizer_state_bytes'])} vs PEFT at most "
                     f"{fmt_bytes(max(f['methods'][m]['optimizer_state_bytes'] for m in peft(f)))}")
    return "; ".join(parts), both(bool(slower) and all(slower), bool(bigger) and all(bigger))


def claim_full_forgets(F):
    """After full fine-tuning the corpus loss has risen by FORGET_LOSS (relative) or fact recall has fallen by
    FORGET_RECALL: supported if on every task, mixed if on some."""
    parts, flags = [], []
    for t, f in F.items():
        full, base = f["methods"]["full"], f["base"]
        parts.append(f"{t}: corpus loss {base['corpus_loss']:.3f} -> {full['corpus_loss']:.3f}, "
                     f"fact recall {base['fact_recall']:.2f} -> {full['fact_recall']:.2f}")
        flags.append(forgot(full, base))
    return "; ".join(parts), all_or_some(flags)


def claim_full_copy(F):
    """Full fine-tuning's saved file is at least 95% of a full copy of the model, and every PEFT method's is
    under 10% of it. Both: supported; one: mixed."""
    f = next(iter(F.values()))
    full, copy = f["methods"]["full"]["saved_bytes"], f["methods"]["full"]["full_copy_bytes"]
    largest = max(f["methods"][m]["saved_bytes"] for m in peft(f))
    measured = (f"full saves {fmt_bytes(full)} per task, a full copy is {fmt_bytes(copy)}; PEFT files at most "
                f"{fmt_bytes(largest)}")
    return measured, both(full >= 0.95 * copy, largest < 0.1 * copy)


def claim_peft_compute(F):
    """Each PEFT method's seconds per step (median, timed in turns) is below full fine-tuning's, per task."""
    parts, flags = [], []
    for t, f in F.items():
        full = f["methods"]["full"]["seconds_per_step"]
        parts.append(f"{t}: ms/step full {full * 1e3:.0f}, " +
                     ", ".join(f"{m} {f['methods'][m]['seconds_per_step'] * 1e3:.0f}" for m in peft(f)))
        flags += [f["methods"][m]["seconds_per_step"] < full for m in peft(f)]
    return "; ".join(parts), all_or_some(flags)


def claim_peft_preserves(F):
    """With the method switched on, no PEFT method forgets (the rule of claim 6), per task and method.
    Reported beside it, not part of the verdict: whether switching the method off gives back the base exactly."""
    parts, flags = [], []
    exact = all(m["disable_restores_base"] for f in F.values() for k, m in f["methods"].items() if k != "full")
    for t, f in F.items():
        base = f["base"]
        parts.append(f"{t}: fact recall base {base['fact_recall']:.2f} -> " +
                     ", ".join(f"{m} {f['methods'][m]['fact_recall']:.2f}" for m in peft(f)) +
                     f"; corpus loss {base['corpus_loss']:.3f} -> " +
                     ", ".join(f"{f['methods'][m]['corpus_loss']:.3f}" for m in peft(f)))
        flags += [not forgot(f["methods"][m], base) for m in peft(f)]
    parts.append("adapter disabled = base exactly: " + ("yes, every PEFT method" if exact else "NO"))
    return "; ".join(parts), all_or_some(flags)


def steps_to(val_steps, val_losses, target):
    """The first evaluated step whose validation loss is <= target (inf if none)."""
    return next((s for s, v in zip(val_steps, val_losses) if v <= target), math.inf)


def claim_peft_faster(F):
    """Each PEFT method reaches full fine-tuning's final val loss in less training time than full needed,
    per task; time = the first evaluated step at or below it x seconds per step (timed in turns)."""
    parts, flags = [], []
    for t, f in F.items():
        M = f["methods"]
        target = M["full"]["val_loss"]
        seconds = {m: steps_to(M[m]["val_steps"], M[m]["val_losses"], target) * M[m]["seconds_per_step"] for m in M}
        parts.append(f"{t}: seconds to reach val loss {target:.3f}: " +
                     ", ".join(f"{m} {'never' if s == math.inf else f'{s:.1f}'}" for m, s in seconds.items()))
        flags += [seconds[m] < seconds["full"] for m in peft(f)]
    return "; ".join(parts), all_or_some(flags)


def claim_lora_beyond_generation(F):
    """On the classify task (scored as a classifier head), LoRA's accuracy is clearly (2 s.e.) above the
    base model's: supported; above but within noise: mixed."""
    if "classify" not in F:
        return "needs the classify task (--task classify or all)", NOT_MEASURED
    f = F["classify"]
    lora, base = f["methods"]["lora"]["accuracy"], f["base"]["accuracy"]
    measured = f"classify accuracy: base {base:.2f}, LoRA {lora:.2f} (n={f['n_test']}, chance 0.50)"
    if clearly_above(lora, base, f["n_test"]):
        return measured, SUPPORTED
    return measured, MIXED if lora > base else NOT_SUPPORTED


def claim_lora_placement(F):
    """Every placement tried (c_attn, its q and v slices, the MLP) trains: it cuts the task's val loss to
    half its starting value or less."""
    for t, f in F.items():
        group = f.get("variants", {}).get("lora_place")
        if group:
            measured = f"{t}, val loss at start -> end: " + ", ".join(
                f"{label} ({v['trainable_params']:,} params) {v['val_start']:.2f} -> {v['val_loss']:.3f}"
                for label, v in group.items())
            return measured, all_or_some(v["val_loss"] <= 0.5 * v["val_start"] for v in group.values())
    return "needs the variant runs", NOT_MEASURED


def beats(f, a, b):
    """a does better than b on a task: clearly higher accuracy, or accuracies within noise and a lower val loss."""
    ma, mb = f["methods"][a], f["methods"][b]
    if clearly_above(ma["accuracy"], mb["accuracy"], f["n_test"]):
        return True
    if clearly_above(mb["accuracy"], ma["accuracy"], f["n_test"]):
        return False
    return ma["val_loss"] < mb["val_loss"]


def claim_lora_better(F):
    """LoRA beats each other PEFT method, per task: clearly (2 s.e.) higher accuracy, or accuracies within
    noise and a lower final val loss."""
    parts, flags = [], []
    for t, f in F.items():
        others = [m for m in peft(f) if m != "lora"]
        wins = {m: beats(f, "lora", m) for m in others}
        show = lambda m: f"{m} acc {f['methods'][m]['accuracy']:.2f} val {f['methods'][m]['val_loss']:.3f}"
        parts.append(f"{t}: {show('lora')} vs " + ", ".join(f"{show(m)} ({'LoRA better' if w else 'LoRA not better'})"
                                                            for m, w in wins.items()))
        flags += wins.values()
    return "; ".join(parts), all_or_some(flags)


def claim_lora_more_params(F):
    """1 < LoRA's trainable parameters / prefix tuning's <= 3: supported; > 3: mixed (more, but not
    slightly); <= 1: not supported."""
    f = next(iter(F.values()))
    lora, prefix = f["methods"]["lora"]["trainable_params"], f["methods"]["prefix"]["trainable_params"]
    ratio = lora / prefix
    measured = f"LoRA {lora:,} vs prefix {prefix:,} trainable parameters ({ratio:.2f}x)"
    return measured, SUPPORTED if 1 < ratio <= 3 else MIXED if ratio > 3 else NOT_SUPPORTED


def tuning_claim(F, groups, what):
    """A setting needs tuning when the final val losses over its values spread by TUNE_SPREAD or more,
    relative to the best; one verdict per group, combined with all_or_some."""
    parts, flags = [], []
    for t, f in F.items():
        for g in groups:
            group = f.get("variants", {}).get(g)
            if not group:
                continue
            losses = {k: v["val_loss"] for k, v in group.items()}
            parts.append(f"{t}, {g.replace('_', ' ')}: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()) +
                         f" (spread {100 * spread(list(losses.values())):.0f}%)")
            flags.append(spread(list(losses.values())) >= TUNE_SPREAD)
        if parts:
            break
    return ("; ".join(parts) if parts else f"needs the {what} variant runs"), all_or_some(flags)


def claim_lora_rank(F):
    """The final val losses at r = 2, 8, 32 spread by TUNE_SPREAD or more (relative to the best)."""
    return tuning_claim(F, ["lora_rank"], "rank")


def claim_prefix_efficient(F):
    """Prefix tuning trains <= 1% of the model's parameters: supported; <= 5%: mixed; more: not supported.
    (Reported next to the same prefix on GPT-2 small.)"""
    f = next(iter(F.values()))
    m = f["methods"]["prefix"]
    frac = m["trainable_params"] / f["base_params"]
    P = m["virtual_tokens"]
    small = GPTConfig(**GPT2_SMALL)
    n_small = sum(int(np.prod(s)) for s in param_shapes(small).values())
    frac_small = 2 * small.n_layer * P * small.n_embd / n_small
    measured = (f"prefix trains {m['trainable_params']:,} of {f['base_params']:,} ({100 * frac:.2f}%); the same "
                f"{P} tokens on GPT-2 small: {100 * frac_small:.3f}%")
    return measured, SUPPORTED if frac <= 0.01 else MIXED if frac <= 0.05 else NOT_SUPPORTED


def claim_prefix_generation(F):
    """On each generation task, prefix tuning's accuracy is not clearly below the best PEFT method's and its
    final val loss is within 1.5x of the best PEFT method's (the alternatives one would choose between)."""
    parts, flags = [], []
    for t, f in F.items():
        if f["kind"] != "generate":
            continue
        p = f["methods"]["prefix"]
        best_acc = max(f["methods"][m]["accuracy"] for m in peft(f))
        best_val = min(f["methods"][m]["val_loss"] for m in peft(f))
        parts.append(f"{t}: prefix acc {p['accuracy']:.2f} (best PEFT {best_acc:.2f}), val {p['val_loss']:.3f} "
                     f"(best PEFT {best_val:.3f})")
        flags.append(not clearly_above(best_acc, p["accuracy"], f["n_test"]) and p["val_loss"] <= 1.5 * best_val)
    return ("; ".join(parts) or "needs a generation task"), all_or_some(flags)


def claim_prefix_narrower(F):
    """Against LoRA, prefix tuning does worse on classification than on generation: its val-loss ratio to
    LoRA is larger on classify than on every generation task, and its classify accuracy is below LoRA's.
    Both: supported; one: mixed."""
    gens = [t for t, f in F.items() if f["kind"] == "generate"]
    if "classify" not in F or not gens:
        return "needs the classify task and a generation task (--task all)", NOT_MEASURED
    ratio = {t: F[t]["methods"]["prefix"]["val_loss"] / F[t]["methods"]["lora"]["val_loss"]
             for t in ["classify"] + gens}
    acc = {m: F["classify"]["methods"][m]["accuracy"] for m in ("prefix", "lora")}
    measured = ("prefix/LoRA val loss: " + ", ".join(f"{t} {r:.2f}x" for t, r in ratio.items()) +
                f"; classify accuracy prefix {acc['prefix']:.2f} vs LoRA {acc['lora']:.2f}")
    return measured, both(all(ratio["classify"] > ratio[t] for t in gens), acc["prefix"] < acc["lora"])


def claim_prefix_tuning(F):
    """The final val losses spread by TUNE_SPREAD or more (relative to the best) over the prefix lengths
    P = 3, 10, 25, and over random vs text initialisation. Both groups: supported; one: mixed."""
    return tuning_claim(F, ["prefix_length", "prefix_init"], "prefix")


# (claim as introductions put it, the rule that decides it)
CLAIMS = [
    ("Fine-tuning lets you give more examples than few-shot prompting", claim_more_examples),
    ("Fine-tuning shortens every input (no examples in the prompt)", claim_shorter_inputs),
    ("Fine-tuning can teach complex instructions", claim_complex_instructions),
    ("Fine-tuning can change the structure or tone of responses", claim_structure),
    ("Full fine-tuning is expensive", claim_full_expensive),
    ("Full fine-tuning risks overwriting existing knowledge", claim_full_forgets),
    ("Full fine-tuning needs a full copy of the model per task", claim_full_copy),
    ("PEFT cuts compute", claim_peft_compute),
    ("PEFT preserves knowledge", claim_peft_preserves),
    ("PEFT trains faster", claim_peft_faster),
    ("LoRA applies beyond generation", claim_lora_beyond_generation),
    ("LoRA gives fine control over where it is injected", claim_lora_placement),
    ("LoRA performs better (than the other PEFT methods)", claim_lora_better),
    ("LoRA adds slightly more parameters than prefix tuning", claim_lora_more_params),
    ("LoRA needs its rank tuned", claim_lora_rank),
    ("Prefix tuning is extremely parameter-efficient", claim_prefix_efficient),
    ("Prefix tuning is suited to generation", claim_prefix_generation),
    ("Prefix tuning is narrower than LoRA", claim_prefix_narrower),
    ("Prefix tuning's length and initialization need tuning", claim_prefix_tuning),
]


def rule_text(rule):
    """A rule's docstring on one line, with the thresholds' values in place of their names."""
    text = " ".join(rule.__doc__.split())
    for name, value in (("FORGET_LOSS", f"{FORGET_LOSS:.0%}"), ("FORGET_RECALL", f"{100 * FORGET_RECALL:.0f} points"),
                        ("TUNE_SPREAD", f"{TUNE_SPREAD:.0%}")):
        text = text.replace(name, value)
    return text


def judge_claims(facts):
    """[{claim, measured, verdict, rule}] for every claim in CLAIMS, from facts (see task_facts)."""
    rows = []
    for claim, rule in CLAIMS:
        measured, verdict = rule(facts)
        rows.append({"claim": claim, "measured": measured, "verdict": verdict, "rule": rule_text(rule)})
    return rows


# ----------------------------------------------------------------------------------------------------
# running the comparison

def stats(values):
    """{mean, std, min, max} of the values of one metric over seeds."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


SCALARS = ("accuracy_after", "final_val_loss", "seconds_per_step", "train_seconds", "trainable_params",
           "optimizer_state_bytes", "saved_bytes", "full_copy_bytes", "corpus_loss_after", "fact_recall_after",
           "format_rate", "field_accuracy")


def scalars(run):
    """The per-run numbers that are summarised over seeds."""
    flat = {k: run[k] for k in SCALARS if k in run}
    if run["knowledge_after"] is not None:
        flat["corpus_loss_after"] = run["knowledge_after"]["corpus_loss"]
        flat["fact_recall_after"] = run["knowledge_after"]["fact_recall"]
    return flat


def run_variants(base, tokenizer, task, settings, lrs, main_runs, echo):
    """The VARIANTS groups on one task (seed 0), variant_steps each; a method's main config is the main
    run itself when variant_steps equals its budget. Returns {group: {label: {val_loss, val_start,
    trainable_params, main}}}."""
    done = {}                                        # (method, label or None) -> run: each config runs once

    def run(method, label, make):
        key = (method, None if make is None else label)
        if key not in done:
            if make is None and settings.variant_steps == settings.steps:
                done[key] = main_runs[method][0]
            else:
                config = method_config(method) if make is None else make(task)
                done[key] = finetune(
                    base, tokenizer, config, task, settings.variant_steps, settings.batch_size, lrs[method], 0,
                    settings.variant_steps, out=lambda line: echo(f"[{task.name}/{method} {label}] {line}"),
                    evaluate_test=False, log_interval=settings.variant_steps, n_val=settings.n_val)
        r = done[key]
        return {"val_loss": r["final_val_loss"], "val_start": r["history"]["val_loss"][0],
                "trainable_params": r["trainable_params"], "main": make is None}

    return {group: {label: run(method, label, make) for label, make in configs.items()}
            for group, (method, configs) in VARIANTS.items()}


def run_task(name, world, base, tokenizer, probe, settings, seeds, lrs, out_dir, echo, with_variants):
    """Every method (and seed) on one task, plus its baselines. Returns the task's part of results.json."""
    task = get_task(name, world)
    if settings.n_test:
        task = dataclasses.replace(task, test=task.test[:settings.n_test])
    answers = [a for _, a in task.test]
    echo(f"== task {name}: {len(task.train)} train, {len(task.val)} val, {len(task.test)} test examples ==")
    before = measure_base(base, tokenizer, task, probe)
    few_shot = few_shot_baseline(base, tokenizer, task, before["accuracy"], settings.max_shots)
    echo(f"base model: test accuracy {before['accuracy']:.3f}, corpus loss {before['knowledge']['corpus_loss']:.3f}, "
         f"fact recall {before['knowledge']['fact_recall']:.3f}; few-shot: " +
         ", ".join(f"k={r['k']} {r['accuracy']:.3f} ({r['tokens_per_query']:.0f} tokens)" if r["fits"] else
                   f"k={r['k']} does not fit ({r['tokens_per_query']:.0f} tokens + answer > "
                   f"{base.config.block_size})" for r in few_shot))
    runs = {m: [] for m in METHODS}
    for seed in range(seeds):
        for m in METHODS:
            tag = f"{name}/{m}" + (f"/seed{seed}" if seeds > 1 else "")
            r = finetune(base, tokenizer, method_config(m), task, settings.steps, settings.batch_size, lrs[m], seed,
                         settings.eval_interval, out=lambda line, tag=tag: echo(f"[{tag}] {line}"),
                         save_dir=os.path.join(out_dir, "adapters", tag), probe=probe, before=before,
                         n_val=settings.n_val)
            if name == "record":
                r.update(record_scores(r["predictions_after"], answers))
            echo(f"[{tag}] done: test accuracy {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}, val loss "
                 f"{r['final_val_loss']:.3f}, {r['seconds_per_step'] * 1e3:.0f} ms/step in this run, fact recall "
                 f"{r['knowledge_before']['fact_recall']:.3f} -> {r['knowledge_after']['fact_recall']:.3f}")
            runs[m].append(r)
    echo(f"timing one step of each method in turns, {settings.timing_rounds} rounds")
    step_times = interleaved_step_times(base, tokenizer, task, lrs, settings.batch_size, settings.timing_rounds)
    echo("ms/step (median, timed in turns): " +
         ", ".join(f"{m} {1e3 * t['median']:.0f}" for m, t in step_times.items()))
    result = {"task": name, "kind": task.kind, "n_train": len(task.train), "n_test": len(task.test),
              "step_times": step_times,
              "base": {"accuracy": before["accuracy"], **before["knowledge"],
                       **(record_scores(before["predictions"], answers) if name == "record" else {})},
              "few_shot": few_shot,
              "examples": [{"input": p, "expected": a,
                            "outputs": {"base": before["predictions"][i],
                                        **{m: runs[m][0]["predictions_after"][i] for m in METHODS}}}
                           for i, (p, a) in enumerate(task.test[:3])],
              "runs": {m: [{k: v for k, v in r.items() if k != "predictions_after"} for r in rs]
                       for m, rs in runs.items()},
              "summary": {m: {k: stats([scalars(r)[k] for r in rs]) for k in scalars(rs[0])} for m, rs in runs.items()}}
    if with_variants:
        result["variants"] = run_variants(base, tokenizer, task, settings, lrs, runs, echo)
    return result


def task_facts(t, base):
    """The numbers the claims read, for one task of results.json (means over seeds)."""
    mean = lambda m, k: t["summary"][m][k]["mean"]
    zero_shot = t["few_shot"][0]["tokens_per_query"]          # the plain prompt, as fine-tuned methods read it
    methods = {}
    for m, rs in t["runs"].items():
        curves = [r["history"] for r in rs]
        methods[m] = {
            "accuracy": mean(m, "accuracy_after"), "val_loss": mean(m, "final_val_loss"),
            "val_start": curves[0]["val_loss"][0],
            "val_steps": curves[0]["val_step"],
            "val_losses": list(np.mean([c["val_loss"] for c in curves], axis=0)),
            "seconds_per_step": t["step_times"][m]["median"], "trainable_params": rs[0]["trainable_params"],
            "optimizer_state_bytes": rs[0]["optimizer_state_bytes"], "saved_bytes": rs[0]["saved_bytes"],
            "full_copy_bytes": rs[0]["full_copy_bytes"], "corpus_loss": mean(m, "corpus_loss_after"),
            "fact_recall": mean(m, "fact_recall_after"), "virtual_tokens": rs[0]["virtual_tokens"],
            "tokens_per_query": zero_shot + rs[0]["virtual_tokens"],
            "disable_restores_base": all(r["disable_restores_base"] for r in rs)}
        if "format_rate" in t["summary"][m]:
            methods[m]["format_rate"] = mean(m, "format_rate")
            methods[m]["field_accuracy"] = mean(m, "field_accuracy")
    run0 = t["runs"]["full"][0]
    return {"kind": t["kind"], "n_test": t["n_test"], "n_train": t["n_train"], "steps": run0["steps"],
            "batch_size": run0["batch_size"], "block_size": base.config.block_size,
            "base_params": base.num_parameters(),
            "base": {**t["base"], "tokens_per_query": zero_shot}, "few_shot": t["few_shot"], "methods": methods,
            "variants": t.get("variants", {})}


# ----------------------------------------------------------------------------------------------------
# plots (matplotlib's Agg backend: files only, no window)

COLORS = {"full": "#d62728", "lora": "#1f77b4", "prefix": "#2ca02c", "prompt": "#9467bd", "adapter": "#ff7f0e"}
LABELS = {"full": "full", "lora": "LoRA", "prefix": "prefix", "prompt": "prompt", "adapter": "adapter"}


def smooth(y, n=10):
    """Moving average over n steps (shorter at the start), to read a noisy training loss."""
    y = np.asarray(y, dtype=float)
    c = np.cumsum(np.insert(y, 0, 0.0))
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - n)
    return (c[i] - c[lo]) / (i - lo)


def whiskers(summary, methods, key, scale=1.0):
    """Bar heights (means) and [below, above] whisker lengths (to the min and max over seeds)."""
    mean = np.array([summary[m][key]["mean"] for m in methods]) * scale
    lo = np.array([summary[m][key]["min"] for m in methods]) * scale
    hi = np.array([summary[m][key]["max"] for m in methods]) * scale
    return mean, np.vstack([mean - lo, hi - mean])


def plot_all(results, folder):
    """Write every figure of the comparison into folder; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    some = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "235" else "")     # minor ticks: 2, 3, 5 only
    tasks = results["tasks"]
    names = list(tasks)
    seeds = results["settings"]["seeds"]
    spread_note = f" (lines: mean of {seeds} seeds, bands/whiskers: min to max)" if seeds > 1 else ""
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=110)
        plt.close(fig)
        files.append(name)

    # loss curves: against steps and against training seconds, all methods on one figure per task
    for t in names:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for m, rs in tasks[t]["runs"].items():
            hs = [r["history"] for r in rs]
            steps = np.array(hs[0]["step"])
            seconds = np.mean([h["train_seconds"] for h in hs], axis=0)
            train = np.array([smooth(h["train_loss"]) for h in hs])
            vstep = np.array(hs[0]["val_step"])
            vsec = np.mean([h["val_seconds"] for h in hs], axis=0)
            val = np.array([h["val_loss"] for h in hs])
            for ax, x, vx in ((axes[0], steps, vstep), (axes[1], seconds, vsec)):
                ax.plot(x, train.mean(0), color=COLORS[m], lw=1, alpha=0.45)
                ax.plot(vx, val.mean(0), color=COLORS[m], lw=2, marker="o", ms=3, label=LABELS[m])
                if len(hs) > 1:
                    ax.fill_between(vx, val.min(0), val.max(0), color=COLORS[m], alpha=0.15)
        for ax, xlabel in ((axes[0], "optimizer step"), (axes[1], "training time (seconds, evaluations excluded)")):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)              # 0.5, 1, 2 rather than 5x10^-1
            ax.yaxis.set_minor_formatter(some)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss on answer tokens (nats, log scale)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(title="val (thick), train (thin, smoothed)", fontsize=8, title_fontsize=8)
        axes[0].set_title(f"{t}: loss against steps")
        axes[1].set_title(f"{t}: loss against wall-clock seconds")
        fig.suptitle(f"Fine-tuning on the {t} task, {results['settings']['steps']} steps each{spread_note}",
                     fontsize=10)
        save(fig, f"loss_{t}.png")

    first = tasks[names[0]]
    methods = list(first["runs"])
    x = np.arange(len(methods))
    colors = [COLORS[m] for m in methods]
    ticks = [LABELS[m] for m in methods]

    # trainable parameters, log scale
    fig, ax = plt.subplots(figsize=(7, 4.5))
    counts = [first["runs"][m][0]["trainable_params"] for m in methods]
    ax.bar(x, counts, color=colors)
    ax.axhline(results["model"]["parameters"], color="k", ls="--", lw=1,
               label=f"whole model ({results['model']['parameters']:,})")
    for xi, c in zip(x, counts):
        ax.text(xi, c * 1.15, f"{c:,}", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=results["model"]["parameters"] * 4)
    ax.set_xticks(x, ticks)
    ax.set_ylabel("trainable parameters (log scale)")
    ax.set_title("Parameters each method trains")
    ax.legend(fontsize=8, loc="lower left")
    save(fig, "params.png")

    # task accuracy, per task: after fine-tuning, the base model, the best few-shot prompt
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, t in zip(axes[0], names):
        s = tasks[t]["summary"]
        width = 0.4 if "format_rate" in s[methods[0]] else 0.7
        mean, err = whiskers(s, methods, "accuracy_after")
        left = x - (width / 2 if width < 0.7 else 0)
        ax.bar(left, mean, width, yerr=err if seeds > 1 else None, capsize=3, color=colors)
        for xi, v in zip(left, mean):
            ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
        handles = [Patch(color="gray", label="exact match (test)")]
        if "format_rate" in s[methods[0]]:
            mean, err = whiskers(s, methods, "format_rate")
            ax.bar(x + width / 2, mean, width, yerr=err if seeds > 1 else None, capsize=3, color=colors, alpha=0.4,
                   hatch="//")
            for xi, v in zip(x + width / 2, mean):
                ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
            handles.append(Patch(facecolor="gray", alpha=0.4, hatch="//", label="answer in record format"))
        handles.append(ax.axhline(tasks[t]["base"]["accuracy"], color="k", ls="--", lw=1,
                                  label="base model, no fine-tuning"))
        shots = [r for r in tasks[t]["few_shot"] if r["fits"] and r["k"] > 0]
        if shots:
            best = max(shots, key=lambda r: r["accuracy"])
            handles.append(ax.axhline(best["accuracy"], color="gray", ls=":", lw=1.5,
                                      label=f"base model, best few-shot (k={best['k']})"))
        if tasks[t]["kind"] == "classify":
            handles.append(ax.axhline(0.5, color="gray", ls="-.", lw=1, label="chance"))
        ax.set_xticks(x, ticks)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy (fraction of test examples)")
        ax.set_title(f"{t}: test accuracy after fine-tuning (n={tasks[t]['n_test']})")
        ax.legend(handles=handles, fontsize=7, loc="upper right")
    save(fig, "accuracy.png")

    # forgetting: corpus loss and fact recall, before and after, with the method active
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(names)
    for j, t in enumerate(names):
        s, base = tasks[t]["summary"], tasks[t]["base"]
        offset = (j - (len(names) - 1) / 2) * width
        for ax, key, before in ((axes[0], "corpus_loss_after", base["corpus_loss"]),
                                (axes[1], "fact_recall_after", base["fact_recall"])):
            mean, err = whiskers(s, methods, key)
            ax.bar(x + offset, mean, width, yerr=err if seeds > 1 else None, capsize=3, color=colors,
                   alpha=1.0 - 0.3 * j, edgecolor="k", lw=0.5)
            for xi, v in zip(x + offset, mean):
                ax.text(xi, v, f"{v:.2f}" + (f"\n{t[0]}" if len(names) > 1 else ""), ha="center", va="bottom",
                        fontsize=7)
    base = tasks[names[0]]["base"]
    axes[0].axhline(base["corpus_loss"], color="k", ls="--", lw=1,
                    label=f"before (pretrained): {base['corpus_loss']:.3f}")
    axes[1].axhline(base["fact_recall"], color="k", ls="--", lw=1,
                    label=f"before (pretrained): {base['fact_recall']:.2f}")
    top = max(max(tasks[t]["summary"][m]["corpus_loss_after"]["max"] for m in methods) for t in names)
    axes[0].set_ylim(0, 1.35 * max(top, base["corpus_loss"]))
    axes[0].set_ylabel("loss (nats per character)")
    axes[0].set_title("Pretraining corpus: validation loss after fine-tuning\n(higher = forgot more)")
    axes[1].set_ylabel("fraction of facts recalled")
    axes[1].set_ylim(0, 1.25)
    axes[1].set_title("Fact recall (cloze, greedy) after fine-tuning\n(lower = forgot more)")
    for ax in axes:
        ax.set_xticks(x, ticks)
        ax.legend(fontsize=8, loc="upper left", title="PEFT measured with the adapter on" +
                  (f"; letters: task ({', '.join(names)})" if len(names) > 1 else ""), title_fontsize=7)
    save(fig, "forgetting.png")

    # seconds per step: timed in turns (bars, quartile whiskers), and as measured during each run (dots)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for j, t in enumerate(names):
        timing = tasks[t]["step_times"]
        median = np.array([timing[m]["median"] for m in methods]) * 1e3
        quartiles = np.array([[timing[m]["median"] - timing[m]["q1"], timing[m]["q3"] - timing[m]["median"]]
                              for m in methods]).T * 1e3
        offset = (j - (len(names) - 1) / 2) * width
        ax.bar(x + offset, median, width, yerr=quartiles, capsize=3, color=colors, alpha=1.0 - 0.3 * j,
               edgecolor="k", lw=0.5)
        for xi, v, up in zip(x + offset, median, quartiles[1]):
            ax.text(xi, v + up, f"{v:.0f}" + (f"\n{t[0]}" if len(names) > 1 else ""), ha="center", va="bottom",
                    fontsize=7)
        in_run = [[r["seconds_per_step"] * 1e3 for r in tasks[t]["runs"][m]] for m in methods]
        for xi, values in zip(x + offset, in_run):
            ax.plot([xi] * len(values), values, "k.", ms=6)
    ax.set_xticks(x, ticks)
    ax.set_ylabel("milliseconds per optimizer step")
    ax.set_title(f"Time per step (batch {results['settings']['batch_size']}; forward, backward, AdamW)"
                 + (f"\nletters: task ({', '.join(names)})" if len(names) > 1 else ""), fontsize=10)
    ax.legend(handles=[Patch(color="gray", label="median, methods timed in turns (whiskers: quartiles)"),
                       ax.plot([], [], "k.", ms=6, label="median during the training run (one after another)")[0]],
              fontsize=8, loc="upper right")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
    save(fig, "step_time.png")

    # memory: optimizer state and saved file, next to a full copy of the model
    fig, ax = plt.subplots(figsize=(8, 4.5))
    opt = [first["runs"][m][0]["optimizer_state_bytes"] for m in methods]
    saved = [first["runs"][m][0]["saved_bytes"] for m in methods]
    copy = first["runs"][methods[0]][0]["full_copy_bytes"]
    ax.bar(x - 0.2, opt, 0.4, color=colors)
    ax.bar(x + 0.2, saved, 0.4, color=colors, alpha=0.45, hatch="//")
    for xi, o, s_ in zip(x, opt, saved):
        ax.text(xi - 0.2, o * 1.15, fmt_bytes(o), ha="center", fontsize=7)
        ax.text(xi + 0.2, s_ * 1.15, fmt_bytes(s_), ha="center", fontsize=7)
    line = ax.axhline(copy, color="k", ls="--", lw=1, label=f"a full copy of the model ({fmt_bytes(copy)})")
    ax.set_yscale("log")
    ax.set_ylim(top=max(max(opt), copy) * 5)
    ax.set_xticks(x, ticks)
    ax.set_ylabel("bytes (log scale)")
    ax.set_title("Memory for training, and storage per task")
    ax.legend(handles=[Patch(color="gray", label="AdamW state (m and v) while training"),
                       Patch(facecolor="gray", alpha=0.45, hatch="//", label="saved file (save_pretrained)"), line],
              fontsize=8, loc="upper right")
    save(fig, "memory.png")

    # the variants: does the setting matter?
    variants = next((tasks[t]["variants"] for t in names if tasks[t].get("variants")), None)
    if variants:
        fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 4), squeeze=False)
        for ax, (group, rows) in zip(axes[0], variants.items()):
            labels = list(rows)
            vals = [rows[k]["val_loss"] for k in labels]
            ax.bar(range(len(labels)), vals, color=COLORS[VARIANTS[group][0]],
                   alpha=0.85, edgecolor="k", lw=0.5)
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.3f}\n{rows[labels[i]]['trainable_params']:,} p", ha="center", va="bottom",
                        fontsize=7)
            ax.set_xticks(range(len(labels)), [k + ("*" if rows[k]["main"] else "") for k in labels])
            ax.set_ylim(0, max(vals) * 1.3)
            ax.set_ylabel("final val loss (nats)")
            ax.set_title(group.replace("_", " "), fontsize=10)
        fig.suptitle(f"Settings of LoRA and prefix tuning ({results['settings']['variant_steps']} steps each, task "
                     f"{next(t for t in names if tasks[t].get('variants'))}; p = trainable parameters; * = the setting "
                     f"of the main comparison)", fontsize=10)
        save(fig, "variants.png")
    return files


# ----------------------------------------------------------------------------------------------------
# tables: the terminal's and the report's

def pm_text(s, fmt, scale=1.0, seeds=1):
    """'mean' or 'mean ± std' (over seeds) of one summarised metric."""
    text = format(s["mean"] * scale, fmt)
    return text + " ± " + format(s["std"] * scale, fmt) if seeds > 1 else text


def results_rows(t, seeds, lrs):
    """Header and rows of one task's results table."""
    header = ["method", "trainable", "lr", "test acc", "val loss", "ms/step", "optimizer", "saved",
              "corpus loss", "fact recall"]
    record = "format_rate" in next(iter(t["summary"].values()))
    if record:
        header.insert(4, "format ok")
    base = t["base"]
    rows = [["base (before)", "0", "-", f"{base['accuracy']:.3f}"] + ([f"{base['format_rate']:.3f}"] if record else [])
            + ["-", "-", "-", "-", f"{base['corpus_loss']:.3f}", f"{base['fact_recall']:.3f}"]]
    for m, s in t["summary"].items():
        r = t["runs"][m][0]
        row = [LABELS[m], f"{r['trainable_params']:,}", f"{lrs[m]:g}", pm_text(s["accuracy_after"], ".3f", seeds=seeds)]
        if record:
            row.append(pm_text(s["format_rate"], ".3f", seeds=seeds))
        row += [pm_text(s["final_val_loss"], ".3f", seeds=seeds), f"{1e3 * t['step_times'][m]['median']:.0f}",
                fmt_bytes(r["optimizer_state_bytes"]), fmt_bytes(r["saved_bytes"]),
                pm_text(s["corpus_loss_after"], ".3f", seeds=seeds),
                pm_text(s["fact_recall_after"], ".3f", seeds=seeds)]
        rows.append(row)
    return header, rows


def text_table(header, rows):
    """A plain-text table: numbers right-aligned, words left-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    number = re.compile(r"[-+]?[\d.,]+( ± [\d.,]+)?( [KMG]?B)?|-")
    column_of_numbers = [all(number.fullmatch(str(r[i])) for r in rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) if num else str(c).ljust(w)
                                   for c, w, num in zip(cells, widths, column_of_numbers))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header, rows):
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def load_note(timing):
    """Why wall time and CPU time differ, read off the two."""
    wall, cpu = timing["total_seconds"], timing["cpu_seconds"]
    if wall > 1.2 * cpu:
        return " (less CPU than wall time: other programs were using the cores too, so timings are slower than alone)"
    if cpu > 1.2 * wall:
        return " (more CPU than wall time: the matrix products used several cores)"
    return ""


def write_report(results, path, figures):
    s, tasks = results["settings"], results["tasks"]
    seeds, lrs = s["seeds"], results["learning_rates"]
    p = results["pretrain"]
    lines = [
        "# Fine-tuning methods, side by side",
        "",
        f"Written by `{results['command']}`. Every number here was computed by that run; the verdicts at the end",
        "are computed from them by the rules listed before the table (tinyllm/compare.py, `CLAIMS`).",
        "",
        "## Setup",
        "",
        f"- Base model: `{p['checkpoint']}`, a {results['model']['parameters']:,}-parameter GPT "
        f"({results['model']['config']['n_layer']} layers, {results['model']['config']['n_embd']} wide, context "
        f"{results['model']['config']['block_size']}), " +
        (f"pretrained by this run in {p['seconds']:.0f} s." if p["made_now"] else "reused (pretrained earlier)."),
        f"- Each method: {s['steps']} steps of {s['batch_size']} examples, the same for all; loss on the answer tokens "
        f"only; AdamW, warmup then cosine decay, gradient clipping at 1 (tinyllm.train.train); {seeds} seed(s)"
        + (" (tables show mean ± std)." if seeds > 1 else "."),
        "- Learning rates (tuned per method, see `LRS` in tinyllm/compare.py for the measurements): " +
        ", ".join(f"{LABELS[m]} {lrs[m]:g}" for m in METHODS) + ".",
        "- Methods: " + "; ".join(f"{LABELS[m]}: {tasks[next(iter(tasks))]['runs'][m][0]['formula']}"
                                  for m in METHODS) + ".",
        "- Forgetting: loss on fixed windows of the pretraining corpus's validation split and greedy recall of every "
        "fact (\"mia lives in\" -> \" oslo\", whatever punctuation follows), before and after; PEFT methods measured "
        "with the adapter on.",
        f"- Timings: measured on this machine ({results['timing']['cpu_note']}); total wall time "
        f"{results['timing']['total_seconds']:.0f} s (" +
        (f"pretraining {results['timing']['pretrain_seconds']:.0f} s, " if p["made_now"] else "") +
        f"fine-tuning and evaluation {results['timing']['compare_seconds']:.0f} s), "
        f"{results['timing']['cpu_seconds']:.0f} CPU seconds in this process{load_note(results['timing'])}.",
        "",
    ]
    for name, t in tasks.items():
        header, rows = results_rows(t, seeds, lrs)
        lines += [f"## Task `{name}`", "",
                  f"{t['n_train']} training examples, {t['n_test']} test examples. test acc: "
                  + ("exact match of greedy decoding" if t["kind"] == "generate"
                     else "the label scored higher, as a classifier head")
                  + ("; format ok: the answer has the record's structure" if name == "record" else "") + ". "
                  "ms/step: median of steps timed in turns with the other methods (fair under a changing load). "
                  "optimizer: AdamW's m and v. saved: the files save_pretrained writes.", "",
                  md_table(header, rows), "",
                  "Few-shot prompting of the base model (no training), in a context of "
                  f"{results['model']['config']['block_size']} tokens:", "",
                  md_table(["k shots", "tokens per query", "fits", "test accuracy"],
                           [[r["k"], f"{r['tokens_per_query']:.0f}", "yes" if r["fits"] else "no",
                             "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"] for r in t["few_shot"]]), "",
                  "Examples (greedy answers on the first test prompts):", ""]
        for ex in t["examples"]:
            lines.append(f"- `{ex['input']!r}` -> expected `{ex['expected']!r}`")
            lines += [f"    - {k}: `{v!r}`" for k, v in ex["outputs"].items()]
        if t.get("variants"):
            lines += ["", f"Variants ({s['variant_steps']} steps each, seed 0, final val loss):", "",
                      md_table(["setting", "value", "trainable", "val loss at start", "final val loss"],
                               [[g.replace("_", " "), label, f"{v['trainable_params']:,}", f"{v['val_start']:.3f}",
                                 f"{v['val_loss']:.3f}"]
                                for g, rows_ in t["variants"].items() for label, v in rows_.items()])]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    lines += ["## How each verdict is decided", "",
              "Where a rule has several cases (tasks, methods, settings) it is supported if every case holds, not "
              "supported if none does, mixed otherwise, and not measured if the run had no case. \"Clearly\" means by "
              "more than two standard errors of the difference of two accuracies on the test set (`noise`).", ""]
    lines += [f"{i}. **{c['claim']}**: {c['rule']}" for i, c in enumerate(results["claims"], 1)] + [""]
    lines += ["## Claims, measured at this scale", "",
              md_table(["#", "claim", "what we measured", "verdict"],
                       [[i, c["claim"], c["measured"], f"**{c['verdict']}**"]
                        for i, c in enumerate(results["claims"], 1)])]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------
# the command

def compare(task="record", steps=None, seeds=1, out=DEFAULT_OUT, checkpoint=None, quick=False, echo=default_out,
            lrs=None, settings=None, variants=True, command="python -m tinyllm compare"):
    """Fine-tune every method on task ("record", "qa", "classify" or "all") from one pretrained checkpoint,
    measure, judge the claims, and write results.json, report.md and the plots into out.

    checkpoint: the pretrained model; made with tinyllm.train.pretrain when the file does not exist. Default
      runs/pretrain/ckpt.npz, or with quick <out>/pretrain/ckpt.npz (a tiny pretraining, never the shared one).
    steps: overrides settings.steps; settings: a Settings (DEFAULT_SETTINGS, or QUICK_SETTINGS with quick).
    Returns: the results dict (also in results.json).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    settings = dataclasses.replace(settings or (QUICK_SETTINGS if quick else DEFAULT_SETTINGS))
    if steps is not None:
        settings.steps = steps
        settings.variant_steps = min(settings.variant_steps, steps)
    if settings.steps < 1 or seeds < 1:
        raise ValueError(f"steps and seeds must be at least 1, got steps={settings.steps}, seeds={seeds}")
    names = list(TASKS) if task == "all" else [task]
    if any(n not in TASKS for n in names):
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or all")
    lrs = {**LRS, **(lrs or {})}
    checkpoint = checkpoint or (os.path.join(out, "pretrain", "ckpt.npz") if quick else DEFAULT_CHECKPOINT)
    os.makedirs(out, exist_ok=True)

    made_now = not os.path.exists(checkpoint)
    if made_now:
        echo(f"no pretrained model at {checkpoint}: pretraining one first" + (" (quick)" if quick else ""))
        result = pretrain(out=checkpoint, quick=quick, echo=lambda line: echo(f"[pretrain] {line}"),
                          resume_command=f"python -m tinyllm pretrain --resume {checkpoint}")
        if result["history"]["status"] != "completed":
            raise KeyboardInterrupt
    pretrain_seconds = time.perf_counter() - start
    base, tokenizer, meta = load_pretrained(checkpoint)
    data = meta["data"]
    echo(f"base model: {checkpoint} ({base.num_parameters():,} parameters, pretrained {meta.get('step', '?')} steps)")
    world = World(data["world_seed"], data["n_people"])
    probe = knowledge_probe(data, tokenizer, base.config.block_size, n_windows=settings.probe_windows)
    if settings.n_recall:
        probe["recall"] = probe["recall"][:settings.n_recall]

    tasks = {}
    for i, name in enumerate(names):
        tasks[name] = run_task(name, world, base, tokenizer, probe, settings, seeds, lrs, out, echo,
                               with_variants=variants and i == 0)
    facts = {name: task_facts(t, base) for name, t in tasks.items()}
    results = {
        "command": command, "settings": {**dataclasses.asdict(settings), "seeds": seeds, "task": task},
        "learning_rates": lrs,
        "pretrain": {"checkpoint": checkpoint, "made_now": made_now, "seconds": pretrain_seconds if made_now else 0.0},
        "model": {"config": base.config.to_dict(), "parameters": base.num_parameters()},
        "tasks": tasks, "claims": judge_claims(facts),
    }
    figures = plot_all(results, out)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    results["timing"] = {"total_seconds": total, "cpu_seconds": cpu,
                         "pretrain_seconds": pretrain_seconds if made_now else 0.0,
                         "compare_seconds": total - (pretrain_seconds if made_now else 0.0),
                         "cpu_note": f"{os.cpu_count()} CPU cores"}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    write_report(results, os.path.join(out, "report.md"), figures)

    for name, t in tasks.items():
        echo(f"\n{name}: after {settings.steps} steps of {settings.batch_size}"
             + (f", {seeds} seeds (mean ± std)" if seeds > 1 else ""))
        echo(text_table(*results_rows(t, seeds, lrs)))
    echo("\nclaims (rules and numbers in report.md):")
    echo(text_table(["verdict", "claim"], [[c["verdict"], c["claim"]] for c in results["claims"]]))
    echo(f"\nwrote {out}/results.json, report.md and {len(figures)} plots in {duration(total)}"
         + (f" (pretraining {duration(results['timing']['pretrain_seconds'])}, then "
            f"{duration(results['timing']['compare_seconds'])} of fine-tuning and evaluation)" if made_now else ""))
    return results
