"""
The comparison behind `python -m tinyllm compare`: six fine-tuning methods on one pretrained model and
one task, each at its own tuned learning rate and step budget, over several seeds, and every claim an
introduction to fine-tuning makes turned into a number and a verdict that accounts for the noise.

    results = compare(task="extract", seeds=3)      # writes runs/compare/{results.json, report.md, *.png}
    for c in results["claims"]: print(c["claim"], c["verdict"])

The steps:
  1. load the pretrained checkpoint (pretrain one first if there is none)
  2. each method's learning rate and step budget from the sweep (tinyllm/sweeps/<task>/, made by
     `python -m tinyllm sweep`, which tuned them on validation data)
  3. the base model: its test accuracy, its answers' format, its knowledge; few-shot prompting of it
  4. fine-tune full, LoRA, prefix, prompt, adapter and (IA)^3 for every seed (tinyllm.finetune.finetune)
  5. one training step of every method, timed in turns
  6. task after task: full fine-tuning continued on a second task, and a second LoRA adapter on the base
  7. the claims' verdicts (tinyllm/claims.py); plots and report.md (tinyllm/report.py); results.json

`quick=True` (--quick) is a smoke test: a tiny pretraining and a few steps, to prove the code runs. It
states no verdicts.
"""
import copy
import dataclasses
import json
import os
import time

import numpy as np

from .checkpoint import atomic_open, load_pretrained
from .claims import judge_claims
from .data import World
from .finetune import finetune, knowledge_probe, measure_base, task_batches
from .optim import AdamW, clip_grad_norm
from .peft import PeftModel, get_peft_model
from .peft.peft_model import reserved_positions
from .peft.saving import base_fingerprint
from .presets import DEFAULT_TASK, MAIN_METHODS, method_config, sweep_variants, tuned
from .report import plot_all, results_rows, text_table, write_report
from .sweep import BATCH_SIZE, N_VAL, SELECT_SEED, VARIANT_SEEDS
from .sweep import SEEDS as SWEEP_SEEDS
from .tasks import TASKS, evaluate, few_shot_task, format_ok, get_task
from .pretrain import PRETRAIN_OUT, pretrain
from .train import default_out, duration, forward_backward

DEFAULT_CHECKPOINT = PRETRAIN_OUT
DEFAULT_OUT = "runs/compare"
SECOND_TASK = {"extract": "qa", "record": "qa", "qa": "extract", "classify": "extract"}   # task after task


@dataclasses.dataclass
class Settings:
    seeds: int = 3                # runs per method, seeds first_seed, first_seed + 1, ...
    first_seed: int = 0
    steps: int | None = None      # None: each method's budget from the sweep; a number: that many for all
    batch_size: int = BATCH_SIZE  # examples per step (the sweep's)
    eval_points: int = 10         # validation losses per run (and one at step 0)
    n_val: int = N_VAL            # val examples in the validation loss (the sweep's)
    n_test: int | None = None     # test examples per task (None: all of them)
    n_recall: int | None = None   # facts in the fact-recall probe (None: all, 6 per person)
    probe_windows: int = 16       # corpus windows in the knowledge probe
    max_shots: int = 8            # the largest k tried for few-shot prompting
    timing_rounds: int = 20       # rounds of interleaved step timing (one step of every method per round)
    sequential: bool = True       # run the task-after-task experiment
    fallback_steps: int = 500     # a method's budget when the sweep has not covered the task
    smoke: bool = False           # a --quick run: no verdicts


DEFAULT_SETTINGS = Settings()
QUICK_SETTINGS = Settings(seeds=2, steps=4, batch_size=2, eval_points=2, n_val=4, n_test=4, n_recall=4,
                          probe_windows=2, max_shots=2, timing_rounds=2, smoke=True)


# ----------------------------------------------------------------------------------------------------
# measurements besides the training runs

def few_shot_baseline(model, tokenizer, task, max_shots):
    """The base model prompted with k solved examples, for k = 0, 1, ... while they fit in the context.

    Returns: list of {k, tokens_per_query (mean prompt tokens), fits, accuracy and correct (per test example;
    None when it does not fit)}; the last row is the first k that does not fit (or max_shots).
    """
    block_size = model.config.block_size
    rows = []
    for k in range(max_shots + 1):
        shot = few_shot_task(task, k) if k else task
        sizes = [(len(tokenizer.encode(p)), len(tokenizer.encode(a))) for p, a in shot.test]
        fits = all(p + a - 1 <= block_size for p, a in sizes)      # the prompt and its answer, as generated
        ev = evaluate(model, tokenizer, shot) if fits else {"accuracy": None, "correct": None}
        rows.append({"k": k, "tokens_per_query": float(np.mean([p for p, _ in sizes])), "fits": fits,
                     "accuracy": ev["accuracy"], "correct": ev["correct"]})
        if not fits:
            break
    return rows


def interleaved_step_times(base, tokenizer, task, lrs, batch_size, rounds, seed=0):
    """Seconds per training step of every method, timed in turns: one step of each method, then again, for
    `rounds` rounds, all on the same batches. When other programs load the machine, every method is slowed
    alike, which timing the methods one after the other (as the training runs are) cannot promise.

    A step is what train() does: forward and backward over all cores, gradient clipping, AdamW. The first round warms up and
    is not counted. Returns {method: {median, q1, q3 (seconds), log_ratio_mean, log_ratio_se, n}}: the
    ratio is to full fine-tuning's step in the same round, so a load that comes and goes cancels out.
    """
    steppers = {}
    for m in MAIN_METHODS:
        pm = get_peft_model(copy.deepcopy(base), method_config(m), tokenizer=tokenizer, seed=seed)
        steppers[m] = (pm, AdamW(pm.trainable_parameters(), lr=lrs[m]))
    room = max(reserved_positions(method_config(m)) for m in MAIN_METHODS)
    get_batch = task_batches(tokenizer, task, base.config.block_size, batch_size, reserved=room)
    rng = np.random.default_rng(seed)
    times = {m: [] for m in MAIN_METHODS}
    for _ in range(rounds + 1):
        x, y = get_batch("train", rng)
        for m, (pm, optimizer) in steppers.items():
            start = time.perf_counter()
            _, grads = forward_backward(pm, x, y, None)
            clip_grad_norm(grads, 1.0)
            optimizer.step(grads)
            times[m].append(time.perf_counter() - start)
    out = {}
    for m, t in times.items():
        t = np.array(t[1:])
        logs = np.log(t / np.array(times["full"][1:]))
        q1, median, q3 = np.percentile(t, [25, 50, 75])
        out[m] = {"median": float(median), "q1": float(q1), "q3": float(q3), "log_ratio_mean": float(logs.mean()),
                  "log_ratio_se": float(logs.std(ddof=1) / np.sqrt(len(logs))) if len(logs) > 1 else float("inf"),
                  "n": len(logs)}
    return out


def stats(values):
    """{mean, std, min, max, values} of one metric over seeds."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "values": [float(v) for v in a]}


SCALARS = ("accuracy_after", "format_rate", "final_val_loss", "corpus_loss_after", "fact_recall_after",
           "seconds_per_step", "train_seconds", "trainable_params", "optimizer_state_bytes", "saved_bytes")


def scalars(run):
    """The per-run numbers that are summarised over seeds (those of SCALARS the run has)."""
    knowledge = run["knowledge_after"] or {}
    flat = {**run, "corpus_loss_after": knowledge.get("corpus_loss"), "fact_recall_after": knowledge.get("fact_recall")}
    return {k: flat[k] for k in SCALARS if flat.get(k) is not None}

# ----------------------------------------------------------------------------------------------------
# running the comparison


def budgets(task_name, settings):
    """{method: {lr, steps, flattened, source}}: the sweep's choice, with --steps or a fallback applied."""
    out = tuned(task_name)
    for t in out.values():
        if settings.steps is not None:
            t.update(steps=settings.steps, flattened=None, source=t["source"] + f" (steps set to {settings.steps})")
        elif t["steps"] is None:
            t["steps"] = settings.fallback_steps
    return out


def train_method(base, tok, task, m, tuning, seed, settings, probe, before, out_dir, echo):
    """One method, one seed. Returns (its results, the trained PeftModel)."""
    tag = f"{task.name}/{m}/seed{seed}"
    steps = tuning["steps"]
    r, pm = finetune(base, tok, method_config(m), task, steps, settings.batch_size, tuning["lr"], seed,
                     eval_interval=max(1, steps // settings.eval_points), out=lambda line: echo(f"[{tag}] {line}"),
                     save_dir=os.path.join(out_dir, "adapters", tag), probe=probe, before=before,
                     n_val=settings.n_val, log_interval=max(1, steps // 4), return_model=True)
    if task.kind == "generate":
        r["format_ok"] = format_ok(r["predictions_after"], task)
        r["format_rate"] = float(np.mean(r["format_ok"]))
    recall = (f", fact recall {r['knowledge_before']['fact_recall']:.3f} -> {r['knowledge_after']['fact_recall']:.3f}"
              if r["knowledge_after"] else "")
    echo(f"[{tag}] test accuracy {r['accuracy_after']:.3f}, val loss {r['final_val_loss']:.3f}"
         f"{'' if r['flattened'] else ' (still falling at the end)'}{recall}")
    return r, pm


def run_sequential(base, tok, world, task, models, seeds, settings, probe, out_dir, echo):
    """Task after task. Full fine-tuning: the model fine-tuned on task A, fine-tuned again on task B; then
    its accuracy on A. LoRA: a second adapter trained on B from the base; both adapters loaded on one base
    with PeftModel.load_adapter, each judged on its own task. Returns per-seed lists."""
    task_b = get_task(SECOND_TASK[task.name], world)
    if settings.n_test:
        task_b = dataclasses.replace(task_b, test=task_b.test[:settings.n_test])
    tuning_b = budgets(task_b.name, settings)
    out = {"task_b": task_b.name, "peft": "lora", "n_test_a": len(task.test), "n_test_b": len(task_b.test),
           "tuning_b": {m: tuning_b[m] for m in ("full", "lora")},
           "full": {"a": [], "b": [], "a_after_b": []}, "adapter": {"a": [], "b": []}}   # per seed, per example
    for seed in seeds:
        full_a = models[("full", seed)].base_model              # full fine-tuning's model: the base it trained
        r_full, pm_full = train_method(full_a, tok, task_b, "full", tuning_b["full"], seed, settings, None, None,
                                       out_dir, echo)
        out["full"]["a"].append(evaluate(full_a, tok, task)["correct"])
        out["full"]["b"].append(r_full["correct_after"])
        out["full"]["a_after_b"].append(evaluate(pm_full, tok, task)["correct"])
        train_method(base, tok, task_b, "lora", tuning_b["lora"], seed, settings, None, None, out_dir, echo)
        both = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(out_dir, "adapters", task.name, "lora",
                                                                           f"seed{seed}"), adapter_name=task.name)
        both.load_adapter(os.path.join(out_dir, "adapters", task_b.name, "lora", f"seed{seed}"), task_b.name)
        for name, which, t in ((task.name, "a", task), (task_b.name, "b", task_b)):
            both.set_adapter(name)
            out["adapter"][which].append(evaluate(both, tok, t)["correct"])
        acc = lambda who, which: float(np.mean(out[who][which][-1]))
        echo(f"task after task, seed {seed}: full {task.name} {acc('full', 'a'):.3f} -> {acc('full', 'a_after_b'):.3f} "
             f"after {task_b.name}; LoRA adapters on one base: {task.name} {acc('adapter', 'a'):.3f}, "
             f"{task_b.name} {acc('adapter', 'b'):.3f}")
    return out


def run_task(name, world, base, tokenizer, probe, settings, out_dir, echo):
    """Every method and seed on one task, its baselines and the task after it. Returns its part of
    results.json."""
    task = get_task(name, world)
    if settings.n_test:
        task = dataclasses.replace(task, test=task.test[:settings.n_test])
    tuning = budgets(name, settings)
    seeds = list(range(settings.first_seed, settings.first_seed + settings.seeds))
    echo(f"== task {name}: {len(task.train)} train, {len(task.val)} val, {len(task.test)} test examples; "
         "lr and steps per method: " + ", ".join(f"{m} {t['lr']:g}/{t['steps']}" for m, t in tuning.items())
         + ("" if all(t["source"] != "fallback" for t in tuning.values()) else
            f" (no sweep for some methods on {name}: they use a preset lr and {settings.fallback_steps} steps, "
            f"not tuned; python -m tinyllm sweep --task {name} tunes them)") + " ==")
    before = measure_base(base, tokenizer, task, probe)
    few_shot = few_shot_baseline(base, tokenizer, task, settings.max_shots)
    echo(f"base model: test accuracy {before['accuracy']:.3f}, corpus loss {before['knowledge']['corpus_loss']:.3f}, "
         f"fact recall {before['knowledge']['fact_recall']:.3f}; few-shot: " +
         ", ".join(f"k={r['k']} {r['accuracy']:.3f} ({r['tokens_per_query']:.0f} tokens)" if r["fits"] else
                   f"k={r['k']} does not fit" for r in few_shot))
    runs, models = {m: [] for m in MAIN_METHODS}, {}
    for seed in seeds:
        for m in MAIN_METHODS:
            r, pm = train_method(base, tokenizer, task, m, tuning[m], seed, settings, probe, before, out_dir, echo)
            runs[m].append(r)
            if m == "full":
                models[(m, seed)] = pm
    echo(f"timing one step of each method in turns, {settings.timing_rounds} rounds")
    step_times = interleaved_step_times(base, tokenizer, task, {m: t["lr"] for m, t in tuning.items()},
                                        settings.batch_size, settings.timing_rounds)
    echo("ms/step (median, timed in turns): " + ", ".join(f"{m} {1e3 * t['median']:.0f}" for m, t in step_times.items()))
    sequential = None
    if settings.sequential and name in SECOND_TASK:
        sequential = run_sequential(base, tokenizer, world, task, models, seeds, settings, probe, out_dir, echo)
    base_row = {"accuracy": before["accuracy"], "correct": before["correct"], **before["knowledge"]}
    if task.kind == "generate":
        base_row["format_ok"] = format_ok(before["predictions"], task)
        base_row["format_rate"] = float(np.mean(base_row["format_ok"]))
    return {"task": name, "kind": task.kind, "n_train": len(task.train), "n_test": len(task.test),
            "seeds": seeds, "tuning": tuning, "step_times": step_times, "base": base_row, "few_shot": few_shot,
            "examples": [{"input": p, "expected": a,
                          "outputs": {"base": before["predictions"][i],
                                      **{m: runs[m][0]["predictions_after"][i] for m in MAIN_METHODS}}}
                         for i, (p, a) in enumerate(task.test[:3])],
            "runs": {m: [{k: v for k, v in r.items() if k != "predictions_after"} for r in rs] for m, rs in runs.items()},
            "summary": {m: {k: stats([scalars(r)[k] for r in rs]) for k in scalars(rs[0])} for m, rs in runs.items()},
            "sequential": sequential}


def task_facts(t, base, variants):
    """The numbers the claims read, for one task of results.json: for each method, (seeds, items) lists
    (items: test examples, facts, corpus windows; one item for the val loss); for the base model, one list
    of items (see tinyllm/claims.py)."""
    zero_shot = t["few_shot"][0]["tokens_per_query"]          # the plain prompt, as fine-tuned methods read it
    methods = {}
    for m, rs in t["runs"].items():
        r0 = rs[0]
        per_seed = lambda get: [get(r) for r in rs]
        methods[m] = {
            "accuracy": per_seed(lambda r: r["correct_after"]), "val_loss": per_seed(lambda r: [r["final_val_loss"]]),
            "test_loss": per_seed(lambda r: r["test_losses"]),
            "format_ok": per_seed(lambda r: r["format_ok"]) if "format_ok" in r0 else None,
            "corpus_loss": per_seed(lambda r: r["knowledge_after"]["window_losses"]),
            "fact_recall": per_seed(lambda r: r["knowledge_after"]["recall_correct"]),
            "val_steps": r0["history"]["val_step"], "val_curves": per_seed(lambda r: r["history"]["val_loss"]),
            "seconds_per_step": t["step_times"][m]["median"],
            "step_ratio": {"log_mean": t["step_times"][m]["log_ratio_mean"],
                           "log_se": t["step_times"][m]["log_ratio_se"], "n": t["step_times"][m]["n"]},
            "trainable_params": r0["trainable_params"], "formula": r0["formula"],
            "optimizer_state_bytes": r0["optimizer_state_bytes"], "saved_bytes": r0["saved_bytes"],
            "full_copy_bytes": r0["full_copy_bytes"], "virtual_tokens": r0["virtual_tokens"],
            "tokens_per_query": zero_shot + r0["virtual_tokens"],
            "disabled_max_diff": max(r["disabled_max_diff"] for r in rs)}
    b = t["base"]
    base_items = {"accuracy": b["correct"], "format_ok": b.get("format_ok"), "corpus_loss": b["window_losses"],
                  "fact_recall": b["recall_correct"], "tokens_per_query": zero_shot}
    return {"kind": t["kind"], "n_test": t["n_test"], "n_train": t["n_train"], "batch_size": t["runs"]["full"][0]["batch_size"],
            "steps": {m: rs[0]["steps"] for m, rs in t["runs"].items()}, "block_size": base.config.block_size,
            "base_params": base.num_parameters(), "base": base_items, "few_shot": t["few_shot"], "methods": methods,
            "sequential": t["sequential"], "variants": {g: v["settings"] for g, v in variants.items()}}


# ----------------------------------------------------------------------------------------------------
# the command


def check_sweep(task_name, base, settings, echo):
    """Say so when the sweep tuned on another base model than this one (a checkpoint pretrained on another
    machine differs in rounding, so its best lrs may differ a little), or when this run's seeds are the
    sweep's: the verdicts should not be judged on the runs that chose the lrs. Returns what was found."""
    fingerprint = base_fingerprint(base)
    swept = {x["base_fingerprint"] for x in tuned(task_name).values() if x["source"] != "fallback"}
    same = swept == {fingerprint} if swept else None
    if same is False:
        echo(f"note: the sweep in tinyllm/sweeps/{task_name} tuned on a base with fingerprint "
             f"{', '.join(sorted(map(str, swept)))}; this base is {fingerprint}. Its lrs and budgets are used as they "
             f"are; python -m tinyllm sweep tunes them on this base.")
    overlap = sorted(set(range(settings.first_seed, settings.first_seed + settings.seeds)) &
                     {*SWEEP_SEEDS, *VARIANT_SEEDS, SELECT_SEED})
    if overlap and not settings.smoke:
        echo(f"note: seeds {overlap} are the sweep's own; verdicts from them are judged on the runs that chose the "
             f"lrs. Pick a --seed below {min(SWEEP_SEEDS + VARIANT_SEEDS + (SELECT_SEED,)) - settings.seeds + 1}.")
    return {"fingerprint": fingerprint, "same_as_sweep": same, "seeds_shared_with_sweep": overlap}


def compare(task=DEFAULT_TASK, seeds=None, seed=0, steps=None, out=DEFAULT_OUT, checkpoint=None, quick=False,
            echo=default_out, settings=None, command="python -m tinyllm compare"):
    """Fine-tune every method on task (one of tasks.TASKS, or "all") from one pretrained checkpoint, measure,
    judge the claims, and write results.json, report.md and the plots into out.

    seeds: runs per method (default 3); seed: the first seed; steps: the same budget for every method
    instead of the sweep's (the report then says so); quick: a smoke test (a tiny pretraining, a few steps,
    no verdicts). checkpoint: the pretrained model, made with tinyllm.pretrain.pretrain when the file does not
    exist: default runs/pretrain/ckpt.npz, or with quick <out>/pretrain/ckpt.npz (never the shared one).
    Returns: the results dict (also in results.json).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    settings = dataclasses.replace(settings or (QUICK_SETTINGS if quick else DEFAULT_SETTINGS))
    for name, value in (("seeds", seeds), ("steps", steps)):
        if value is not None:
            setattr(settings, name, value)
    settings.first_seed = seed
    if settings.seeds < 1 or (settings.steps is not None and settings.steps < 1) or seed < 0:
        raise ValueError(f"seeds and steps must be at least 1 and seed at least 0, got seeds={settings.seeds}, "
                         f"steps={settings.steps}, seed={seed}")
    names = list(TASKS) if task == "all" else [task]
    if any(n not in TASKS for n in names):
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or all")
    checkpoint = checkpoint or (os.path.join(out, "pretrain", "ckpt.npz") if quick else DEFAULT_CHECKPOINT)
    os.makedirs(out, exist_ok=True)
    if settings.smoke:
        echo("SMOKE TEST (--quick): a tiny pretraining and a few steps prove that the code runs; its numbers "
             "mean nothing, and no claim is judged")

    made_now = not os.path.exists(checkpoint)
    if made_now:
        echo(f"no pretrained model at {checkpoint}: pretraining one first" + (" (quick)" if quick else ""))
        result = pretrain(out=checkpoint, quick=quick, echo=lambda line: echo(f"[pretrain] {line}"),
                          resume_command=f"python -m tinyllm pretrain --resume {checkpoint}")
        if result["history"]["status"] != "completed":
            raise KeyboardInterrupt
    pretrain_seconds = time.perf_counter() - start if made_now else 0.0
    base, tokenizer, meta = load_pretrained(checkpoint, need_data=True)
    data = meta["data"]
    echo(f"base model: {checkpoint} ({base.num_parameters():,} parameters, pretrained {meta.get('step', '?')} steps)")
    world = World(data["world_seed"], data["n_people"])
    sweep_base = check_sweep(names[0], base, settings, echo)
    probe = knowledge_probe(data, tokenizer, base.config.block_size, n_windows=settings.probe_windows)
    if settings.n_recall:
        probe["recall"] = probe["recall"][:settings.n_recall]

    tasks = {name: run_task(name, world, base, tokenizer, probe, settings, out, echo) for name in names}
    variants = {} if settings.smoke else sweep_variants(names[0])
    facts = {name: task_facts(t, base, variants if i == 0 else {}) for i, (name, t) in enumerate(tasks.items())}
    seeds_used = tasks[names[0]]["seeds"]
    results = {
        "command": command, "smoke_test": settings.smoke,
        "settings": {**dataclasses.asdict(settings), "task": task, "seeds": seeds_used, "sweep_base": sweep_base},
        "pretrain": {"checkpoint": checkpoint, "made_now": made_now, "seconds": pretrain_seconds},
        "model": {"config": base.config.to_dict(), "parameters": base.num_parameters()},
        "tasks": tasks, "variants": variants, "claims": judge_claims(facts, smoke=settings.smoke),
    }
    figures = plot_all(results, out)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    results["timing"] = {"total_seconds": total, "cpu_seconds": cpu, "pretrain_seconds": pretrain_seconds,
                         "compare_seconds": total - pretrain_seconds, "cores": os.cpu_count()}
    with atomic_open(os.path.join(out, "results.json")) as f:
        f.write(json.dumps(results, indent=1, default=float).encode())
    write_report(results, os.path.join(out, "report.md"), figures)

    for name, t in tasks.items():
        echo(f"\n{name}: {len(seeds_used)} seed(s)" + (" (mean ± std)" if len(seeds_used) > 1 else ""))
        echo(text_table(*results_rows(t)))
    echo("\nclaims (rules and numbers in report.md):")
    echo(text_table(["verdict", "claim"], [[c["verdict"], c["claim"]] for c in results["claims"]]))
    echo(f"\nwrote {out}/results.json, report.md and {len(figures)} plots in {duration(total)}"
         + (f" (pretraining {duration(pretrain_seconds)}, then {duration(total - pretrain_seconds)} of fine-tuning "
            f"and evaluation)" if made_now else ""))
    return results
