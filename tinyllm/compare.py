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
  5. compute the claims' verdicts from the numbers, by the rules in tinyllm/claims.py (CLAIMS)
  6. write results.json, the plots and report.md (tinyllm/report.py); print the table

Every verdict is computed: a rule reads the measured numbers and returns supported, not supported, mixed
or not measured (when the run did not include what the claim needs, e.g. a classification task).
"""
import copy
import dataclasses
import json
import os
import re
import time

import numpy as np

from .checkpoint import load_pretrained
from .claims import judge_claims
from .data import World
from .finetune import finetune, knowledge_probe, measure_base, task_batches
from .optim import AdamW, clip_grad_norm
from .peft import (AdapterConfig, FullFineTuningConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                   get_peft_model)
from .peft.peft_model import reserved_positions
from .report import plot_all, results_rows, text_table, write_report
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
# running the comparison

def stats(values):
    """{mean, std, min, max} of the values of one metric over seeds."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


SCALARS = ("accuracy_after", "final_val_loss", "seconds_per_step", "train_seconds", "trainable_params",
           "optimizer_state_bytes", "saved_bytes", "full_copy_bytes", "corpus_loss_after", "fact_recall_after",
           "format_rate", "field_accuracy")


def summarise(flat_runs):
    """{metric: stats over seeds} from each seed's scalars()."""
    return {k: stats([f[k] for f in flat_runs]) for k in flat_runs[0]}


def scalars(run):
    """The per-run numbers that are summarised over seeds (those of SCALARS the run has)."""
    knowledge = run["knowledge_after"] or {}
    flat = {**run, "corpus_loss_after": knowledge.get("corpus_loss"), "fact_recall_after": knowledge.get("fact_recall")}
    return {k: flat[k] for k in SCALARS if flat.get(k) is not None}


def run_variants(base, tokenizer, task, settings, lrs, main_runs, echo):
    """The VARIANTS groups on one task (seed 0), variant_steps each; a method's main config is the main
    run itself when variant_steps equals its budget. Returns {group: {label: {method, val_loss, val_start,
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
        return {"method": method, "val_loss": r["final_val_loss"], "val_start": r["history"]["val_loss"][0],
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
              "summary": {m: summarise([scalars(r) for r in rs]) for m, rs in runs.items()}}
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
    pretrain_seconds = time.perf_counter() - start if made_now else 0.0
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
        "pretrain": {"checkpoint": checkpoint, "made_now": made_now, "seconds": pretrain_seconds},
        "model": {"config": base.config.to_dict(), "parameters": base.num_parameters()},
        "tasks": tasks, "claims": judge_claims(facts),
    }
    figures = plot_all(results, out)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    results["timing"] = {"total_seconds": total, "cpu_seconds": cpu,
                         "pretrain_seconds": pretrain_seconds,
                         "compare_seconds": total - pretrain_seconds,
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
