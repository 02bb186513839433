"""
Lesson 10: LoRA's rank, and which matrices it adapts.

LoRA (lesson 06) trains a rank-r update scale * A @ B next to a frozen weight. Two choices decide it: the
rank r, and the matrices it goes on. This lesson fine-tunes the same pretrained model on the lab's task
(extract: read one field off a sentence) again and again, changing one of the two each time:

  1. the base model, the task and the budget every run shares
  2. the main configuration (r = 8 on c_attn, the comparison's LoRA) with other seeds: the noise
  3. the rank, on c_attn, with lora_alpha = 2r so that only the rank changes, not the scale
  4. the place, at a FIXED number of trainable parameters: Wq, Wk, Wv alone, Wq and Wv (the LoRA paper's
     choice), all of c_attn, all of attention, or the MLP
  5. what it shows, with differences smaller than the seed-to-seed spread called noise
  6. the figures

Run from the repository root (a few minutes on 2 cores; README.md has the measured time; pretraining
first if there is no checkpoint):

    python lessons/10_lora_rank_and_targets.py

Figures go to runs/lessons/10_lora_rank_and_targets/.

Legend: L layers, C channels, r rank; a linear with `in` inputs and `out` outputs trains r * (in + out).
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.data import World
from tinyllm.finetune import finetune, measure_base
from tinyllm.peft import LoraConfig
from tinyllm.peft.lora import find_targets, module_shapes
from tinyllm.peft.saving import read_adapter
from tinyllm.presets import DEFAULT_TASK, tuned
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, lesson_section, load_base

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "10_lora_rank_and_targets")
TARGETS = {   # label: target_modules
    "q": ["c_attn.q"], "k": ["c_attn.k"], "v": ["c_attn.v"], "q,v": ["c_attn.q", "c_attn.v"],
    "q|k|v (c_attn)": ["c_attn"], "all attention": ["c_attn", "attn.c_proj"], "MLP": ["mlp.c_fc", "mlp.c_proj"],
}
MAIN_TARGET, MAIN_RANK = "q|k|v (c_attn)", 8     # the comparison's LoRA (tinyllm.presets): r = 8 on c_attn


def lora(r, targets):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)


def per_rank(targets, mc):
    """Trainable numbers per unit of rank: the sum of in + out over the targeted linears."""
    shapes = module_shapes(mc)
    return sum(sum(shapes[n]) for n in find_targets(LoraConfig(r=1, target_modules=targets), mc))


def run(base, tok, task, config, settings, before, seed=0):
    """One fine-tuning run, quietly; returns the numbers this lesson reads, and the size of the learned
    update: the Frobenius norm of scale * A @ B over all targeted matrices, read from the saved adapter."""
    steps = settings["steps"]
    with tempfile.TemporaryDirectory() as folder:
        r = finetune(base, tok, config, task, steps=steps, batch_size=settings["batch_size"], lr=settings["lr"],
                     seed=seed, eval_interval=max(1, steps // 5), out=lambda line: None, before=before,
                     log_interval=steps, save_dir=folder)
        arrays = read_adapter(base, folder, False)[1]
    dW = [config.scale * arrays[k] @ arrays[k[:-len("lora_A")] + "lora_B"] for k in arrays if k.endswith("lora_A")]
    return {"val_loss": r["final_val_loss"], "accuracy": r["accuracy_after"], "params": r["trainable_params"],
            "update_norm": float(np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in dW))),
            "seconds": r["train_seconds"], "val_steps": r["history"]["val_step"], "val_curve": r["history"]["val_loss"]}


def show_run(label, m):
    print(f"  {label:<22} {m['params']:>8,} trainable   val loss {m['val_loss']:.3f}   test accuracy "
          f"{m['accuracy']:.3f}   |update| {m['update_norm']:6.2f}   ({m['seconds']:.0f} s)", flush=True)


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. the base model, the task and the budget")
def setup(checkpoint, config, task_name, steps, batch_size, lr, n_test, n_runs):
    """Every run fine-tunes the same pretrained model on the same task for the same number of steps, at the
    learning rate the sweep (`python -m tinyllm sweep`) tuned for LoRA on this task, warmup then cosine
    decay. The same seed gives every run the same batches, so two runs differ only in what this lesson
    changes. A run reports its validation loss (held-out examples, nats per answer token) and its test
    accuracy (exact match of the greedy answer)."""
    base, tok, data, source = load_base(checkpoint, config)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    task.test = task.test[:n_test]
    tuning = tuned(task_name)["lora"]
    lr = tuning["lr"] if lr is None else lr
    where = (f"the sweep's choice, {tuning['source']}" if tuning["source"] != "fallback" else
             f"LoRA's preset rate: no sweep has been run for {task_name} yet")
    print(f"Base model: {source}, {base.num_parameters():,} parameters. Task {task_name!r}: e.g. "
          f"{task.train[0][0]!r} -> {task.train[0][1]!r}; {len(task.train)} training examples, the val loss on "
          f"{min(len(task.val), 64)} val examples, the accuracy on {len(task.test)} test examples.")
    print(f"Every run: {steps} steps of {batch_size} examples, peak lr {lr:g} ({where}). {n_runs} runs in all.")
    before = measure_base(base, tok, task)
    print(f"The base model, before fine-tuning: test accuracy {before['accuracy']:.3f}.")
    return base, tok, task, before, dict(steps=steps, batch_size=batch_size, lr=lr), source


@lesson_section("2. how much do runs differ by chance alone?")
def seed_noise(base, tok, task, settings, before, main, seeds):
    """The main configuration, LoRA r = 8 on c_attn, run again with other seeds (a seed sets A's
    initialisation and the order of the batches). |update| is the Frobenius norm of everything LoRA learned,
    scale * A @ B summed over all targeted matrices. Differences between seeds are what chance alone does:
    below, a difference smaller than about twice this spread says nothing."""
    runs = [main] + [run(base, tok, task, lora(MAIN_RANK, TARGETS[MAIN_TARGET]), settings, before, seed=s) for s in seeds]
    for s, m in zip([0, *seeds], runs):
        show_run(f"seed {s}", m)
    losses = [m["val_loss"] for m in runs]
    spread = max(losses) - min(losses)
    n = len(task.test)
    p = max(np.mean([m["accuracy"] for m in runs]), 1 / n)
    print(f"Val losses range over {spread:.3f} between seeds. Accuracy on {n} test examples moves in steps of "
          f"{1 / n:.3f}; two standard errors at these accuracies are about {2 * np.sqrt(p * (1 - p) / n):.3f}.")
    return spread, runs


@lesson_section("3. the rank")
def sweep_ranks(base, tok, task, settings, before, ranks, main):
    """LoRA on c_attn, the fused q|k|v projection, in every block. lora_alpha = 2r keeps the scale alpha / r
    at 2, so only the rank changes. Each unit of rank adds a row of A and a column of B in every block: more
    rank is more parameters. Does it buy a lower loss in this budget?"""
    mc = base.config
    print(f"c_attn is {mc.n_embd} -> {3 * mc.n_embd}: each rank adds {mc.n_embd} + {3 * mc.n_embd} numbers in each of "
          f"{mc.n_layer} blocks, {per_rank(TARGETS[MAIN_TARGET], mc):,} x r in all.")
    results = {}
    for r in ranks:
        results[r] = main if r == MAIN_RANK else run(base, tok, task, lora(r, TARGETS[MAIN_TARGET]), settings, before)
        show_run(f"r = {r}", results[r])
    return results


@lesson_section("4. where LoRA goes, at a fixed budget")
def sweep_targets(base, tok, task, settings, before, main):
    """The budget is what r = 8 on c_attn trains. Every other set of matrices gets the rank that comes closest
    to it, r = round(budget / sum of (in + out) over its matrices): a target with fewer weights gets a
    higher rank, so every run trains about as many numbers and only the place differs. Wq and Wk change only
    where attention looks; Wv, the output projection and the MLP change what is written into the residual
    stream."""
    mc = base.config
    budget = MAIN_RANK * per_rank(TARGETS[MAIN_TARGET], mc)
    print(f"Budget: {budget:,} trainable parameters.")
    results = {}
    for label, targets in TARGETS.items():
        r = max(1, min(round(budget / per_rank(targets, mc)), mc.n_embd))
        results[label] = dict(main) if (label, r) == (MAIN_TARGET, MAIN_RANK) else \
            run(base, tok, task, lora(r, targets), settings, before)
        results[label]["r"] = r
        show_run(f"{label} (r = {r})", results[label])
    return results, budget


@lesson_section("5. what it shows")
def what_it_shows(by_rank, by_target, spread):
    """One run per configuration, and the best of several noisy runs is a lucky one: a configuration is
    called worse than the best only when its val loss is higher by more than twice the seed-to-seed spread."""
    ranks = sorted(by_rank)
    best_r = min(by_rank, key=lambda r: by_rank[r]["val_loss"])
    lo, hi = ranks[0], ranks[-1]
    print(f"Rank: the lowest val loss is at r = {best_r} ({by_rank[best_r]['val_loss']:.3f}); r = {lo} reaches "
          f"{by_rank[lo]['val_loss']:.3f} with {by_rank[lo]['params']:,} parameters, r = {hi} "
          f"{by_rank[hi]['val_loss']:.3f} with {by_rank[hi]['params']:,}.")
    worse = [r for r in ranks if by_rank[r]["val_loss"] > by_rank[best_r]["val_loss"] + 2 * spread]
    close = [r for r in ranks if r not in worse and r != best_r]
    print(f"Ranks clearly worse than the best (by more than {2 * spread:.3f}): "
          + (", ".join(f"r = {r}" for r in worse) if worse else "none") + "; within noise of it: "
          + (", ".join(f"r = {r}" for r in close) if close else "none") + ".")
    if hi in worse:
        bigger = by_rank[hi]["update_norm"] > by_rank[best_r]["update_norm"]
        print(f"r = {hi} trains {by_rank[hi]['params'] / by_rank[best_r]['params']:.0f}x the parameters of r = {best_r} "
              f"and ends worse. Its learned update is {'larger' if bigger else 'not larger'}: |scale * A @ B| = "
              f"{by_rank[hi]['update_norm']:.2f} against {by_rank[best_r]['update_norm']:.2f}.")
        if bigger:
            print("With the scale fixed at 2, a sum of more rank-1 terms moves further per step at the same learning "
                  "rate: more parameters are not automatically better, and a larger rank wants a smaller rate or scale.")
    if lo in worse:
        print(f"r = {lo} ends worse too: a rank-{lo} update per matrix is too little for this task in this budget.")
    order = sorted(by_target, key=lambda k: by_target[k]["val_loss"])
    print("Places, best to worst: " + ", ".join(f"{k} {by_target[k]['val_loss']:.3f}" for k in order) + ".")
    gap = by_target[order[-1]]["val_loss"] - by_target[order[0]]["val_loss"]
    print(f"Best ({order[0]}) against worst ({order[-1]}): {gap:.3f}, {gap / max(spread, 1e-9):.1f}x the seed-to-seed "
          f"spread: " + ("the same number of parameters does more in some places than in others." if gap > 2 * spread
                         else "within noise, the place made no difference here."))
    return best_r, order


@lesson_section("6. figures")
def save_figures(by_rank, noise_runs, by_target, budget, spread, settings, out_dir):
    """lora_rank.png: the validation loss while training, one curve per rank, and the final loss and test
    accuracy against the rank. lora_targets.png: the final validation loss of each place at the fixed budget,
    with the band that is within noise of the best."""
    rank_path = os.path.join(out_dir, "lora_rank.png")
    target_path = os.path.join(out_dir, "lora_targets.png")
    plot_ranks(by_rank, noise_runs, settings, rank_path)
    plot_targets(by_target, budget, spread, target_path)
    for path in (rank_path, target_path):
        print(f"saved {os.path.relpath(path)}")
    return [rank_path, target_path]


def plot_ranks(ranks, noise_runs, settings, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ranks)))
    for (r, m), c in zip(ranks.items(), colors):
        ax1.plot(m["val_steps"], m["val_curve"], "o-", color=c, ms=3, label=f"r = {r} ({m['params']:,} params)")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "1235" else ""))
    ax1.set_xlabel("fine-tuning step")
    ax1.set_ylabel("validation loss (nats per answer token, log scale)")
    ax1.set_title("Validation loss while training, one curve per rank")
    ax1.legend(fontsize=9)
    ax1.grid(alpha=0.3, which="both")

    rs = list(ranks)
    ax2.plot(rs, [ranks[r]["val_loss"] for r in rs], "o-", color="tab:blue", lw=2, label="final validation loss (seed 0)")
    noise = [m["val_loss"] for m in noise_runs]
    ax2.errorbar([MAIN_RANK], [np.mean(noise)], yerr=[[np.mean(noise) - min(noise)], [max(noise) - np.mean(noise)]],
                 fmt="none", ecolor="black", capsize=6, lw=1.5,
                 label=f"range over {len(noise_runs)} seeds at r = {MAIN_RANK}")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(rs)
    ax2.set_xticklabels([str(r) for r in rs])
    ax2.set_xlabel("LoRA rank r (log scale; lora_alpha = 2r)")
    ax2.set_ylabel("final validation loss (nats per answer token)", color="tab:blue")
    ax3 = ax2.twinx()
    ax3.plot(rs, [ranks[r]["accuracy"] for r in rs], "s--", color="tab:orange", label="test accuracy (exact match)")
    ax3.set_ylabel("test accuracy (exact match)", color="tab:orange")
    ax3.set_ylim(0, min(1.05, max(0.2, 1.3 * max(ranks[r]["accuracy"] for r in rs))))
    lines, more = ax2.get_legend_handles_labels(), ax3.get_legend_handles_labels()
    ax2.legend(lines[0] + more[0], lines[1] + more[1], fontsize=9, loc="upper center")
    ax2.set_title(f"Loss and accuracy against rank (every run: steps = {settings['steps']}, "
                  f"batch = {settings['batch_size']})")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_targets(targets, budget, spread, path):
    fig, ax = plt.subplots(figsize=(12, 5.5))
    labels = list(targets)
    x = np.arange(len(labels))
    losses = [targets[k]["val_loss"] for k in labels]
    bars = ax.bar(x, losses, color=["tab:green" if k == "MLP" else "tab:blue" for k in labels], alpha=0.85)
    for b, k in zip(bars, labels):
        m = targets[k]
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"r={m['r']}\n{m['params']:,}\nacc {m['accuracy']:.2f}",
                ha="center", va="bottom", fontsize=8.5)
    best = min(losses)
    ax.axhspan(best, best + 2 * spread, color="gray", alpha=0.2,
               label=f"within noise of the best: up to twice the seed-to-seed spread ({2 * spread:.3f}) above it")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylim(0, max(losses) * 1.25)
    ax.set_xlabel("matrices LoRA adapts (in every block)")
    ax.set_ylabel("final validation loss (nats per answer token)")
    ax.set_title(f"Where to put LoRA with a budget of about {budget:,} trainable parameters "
                 f"(labels: rank, parameters, test accuracy)")
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(ranks=(1, 4, 16, 64), steps=150, batch_size=8, lr=None, task_name=DEFAULT_TASK, noise_seeds=(1, 2),
         n_test=100, checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    ranks: LoRA ranks to try on c_attn (the main rank, 8, always runs); steps, batch_size, lr: every run's
    budget (lr None: the sweep's rate for LoRA on the task); noise_seeds: extra seeds of the main
    configuration; n_test: test examples scored; checkpoint: the pretrained model (pretrained first if
    missing); config: GPTConfig fields of a random model to use instead (tests).
    Returns a dict of the measured numbers (and the figures' paths).
    """
    os.makedirs(out_dir, exist_ok=True)
    ranks = sorted(set(ranks) | {MAIN_RANK})
    n_runs = len(ranks) + len(TARGETS) - 1 + len(noise_seeds)
    base, tok, task, before, settings, source = setup(checkpoint, config, task_name, steps, batch_size, lr, n_test, n_runs)
    main_run = run(base, tok, task, lora(MAIN_RANK, TARGETS[MAIN_TARGET]), settings, before)
    spread, noise_runs = seed_noise(base, tok, task, settings, before, main_run, noise_seeds)
    by_rank = sweep_ranks(base, tok, task, settings, before, ranks, main_run)
    by_target, budget = sweep_targets(base, tok, task, settings, before, main_run)
    best_r, order = what_it_shows(by_rank, by_target, spread)
    figures = save_figures(by_rank, noise_runs, by_target, budget, spread, settings, out_dir)
    strip = lambda m: {k: v for k, v in m.items() if k not in ("val_steps", "val_curve")}
    return dict(source=source, task=task_name, steps=steps, batch_size=batch_size, lr=settings["lr"],
                base_accuracy=before["accuracy"], seed_spread=spread, noise=[strip(m) for m in noise_runs],
                ranks={r: strip(m) for r, m in by_rank.items()}, best_rank=best_r,
                targets={k: strip(m) for k, m in by_target.items()}, budget=budget, target_order=order,
                figures=figures)


if __name__ == "__main__":
    main()
