"""
Lesson 13: is the fine-tuning update low-rank?

LoRA rests on a hypothesis: the change fine-tuning makes to a weight matrix, dW = W_after - W_before,
has a low "intrinsic rank", so a rank-r product A @ B can stand in for it. Full fine-tuning lets dW be
anything, so it can test the hypothesis:

  1. fine-tune all the weights (and, for comparison, LoRA with r = 8 on c_attn) on one task
  2. take dW of every matrix in the blocks and its singular values s_1 >= s_2 >= ... (np.linalg.svd)
  3. spectra: s_i / s_1, next to a random matrix of the same shape (what "no structure" looks like)
  4. energy in the top r directions, sum(s_1..s_r ^ 2) / sum(s ^ 2): how much of dW a rank-r update can hold
  5. does the rest matter? Keep only the top r directions of every dW (the best rank-r approximation) and
     measure the validation loss: if the loss at r = 8 is close to the full update's, rank 8 was enough
  6. does LoRA find the same directions? The overlap of LoRA's update with the top directions of full
     fine-tuning's update, against the overlap two random subspaces would have

The task is record (rewrite a sentence into a fixed format), on which tinyllm.compare tuned the learning rates.

Run from the repository root (about 1.5 minutes on 2 CPU cores; pretraining first if there is no checkpoint):

    python lessons/13_is_the_update_low_rank.py

Figures go to runs/lessons/13_is_the_update_low_rank/.

Legend: L layers, C channels, r rank; U S V^T the singular value decomposition of dW.
"""
import copy
import dataclasses
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.presets import method_config, tuned_lrs
from tinyllm.tasks import record_scores

LRS = tuned_lrs()
from tinyllm.data import World
from tinyllm.peft.saving import read_adapter
from tinyllm.finetune import finetune, measure_base, val_loss_fn
from tinyllm.tasks import evaluate, get_task
from lessons.common import CHECKPOINT, load_base, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "13_is_the_update_low_rank")
MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")    # the weight matrices of a block
COLORS = dict(zip(MATRICES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))


# ----------------------------------------------------------------------------------------------------
# 1. fine-tuning, keeping what it learned

def train_and_keep(base, tok, task, method, steps, batch_size, before):
    """Fine-tune and return (the run's numbers, the saved arrays): for full fine-tuning every weight after
    training, for LoRA its A and B matrices."""
    with tempfile.TemporaryDirectory() as folder:
        r = finetune(base, tok, method_config(method), task, steps=steps, batch_size=batch_size, lr=LRS[method],
                     eval_interval=max(1, steps // 4), out=lambda line: None, before=before, save_dir=folder,
                     log_interval=steps)
        arrays = read_adapter(base, folder, False)[1]
    print(f"  {method:<5} {r['trainable_params']:>9,} trainable, lr {LRS[method]:g}: val loss "
          f"{r['history']['val_loss'][0]:.3f} -> {r['final_val_loss']:.3f}, test accuracy {r['accuracy_before']:.3f} -> "
          f"{r['accuracy_after']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
    return r, arrays


def updates(base, full_after, lora_arrays, lora_scale, L):
    """{name: dW} per block matrix, float64: full fine-tuning's W_after - W_before, and LoRA's scale * A @ B."""
    dW_full, dW_lora = {}, {}
    for i in range(L):
        for m in MATRICES:
            name = f"h.{i}.{m}"
            dW_full[name] = full_after[name + ".weight"].astype(np.float64) - base.params[name + ".weight"]
            if name + ".lora_A" in lora_arrays:
                A, B = lora_arrays[name + ".lora_A"], lora_arrays[name + ".lora_B"]
                dW_lora[name] = lora_scale * A.astype(np.float64) @ B
    return dW_full, dW_lora


# ----------------------------------------------------------------------------------------------------
# 2-4. spectra and energy

def energy(s):
    """Cumulative share of the squared Frobenius norm in the top 1, 2, ... singular directions."""
    e = np.cumsum(s ** 2)
    return e / e[-1]


def directions_for(s, share):
    """How many singular directions hold `share` of the energy."""
    return int(np.searchsorted(energy(s), share) + 1)


def show_spectra(dW_full, ranks, lora_r, seed):
    section("2-4. the singular values of full fine-tuning's dW")
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
    print("(top r: share of the squared norm in the r largest singular directions; 90% in: how many directions "
          "hold 90%; random: a Gaussian matrix of the same shape)")
    return spectra, random_spectra


# ----------------------------------------------------------------------------------------------------
# 5. keep only the top r directions

def truncated(dW, r):
    """The best rank-r approximation of dW (Eckart-Young): U[:, :r] S[:r] V^T[:r]."""
    U, s, Vt = np.linalg.svd(dW, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r]


def truncation_test(base, tok, task, full_after, dW_full, ranks):
    section("5. keep only the top r directions of every dW")
    print("A copy of the base model gets full fine-tuning's trained embeddings, layer norms and biases, and for each block")
    print("matrix W_before + (dW cut to its top r directions). r = 0 keeps no matrix update, 'full' all of it.")
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
        rows[label] = score(model, tok, task, val_loss)
        print(f"  r = {str(label):<5} val loss {rows[label]['val_loss']:.3f}   " +
              "   ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in rows[label].items() if k != "val_loss"), flush=True)
    return rows


def score(model, tok, task, val_loss):
    """Val loss and test accuracy; on the record task also the share of its key=value fields right."""
    ev = evaluate(model, tok, task)
    row = {"val_loss": float(val_loss(model)), "test_accuracy": ev["accuracy"]}
    if task.name == "record":
        row["field_accuracy"] = record_scores(ev["predictions"], [a for _, a in task.test])["field_accuracy"]
    return row


# ----------------------------------------------------------------------------------------------------
# 6. LoRA's directions against full fine-tuning's

def subspace_overlap(dW_a, dW_b, r):
    """How much of the top-r output directions of dW_a lie in the top-r output directions of dW_b:
    ||U_a[:, :r]^T U_b[:, :r]||_F^2 / r, 1 for the same subspace, about r / n for random ones (n rows)."""
    Ua = np.linalg.svd(dW_a, full_matrices=False)[0][:, :r]
    Ub = np.linalg.svd(dW_b, full_matrices=False)[0][:, :r]
    return float(np.sum((Ua.T @ Ub) ** 2) / r)


def show_overlap(dW_full, dW_lora, r):
    section(f"6. does LoRA (r = {r}) find the directions full fine-tuning uses?")
    rows = {}
    for name, dl in dW_lora.items():
        rows[name] = {"overlap": subspace_overlap(dl, dW_full[name], r), "chance": r / dl.shape[0],
                      "lora_norm": float(np.linalg.norm(dl)), "full_norm": float(np.linalg.norm(dW_full[name]))}
        print(f"  {name:<16} overlap of the top {r} directions (input side) {rows[name]['overlap']:.2f}   (random "
              f"subspaces: {rows[name]['chance']:.2f})   |dW| LoRA {rows[name]['lora_norm']:.3f}, full {rows[name]['full_norm']:.3f}")
    return rows


# ----------------------------------------------------------------------------------------------------
# figures

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
            label="full fine-tuning's dW cut to rank r")
    ax.axhline(rows["full"]["val_loss"], color="tab:red", ls="--", label="full fine-tuning's whole dW")
    ax.axhline(lora_val, color="tab:blue", ls=":", lw=2, label=f"LoRA trained with r = {lora_r} (c_attn only)")
    ax.axvline(lora_r, color="black", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels(["0" if r == 0 else str(r) for r in ranks])
    ax.set_xlabel("rank r kept in every block matrix (log scale; 0: no matrix update)")
    ax.set_ylabel("validation loss (nats per answer token)")
    ax.set_title("Does the low-rank part do the work?")
    handles, labels = ax.get_legend_handles_labels()
    if "field_accuracy" in rows["full"]:
        ax2 = ax.twinx()
        ax2.plot(xs, [100 * rows[r]["field_accuracy"] for r in ranks], "s--", color="tab:green",
                 label="record fields right (cut dW), right axis")
        ax2.set_ylabel("record fields right (% of key=value pairs)", color="tab:green")
        ax2.set_ylim(0, 100)
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=200, batch_size=8, task_name="record", n_test=100, ranks=(1, 2, 4, 8, 16, 32, 64), lora_r=8, seed=0,
         checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    steps, batch_size: the budget of both fine-tuning runs (learning rates: tinyllm.compare's, tuned on this
    task); n_test: test examples scored (the first n; None: all); ranks: the r
    values reported and tested (capped at the matrices' size); lora_r: the rank of tinyllm.compare's LoRA
    (drawn as the reference); checkpoint: the pretrained model (pretrained first if missing); config: GPTConfig
    fields of a random model to use instead (tests). Returns a dict of the measured numbers and figure paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    task = dataclasses.replace(task, test=task.test[:n_test])
    ranks = sorted({r for r in ranks if r <= base.config.n_embd})
    print(f"Base model: {source}. Task {task_name!r} (scored on {len(task.test)} test examples), {steps} steps of "
          f"{batch_size} examples per run.")
    section("1. fine-tuning")
    before = measure_base(base, tok, task)
    full_run, full_after = train_and_keep(base, tok, task, "full", steps, batch_size, before)
    lora_cfg = method_config("lora")
    lora_run, lora_arrays = train_and_keep(base, tok, task, "lora", steps, batch_size, before)
    dW_full, dW_lora = updates(base, full_after, lora_arrays, lora_cfg.scale, base.config.n_layer)

    spectra, random_spectra = show_spectra(dW_full, ranks, lora_r, seed)
    rows = truncation_test(base, tok, task, full_after, dW_full, ranks)
    overlap = show_overlap(dW_full, dW_lora, lora_cfg.r)

    section("what it shows")
    e_at = {name: energy(s)[min(lora_r, len(s)) - 1] for name, s in spectra.items()}
    e_rand = {name: energy(s)[min(lora_r, len(s)) - 1] for name, s in random_spectra.items()}
    print(f"Energy of dW in its top {lora_r} directions: {min(e_at.values()):.0%} to {max(e_at.values()):.0%} over the "
          f"{len(e_at)} matrices (mean {np.mean(list(e_at.values())):.0%}); for random matrices of the same shapes "
          f"{np.mean(list(e_rand.values())):.0%}.")
    lost = rows[lora_r]["val_loss"] - rows["full"]["val_loss"] if lora_r in rows else float("nan")
    span = rows[0]["val_loss"] - rows["full"]["val_loss"]
    print(f"Cutting every dW to rank {lora_r} moves the val loss from {rows['full']['val_loss']:.3f} to "
          f"{rows[lora_r]['val_loss']:.3f} ({lost:+.3f}); dropping the matrix updates altogether gives {rows[0]['val_loss']:.3f}.")
    if span > 0 and lost <= 0:
        print(f"So rank {lora_r} keeps all of the improvement the matrix updates make; the cut update is even "
              f"{-lost:.3f} better.")
    elif span > 0:
        print(f"So rank {lora_r} keeps {1 - lost / span:.0%} of the improvement the matrix updates make.")
    if "field_accuracy" in rows["full"]:
        print(f"On the record's fields, the stricter test: the update cut to rank {lora_r} gets "
              f"{rows[lora_r]['field_accuracy']:.0%} of them right, the whole update {rows['full']['field_accuracy']:.0%}.")
    close = [r for r in ranks if rows[r]["val_loss"] <= 1.1 * rows["full"]["val_loss"]]
    print("The smallest rank within 10% of the whole update's val loss: " +
          (f"r = {close[0]} ({rows[close[0]]['val_loss']:.3f})." if close else f"none up to r = {ranks[-1]}."))
    concentrated = np.mean(list(e_at.values())) > np.mean(list(e_rand.values()))
    if close and close[0] <= lora_r:
        print(f"So here, yes: rank {lora_r} holds what the update does.")
    elif concentrated:
        print("So here, partly: dW is far more concentrated than a random matrix, but matching the whole update took "
              + (f"r = {close[0]}" if close else f"more than r = {ranks[-1]}") + f", more than LoRA's {lora_r}.")
    mean_overlap = np.mean([o["overlap"] for o in overlap.values()]) if overlap else float("nan")
    chance = np.mean([o["chance"] for o in overlap.values()]) if overlap else float("nan")
    print(f"LoRA's update shares {mean_overlap:.2f} of its top-{lora_cfg.r} subspace with full fine-tuning's on c_attn "
          f"(random subspaces: {chance:.2f}). LoRA trained on its own reached val loss {lora_run['final_val_loss']:.3f}, "
          f"full fine-tuning {full_run['final_val_loss']:.3f}.")

    section("figures")
    spectra_path = os.path.join(out_dir, "singular_values.png")
    trunc_path = os.path.join(out_dir, "truncated_update.png")
    plot_spectra(spectra, random_spectra, dW_lora, lora_r, spectra_path)
    plot_truncation(rows, lora_run["final_val_loss"], lora_r, trunc_path)
    print(f"saved {os.path.relpath(spectra_path)}: normalised singular values and energy of every dW")
    print(f"saved {os.path.relpath(trunc_path)}: validation loss with dW cut to rank r")
    return dict(source=source, task=task_name, steps=steps, batch_size=batch_size,
                full_val_loss=full_run["final_val_loss"], lora_val_loss=lora_run["final_val_loss"],
                full_accuracy=full_run["accuracy_after"], lora_accuracy=lora_run["accuracy_after"],
                energy_at_lora_r=e_at, random_energy_at_lora_r=e_rand,
                directions_for_90=({n: directions_for(s, 0.9) for n, s in spectra.items()}),
                truncation=rows, overlap=overlap, figures=[spectra_path, trunc_path])


if __name__ == "__main__":
    main()
