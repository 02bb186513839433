"""
Lesson 15: memory at scale.

On our 0.8M-parameter model every method fits in a few megabytes, so the methods differ in time and
accuracy but not in memory. At real sizes memory decides what can be trained at all. Training one step
needs four kinds of memory:

    weights       the model, plus the method's own parameters
    gradients     one number per TRAINABLE parameter
    AdamW state   two numbers (m and v) per trainable parameter
    activations   what the forward keeps for the backward: grows with batch x tokens, not with the method

tinyllm.memory counts all four for any GPTConfig and method config. This lesson

  1. shows the counts for GPT-2 small, with each method's arithmetic,
  2. checks the calculator against tinyllm's own arrays after a real training step on a small model,
  3. tabulates GPT-2 small, medium, large and XL for every method,
  4. plots them, next to common accelerator memory sizes.

Run from the repository root (a few seconds, no training):

    python lessons/15_memory_at_scale.py

Figures go to runs/lessons/15_memory_at_scale/.

Legend: L layers, C channels, V vocabulary, B batch, T tokens, P virtual tokens, r LoRA rank, m adapter width.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.memory import GPT2_SIZES, activation_arrays, base_count, training_memory
from tinyllm.model import GPT, GPTConfig
from tinyllm.optim import AdamW
from tinyllm.presets import MAIN_METHODS as METHOD_NAMES, method_config
from tinyllm.peft import AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from lessons.common import section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "15_memory_at_scale")
GIB = 2 ** 30
METHODS = {name: method_config(name) for name in METHOD_NAMES}   # as tinyllm.compare configures them
ACCELERATORS = (16, 24, 80)   # GiB on common GPUs, for scale
COLORS = {"full": "tab:red", "lora": "tab:blue", "prefix": "tab:green", "prompt": "tab:purple",
          "adapter": "tab:orange"}
PARTS = ("weights", "gradients", "adam", "activations")


def gib(n_bytes):
    return n_bytes / GIB


# ----------------------------------------------------------------------------------------------------
# 1. the counts for GPT-2 small

def show_counts(mc):
    section("1. what trains, for GPT-2 small")
    from tinyllm.peft import adapter, lora, prefix, prompt
    formulas = {LoraConfig: lora.formula, PrefixTuningConfig: prefix.formula, PromptTuningConfig: prompt.formula,
                AdapterConfig: adapter.formula}
    total = base_count(mc)
    print(f"GPT-2 small: {mc.n_layer} layers, C = {mc.n_embd}, V = {mc.vocab_size:,}, context {mc.block_size}: "
          f"{total:,} parameters (the LM head shares wte).")
    counts = {}
    for name, method in METHODS.items():
        m = training_memory(mc, method)["counts"]
        counts[name] = m["trainable"]
        how = formulas[type(method)](method, mc) if type(method) in formulas else "every weight of the model"
        print(f"  {name:<8} {m['trainable']:>13,} trainable ({100 * m['trainable'] / total:7.3f}% of the base)   {how}")
    print("\nGradients and AdamW's m and v exist only for trainable numbers: 3 per trainable parameter, on top")
    print("of the weights. For full fine-tuning that is 3 more copies of the whole model.")
    return counts


# ----------------------------------------------------------------------------------------------------
# 2. the calculator against tinyllm's own arrays

def measure_step(mc, method, batch_size, seq_len, seed=0):
    """Run one real training step of method on a random GPT and count its arrays."""
    pm = get_peft_model(GPT(mc, seed=seed), method, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, mc.vocab_size, (batch_size, seq_len))                    # (B,T)
    y = rng.integers(0, mc.vocab_size, (batch_size, seq_len))                    # (B,T)
    optimizer = AdamW(pm.trainable_parameters(), lr=1e-3)
    pm.forward(x, y)
    weights = [*pm.base_model.params.values(), *pm.adapters["default"].values()]
    activations = sum(a.size for a in activation_arrays(pm._cache, weights) if a.dtype.kind == "f")
    grads = pm.backward()
    optimizer.step(grads)
    return {"weights": pm.get_nb_trainable_parameters()[1], "gradients": sum(g.size for g in grads.values()),
            "adam": optimizer.state_bytes() // pm.base_model.dtype.itemsize, "activations": activations}


def check_calculator(mc, batch_size, seq_len):
    section("2. the calculator against a real training step")
    print(f"A random GPT with {mc.n_layer} layers, C = {mc.n_embd}, V = {mc.vocab_size}; one forward, backward and "
          f"AdamW step on a batch of {batch_size} x {seq_len} tokens.")
    print("Measured: the parameters, the gradients backward() returned, AdamW's m and v, and every float array")
    print("the forward cached for the backward (each counted once). Predicted: tinyllm.memory.\n")
    print(f"{'method':<8} " + " ".join(f"{p + ' meas / pred':>27}" for p in PARTS) + "  agree")
    rows, all_agree = {}, True
    for name, method in METHODS.items():
        measured = measure_step(mc, method, batch_size, seq_len)
        predicted = training_memory(mc, method, batch_size, seq_len)["counts"]
        agree = all(measured[p] == predicted[p] for p in PARTS)
        all_agree &= agree
        rows[name] = {"measured": measured, "predicted": {p: predicted[p] for p in PARTS}, "agree": agree}
        print(f"{name:<8} " + " ".join(f"{measured[p]:>13,} / {predicted[p]:<11,}" for p in PARTS)
              + f"  {'yes' if agree else 'NO'}")
    print(f"\nEvery count agrees exactly: {all_agree}. So the numbers below are what tinyllm itself would hold")
    print("at those sizes (in float32, B x T tokens per step); PyTorch keeps a somewhat different set of activations.")
    return rows, all_agree


# ----------------------------------------------------------------------------------------------------
# 3. GPT-2 small to XL

def show_table(sizes, batch_size, seq_len, dtype):
    section(f"3. GPT-2 small to XL, one step of {batch_size} x {seq_len} tokens, {dtype}")
    table = {}
    print(f"{'model':<12} {'params':>8} {'method':<8} {'weights':>9} {'grads':>9} {'AdamW':>9} {'activ.':>9} "
          f"{'total GiB':>10} {'vs full':>8}")
    for size in sizes:
        mc = GPT2_SIZES[size]
        table[size] = {}
        for name, method in METHODS.items():
            T = min(seq_len, mc.block_size - getattr(method, "num_virtual_tokens", 0))   # room for virtual tokens
            table[size][name] = training_memory(mc, method, batch_size, T, dtype)
        full = table[size]["full"]["bytes"]["total"]
        for name, m in table[size].items():
            b = m["bytes"]
            print(f"{size:<12} {base_count(mc) / 1e6:7.0f}M {name:<8} " + " ".join(f"{gib(b[p]):9.3f}" for p in PARTS)
                  + f" {gib(b['total']):10.2f} {b['total'] / full:8.2f}")
        print()
    xl = "gpt2-xl" if "gpt2-xl" in table else sizes[-1]
    full, lora = table[xl]["full"]["bytes"], table[xl]["lora"]["bytes"]
    states = full["gradients"] + full["adam"]
    print(f"At {xl}, full fine-tuning needs {gib(full['total']):.1f} GiB: the weights ({gib(full['weights']):.1f}) and "
          f"then {gib(states):.1f} GiB more for their gradients and AdamW state.")
    print(f"LoRA needs {gib(lora['total']):.1f} GiB ({lora['total'] / full['total']:.0%} of it): its gradients and "
          f"AdamW state are {gib(lora['gradients'] + lora['adam']) * 1024:.0f} MiB.")
    print(f"What no method saves: the activations, {gib(full['activations']):.1f} GiB for "
          f"{batch_size} x {seq_len} tokens, because the backward must pass through every frozen layer to reach")
    print("the trainable parameters below them. They grow with the batch (and, through attention, with the square")
    print("of the sequence length); gradient checkpointing trades them for a second forward.")
    per_token = table[xl]["full"]["counts"]["activations_per_token"]
    print(f"\nActivations per token at {xl}: {per_token:,.0f} numbers = {per_token * 4 / 2**20:.1f} MiB in float32.")
    return table


# ----------------------------------------------------------------------------------------------------
# 4. figure

def plot_memory(table, sizes, batch_size, seq_len, dtype, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.3, 1]})
    names = list(METHODS)
    width = 0.8 / len(names)
    x = np.arange(len(sizes))
    for j, name in enumerate(names):
        totals = [gib(table[s][name]["bytes"]["total"]) for s in sizes]
        ax1.bar(x + (j - (len(names) - 1) / 2) * width, totals, width, color=COLORS[name], label=name)
    for g in ACCELERATORS:
        ax1.axhline(g, color="gray", ls="--", lw=0.8)
        ax1.text(-0.45, g * 1.03, f"a {g} GiB GPU", color="dimgray", ha="left", va="bottom", fontsize=9)
    ax1.set_yscale("log")
    ax1.set_ylim(1, 300)
    ax1.set_yticks([1, 2, 5, 10, 20, 50, 100, 200])
    ax1.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(plt.NullFormatter())
    ax1.set_xticks(x)
    ax1.set_xticklabels([f"{s}\n{base_count(GPT2_SIZES[s]) / 1e6:.0f}M params" for s in sizes])
    ax1.set_xlabel("model size")
    ax1.set_ylabel(f"memory for one training step (GiB, {dtype}, log scale)")
    ax1.set_title(f"Total: weights + gradients + AdamW + activations ({batch_size} x {seq_len} tokens)")
    ax1.legend(title="method", loc="upper center", ncol=len(names))
    ax1.grid(axis="y", which="both", alpha=0.3)

    big = sizes[-1]
    width = 0.8 / len(PARTS)
    x = np.arange(len(names))
    part_colors = {"weights": "tab:gray", "gradients": "tab:pink", "adam": "tab:brown", "activations": "tab:cyan"}
    for j, part in enumerate(PARTS):
        values = [max(gib(table[big][n]["bytes"][part]), 1e-6) for n in names]
        ax2.bar(x + (j - (len(PARTS) - 1) / 2) * width, values, width, color=part_colors[part],
                label="AdamW m + v" if part == "adam" else part)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.set_xticks(x)
    ax2.set_xticklabels(names)
    ax2.set_xlabel("method")
    ax2.set_ylabel(f"GiB ({dtype}, log scale)")
    ax2.set_title(f"Where it goes, {big}")
    ax2.set_ylim(top=ax2.get_ylim()[1] * 30)    # room for the legend above the bars
    ax2.legend(loc="upper center", ncol=2, fontsize=9)
    ax2.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(sizes=tuple(GPT2_SIZES), batch_size=1, seq_len=1024, dtype="float32",
         check_config=None, check_batch=(2, 24), out_dir=OUT_DIR):
    """Run the lesson.

    sizes: keys of tinyllm.memory.GPT2_SIZES; batch_size, seq_len: the training step counted at those sizes
    (virtual tokens take their room from seq_len); dtype: of every array; check_config: GPTConfig fields of the
    small model the calculator is checked on (default: the lesson model, 4 layers, C = 128); check_batch: (B, T)
    of that check. Returns a dict of the numbers (and the figure's path).
    """
    os.makedirs(out_dir, exist_ok=True)
    counts = show_counts(GPT2_SIZES["gpt2"])
    rows, all_agree = check_calculator(GPTConfig(**(check_config or {})), *check_batch)
    table = show_table(list(sizes), batch_size, seq_len, dtype)

    section("figure")
    path = os.path.join(out_dir, "memory_by_method_and_size.png")
    plot_memory(table, list(sizes), batch_size, seq_len, dtype, path)
    print(f"saved {os.path.relpath(path)}: memory per method and model size, and its parts at {sizes[-1]}")
    gib_table = {s: {n: {k: gib(v) for k, v in m["bytes"].items()} for n, m in table[s].items()} for s in table}
    return dict(gpt2_small_params=base_count(GPT2_SIZES["gpt2"]), trainable_gpt2_small=counts, check=rows,
                calculator_agrees=all_agree, gib=gib_table,
                params={s: base_count(GPT2_SIZES[s]) for s in sizes}, figures=[path])


if __name__ == "__main__":
    main()
