"""
The sweep behind the comparison (`python -m tinyllm sweep`): each method's learning rate, and a step budget
at which its validation loss has flattened, both chosen on validation data, never on test.

A method that trains a few thousand numbers wants a larger step than one that trains all of them, and one
stopped while its loss still falls is measured on how fast it starts, not where it ends. So, per method:

  1. budgets S = 125, 250, 500, 1000 steps (doubling); at the first, every learning rate of the method's
     grid (tinyllm.presets), at each later one the best lr of the budget before and its two neighbours on
     the ladder 1e-5, 3e-5, 1e-4, ...; a best lr at the edge of those tried gets the next rung tried too
  2. each (S, lr) trains SEEDS times; its score is the mean final validation loss
  3. the budget has flattened when doubling it lowers the best score by less than REL_TOL of it (or by
     less than ABS_TOL nats, for a loss already near zero): the method's budget is S, at its best lr
     there; otherwise CAP (the most the default comparison trains), marked not flattened, with what doubling
     it gained on record when the sweep measured it
Then the variants the tuning claims need (tinyllm.presets.VARIANTS: LoRA rank and placement, prefix length
and initialisation): each at its method's budget, its lr the best (on validation) of the method's and one
rung either side, then three fresh seeds at that lr, scored on the test examples.

Every result goes to tinyllm/sweeps/<task>/<method>.json (variants_<group>.json for the variants), which
the repository keeps and `compare` reads. One method runs in about two to ten minutes on 2 cores, the
whole sweep in about an hour; `--methods` picks some, so two processes can share the work.
"""
import datetime
import json
import os
import time

import numpy as np

from .checkpoint import atomic_open, load_pretrained
from .data import World
from .finetune import ABS_TOL, REL_TOL, example_losses, finetune
from .peft.saving import base_fingerprint
from .presets import MAIN_METHODS, PRESETS, VARIANTS, method_config, sweep_folder, tuned, variant_config
from .tasks import get_task
from .pretrain import PRETRAIN_OUT
from .train import default_out, duration

BUDGETS = (125, 250, 500, 1000)   # steps, doubling
CAP = 1000                        # the most steps a run of the default comparison trains (a lower cap saves
                                  # minutes; the budgets above it are then measured only to say what they gain)
BATCH_SIZE = 8                    # examples per step, in the sweep and in compare
SEEDS = (1000, 1001)              # seeds of the sweep's runs: apart from compare's (0, 1, 2, ...)
VARIANT_SEEDS = (1000, 1001, 1002)  # the variants' runs that the claims compare
SELECT_SEED = 999                 # the variants' choice of lr: one run per lr, not among the ones compared
N_VAL = 100                       # validation examples in the validation loss


def train_once(base, tok, task, config, lr, steps, seed, echo, test=False):
    """One run; returns its final val loss and its val curve (5 evaluations); test: also each test example's
    loss (test_losses), for the variant claims, judged on examples the choice of lr never saw."""
    r, pm = finetune(base, tok, config, task, steps, BATCH_SIZE, lr, seed, eval_interval=max(1, steps // 5),
                     out=lambda line: None, evaluate_test=False, log_interval=steps, n_val=N_VAL, return_model=True)
    h = r["history"]
    echo(f"  steps {steps:>4}  lr {lr:<7g} seed {seed}  val loss {h['val_loss'][-1]:.4f}  "
         f"({r['train_seconds']:.0f}s)")
    out = {"steps": steps, "lr": lr, "seed": seed, "val_loss": h["val_loss"][-1], "val_steps": h["val_step"],
           "val_losses": h["val_loss"], "seconds": r["train_seconds"], "trainable_params": r["trainable_params"]}
    if test:
        pm.eval()
        out["test_losses"] = example_losses(pm, tok, task.test, base.config.block_size, r["virtual_tokens"])
    return out


LADDER = [float(f"{m}e{e}") for e in range(-5, 1) for m in (1, 3)]   # 1e-5, 3e-5, ..., 1, 3: the lrs tried


def step_on_ladder(lr, k):
    """The lr k rungs up (k > 0) or down the ladder from lr, or None past its ends."""
    i = min(range(len(LADDER)), key=lambda j: abs(np.log(LADDER[j] / lr))) + k
    return LADDER[i] if 0 <= i < len(LADDER) else None


def flattened(before, after):
    """True when after (the best val loss at 2S) is not clearly below before (the best at S)."""
    return before - after < max(REL_TOL * before, ABS_TOL)


def sweep_method(base, tok, task, method, echo=default_out, budgets=BUDGETS, seeds=SEEDS):
    """Find one method's lr and budget. Returns the dict written to <method>.json."""
    runs, by_budget = [], []
    lrs = list(PRESETS[method].lrs)
    for S in budgets:
        echo(f"{method}: {S} steps")
        scores = {}

        def score(lr):
            ran = [train_once(base, tok, task, method_config(method), lr, S, seed, echo) for seed in seeds]
            runs.extend(ran)
            scores[lr] = float(np.mean([r["val_loss"] for r in ran]))

        for lr in lrs:
            score(lr)
        for _ in range(2):       # a best lr at the edge of those tried may not be the best: go one rung further
            best = min(scores, key=scores.get)
            further = step_on_ladder(best, 1 if best == max(scores) else -1 if best == min(scores) else 0)
            if further is None or further in scores:
                break
            score(further)
        best = min(scores, key=scores.get)
        by_budget.append({"steps": S, "scores": {f"{lr:g}": v for lr, v in sorted(scores.items())},
                          "best_lr": best, "best_val_loss": scores[best]})
        if len(by_budget) > 1 and (flattened(by_budget[-2]["best_val_loss"], scores[best]) or S > CAP):
            break
        lrs = [x for x in (step_on_ladder(best, -1), best, step_on_ladder(best, 1)) if x is not None]
    chosen = choose(by_budget)
    echo(f"{method}: lr {chosen['lr']:g}, {chosen['steps']} steps "
         f"({'flattened' if chosen['flattened'] else 'still falling at the largest budget the comparison affords'})")
    return {"method": method, "budgets": by_budget, "chosen": chosen, "runs": runs}


def choose(by_budget):
    """The method's budget from its scores at doubling budgets: the first one at which doubling no longer
    helps (flattened), or CAP, marked not flattened (unless its loss is already below ABS_TOL), with what
    doubling it gave (doubled_val_loss)."""
    allowed = [b for b in by_budget if b["steps"] <= CAP]
    for b, doubled in zip(allowed, by_budget[1:]):
        if flattened(b["best_val_loss"], doubled["best_val_loss"]):
            break
    else:
        b = allowed[-1]
        doubled = next((d for d in by_budget if d["steps"] == 2 * b["steps"]), None)
    done = b["best_val_loss"] < ABS_TOL         # no budget can lower it by more than ABS_TOL
    return {"lr": b["best_lr"], "steps": b["steps"], "flattened": done or doubled is not None and
            flattened(b["best_val_loss"], doubled["best_val_loss"]), "val_loss": b["best_val_loss"],
            "doubled_val_loss": doubled["best_val_loss"] if doubled else None}


def sweep_variants(base, tok, task, group, lrs_steps, echo=default_out, seeds=VARIANT_SEEDS, done=None):
    """One VARIANTS group: every setting at its method's budget. Its lr: the best val loss of the method's lr
    and one rung either side, from one run each at SELECT_SEED; then len(seeds) fresh runs at that lr, each
    with its test examples' losses, which the claims compare (the selection's runs are not among them, so
    the setting that won the choice of lr gets no edge). done: {method: result} of the method's own
    setting, shared by its groups (it runs once)."""
    method, configs = VARIANTS[group]
    lr, steps = lrs_steps[method]["lr"], lrs_steps[method]["steps"] or CAP
    out = {"group": group, "method": method, "steps": steps, "settings": {}}
    done = {} if done is None else done
    for label in configs:
        if configs[label] is None and method in done:
            out["settings"][label] = done[method]
            continue
        echo(f"{group} {label}: {steps} steps")
        config = lambda: variant_config(group, label, task)
        tried = [train_once(base, tok, task, config(), x, steps, SELECT_SEED, echo)
                 for x in (step_on_ladder(lr, -1), lr, step_on_ladder(lr, 1)) if x is not None]
        best = min(tried, key=lambda r: r["val_loss"])["lr"]
        runs = [train_once(base, tok, task, config(), best, steps, seed, echo, test=True) for seed in seeds]
        out["settings"][label] = {
            "lr": best, "val_losses": [r["val_loss"] for r in runs], "test_losses": [r["test_losses"] for r in runs],
            "scores": {f"{r['lr']:g}": r["val_loss"] for r in tried}, "selection": tried,
            "runs": [{k: v for k, v in r.items() if k != "test_losses"} for r in runs],
            "trainable_params": runs[0]["trainable_params"], "main": configs[label] is None,
            "config": config().to_dict()}
        if configs[label] is None:
            done[method] = out["settings"][label]
    return out


def write_json(path, result):
    with atomic_open(path) as f:
        f.write(json.dumps(result, indent=1).encode())


def sweep(task="extract", methods=MAIN_METHODS, variants=tuple(VARIANTS), checkpoint=PRETRAIN_OUT,
          out=None, echo=default_out, command="python -m tinyllm sweep"):
    """Run the sweep for the given methods and variant groups; write one JSON file per method and group
    into out (default tinyllm/sweeps/<task>/). Variant groups need their method's result, from this run
    or from an earlier one in out."""
    start = time.perf_counter()
    base, tok, meta = load_pretrained(checkpoint, need_data=True)
    world = World(meta["data"]["world_seed"], meta["data"]["n_people"])
    t = get_task(task, world)
    folder = out or sweep_folder(task)
    os.makedirs(folder, exist_ok=True)
    header = {"task": task, "command": command, "date": datetime.date.today().isoformat(),
              "base": {"checkpoint": checkpoint, "step": meta.get("step"), "fingerprint": base_fingerprint(base)},
              "settings": {"budgets": list(BUDGETS), "batch_size": BATCH_SIZE, "seeds": list(SEEDS),
                           "variant_seeds": list(VARIANT_SEEDS), "select_seed": SELECT_SEED, "cap": CAP,
                           "n_val": N_VAL, "rel_tol": REL_TOL, "abs_tol": ABS_TOL, "grids": {m: list(PRESETS[m].lrs) for m in methods}}}
    for m in methods:
        write_json(os.path.join(folder, f"{m}.json"), {**header, **sweep_method(base, tok, t, m, echo)})
    found, done = tuned(task, folder), {}
    for g in variants:
        method = VARIANTS[g][0]
        if found[method]["source"] == "fallback":
            raise ValueError(f"variant group {g} needs the sweep of {method} first: add it to --methods")
        write_json(os.path.join(folder, f"variants_{g}.json"), {**header, **sweep_variants(base, tok, t, g, found, echo, done=done)})
    echo(f"sweep of {task} done in {duration(time.perf_counter() - start)}; results in {folder}")
