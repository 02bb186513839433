"""
Lesson 11: how big, and how to start: prefix tuning, prompt tuning and adapters.

Each of these methods has a size and a starting point to choose (lessons 07 and 08 introduce them):

  1. prefix tuning: the number of virtual tokens P = 1, 2, 5, 10, 20, 50; their initialisation, random or
     the keys and values the base model computes for real text; and the MLP reparameterization (a small
     network that produces the prefixes during training, as in the prefix-tuning paper)
  2. prompt tuning: the number of virtual tokens, and the initialisation: random vectors, embeddings of
     random tokens (SAMPLE_VOCAB), or the embeddings of real text (TEXT)
  3. adapters: the bottleneck width m = 1, 2, 4, 8, 16, 64
  4. all of them on one axis: trainable parameters against the loss they reach

Virtual tokens take context positions: with P of them, an example must fit in block_size - P. The task is
qa, whose examples are short; any example that does not fit is dropped, and the lesson says how many.
Every run: tinyllm.finetune.finetune with the method's learning rate tuned in tinyllm.compare, the same
steps and batches. The main configuration of each method is repeated with another seed, to show how much
runs differ by chance.

Run from the repository root (about 4 minutes on 2 CPU cores; pretraining first if there is no checkpoint):

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

from tinyllm.presets import tuned_lrs

LRS = tuned_lrs()
from tinyllm.data import World
from tinyllm.finetune import finetune, measure_base
from tinyllm.peft import AdapterConfig, PrefixTuningConfig, PromptTuningConfig
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, load_base, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "11_prefix_prompt_adapter_sizes")
MAIN_P, MAIN_M = 10, 16          # the sizes tinyllm.compare uses
COLORS = {"prefix": "tab:green", "prompt": "tab:purple", "adapter": "tab:orange"}


def fitting(task, tok, room):
    """The task with only the examples whose prompt + answer fit in `room` positions (an example of n
    tokens needs n - 1), and how many were dropped from each split."""
    keep = lambda examples: [(p, a) for p, a in examples if len(tok.encode(p + a)) - 1 <= room]
    small = dataclasses.replace(task, train=keep(task.train), val=keep(task.val), test=keep(task.test))
    dropped = {s: len(getattr(task, s)) - len(getattr(small, s)) for s in ("train", "val", "test")}
    return small, dropped


# ----------------------------------------------------------------------------------------------------
# the runs

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
        r = finetune(self.base, self.tok, config, task, steps=self.steps, batch_size=self.batch_size,
                     lr=self.lrs[method] if lr is None else lr, seed=seed, eval_interval=max(1, self.steps // 5),
                     out=lambda line: None, before=None if any(dropped.values()) else self.before,
                     log_interval=self.steps)
        m = {"val_loss": r["final_val_loss"], "accuracy": r["accuracy_after"], "params": r["trainable_params"],
             "seconds": r["train_seconds"], "ms_per_step": 1e3 * r["seconds_per_step"], "dropped": sum(dropped.values())}
        note = f"   ({m['dropped']} examples dropped: too long)" if m["dropped"] else ""
        print(f"  {label:<28} {m['params']:>8,} trainable   val loss {m['val_loss']:.3f}   test accuracy "
              f"{m['accuracy']:.3f}   {m['ms_per_step']:4.0f} ms/step{note}", flush=True)
        return m


def init_text(task):
    """A real training example, the text the 'text' initialisations start from."""
    prompt, answer = task.train[0]
    return prompt + answer


def prefix_runs(run, lengths, text, seeds, mlp_lr_scales):
    section("1. prefix tuning: length, initialisation, reparameterization")
    print(f"Random prefixes (normal, std 1) of P virtual tokens in front of every layer's keys and values, "
          f"lr {run.lrs['prefix']:g}:")
    by_length = {P: run("prefix", f"P = {P}", PrefixTuningConfig(num_virtual_tokens=P)) for P in lengths}
    main = by_length[MAIN_P]
    repeats = [run("prefix", f"P = {MAIN_P}, seed {s}", PrefixTuningConfig(num_virtual_tokens=MAIN_P), seed=s)
               for s in seeds]
    print(f"\nAt P = {MAIN_P}, starting from the keys and values the base model computes for real text ({text!r},")
    print("repeated or cut to P), and from the MLP reparameterization: an embedding (P,C) -> C -> H -> 2LC that produces")
    print("every layer's prefix, trained in their place (only the prefixes it produces are kept afterwards). Its weights")
    print("multiply each other, so it is also tried at smaller learning rates:")
    lr = run.lrs["prefix"]
    variants = {"random": main,
                "real text": run("prefix", "text init", PrefixTuningConfig(num_virtual_tokens=MAIN_P, init="text",
                                                                          init_text=text))}
    for scale in mlp_lr_scales:
        variants[f"MLP, lr {lr * scale:g}"] = run("prefix", f"random + MLP, lr {lr * scale:g}",
                                                  PrefixTuningConfig(num_virtual_tokens=MAIN_P, prefix_projection=True),
                                                  lr=lr * scale)
    return by_length, variants, [main] + repeats


def prompt_runs(run, lengths, text, seeds):
    section("2. prompt tuning: length and initialisation")
    print(f"P learned input vectors in front of the token embeddings, started RANDOM (at the embeddings' scale), "
          f"lr {run.lrs['prompt']:g}:")
    by_length = {P: run("prompt", f"P = {P}", PromptTuningConfig(num_virtual_tokens=P)) for P in lengths}
    main = by_length[MAIN_P]
    repeats = [run("prompt", f"P = {MAIN_P}, seed {s}", PromptTuningConfig(num_virtual_tokens=MAIN_P), seed=s)
               for s in seeds]
    print(f"\nAt P = {MAIN_P}: embeddings of random tokens (SAMPLE_VOCAB), or of real text ({text!r}):")
    variants = {"RANDOM": main,
                "SAMPLE_VOCAB": run("prompt", "SAMPLE_VOCAB", PromptTuningConfig(num_virtual_tokens=MAIN_P,
                                                                               prompt_tuning_init="SAMPLE_VOCAB")),
                "TEXT": run("prompt", "TEXT", PromptTuningConfig(num_virtual_tokens=MAIN_P, prompt_tuning_init="TEXT",
                                                               prompt_tuning_init_text=text))}
    return by_length, variants, [main] + repeats


def adapter_runs(run, widths, seeds):
    section("3. adapters: the bottleneck width")
    print(f"Two adapters per block, C -> m -> C with their own residual, up-projection started at zero, "
          f"lr {run.lrs['adapter']:g}:")
    by_width = {m: run("adapter", f"m = {m}", AdapterConfig(bottleneck_size=m)) for m in widths}
    repeats = [run("adapter", f"m = {MAIN_M}, seed {s}", AdapterConfig(bottleneck_size=MAIN_M), seed=s) for s in seeds]
    return by_width, [by_width[MAIN_M]] + repeats


def spread(runs):
    losses = [m["val_loss"] for m in runs]
    return max(losses) - min(losses)


# ----------------------------------------------------------------------------------------------------
# figures

def draw_lengths(ax, prefix, prompt, noise):
    for name, by_length in (("prefix", prefix), ("prompt", prompt)):
        ax.plot(list(by_length), [m["val_loss"] for m in by_length.values()], "o-", color=COLORS[name], lw=2,
                label=f"{name} tuning (random init)")
        ax.errorbar([MAIN_P], [by_length[MAIN_P]["val_loss"]], yerr=noise[name] / 2, color=COLORS[name], capsize=6,
                    fmt="none")
    ax.set_xscale("log")
    ax.set_xticks(list(prefix))
    ax.set_xticklabels([str(P) for P in prefix])
    ax.set_xlabel("virtual tokens P (log scale)")
    ax.set_ylabel("final validation loss (nats per answer token)")
    ax.set_title("Length: prefix and prompt tuning (bars: seed-to-seed spread)")
    ax.legend()
    ax.grid(alpha=0.3)


def draw_widths(ax, adapter, noise):
    widths = list(adapter)
    ax.plot(widths, [adapter[m]["val_loss"] for m in widths], "o-", color=COLORS["adapter"], lw=2, label="adapters")
    ax.errorbar([MAIN_M], [adapter[MAIN_M]["val_loss"]], yerr=noise["adapter"] / 2, color=COLORS["adapter"],
                capsize=6, fmt="none")
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths)
    ax.set_xticklabels([str(m) for m in widths])
    ax.set_xlabel("adapter bottleneck width m (log scale)")
    ax.set_ylabel("final validation loss (nats per answer token)")
    ax.set_title("Width: adapters (bar: seed-to-seed spread)")
    ax.legend()
    ax.grid(alpha=0.3)


def draw_inits(ax, prefix_init, prompt_init):
    labels, heights, colors = [], [], []
    for name, variants in (("prefix", prefix_init), ("prompt", prompt_init)):
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
    ax.set_xlabel(f"initialisation (P = {MAIN_P} virtual tokens)")
    ax.set_ylabel("final validation loss (nats per answer token)")
    ax.set_title("How to start: initialisation and reparameterization")
    ax.grid(axis="y", alpha=0.3)


def draw_params(ax, prefix, prompt, adapter):
    for name, runs, key in (("prefix", prefix, "P"), ("prompt", prompt, "P"), ("adapter", adapter, "m")):
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


def plot_all(prefix, prompt, adapter, prefix_init, prompt_init, noise, path):
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    draw_lengths(axes[0, 0], prefix, prompt, noise)
    draw_widths(axes[0, 1], adapter, noise)
    draw_inits(axes[1, 0], prefix_init, prompt_init)
    draw_params(axes[1, 1], prefix, prompt, adapter)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(lengths=(1, 2, 5, 10, 20, 50), widths=(1, 2, 4, 8, 16, 64), steps=120, batch_size=8, task_name="qa",
         noise_seeds=(1,), mlp_lr_scales=(1, 0.1, 0.01), checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    lengths: virtual-token counts for prefix and prompt tuning (10 is always run); widths: adapter bottlenecks
    (16 is always run); steps, batch_size: every run's budget (learning rates: tinyllm.compare's, per method);
    noise_seeds: extra seeds of each method's main configuration; mlp_lr_scales: the prefix MLP's learning rates,
    as multiples of the prefix's; checkpoint: the pretrained model (pretrained
    first if missing); config: GPTConfig fields of a random model to use instead (tests).
    Returns a dict of the measured numbers (and the figure's path).
    """
    os.makedirs(out_dir, exist_ok=True)
    lengths, widths = sorted(set(lengths) | {MAIN_P}), sorted(set(widths) | {MAIN_M})
    base, tok, data, source = load_base(checkpoint, config)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    longest = max(len(tok.encode(p + a)) for p, a in task.train + task.val + task.test)
    print(f"Base model: {source}, {base.num_parameters():,} parameters, a context of {base.config.block_size}. Task "
          f"{task_name!r}: {len(task.train)} training examples, the longest {longest} tokens, so P <= "
          f"{base.config.block_size + 1 - longest} leaves room for every example.")
    print(f"Every run: {steps} steps of {batch_size} examples, each method at its tuned peak learning rate.")
    if task_name != "record":
        print(f"(tinyllm.compare tuned the rates on the record task; on {task_name} another rate may suit some methods better.)")
    run = Runner(base, tok, task, steps, batch_size, LRS)
    print(f"The base model, before fine-tuning: test accuracy {run.before['accuracy']:.3f}.")
    text = init_text(task)

    prefix, prefix_init, prefix_noise = prefix_runs(run, lengths, text, noise_seeds, mlp_lr_scales)
    prompt, prompt_init, prompt_noise = prompt_runs(run, lengths, text, noise_seeds)
    adapter, adapter_noise = adapter_runs(run, widths, noise_seeds)
    noise = {"prefix": spread(prefix_noise), "prompt": spread(prompt_noise), "adapter": spread(adapter_noise)}

    section("what it shows")
    n_seeds = len(noise_seeds) + 1
    print("Seed-to-seed spread of the final val loss at the main sizes: " +
          ", ".join(f"{k} {v:.3f}" for k, v in noise.items()) + f" ({n_seeds} seeds each, a rough gauge). A difference")
    print("counts below only when it is more than twice that spread.")
    for name, runs, key in (("prefix", prefix, "P"), ("prompt", prompt, "P"), ("adapter", adapter, "m")):
        best = min(runs, key=lambda s: runs[s]["val_loss"])
        close = [size for size in runs if runs[size]["val_loss"] <= runs[best]["val_loss"] + 2 * noise[name]]
        print(f"{name}: best at {key} = {best} ({runs[best]['val_loss']:.3f}, {runs[best]['params']:,} parameters); "
              f"{key} = {min(runs)}: {runs[min(runs)]['val_loss']:.3f}; within noise of the best: "
              + ", ".join(f"{key} = {size}" for size in close) + ".")
    for name, variants in (("prefix", prefix_init), ("prompt", prompt_init)):
        best = min(variants, key=lambda k: variants[k]["val_loss"])
        worst = max(variants, key=lambda k: variants[k]["val_loss"])
        gap = variants[worst]["val_loss"] - variants[best]["val_loss"]
        print(f"{name} start: best {best} ({variants[best]['val_loss']:.3f}), worst {worst} "
              f"({variants[worst]['val_loss']:.3f}), a gap of {gap:.3f}: "
              + ("a real difference." if gap > 2 * noise[name] else "within noise."))
    slow = prompt[max(lengths)]["ms_per_step"] / prompt[min(lengths)]["ms_per_step"]
    print(f"Virtual tokens are not free at run time: prompt tuning with P = {max(lengths)} took {slow:.1f}x the time per "
          f"step of P = {min(lengths)}, since every example grows by P tokens.")
    if run.dropped:
        print("Examples dropped because they did not fit with the virtual tokens: " +
              ", ".join(f"P = {P}: {d}" for P, d in run.dropped.items()))
    else:
        print(f"No example was dropped: with P up to {max(lengths)}, every {task_name} example still fits.")

    section("figures")
    path = os.path.join(out_dir, "sizes_and_inits.png")
    plot_all(prefix, prompt, adapter, prefix_init, prompt_init, noise, path)
    print(f"saved {os.path.relpath(path)}: loss against length, width and initialisation, and against parameters")
    return dict(source=source, task=task_name, steps=steps, batch_size=batch_size, lrs=dict(LRS),
                base_accuracy=run.before["accuracy"], prefix=prefix, prompt=prompt, adapter=adapter,
                prefix_init=prefix_init, prompt_init=prompt_init, seed_spread=noise, init_text=text,
                dropped={P: d for P, d in run.dropped.items()}, figures=[path])


if __name__ == "__main__":
    main()
