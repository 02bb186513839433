"""
Lesson 10: LoRA's rank, and which matrices it adapts.

LoRA (lesson 06) trains a rank-r update scale * A @ B next to a frozen weight. Two choices decide it:

  1. the rank r: r = 1, 2, 4, 8, 16, 64 on the fused q|k|v projection c_attn. lora_alpha = 2r, so the
     scale alpha / r stays 2 and only the rank changes (as in tinyllm.compare). More rank is more
     parameters: does it buy a lower loss?
  2. where it goes, at a FIXED budget of trainable parameters (that of r = 8 on c_attn): on Wq alone, Wk,
     Wv, Wq and Wv (the LoRA paper's choice), all of c_attn, all of attention (c_attn and attn.c_proj), or
     the MLP. A target with fewer weights gets a higher rank, so every run trains about as many numbers.

Every run is tinyllm.finetune.finetune on the qa task (its examples are short, so runs are quick), with
the learning rate tuned for LoRA in tinyllm.compare, the same steps and batches (same seed) for all. The
main configuration is repeated with other seeds: differences smaller than that seed-to-seed spread are noise.

Run from the repository root (about 3 minutes on 2 CPU cores; pretraining first if there is no checkpoint):

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

from tinyllm.presets import tuned_lrs

LRS = tuned_lrs()
from tinyllm.data import World
from tinyllm.finetune import finetune, measure_base
from tinyllm.peft.saving import read_adapter
from tinyllm.peft import LoraConfig
from tinyllm.peft.lora import find_targets, module_shapes
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, load_base, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "10_lora_rank_and_targets")
TARGETS = {   # label: target_modules
    "q": ["c_attn.q"], "k": ["c_attn.k"], "v": ["c_attn.v"], "q,v": ["c_attn.q", "c_attn.v"],
    "q|k|v (c_attn)": ["c_attn"], "all attention": ["c_attn", "attn.c_proj"], "MLP": ["mlp.c_fc", "mlp.c_proj"],
}
MAIN_TARGET, MAIN_RANK = "q|k|v (c_attn)", 8     # the comparison's LoRA: r = 8 on c_attn


def lora(r, targets):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)


def per_rank(targets, mc):
    """Trainable numbers per unit of rank: the sum of in + out over the targeted linears."""
    shapes = module_shapes(mc)
    return sum(sum(shapes[n]) for n in find_targets(LoraConfig(r=1, target_modules=targets), mc))


# ----------------------------------------------------------------------------------------------------
# the runs

def run(base, tok, task, config, settings, before, seed=0):
    """One fine-tuning run, quietly; returns the numbers this lesson reads, and the size of the learned
    update: the Frobenius norm of scale * A @ B over all targeted matrices, read from the saved adapter."""
    with tempfile.TemporaryDirectory() as folder:
        r = finetune(base, tok, config, task, steps=settings["steps"], batch_size=settings["batch_size"],
                     lr=settings["lr"], seed=seed, eval_interval=max(1, settings["steps"] // 5), out=lambda line: None,
                     before=before, log_interval=settings["steps"], save_dir=folder)
        arrays = read_adapter(base, folder, False)[1]
    dW = [config.scale * arrays[k] @ arrays[k[:-len("lora_A")] + "lora_B"] for k in arrays if k.endswith("lora_A")]
    return {"val_loss": r["final_val_loss"], "accuracy": r["accuracy_after"], "params": r["trainable_params"],
            "update_norm": float(np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in dW))),
            "seconds": r["train_seconds"], "val_steps": r["history"]["val_step"], "val_curve": r["history"]["val_loss"]}


def show_run(label, m):
    print(f"  {label:<22} {m['params']:>8,} trainable   val loss {m['val_loss']:.3f}   test accuracy "
          f"{m['accuracy']:.3f}   |update| {m['update_norm']:6.2f}   ({m['seconds']:.0f} s)", flush=True)


def seed_noise(base, tok, task, settings, before, main, seeds):
    section("1. how much do runs differ by chance alone?")
    print(f"The main configuration, LoRA r = {MAIN_RANK} on c_attn, with the seeds {[0, *seeds]} (the seed sets A's "
          f"initialisation and the batch order):")
    runs = [main] + [run(base, tok, task, lora(MAIN_RANK, TARGETS[MAIN_TARGET]), settings, before, seed=s) for s in seeds]
    for s, m in zip([0, *seeds], runs):
        show_run(f"seed {s}", m)
    losses = [m["val_loss"] for m in runs]
    spread = max(losses) - min(losses)
    print("(|update|: the Frobenius norm of everything LoRA learned, scale * A @ B over all targeted matrices.)")
    print(f"Val losses range over {spread:.3f} between seeds: read smaller differences below as noise.")
    n = len(task.test)
    p = max(np.mean([m["accuracy"] for m in runs]), 1 / n)
    print(f"Accuracy on {n} test questions moves in steps of {1 / n:.3f}; two standard errors at the accuracies "
          f"here are about {2 * np.sqrt(p * (1 - p) / n):.3f}.")
    return spread, runs


def sweep_ranks(base, tok, task, settings, before, ranks, main):
    section("2. the rank")
    mc = base.config
    print(f"LoRA on c_attn ({mc.n_embd} -> {3 * mc.n_embd}) in all {mc.n_layer} blocks, lora_alpha = 2r. Each rank adds "
          f"r x ({mc.n_embd} + {3 * mc.n_embd}) x {mc.n_layer} = {per_rank(TARGETS[MAIN_TARGET], mc):,} x r parameters.")
    results = {}
    for r in ranks:
        results[r] = main if r == MAIN_RANK else run(base, tok, task, lora(r, TARGETS[MAIN_TARGET]), settings, before)
        show_run(f"r = {r}", results[r])
    return results


def sweep_targets(base, tok, task, settings, before, main):
    section("3. where LoRA goes, at a fixed budget")
    mc = base.config
    budget = MAIN_RANK * per_rank(TARGETS[MAIN_TARGET], mc)
    print(f"Budget: {budget:,} trainable parameters (r = {MAIN_RANK} on c_attn). Each target gets the rank that comes "
          f"closest: r = round(budget / sum of (in + out) over its matrices).")
    results = {}
    for label, targets in TARGETS.items():
        r = max(1, min(round(budget / per_rank(targets, mc)), mc.n_embd))
        results[label] = dict(main) if (label, r) == (MAIN_TARGET, MAIN_RANK) else run(base, tok, task, lora(r, targets),
                                                                                    settings, before)
        results[label]["r"] = r
        show_run(f"{label} (r = {r})", results[label])
    return results, budget


# ----------------------------------------------------------------------------------------------------
# figures

def plot_ranks(ranks, noise_runs, spread, settings, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ranks)))
    for (r, m), c in zip(ranks.items(), colors):
        ax1.plot(m["val_steps"], m["val_curve"], "o-", color=c, ms=3, label=f"r = {r} ({m['params']:,} params)")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "1235" else ""))
    ax1.set_xlabel("fine-tuning step")
    ax1.set_ylabel("validation loss (nats per answer token, log scale)")
    ax1.set_title("Validation loss while training, one curve per rank")
    ax1.legend(fontsize=9)
    ax1.grid(alpha=0.3, which="both")

    rs = list(ranks)
    losses = [ranks[r]["val_loss"] for r in rs]
    ax2.plot(rs, losses, "o-", color="tab:blue", lw=2, label="final validation loss (seed 0)")
    noise = [m["val_loss"] for m in noise_runs]
    ax2.errorbar([MAIN_RANK], [np.mean(noise)], yerr=[[np.mean(noise) - min(noise)], [max(noise) - np.mean(noise)]],
                 fmt="none", ecolor="black", capsize=6, lw=1.5, label=f"range over {len(noise_runs)} seeds at r = {MAIN_RANK}")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(rs)
    ax2.set_xticklabels([str(r) for r in rs])
    ax2.set_xlabel("LoRA rank r (log scale; lora_alpha = 2r)")
    ax2.set_ylabel("final validation loss (nats per answer token)", color="tab:blue")
    ax3 = ax2.twinx()
    ax3.plot(rs, [ranks[r]["accuracy"] for r in rs], "s--", color="tab:orange", label="test accuracy (exact match)")
    ax3.set_ylabel("test accuracy (exact match)", color="tab:orange")
    ax3.set_ylim(0, max(0.2, 1.3 * max(ranks[r]["accuracy"] for r in rs)))
    lines = ax2.get_legend_handles_labels()
    more = ax3.get_legend_handles_labels()
    ax2.legend(lines[0] + more[0], lines[1] + more[1], fontsize=9, loc="upper center")
    ax2.set_title(f"After {settings['steps']} steps of {settings['batch_size']}: loss and accuracy against rank")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_targets(targets, budget, spread, path):
    fig, ax = plt.subplots(figsize=(12, 5.5))
    labels = list(targets)
    x = np.arange(len(labels))
    losses = [targets[k]["val_loss"] for k in labels]
    bars = ax.bar(x, losses, color=["tab:blue" if k != "MLP" else "tab:green" for k in labels], alpha=0.85)
    for b, k in zip(bars, labels):
        m = targets[k]
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"r={m['r']}\n{m['params']:,}\nacc {m['accuracy']:.2f}",
                ha="center", va="bottom", fontsize=8.5)
    best = min(losses)
    ax.axhspan(best, best + 2 * spread, color="gray", alpha=0.2,
               label=f"best + twice the seed-to-seed spread ({2 * spread:.3f}): within noise")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylim(0, max(losses) * 1.25)
    ax.set_xlabel("matrices LoRA adapts (in every block)")
    ax.set_ylabel("final validation loss (nats per answer token)")
    ax.set_title(f"Where to put LoRA with a budget of ~{budget:,} trainable parameters "
                 f"(labels: rank, parameters, test accuracy)")
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(ranks=(1, 2, 4, 8, 16, 64), steps=200, batch_size=8, lr=LRS["lora"], task_name="qa", noise_seeds=(1, 2),
         checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    ranks: LoRA ranks to try on c_attn (the main rank, 8, is always run); steps, batch_size, lr: every run's
    budget (lr: tinyllm.compare's tuned LoRA rate); noise_seeds: extra seeds of the main configuration;
    checkpoint: the pretrained model (pretrained first if missing); config: GPTConfig fields of a random model
    to use instead (tests). Returns a dict of the measured numbers (and the figures' paths).
    """
    os.makedirs(out_dir, exist_ok=True)
    ranks = sorted(set(ranks) | {MAIN_RANK})
    base, tok, data, source = load_base(checkpoint, config)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    settings = dict(steps=steps, batch_size=batch_size, lr=lr)
    print(f"Base model: {source}, {base.num_parameters():,} parameters. Task {task_name!r}: {len(task.train)} training "
          f"examples, val loss on {min(len(task.val), 64)} val examples, accuracy on {len(task.test)} test questions.")
    print(f"Every run: {steps} steps of {batch_size} examples, peak lr {lr:g} (tuned for LoRA in tinyllm.compare), "
          f"warmup then cosine decay. The default run trains {len(ranks) + len(TARGETS) + len(noise_seeds) - 1} times.")
    if task_name != "record":
        print(f"(tinyllm.compare tuned the rates on the record task; on {task_name} another rate may suit some methods better.)")
    before = measure_base(base, tok, task)
    print(f"The base model, before fine-tuning: test accuracy {before['accuracy']:.3f}.")

    main_run = run(base, tok, task, lora(MAIN_RANK, TARGETS[MAIN_TARGET]), settings, before)
    spread, noise_runs = seed_noise(base, tok, task, settings, before, main_run, noise_seeds)
    by_rank = sweep_ranks(base, tok, task, settings, before, ranks, main_run)
    by_target, budget = sweep_targets(base, tok, task, settings, before, main_run)

    section("what it shows")
    best_r = min(by_rank, key=lambda r: by_rank[r]["val_loss"])
    lo, hi = min(ranks), max(ranks)
    print(f"Rank: the lowest val loss is at r = {best_r} ({by_rank[best_r]['val_loss']:.3f}); r = {lo} reaches "
          f"{by_rank[lo]['val_loss']:.3f} with {by_rank[lo]['params']:,} parameters, r = {hi} {by_rank[hi]['val_loss']:.3f} "
          f"with {by_rank[hi]['params']:,}.")
    # one run per rank, and the best of several noisy runs is lucky: call a rank worse only when it is
    # above the best by more than twice the seed-to-seed spread
    worse = [r for r in ranks if by_rank[r]["val_loss"] > by_rank[best_r]["val_loss"] + 2 * spread]
    print(f"Ranks clearly worse than the best (by more than twice the seed-to-seed spread, {2 * spread:.3f}): "
          + (", ".join(f"r = {r}" for r in worse) if worse else "none") + "; the others are within noise of it.")
    if hi in worse:
        bigger = by_rank[hi]["update_norm"] > by_rank[best_r]["update_norm"]
        print(f"r = {hi} trains {by_rank[hi]['params'] // by_rank[best_r]['params']}x the parameters of r = {best_r} and ends "
              f"worse. Its learned update is {'larger' if bigger else 'not larger'}: |scale * A @ B| = "
              f"{by_rank[hi]['update_norm']:.2f} against {by_rank[best_r]['update_norm']:.2f}.")
        if bigger:
            print("With the scale fixed at 2, a sum of more rank-1 terms moves further per step at the same learning")
            print("rate. More parameters are not automatically better; a larger rank wants a smaller rate or scale.")
    if lo in worse:
        print(f"r = {lo} ends worse too: a rank-{lo} update per matrix is too little for this task in this budget.")
    order = sorted(by_target, key=lambda k: by_target[k]["val_loss"])
    print("Targets, best to worst: " + ", ".join(f"{k} {by_target[k]['val_loss']:.3f}" for k in order) + ".")
    gap = by_target[order[-1]]["val_loss"] - by_target[order[0]]["val_loss"]
    print(f"Best ({order[0]}) against worst ({order[-1]}): {gap:.3f}, {gap / max(spread, 1e-9):.1f}x the seed-to-seed "
          f"spread: " + ("the same number of parameters does more in some places than in others." if gap > 2 * spread
                         else "within noise, the place made no difference here."))
    print("Wq and Wk only change where attention looks; Wv, the output projection and the MLP change what is")
    print("written into the residual stream.")

    section("figures")
    rank_path = os.path.join(out_dir, "lora_rank.png")
    target_path = os.path.join(out_dir, "lora_targets.png")
    plot_ranks(by_rank, noise_runs, spread, settings, rank_path)
    plot_targets(by_target, budget, spread, target_path)
    print(f"saved {os.path.relpath(rank_path)}: validation loss against steps and against rank")
    print(f"saved {os.path.relpath(target_path)}: final validation loss per target set at a fixed budget")
    strip = lambda m: {k: v for k, v in m.items() if k not in ("val_steps", "val_curve")}
    return dict(source=source, task=task_name, steps=steps, batch_size=batch_size, lr=lr,
                base_accuracy=before["accuracy"], seed_spread=spread, noise=[strip(m) for m in noise_runs],
                ranks={r: strip(m) for r, m in by_rank.items()}, best_rank=best_r,
                targets={k: strip(m) for k, m in by_target.items()}, budget=budget, target_order=order,
                figures=[rank_path, target_path])


if __name__ == "__main__":
    main()
