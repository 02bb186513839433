"""
Lesson 12: how much data does each method need?

Every method is fine-tuned on the first n training examples of a task, n = 20, 50, 100 and all of them,
with the same number of steps: small n means the same examples come round again and again (more epochs).
What to look for:

  1. the validation loss each method reaches with n examples (held-out people: it measures generalisation)
  2. the gap between training and validation loss: a model that memorises its few examples has a low
     training loss and a high validation loss
  3. test accuracy, for completeness

The task is qa (its 180 training examples are questions about 15 people; val and test ask about other
people), every method at its learning rate tuned in tinyllm.compare, with the comparison's configs.

Run from the repository root (about 3 minutes on 2 CPU cores; pretraining first if there is no checkpoint):

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

from tinyllm.presets import MAIN_METHODS as METHODS, method_config, tuned_lrs

LRS = tuned_lrs()
from tinyllm.data import World
from tinyllm.finetune import finetune, measure_base
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, load_base, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "12_data_size")
COLORS = {"full": "tab:red", "lora": "tab:blue", "prefix": "tab:green", "prompt": "tab:purple", "adapter": "tab:orange"}


# ----------------------------------------------------------------------------------------------------
# the runs

def run(base, tok, task, method, n, steps, batch_size, before, tail, seed=0):
    """Fine-tune method on the first n training examples; returns the numbers this lesson reads."""
    subset = dataclasses.replace(task, train=task.train[:n])
    r = finetune(base, tok, method_config(method), subset, steps=steps, batch_size=batch_size, lr=LRS[method],
                 seed=seed, eval_interval=max(1, steps // 5), out=lambda line: None, before=before, log_interval=steps)
    train_loss = float(np.mean(r["history"]["train_loss"][-tail:]))     # the last steps, on the n examples
    return {"val_loss": r["final_val_loss"], "train_loss": train_loss, "gap": r["final_val_loss"] - train_loss,
            "accuracy": r["accuracy_after"], "params": r["trainable_params"], "seconds": r["train_seconds"]}


def sweep(base, tok, task, sizes, methods, steps, batch_size, before, tail, noise_seeds):
    section("1. every method on n examples")
    print(f"{'method':<8} {'n':>5} {'seed':>5} {'epochs':>7} {'train loss':>11} {'val loss':>9} {'gap':>7} "
          f"{'test acc':>9} {'time':>6}")
    results, noise = {m: {} for m in methods}, {}
    for method in methods:
        for n in sizes:
            results[method][n] = r = run(base, tok, task, method, n, steps, batch_size, before, tail)
            show(method, n, 0, steps * batch_size / n, r)
        # the same run with other seeds (initialisation and batch order): how much of a difference is chance
        repeats = [run(base, tok, task, method, sizes[-1], steps, batch_size, before, tail, seed=s) for s in noise_seeds]
        for s, r in zip(noise_seeds, repeats):
            show(method, sizes[-1], s, steps * batch_size / sizes[-1], r)
        losses = [results[method][sizes[-1]]["val_loss"]] + [r["val_loss"] for r in repeats]
        noise[method] = max(losses) - min(losses)
        print()
    print(f"(epochs: how many times each example is seen, {steps} steps x {batch_size} / n; train loss: mean of the "
          f"last {tail} steps, on the n examples; gap: val - train)")
    return results, noise


def show(method, n, seed, epochs, r):
    print(f"{method:<8} {n:>5} {seed:>5} {epochs:>7.1f} {r['train_loss']:>11.3f} {r['val_loss']:>9.3f} "
          f"{r['gap']:>7.3f} {r['accuracy']:>9.3f} {r['seconds']:>5.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------------
# figure

def plot(results, noise_by_method, sizes, steps, batch_size, n_test, path):
    p = max(max(r["accuracy"] for by_n in results.values() for r in by_n.values()), 1 / n_test)   # the widest
    noise = 2 * np.sqrt(p * (1 - p) / n_test)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    panels = (("val_loss", "final validation loss (nats per answer token)", "Validation loss (held-out people)"),
              ("gap", "validation - training loss (nats per token)", "Memorising: the train/val gap"),
              ("accuracy", f"test accuracy (exact match, {n_test} questions)",
               f"Test accuracy (two standard errors: about {noise:.2f})"))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for method, by_n in results.items():
            ax.plot(sizes, [by_n[n][key] for n in sizes], "o-", color=COLORS.get(method), lw=2, label=method)
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
                         color=COLORS.get(method), capsize=5, fmt="none")
    axes[0].set_title("Validation loss (held-out people; bars: seed-to-seed spread)")
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[0].legend(title="method")
    fig.suptitle(f"Data size: every run {steps} steps of {batch_size} examples, so fewer examples means more epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(sizes=(20, 50, 100, None), methods=METHODS, steps=120, batch_size=8, task_name="qa", tail=10,
         noise_seeds=(1,), checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    sizes: numbers of training examples (None: all of them); methods: names in tinyllm.compare.METHODS;
    steps, batch_size: every run's budget (learning rates: tinyllm.compare's); tail: training steps averaged
    for the final training loss; noise_seeds: seeds the largest n is repeated with; checkpoint: the pretrained
    model (pretrained first if missing); config: GPTConfig fields of a random model to use instead (tests).
    Returns a dict of the measured numbers and the figure's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    sizes = sorted({min(n or len(task.train), len(task.train)) for n in sizes})
    noise_seeds = tuple(noise_seeds)
    print(f"Base model: {source}. Task {task_name!r}: {len(task.train)} training examples (in random order, so the "
          f"first n are a random subset), val loss on {min(len(task.val), 64)} val examples, accuracy on "
          f"{len(task.test)} test questions.")
    print(f"Sizes n = {sizes}; every run {steps} steps of {batch_size} examples, learning rates "
          + ", ".join(f"{m} {LRS[m]:g}" for m in methods) + f" (tuned in tinyllm.compare). {(len(sizes) + len(noise_seeds)) * len(methods)} runs.")
    if task_name != "record":
        print(f"(tinyllm.compare tuned the rates on the record task; on {task_name} another rate may suit some methods better.)")
    before = measure_base(base, tok, task)
    print(f"The base model, before fine-tuning: test accuracy {before['accuracy']:.3f}.")
    results, noise = sweep(base, tok, task, sizes, methods, steps, batch_size, before, tail, noise_seeds)

    section("what it shows")
    small, large = sizes[0], sizes[-1]
    print(f"A difference counts only when it is more than twice the seed-to-seed spread at n = {large} "
          f"({len(noise_seeds) + 1} seeds, a rough gauge).")
    for method, by_n in results.items():
        d_val = by_n[small]["val_loss"] - by_n[large]["val_loss"]
        verdict = "within noise" if abs(d_val) <= 2 * noise[method] else "better" if d_val > 0 else "worse"
        print(f"{method:<8} n = {small} -> {large}: val loss {by_n[small]['val_loss']:.3f} -> {by_n[large]['val_loss']:.3f} "
              f"({abs(d_val):.3f} {'lower' if d_val > 0 else 'higher'}: {verdict}; seed spread {noise[method]:.3f}); train/val gap "
              f"{by_n[small]['gap']:.3f} -> {by_n[large]['gap']:.3f}")
    gains = {m: by_n[small]["val_loss"] - by_n[large]["val_loss"] for m, by_n in results.items()}
    most = max(gains, key=gains.get)
    gaps = {m: by_n[small]["gap"] for m, by_n in results.items()}
    print(f"\nMore data helped {most} the most ({gains[most]:.3f} lower val loss from n = {small} to {large}).")
    print(f"The train/val gap at n = {small}, widest first, next to each method's trainable parameters:")
    for m in sorted(gaps, key=gaps.get, reverse=True):
        print(f"  {m:<8} gap {gaps[m]:6.3f}   {results[m][small]['params']:>9,} trainable")
    print("A wide gap is memorising: a low loss on the few training examples that does not carry over to new people.")
    print("A method whose val loss hardly moves with n is limited by its budget or its capacity, not by the data.")

    section("figure")
    path = os.path.join(out_dir, "data_size.png")
    plot(results, noise, sizes, steps, batch_size, len(task.test), path)
    print(f"saved {os.path.relpath(path)}: val loss, train/val gap and test accuracy against n, per method")
    return dict(source=source, task=task_name, steps=steps, batch_size=batch_size, sizes=sizes,
                base_accuracy=before["accuracy"], results=results, gain_from_data=gains, small_n_gap=gaps,
                seed_spread=noise,
                figures=[path])


if __name__ == "__main__":
    main()
