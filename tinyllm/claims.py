"""
The claims an introduction to fine-tuning makes, and the rules that decide each one from the numbers
`python -m tinyllm compare` measured (tinyllm.compare.task_facts gathers them).

A rule reads the facts and returns (what it measured, verdict): supported, not supported, mixed, or not
measured when the run did not include what the claim needs (e.g. a classification task). Its docstring
is the rule as the report prints it; the thresholds below appear there with their values.
"""
import math

from .memory import base_count
from .model import GPT2_SMALL, GPTConfig

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
    n_small = base_count(small)
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

