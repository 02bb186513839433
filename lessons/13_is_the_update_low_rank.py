"""
Lesson 13: is the fine-tuning update low-rank?

LoRA rests on a hypothesis: the change fine-tuning makes to a weight matrix, dW = W_after - W_before, has a
low "intrinsic rank", so a rank-r product A @ B can stand in for it. Full fine-tuning lets dW be anything,
so it can test the hypothesis, on the lab's task (extract: read one field off a sentence):

  1. fine-tune all the weights, and LoRA with r = 8 on c_attn, keeping what each learned
  2. the singular values s_1 >= s_2 >= ... of every dW, next to a random matrix of the same shape, and the
     energy in the top r directions, sum(s_1..s_r ^ 2) / sum(s ^ 2): how much of dW a rank-r update holds
  3. does the rest matter? Keep only the top r directions of every dW (its best rank-r approximation) and
     measure the validation loss and test accuracy
  4. does LoRA find the same directions? The overlap of LoRA's update with the top directions of full
     fine-tuning's, on the input side and on the output side, against what random subspaces would share
  5. what it shows
  6. the figures

Run from the repository root (a few minutes on 2 cores; README.md has the measured time; pretraining
first if there is no checkpoint):

    python lessons/13_is_the_update_low_rank.py

Figures go to runs/lessons/13_is_the_update_low_rank/.

Legend: L layers, C channels, r rank; dW = U S V^T, the singular value decomposition of a weight stored as
(in, out): U's columns are directions of the input space, V's of the output space.
"""
import copy
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
from tinyllm.finetune import finetune, measure_base, val_loss_fn
from tinyllm.peft.saving import read_adapter
from tinyllm.presets import DEFAULT_TASK, method_config, tuned
from tinyllm.tasks import evaluate, get_task
from lessons.common import CHECKPOINT, lesson_section, load_base

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "13_is_the_update_low_rank")
MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")    # the weight matrices of a block
COLORS = dict(zip(MATRICES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. fine-tuning, keeping what it learned")
def fine_tune_both(base, tok, task, steps, batch_size):
    """Full fine-tuning and LoRA (r = 8 on c_attn, the comparison's), each at the learning rate the sweep
    (`python -m tinyllm sweep`) tuned for it on this task, the same steps and batches. What each saves is
    kept: for full fine-tuning every weight after training, for LoRA its A and B matrices."""
    before = measure_base(base, tok, task)
    found = tuned(task.name)
    runs = {}
    for method in ("full", "lora"):
        lr = found[method]["lr"]
        where = found[method]["source"] if found[method]["source"] != "fallback" else "the preset's: no sweep yet"
        with tempfile.TemporaryDirectory() as folder:
            r = finetune(base, tok, method_config(method), task, steps=steps, batch_size=batch_size, lr=lr,
                         eval_interval=max(1, steps // 4), out=lambda line: None, before=before, save_dir=folder,
                         log_interval=steps)
            runs[method] = r, read_adapter(base, folder, False)[1]
        print(f"  {method:<5} {r['trainable_params']:>9,} trainable, lr {lr:g} ({where}): val loss "
              f"{r['history']['val_loss'][0]:.3f} -> {r['final_val_loss']:.3f}, test accuracy "
              f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
    return runs


def updates(base, full_after, lora_arrays, lora_scale, L):
    """{name: dW} per block matrix, float64, (in, out): full fine-tuning's W_after - W_before, and LoRA's
    scale * A @ B."""
    dW_full, dW_lora = {}, {}
    for i in range(L):
        for m in MATRICES:
            name = f"h.{i}.{m}"
            dW_full[name] = full_after[name + ".weight"].astype(np.float64) - base.params[name + ".weight"]
            if name + ".lora_A" in lora_arrays:
                A, B = lora_arrays[name + ".lora_A"], lora_arrays[name + ".lora_B"]
                dW_lora[name] = lora_scale * A.astype(np.float64) @ B
    return dW_full, dW_lora


def energy(s):
    """Cumulative share of the squared Frobenius norm in the top 1, 2, ... singular directions."""
    e = np.cumsum(s ** 2)
    return e / e[-1]


def directions_for(s, share):
    """How many singular directions hold `share` of the energy."""
    return int(np.searchsorted(energy(s), share) + 1)


@lesson_section("2. how concentrated is full fine-tuning's dW?")
def show_spectra(dW_full, ranks, lora_r, seed):
    """np.linalg.svd gives every dW's singular values, largest first. 'top r' is the share of dW's squared
    norm in its r largest singular directions, what the best rank-r matrix can hold; '90% in' is how many
    directions hold 90% of it. The last column is the same share for a Gaussian random matrix of the same
    shape: what 'no structure' looks like."""
    rng = np.random.default_rng(seed)
    spectra, random_spectra = {}, {}
    print(f"{'matrix':<18} {'shape':>11} {'|dW|':>7} " + " ".join(f"{'top ' + str(r):>7}" for r in ranks)
          + f" {'90% in':>10} {'random: top ' + str(lora_r):>15}")
    for name, dW in dW_full.items():
        s = np.linalg.svd(dW, compute_uv=False)                                   # descending
        noise = np.linalg.svd(rng.standard_normal(dW.shape), compute_uv=False)    # same shape, no structure
        spectra[name], random_spectra[name] = s, noise
        e, e_rand = energy(s), energy(noise)
        print(f"{name:<18} {str(dW.shape):>11} {np.linalg.norm(dW):7.3f} " + " ".join(f"{e[r - 1]:7.1%}" for r in ranks)
              + f" {directions_for(s, 0.9):>4} of {len(s):<3} {e_rand[min(lora_r, len(s)) - 1]:>15.1%}")
    return spectra, random_spectra


def truncated(dW, r):
    """The best rank-r approximation of dW (Eckart-Young): U[:, :r] S[:r] V^T[:r]."""
    U, s, Vt = np.linalg.svd(dW, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r]


@lesson_section("3. keep only the top r directions of every dW")
def truncation_test(base, tok, task, full_after, dW_full, ranks):
    """A copy of the base model gets full fine-tuning's trained embeddings, layer norms and biases, and for
    each block matrix W_before + (dW cut to its top r directions). r = 0 keeps no matrix update at all,
    'full' all of it. If the loss at a small r is close to the whole update's, that rank was enough."""
    model = copy.deepcopy(base)
    val_loss = val_loss_fn(tok, task, base.config.block_size)
    rows = {}
    for r in [0, *ranks, None]:
        for k, v in full_after.items():
            model.params[k][...] = v                                       # everything full fine-tuning trained
        for name, dW in dW_full.items():
            W = base.params[name + ".weight"].astype(np.float64)
            if r is not None:
                model.params[name + ".weight"][...] = W + (truncated(dW, r) if r else 0.0)
        label = "full" if r is None else r
        rows[label] = {"val_loss": float(val_loss(model)), "test_accuracy": evaluate(model, tok, task)["accuracy"]}
        print(f"  r = {str(label):<5} val loss {rows[label]['val_loss']:.3f}   test accuracy "
              f"{rows[label]['test_accuracy']:.3f}", flush=True)
    return rows


def subspace_overlap(dW_a, dW_b, r, side="input"):
    """How much of the top-r subspace of dW_a lies in the top-r subspace of dW_b, on one side.

    The weights are stored (in, out) and used as x @ W, so in dW = U S V^T the columns of U (length in) are
    directions in the INPUT space, the inputs x the update responds to, and the rows of V^T (length out) are
    directions in the OUTPUT space, what it writes. side='input' compares U[:, :r], side='output' V[:, :r]:
    ||Q_a^T Q_b||_F^2 / r, 1 for the same subspace, about r / n for random ones in n dimensions (n = in or out).
    """
    Qa, Qb = top_directions(dW_a, r, side), top_directions(dW_b, r, side)
    return float(np.sum((Qa.T @ Qb) ** 2) / r)


def top_directions(dW, r, side):
    """The top r singular directions of dW (in, out) as orthonormal columns: (in, r) or (out, r)."""
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    U, _, Vt = np.linalg.svd(dW, full_matrices=False)
    return U[:, :r] if side == "input" else Vt[:r].T


@lesson_section("4. does LoRA find the directions full fine-tuning uses?")
def show_overlap(dW_full, dW_lora, r):
    """LoRA's update scale * A @ B has rank r: on the input side its directions are A's columns, on the
    output side B's rows. For each c_attn, the share of LoRA's r directions that lie in the top r
    directions of full fine-tuning's update of the same matrix, on each side, next to what two random
    r-dimensional subspaces would share. |dW|: the Frobenius norm of each update."""
    rows = {}
    for name, dl in dW_lora.items():
        n_in, n_out = dl.shape
        rows[name] = {"overlap": subspace_overlap(dl, dW_full[name], r, "input"), "chance": r / n_in,
                      "overlap_out": subspace_overlap(dl, dW_full[name], r, "output"), "chance_out": r / n_out,
                      "lora_norm": float(np.linalg.norm(dl)), "full_norm": float(np.linalg.norm(dW_full[name]))}
        o = rows[name]
        print(f"  {name:<16} input side {o['overlap']:.2f} (random: {o['chance']:.2f})   output side "
              f"{o['overlap_out']:.2f} (random: {o['chance_out']:.2f})   |dW| LoRA {o['lora_norm']:.3f}, "
              f"full {o['full_norm']:.3f}")
    return rows


@lesson_section("5. what it shows")
def what_it_shows(spectra, random_spectra, rows, ranks, overlap, runs, lora_r):
    """Three questions: is dW more concentrated than a random matrix, does its top-r part do the work of the
    whole, and does LoRA, trained on its own, land in the same directions?"""
    e_at = {name: energy(s)[min(lora_r, len(s)) - 1] for name, s in spectra.items()}
    e_rand = {name: energy(s)[min(lora_r, len(s)) - 1] for name, s in random_spectra.items()}
    print(f"Energy of dW in its top {lora_r} directions: {min(e_at.values()):.0%} to {max(e_at.values()):.0%} over the "
          f"{len(e_at)} matrices (mean {np.mean(list(e_at.values())):.0%}); for random matrices of the same shapes "
          f"{np.mean(list(e_rand.values())):.0%}.")
    if lora_r in rows:
        lost = rows[lora_r]["val_loss"] - rows["full"]["val_loss"]
        span = rows[0]["val_loss"] - rows["full"]["val_loss"]
        print(f"Cutting every dW to rank {lora_r} moves the val loss from {rows['full']['val_loss']:.3f} to "
              f"{rows[lora_r]['val_loss']:.3f} ({lost:+.3f}), test accuracy from {rows['full']['test_accuracy']:.3f} to "
              f"{rows[lora_r]['test_accuracy']:.3f}; dropping the matrix updates altogether gives val loss "
              f"{rows[0]['val_loss']:.3f}.")
        if span > 0 and lost <= 0:
            print(f"So rank {lora_r} keeps all of the drop in val loss the matrix updates make; the cut update is even "
                  f"{-lost:.3f} better.")
        elif span > 0:
            print(f"So rank {lora_r} keeps {1 - lost / span:.0%} of the drop in val loss the matrix updates make.")
    close = [r for r in ranks if rows[r]["val_loss"] <= 1.1 * rows["full"]["val_loss"]]
    print("The smallest rank within 10% of the whole update's val loss: " +
          (f"r = {close[0]} ({rows[close[0]]['val_loss']:.3f})." if close else f"none up to r = {ranks[-1]}."))
    if close and close[0] <= lora_r:
        print(f"So here, yes: rank {lora_r} holds what the update does.")
    elif np.mean(list(e_at.values())) > np.mean(list(e_rand.values())):
        print(f"So here, partly: dW is more concentrated than a random matrix ({np.mean(list(e_at.values())):.0%} of its "
              f"energy in the top {lora_r} against {np.mean(list(e_rand.values())):.0%}), but matching the whole update took "
              + (f"r = {close[0]}" if close else f"more than r = {ranks[-1]}") + f", more than LoRA's {lora_r}.")
    else:
        print("So here, no: dW is no more concentrated than a random matrix.")
    if overlap:
        mean = lambda key: np.mean([o[key] for o in overlap.values()])
        print(f"LoRA's update shares {mean('overlap'):.2f} of its input directions with full fine-tuning's top {lora_r} "
              f"on c_attn (random: {mean('chance'):.2f}), and {mean('overlap_out'):.2f} of its output directions "
              f"(random: {mean('chance_out'):.2f}).")
    print(f"LoRA trained on its own reached val loss {runs['lora'][0]['final_val_loss']:.3f}, full fine-tuning "
          f"{runs['full'][0]['final_val_loss']:.3f}.")
    return e_at, e_rand


@lesson_section("6. figures")
def save_figures(spectra, random_spectra, dW_lora, rows, lora_val, lora_r, out_dir):
    """singular_values.png: every dW's singular values divided by its largest, and the energy in its top i
    directions, one line per matrix and block, next to a random matrix and LoRA's own update.
    truncated_update.png: the validation loss and test accuracy with every dW cut to rank r."""
    spectra_path = os.path.join(out_dir, "singular_values.png")
    trunc_path = os.path.join(out_dir, "truncated_update.png")
    plot_spectra(spectra, random_spectra, dW_lora, lora_r, spectra_path)
    plot_truncation(rows, lora_val, lora_r, trunc_path)
    for path in (spectra_path, trunc_path):
        print(f"saved {os.path.relpath(path)}")
    return [spectra_path, trunc_path]


def plot_spectra(spectra, random_spectra, dW_lora, lora_r, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    for name, s in spectra.items():
        m = name.split(".", 2)[2]
        ax1.plot(np.arange(1, len(s) + 1), s / s[0], color=COLORS[m], alpha=0.6, lw=1.2)
        ax2.plot(np.arange(1, len(s) + 1), 100 * energy(s), color=COLORS[m], alpha=0.6, lw=1.2)
    some = next(iter(random_spectra.values()))
    ax1.plot(np.arange(1, len(some) + 1), some / some[0], color="gray", ls="--", lw=2)
    ax2.plot(np.arange(1, len(some) + 1), 100 * energy(some), color="gray", ls="--", lw=2)
    if dW_lora:
        s = np.linalg.svd(next(iter(dW_lora.values())), compute_uv=False)
        ax1.plot(np.arange(1, len(s) + 1), np.maximum(s / s[0], 1e-7), color="black", lw=2, ls=":")
    for ax in (ax1, ax2):
        ax.axvline(lora_r, color="black", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("singular direction i (log scale)")
        ax.grid(alpha=0.3, which="both")
    ax1.set_yscale("log")
    ax1.set_ylim(1e-3, 1.5)
    ax1.set_ylabel("s_i / s_1 (log scale)")
    ax1.set_title("Normalised singular values of dW, one line per matrix and block")
    ax2.set_ylabel("energy in the top i directions (% of |dW|^2)")
    ax2.set_ylim(0, 101)
    ax2.set_title(f"How much of dW a rank-i update holds (LoRA's r = {lora_r}: vertical line)")
    handles = [plt.Line2D([], [], color=COLORS[m], label=f"full fine-tuning: {m}") for m in MATRICES]
    handles += [plt.Line2D([], [], color="gray", ls="--", lw=2, label="a random matrix (first block's c_attn shape)"),
                plt.Line2D([], [], color="black", ls=":", lw=2, label=f"LoRA's own dW (r = {lora_r}, block 0 c_attn)"),
                plt.Line2D([], [], color="black", lw=1, label=f"r = {lora_r}")]
    ax1.legend(handles=handles, fontsize=8.5, loc="lower left")
    ax2.legend(handles=handles[:-2] + handles[-1:], fontsize=8.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_truncation(rows, lora_val, lora_r, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ranks = [r for r in rows if r != "full"]
    xs = [max(r, 0.5) for r in ranks]                       # r = 0 drawn at 0.5 on the log axis
    ax.plot(xs, [rows[r]["val_loss"] for r in ranks], "o-", color="tab:red", lw=2,
            label="val loss, full fine-tuning's dW cut to rank r")
    ax.axhline(rows["full"]["val_loss"], color="tab:red", ls="--", label="val loss, full fine-tuning's whole dW")
    ax.axhline(lora_val, color="tab:blue", ls=":", lw=2, label=f"val loss, LoRA trained with r = {lora_r} (c_attn only)")
    ax.axvline(lora_r, color="black", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels(["0" if r == 0 else str(r) for r in ranks])
    ax.set_xlabel("rank r kept in every block matrix (log scale; 0: no matrix update)")
    ax.set_ylabel("validation loss (nats per answer token)")
    ax.set_title("Does the low-rank part do the work?")
    ax2 = ax.twinx()
    ax2.plot(xs, [100 * rows[r]["test_accuracy"] for r in ranks], "s--", color="tab:green",
             label="test accuracy, dW cut to rank r (right axis)")
    ax2.set_ylabel("test accuracy (% exact match)", color="tab:green")
    ax2.set_ylim(0, 100)
    handles, labels = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax2.legend(handles + more[0], labels + more[1], loc="upper center")     # on the top axes: above every line
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=200, batch_size=8, task_name=DEFAULT_TASK, n_test=100, ranks=(1, 2, 4, 8, 16, 32, 64), lora_r=8,
         seed=0, checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    steps, batch_size: the budget of both fine-tuning runs (learning rates: the sweep's for the task);
    n_test: test examples scored (the first n; None: all); ranks: the r values reported and tested (capped
    at the matrices' size); lora_r: the rank of the comparison's LoRA (drawn as the reference); checkpoint:
    the pretrained model (pretrained first if missing); config: GPTConfig fields of a random model to use
    instead (tests). Returns a dict of the measured numbers and figure paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    task.test = task.test[:n_test]
    ranks = sorted({r for r in ranks if r <= base.config.n_embd})
    print(f"Base model: {source}. Task {task_name!r}: e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}; accuracy on "
          f"{len(task.test)} test examples; every run {steps} steps of {batch_size} examples.")
    runs = fine_tune_both(base, tok, task, steps, batch_size)
    lora_cfg = method_config("lora")
    dW_full, dW_lora = updates(base, runs["full"][1], runs["lora"][1], lora_cfg.scale, base.config.n_layer)
    spectra, random_spectra = show_spectra(dW_full, ranks, lora_r, seed)
    rows = truncation_test(base, tok, task, runs["full"][1], dW_full, ranks)
    overlap = show_overlap(dW_full, dW_lora, lora_cfg.r)
    e_at, e_rand = what_it_shows(spectra, random_spectra, rows, ranks, overlap, runs, lora_r)
    figures = save_figures(spectra, random_spectra, dW_lora, rows, runs["lora"][0]["final_val_loss"], lora_r, out_dir)
    full, lora = runs["full"][0], runs["lora"][0]
    return dict(source=source, task=task_name, steps=steps, batch_size=batch_size,
                full_val_loss=full["final_val_loss"], lora_val_loss=lora["final_val_loss"],
                full_accuracy=full["accuracy_after"], lora_accuracy=lora["accuracy_after"],
                energy_at_lora_r=e_at, random_energy_at_lora_r=e_rand,
                directions_for_90={n: directions_for(s, 0.9) for n, s in spectra.items()},
                truncation=rows, overlap=overlap, figures=figures)


if __name__ == "__main__":
    main()
