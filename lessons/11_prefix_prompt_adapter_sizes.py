"""
Lesson 11: how big, and how to start: prefix tuning, prompt tuning and adapters.

Each of these methods (lessons 07 and 08) has a size and a starting point to choose. This lesson fine-tunes
the same pretrained model on the lab's task (extract: read one field off a sentence) with each choice:

  1. the base model, the task and the budget every run shares
  2. prefix tuning: the number of virtual tokens P
  3. prefix tuning: starting from real text's keys and values, and the MLP reparameterization
  4. prompt tuning: the number of virtual tokens, and random, SAMPLE_VOCAB or TEXT initialisation
  5. adapters: the bottleneck width m
  6. what it shows, all sizes on one axis: trainable parameters against the loss they reach
  7. the figure

Run from the repository root (a few minutes on 2 cores; README.md has the measured time; pretraining
first if there is no checkpoint):

    python lessons/11_prefix_prompt_adapter_sizes.py

Figures go to runs/lessons/11_prefix_prompt_adapter_sizes/.

Legend: L layers, C channels, P virtual tokens, H hidden width of the prefix MLP, m adapter width.
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
from tinyllm.peft import AdapterConfig, PrefixTuningConfig, PromptTuningConfig
from tinyllm.presets import DEFAULT_TASK, PRESETS, tuned
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, lesson_section, load_base

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "11_prefix_prompt_adapter_sizes")
MAIN_P, MAIN_M = 10, 16          # the sizes the comparison uses (tinyllm.presets)
METHODS = ("prefix", "prompt", "adapter")
COLORS = {m: PRESETS[m].color for m in METHODS}


def fitting(task, tok, room):
    """The task with only the examples whose prompt + answer fit in `room` positions (an example of n
    tokens needs n - 1), and how many were dropped from each split."""
    keep = lambda examples: [(p, a) for p, a in examples if len(tok.encode(p + a)) - 1 <= room]
    small = dataclasses.replace(task, train=keep(task.train), val=keep(task.val), test=keep(task.test))
    dropped = {s: len(getattr(task, s)) - len(getattr(small, s)) for s in ("train", "val", "test")}
    return small, dropped


class Runner:
    """Fine-tunes configs on one task with one budget, quietly, and prints a line per run."""

    def __init__(self, base, tok, task, steps, batch_size, lrs):
        self.base, self.tok, self.task = base, tok, task
        self.steps, self.batch_size, self.lrs = steps, batch_size, lrs
        self.before = measure_base(base, tok, task)
        self.block_size = base.config.block_size
        self.dropped = {}                 # P -> examples dropped for lack of room

    def __call__(self, method, label, config, seed=0, lr=None):
        P = getattr(config, "num_virtual_tokens", 0)
        task, dropped = fitting(self.task, self.tok, self.block_size - P)
        if any(dropped.values()):
            self.dropped[P] = dropped
        # eval_interval=steps: a val loss at the start and at the end only, the one this lesson reads
        r = finetune(self.base, self.tok, config, task, steps=self.steps, batch_size=self.batch_size,
                     lr=self.lrs[method] if lr is None else lr, seed=seed, eval_interval=self.steps,
                     out=lambda line: None, before=None if any(dropped.values()) else self.before,
                     log_interval=self.steps)
        m = {"val_loss": r["final_val_loss"], "accuracy": r["accuracy_after"], "params": r["trainable_params"],
             "seconds": r["train_seconds"], "ms_per_step": 1e3 * r["seconds_per_step"], "dropped": sum(dropped.values())}
        note = f"   ({m['dropped']} examples dropped: too long)" if m["dropped"] else ""
        print(f"  {label:<28} {m['params']:>8,} trainable   val loss {m['val_loss']:.3f}   test accuracy "
              f"{m['accuracy']:.3f}   {m['ms_per_step']:4.0f} ms/step{note}", flush=True)
        return m


def spread(runs):
    losses = [m["val_loss"] for m in runs]
    return max(losses) - min(losses)


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. the base model, the task and the budget")
def setup(checkpoint, config, task_name, steps, batch_size, n_test):
    """Every run fine-tunes the same pretrained model on the same task for the same number of steps, each
    method at the learning rate the sweep (`python -m tinyllm sweep`) tuned for it on this task. Virtual
    tokens take context positions: with P of them an example must fit in the context less P, and any example
    that does not is dropped (the run says how many). Each method's main size is run again with another
    seed, to show how much runs differ by chance."""
    base, tok, data, source = load_base(checkpoint, config)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    task.test = task.test[:n_test]
    found = tuned(task_name)
    lrs = {m: found[m]["lr"] for m in METHODS}
    longest = max(len(tok.encode(p + a)) for p, a in task.train + task.val + task.test)
    print(f"Base model: {source}, {base.num_parameters():,} parameters, a context of {base.config.block_size}. Task "
          f"{task_name!r}: e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}; {len(task.train)} training examples, "
          f"the longest {longest} tokens, so P <= {base.config.block_size + 1 - longest} leaves room for every one.")
    print(f"Every run: {steps} steps of {batch_size} examples; accuracy on {len(task.test)} test examples. Learning rates:")
    for m in METHODS:
        where = found[m]["source"] if found[m]["source"] != "fallback" else f"the preset's: no sweep for {task_name} yet"
        print(f"  {m:8} {lrs[m]:<7g} ({where})")
    run = Runner(base, tok, task, steps, batch_size, lrs)
    print(f"The base model, before fine-tuning: test accuracy {run.before['accuracy']:.3f}.")
    return run, source


@lesson_section("2. prefix tuning: how many virtual tokens")
def prefix_lengths(run, lengths, seeds):
    """P learned keys and values in front of every layer's own, started random (normal, std 1). Each virtual
    token costs 2C numbers per layer, and a context position."""
    by_length = {P: run("prefix", f"P = {P}", PrefixTuningConfig(num_virtual_tokens=P)) for P in lengths}
    repeats = [run("prefix", f"P = {MAIN_P}, seed {s}", PrefixTuningConfig(num_virtual_tokens=MAIN_P), seed=s)
               for s in seeds]
    return by_length, [by_length[MAIN_P]] + repeats


@lesson_section("3. prefix tuning: how to start")
def prefix_starts(run, main, text, mlp_lr_scales):
    """At P = 10, two other starts. Real text: the keys and values the base model itself computes for a
    training example, repeated or cut to P, as the prefix-tuning paper initialises. The MLP
    reparameterization: a small network, an embedding (P,C) -> C -> H -> 2LC, produces every layer's prefix
    and is trained in its place; only the prefixes it produces are kept afterwards. Its weights multiply each
    other, so it is also tried at smaller learning rates."""
    print(f"The text: {text!r}")
    lr = run.lrs["prefix"]
    variants = {"random": main,
                "real text": run("prefix", "text init", PrefixTuningConfig(num_virtual_tokens=MAIN_P, init="text",
                                                                          init_text=text))}
    for scale in mlp_lr_scales:
        variants[f"MLP, lr {lr * scale:g}"] = run("prefix", f"random + MLP, lr {lr * scale:g}",
                                                  PrefixTuningConfig(num_virtual_tokens=MAIN_P, prefix_projection=True),
                                                  lr=lr * scale)
    return variants


@lesson_section("4. prompt tuning: length and initialisation")
def prompt_runs(run, lengths, text, seeds):
    """P learned input vectors in front of the token embeddings: C numbers each, and a context position.
    First started RANDOM (at the embeddings' scale) for every length; then at P = 10 from the embeddings of
    random tokens of the vocabulary (SAMPLE_VOCAB) or of the same real text as in part 3 (TEXT)."""
    by_length = {P: run("prompt", f"P = {P}", PromptTuningConfig(num_virtual_tokens=P)) for P in lengths}
    main = by_length[MAIN_P]
    repeats = [run("prompt", f"P = {MAIN_P}, seed {s}", PromptTuningConfig(num_virtual_tokens=MAIN_P), seed=s)
               for s in seeds]
    variants = {"RANDOM": main,
                "SAMPLE_VOCAB": run("prompt", "SAMPLE_VOCAB", PromptTuningConfig(num_virtual_tokens=MAIN_P,
                                                                               prompt_tuning_init="SAMPLE_VOCAB")),
                "TEXT": run("prompt", "TEXT", PromptTuningConfig(num_virtual_tokens=MAIN_P, prompt_tuning_init="TEXT",
                                                               prompt_tuning_init_text=text))}
    return by_length, variants, [main] + repeats


@lesson_section("5. adapters: the bottleneck width")
def adapter_runs(run, widths, seeds):
    """Two adapters per block, C -> m -> C with their own residual, the up-projection started at zero (so the
    model starts as the base). Each unit of width adds 2C + 1 numbers per adapter."""
    by_width = {m: run("adapter", f"m = {m}", AdapterConfig(bottleneck_size=m)) for m in widths}
    repeats = [run("adapter", f"m = {MAIN_M}, seed {s}", AdapterConfig(bottleneck_size=MAIN_M), seed=s) for s in seeds]
    return by_width, [by_width[MAIN_M]] + repeats


@lesson_section("6. what it shows")
def what_it_shows(run, sizes, starts, noise, n_seeds, lengths):
    """The seed-to-seed spread is the gauge: a difference counts only when it is more than twice the spread
    of the method's main size (with few seeds, a rough gauge)."""
    print("Seed-to-seed spread of the final val loss at the main sizes: " +
          ", ".join(f"{k} {v:.3f}" for k, v in noise.items()) + f" ({n_seeds} seeds each).")
    for name, runs in sizes.items():
        key = "m" if name == "adapter" else "P"
        best = min(runs, key=lambda s: runs[s]["val_loss"])
        close = [size for size in runs if runs[size]["val_loss"] <= runs[best]["val_loss"] + 2 * noise[name]]
        print(f"{name}: best at {key} = {best} ({runs[best]['val_loss']:.3f}, {runs[best]['params']:,} parameters); "
              f"{key} = {min(runs)}: {runs[min(runs)]['val_loss']:.3f}; within noise of the best: "
              + ", ".join(f"{key} = {size}" for size in close) + ".")
    for name, variants in starts.items():
        best = min(variants, key=lambda k: variants[k]["val_loss"])
        worst = max(variants, key=lambda k: variants[k]["val_loss"])
        gap = variants[worst]["val_loss"] - variants[best]["val_loss"]
        print(f"{name} start: best {best} ({variants[best]['val_loss']:.3f}), worst {worst} "
              f"({variants[worst]['val_loss']:.3f}), a gap of {gap:.3f}: "
              + ("a real difference." if gap > 2 * noise[name] else "within noise."))
    prompt = sizes["prompt"]
    slow = prompt[max(lengths)]["ms_per_step"] / prompt[min(lengths)]["ms_per_step"]
    print(f"Virtual tokens are not free at run time: prompt tuning with P = {max(lengths)} took {slow:.1f}x the time "
          f"per step of P = {min(lengths)}, since every example grows by P positions.")
    if run.dropped:
        print("Examples dropped because they did not fit with the virtual tokens: " +
              ", ".join(f"P = {P}: {d}" for P, d in run.dropped.items()))
    else:
        print(f"No example was dropped: with P up to {max(lengths)}, every {run.task.name} example still fits.")


@lesson_section("7. the figure")
def save_figure(sizes, starts, noise, out_dir):
    """sizes_and_inits.png: the final validation loss against the number of virtual tokens (prefix, prompt)
    and against the adapter width, with the seed-to-seed spread as a bar at the main size; against the way
    each started; and every size of every method against its trainable parameters."""
    path = os.path.join(out_dir, "sizes_and_inits.png")
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    draw_sizes(axes[0, 0], {m: sizes[m] for m in ("prefix", "prompt")}, MAIN_P, noise,
               "virtual tokens P (log scale)", "Length: prefix and prompt tuning, random start")
    draw_sizes(axes[0, 1], {"adapter": sizes["adapter"]}, MAIN_M, noise,
               "adapter bottleneck width m (log scale)", "Width: adapters")
    draw_starts(axes[1, 0], starts)
    draw_params(axes[1, 1], sizes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {os.path.relpath(path)}")
    return path


def draw_sizes(ax, by_method, main, noise, xlabel, title):
    for name, by_size in by_method.items():
        ax.plot(list(by_size), [m["val_loss"] for m in by_size.values()], "o-", color=COLORS[name], lw=2, label=name)
        ax.errorbar([main], [by_size[main]["val_loss"]], yerr=noise[name] / 2, color=COLORS[name], capsize=6, fmt="none")
    sizes = sorted({s for by_size in by_method.values() for s in by_size})
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (nats per answer token)")
    ax.set_title(f"{title} (bar: seed-to-seed spread)")
    ax.legend()
    ax.grid(alpha=0.3)


def draw_starts(ax, starts):
    labels, heights, colors = [], [], []
    for name, variants in starts.items():
        for label, m in variants.items():
            labels.append(f"{name}\n" + label.replace(", ", "\n").replace("SAMPLE_", "SAMPLE_\n"))
            heights.append(m["val_loss"])
            colors.append(COLORS[name])
    bars = ax.bar(np.arange(len(heights)), heights, color=colors, alpha=0.85)
    for b, h in zip(bars, heights):
        ax.text(b.get_x() + b.get_width() / 2, h, f"{h:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(np.arange(len(heights)))
    ax.set_xticklabels(labels, fontsize=9)
    ax.set_ylim(0, max(heights) * 1.15)
    ax.set_xlabel(f"how the P = {MAIN_P} virtual tokens start")
    ax.set_ylabel("final validation loss (nats per answer token)")
    ax.set_title("How to start: initialisation and reparameterization")
    ax.grid(axis="y", alpha=0.3)


def draw_params(ax, sizes):
    for name, runs in sizes.items():
        key = "m" if name == "adapter" else "P"
        ax.plot([m["params"] for m in runs.values()], [m["val_loss"] for m in runs.values()], "o-", color=COLORS[name],
                label=name)
        for size, m in runs.items():
            ax.annotate(f"{key}={size}", (m["params"], m["val_loss"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color=COLORS[name])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("final validation loss (nats per answer token)")
    ax.set_title("All sizes: parameters against loss")
    ax.legend()
    ax.grid(alpha=0.3, which="both")


# ----------------------------------------------------------------------------------------------------

def main(lengths=(1, 5, 10, 50), widths=(1, 4, 16, 64), steps=120, batch_size=8, task_name=DEFAULT_TASK,
         noise_seeds=(1,), mlp_lr_scales=(1, 0.1), n_test=100, checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    lengths: virtual-token counts for prefix and prompt tuning (10 always runs); widths: adapter bottlenecks
    (16 always runs); steps, batch_size: every run's budget (learning rates: the sweep's, per method);
    noise_seeds: extra seeds of each method's main size; mlp_lr_scales: the prefix MLP's learning rates, as
    multiples of the prefix's; n_test: test examples scored; checkpoint: the pretrained model (pretrained
    first if missing); config: GPTConfig fields of a random model to use instead (tests).
    Returns a dict of the measured numbers (and the figure's path).
    """
    os.makedirs(out_dir, exist_ok=True)
    lengths, widths = sorted(set(lengths) | {MAIN_P}), sorted(set(widths) | {MAIN_M})
    run, source = setup(checkpoint, config, task_name, steps, batch_size, n_test)
    text = "".join(run.task.train[0])                   # a real training example, for the 'text' starts
    prefix, prefix_noise = prefix_lengths(run, lengths, noise_seeds)
    prefix_init = prefix_starts(run, prefix[MAIN_P], text, mlp_lr_scales)
    prompt, prompt_init, prompt_noise = prompt_runs(run, lengths, text, noise_seeds)
    adapter, adapter_noise = adapter_runs(run, widths, noise_seeds)
    sizes, starts = {"prefix": prefix, "prompt": prompt, "adapter": adapter}, {"prefix": prefix_init, "prompt": prompt_init}
    noise = {"prefix": spread(prefix_noise), "prompt": spread(prompt_noise), "adapter": spread(adapter_noise)}
    what_it_shows(run, sizes, starts, noise, len(noise_seeds) + 1, lengths)
    path = save_figure(sizes, starts, noise, out_dir)
    return dict(source=source, task=task_name, steps=steps, batch_size=batch_size, lrs=dict(run.lrs),
                base_accuracy=run.before["accuracy"], prefix=prefix, prompt=prompt, adapter=adapter,
                prefix_init=prefix_init, prompt_init=prompt_init, seed_spread=noise, init_text=text,
                dropped=dict(run.dropped), figures=[path])


if __name__ == "__main__":
    main()
