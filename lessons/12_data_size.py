"""
Lesson 12: how much data does each method need?

Every method is fine-tuned on the first n training examples of the lab's task (extract: read one field off
a sentence), for n = 20, 100 and all of them (main's `sizes`; the run prints them), always with the
same number of steps: a small n means the same examples come round again and again (more epochs).

  1. the base model, the task and the budget every run shares
  2. every method on n examples: the validation loss it reaches (held-out examples: generalisation), the
     gap between its training and validation loss (memorising), and test accuracy
  3. what it shows
  4. the figure

Run from the repository root (a few minutes on 2 cores; README.md has the measured time; pretraining
first if there is no checkpoint):

    python lessons/12_data_size.py

Figures go to runs/lessons/12_data_size/.
"""
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.data import World
from tinyllm.finetune import finetune, measure_base
from tinyllm.presets import DEFAULT_TASK, MAIN_METHODS, PRESETS, method_config, tuned
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, lesson_section, load_base

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "12_data_size")


def run(base, tok, task, method, n, settings, before, seed=0):
    """Fine-tune method on the first n training examples; returns the numbers this lesson reads."""
    steps, tail = settings["steps"], settings["tail"]
    subset = dataclasses.replace(task, train=task.train[:n])
    # eval_interval=steps: a val loss at the start and at the end only, the one this lesson reads
    r = finetune(base, tok, method_config(method), subset, steps=steps, batch_size=settings["batch_size"],
                 lr=settings["lrs"][method], seed=seed, eval_interval=steps, out=lambda line: None,
                 before=before, log_interval=steps)
    train_loss = float(np.mean(r["history"]["train_loss"][-tail:]))     # the last steps, on the n examples
    return {"val_loss": r["final_val_loss"], "train_loss": train_loss, "gap": r["final_val_loss"] - train_loss,
            "accuracy": r["accuracy_after"], "params": r["trainable_params"], "seconds": r["train_seconds"]}


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. the base model, the task and the budget")
def setup(checkpoint, config, task_name, sizes, methods, steps, batch_size, tail, n_test, noise_seeds):
    """The task's training examples come in random order, so the first n are a random subset of them. The
    validation and test examples are the same for every run: new sentences about other invented people.
    Every method is configured as the comparison configures it and trains at the learning rate the sweep
    (`python -m tinyllm sweep`) tuned for it on this task, for the same number of steps of the same batch
    size."""
    base, tok, data, source = load_base(checkpoint, config)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    task.test = task.test[:n_test]
    sizes = sorted({min(n or len(task.train), len(task.train)) for n in sizes})
    found = tuned(task_name)
    lrs = {m: found[m]["lr"] for m in methods}
    print(f"Base model: {source}. Task {task_name!r}: e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}; "
          f"{len(task.train)} training examples, the val loss on {min(len(task.val), 64)} val examples, the accuracy "
          f"on {len(task.test)} test examples.")
    print(f"Sizes n = {', '.join(map(str, sizes))} (the last: all of them). Every run: {steps} steps of {batch_size} "
          f"examples, {(len(sizes) + len(noise_seeds)) * len(methods)} runs in all. Learning rates:")
    for m in methods:
        where = found[m]["source"] if found[m]["source"] != "fallback" else f"the preset's: no sweep for {task_name} yet"
        print(f"  {m:8} {lrs[m]:<7g} ({where})")
    before = measure_base(base, tok, task)
    print(f"The base model, before fine-tuning: test accuracy {before['accuracy']:.3f}.")
    return base, tok, task, sizes, before, dict(steps=steps, batch_size=batch_size, tail=tail, lrs=lrs), source


@lesson_section("2. every method on n examples")
def sweep(base, tok, task, sizes, methods, settings, before, noise_seeds):
    """epochs: how many times each example is seen, steps x batch / n. train loss: the mean of the last few
    steps' losses, on the n examples the run trains on; val loss: on held-out examples; gap: val - train. A
    model that memorises its few examples has a low training loss and a high validation loss. When n is
    more than the run draws (steps x batch examples: under one epoch), every training batch is new to the
    model, as the validation examples are, and the mean of the last steps lags behind the final model: the gap is then
    near zero or below it. The largest n is run again with other seeds (initialisation and batch order):
    how much of a difference is chance."""
    steps, batch_size = settings["steps"], settings["batch_size"]
    print(f"{'method':<8} {'n':>5} {'seed':>5} {'epochs':>7} {'train loss':>11} {'val loss':>9} {'gap':>7} "
          f"{'test acc':>9} {'time':>6}")
    results, noise = {m: {} for m in methods}, {}
    for method in methods:
        for n in sizes:
            results[method][n] = r = run(base, tok, task, method, n, settings, before)
            show(method, n, 0, steps * batch_size / n, r)
        repeats = [run(base, tok, task, method, sizes[-1], settings, before, seed=s) for s in noise_seeds]
        for s, r in zip(noise_seeds, repeats):
            show(method, sizes[-1], s, steps * batch_size / sizes[-1], r)
        losses = [results[method][sizes[-1]]["val_loss"]] + [r["val_loss"] for r in repeats]
        noise[method] = max(losses) - min(losses)
        print()
    print(f"(train loss: the mean of the last {settings['tail']} steps)")
    return results, noise


def show(method, n, seed, epochs, r):
    print(f"{method:<8} {n:>5} {seed:>5} {epochs:>7.1f} {r['train_loss']:>11.3f} {r['val_loss']:>9.3f} "
          f"{r['gap']:>7.3f} {r['accuracy']:>9.3f} {r['seconds']:>5.0f}s", flush=True)


@lesson_section("3. what it shows")
def what_it_shows(results, noise, sizes, n_seeds):
    """A difference counts only when it is more than twice the seed-to-seed spread at the largest n (with
    few seeds, a rough gauge). A wide train/val gap is memorising: a low loss on the few training examples
    that does not carry over to new ones. A method whose val loss hardly moves with n is limited by its
    budget or its capacity, not by the data."""
    small, large = sizes[0], sizes[-1]
    print(f"The gauge: {n_seeds} seeds at n = {large}.")
    for method, by_n in results.items():
        d_val = by_n[small]["val_loss"] - by_n[large]["val_loss"]
        verdict = "within noise" if abs(d_val) <= 2 * noise[method] else "better" if d_val > 0 else "worse"
        print(f"{method:<8} n = {small} -> {large}: val loss {by_n[small]['val_loss']:.3f} -> "
              f"{by_n[large]['val_loss']:.3f} ({abs(d_val):.3f} {'lower' if d_val > 0 else 'higher'}: {verdict}; seed "
              f"spread {noise[method]:.3f}); train/val gap {by_n[small]['gap']:.3f} -> {by_n[large]['gap']:.3f}")
    gains = {m: by_n[small]["val_loss"] - by_n[large]["val_loss"] for m, by_n in results.items()}
    most = max(gains, key=gains.get)
    gaps = {m: by_n[small]["gap"] for m, by_n in results.items()}
    if gains[most] > 2 * noise[most]:
        print(f"\nMore data helped {most} the most ({gains[most]:.3f} lower val loss from n = {small} to {large}).")
    else:
        print(f"\nNo method gained more from n = {small} to {large} than twice its seed spread.")
    print(f"The train/val gap at n = {small}, widest first, next to each method's trainable parameters:")
    for m in sorted(gaps, key=gaps.get, reverse=True):
        print(f"  {m:<8} gap {gaps[m]:6.3f}   {results[m][small]['params']:>9,} trainable")
    return gains, gaps


@lesson_section("4. the figure")
def save_figure(results, noise_by_method, sizes, settings, n_test, out_dir):
    """data_size.png, against the number of training examples n: the validation loss (bars: the seeds'
    spread at the largest n), the train/val gap, and test accuracy."""
    path = os.path.join(out_dir, "data_size.png")
    p = min(max(max(r["accuracy"] for by_n in results.values() for r in by_n.values()), 1 / n_test), 0.5)  # p(1-p) peaks at 0.5
    noise = 2 * np.sqrt(p * (1 - p) / n_test)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    panels = (("val_loss", "final validation loss (nats per answer token)",
               "Validation loss (bars: seed-to-seed spread)"),
              ("gap", "validation - training loss (nats per answer token)", "Memorising: the train/val gap"),
              ("accuracy", f"test accuracy (exact match, {n_test} examples)",
               f"Test accuracy (two standard errors: about {noise:.2f})"))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for method, by_n in results.items():
            ax.plot(sizes, [by_n[n][key] for n in sizes], "o-", color=PRESETS[method].color, lw=2,
                    label=PRESETS[method].label)
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("training examples n (log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for method, by_n in results.items():    # the seed-to-seed spread, drawn at the largest n
        axes[0].errorbar([sizes[-1]], [by_n[sizes[-1]]["val_loss"]], yerr=noise_by_method[method] / 2,
                         color=PRESETS[method].color, capsize=5, fmt="none")
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[0].legend(title="method")
    fig.suptitle(f"Data size: every run steps = {settings['steps']}, batch = {settings['batch_size']}, so a smaller n "
                 f"means more epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {os.path.relpath(path)}")
    return path


# ----------------------------------------------------------------------------------------------------

def main(sizes=(20, 100, None), methods=MAIN_METHODS, steps=100, batch_size=8, task_name=DEFAULT_TASK, tail=10,
         noise_seeds=(1,), n_test=100, checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    sizes: numbers of training examples (None: all of them); methods: names in tinyllm.presets.MAIN_METHODS;
    steps, batch_size: every run's budget (learning rates: the sweep's); tail: training steps averaged for
    the final training loss; noise_seeds: seeds the largest n is repeated with; n_test: test examples
    scored; checkpoint: the pretrained model (pretrained first if missing); config: GPTConfig fields of a
    random model to use instead (tests). Returns a dict of the measured numbers and the figure's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    noise_seeds = tuple(noise_seeds)
    base, tok, task, sizes, before, settings, source = setup(checkpoint, config, task_name, sizes, methods, steps,
                                                             batch_size, tail, n_test, noise_seeds)
    results, noise = sweep(base, tok, task, sizes, methods, settings, before, noise_seeds)
    gains, gaps = what_it_shows(results, noise, sizes, len(noise_seeds) + 1)
    path = save_figure(results, noise, sizes, settings, len(task.test), out_dir)
    return dict(source=source, task=task_name, steps=steps, batch_size=batch_size, sizes=sizes, lrs=settings["lrs"],
                base_accuracy=before["accuracy"], results=results, gain_from_data=gains, small_n_gap=gaps,
                seed_spread=noise, figures=[path])


if __name__ == "__main__":
    main()
