"""
Lesson 15: memory at scale.

On the lessons' small model the weights, gradients and AdamW state take a few MiB and one training step
about 100 MiB for every method, so the methods differ in time and accuracy but not in memory. At real sizes memory decides what can be trained at all. One training step needs four
kinds of memory:

    weights       the model, plus the method's own parameters
    gradients     one number per TRAINABLE parameter
    AdamW state   two numbers (m and v) per trainable parameter
    activations   what the forward keeps for the backward: grows with batch x tokens

tinyllm.memory counts all four for any GPTConfig and method config. This lesson

  1. shows what each method trains for GPT-2 small, with its arithmetic,
  2. checks the calculator against tinyllm's own arrays after a real training step on a small model,
  3. tabulates GPT-2 small, medium, large and XL for every method,
  4. takes the activations apart: which of them the backward reads, and which a frozen layer does not need,
  5. plots them, next to common accelerator memory sizes.

Run from the repository root (one training step on the small model, no fine-tuning runs):

    python lessons/15_memory_at_scale.py

Figures go to runs/lessons/15_memory_at_scale/.

Legend: L layers, C channels, NH heads, V vocabulary, B batch, T tokens, K keys a token attends over, P
virtual tokens, r LoRA rank, m adapter width.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.memory import GPT2_SIZES, DTYPE_BYTES, activation_arrays, activation_count, base_count, training_memory
from tinyllm.model import GPT, GPTConfig
from tinyllm.optim import AdamW
from tinyllm.peft import FullFineTuningConfig, LoraConfig, get_peft_model, method_of
from tinyllm.peft.lora import find_targets, fused_module
from tinyllm.presets import MAIN_METHODS, PRESETS, method_config
from lessons.common import lesson_section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "15_memory_at_scale")
GIB, MIB = 2 ** 30, 2 ** 20
METHODS = {name: method_config(name) for name in MAIN_METHODS}   # as the comparison configures them
ACCELERATORS = (16, 24, 80)   # GiB on common GPUs, for scale
PARTS = ("weights", "gradients", "adam", "activations")


def gib(n_bytes):
    return n_bytes / GIB


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. what trains, for GPT-2 small")
def show_counts(mc):
    """Each method at the sizes the comparison uses, on GPT-2 small's shapes. Gradients and AdamW's m and v
    exist only for trainable numbers: 3 per trainable parameter, on top of the weights. For full
    fine-tuning that is 3 more copies of the whole model."""
    lesson = GPTConfig()
    print(f"For scale, the lessons' model: {base_count(lesson):,} parameters, "
          f"{base_count(lesson) * DTYPE_BYTES['float32'] / MIB:.1f} MiB in float32.")
    total = base_count(mc)
    print(f"GPT-2 small: {mc.n_layer} layers, C = {mc.n_embd}, V = {mc.vocab_size:,}, context {mc.block_size}: "
          f"{total:,} parameters (the LM head shares wte).")
    counts = {}
    for name, method in METHODS.items():
        counts[name] = n = training_memory(mc, method)["counts"]["trainable"]
        print(f"  {name:<8} {n:>13,} trainable ({100 * n / total:7.3f}% of the base)   "
              f"{method_of(method).formula(method, mc)}")
    return counts


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


@lesson_section("2. the calculator against a real training step")
def check_calculator(mc, batch_size, seq_len):
    """One forward, backward and AdamW step of every method on a small random GPT. Measured: the parameters,
    the gradients backward() returned, AdamW's m and v, and every float array the forward cached for the
    backward (each counted once, however many views of it the cache holds). Predicted: tinyllm.memory. When
    they agree, the numbers in part 3 are what tinyllm itself would hold at those sizes."""
    print(f"The model: {mc.n_layer} layers, C = {mc.n_embd}, V = {mc.vocab_size}; a batch of {batch_size} x {seq_len} "
          f"tokens.\n")
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
    print(f"\nEvery count agrees exactly: {all_agree}.")
    return rows, all_agree


@lesson_section("3. GPT-2 small to XL")
def show_table(sizes, batch_size, seq_len, dtype):
    """Every method at every GPT-2 size, one training step, all arrays in one dtype. Virtual tokens take
    their room from the sequence. 'vs full': the total as a fraction of full fine-tuning's."""
    print(f"One step of {batch_size} x {seq_len} tokens, {dtype}; GiB:\n")
    table = {}
    print(f"{'model':<12} {'params':>8} {'method':<8} {'weights':>9} {'grads':>9} {'AdamW':>9} {'activ.':>9} "
          f"{'total':>9} {'vs full':>8}")
    for size in sizes:
        mc = GPT2_SIZES[size]
        table[size] = {}
        for name, method in METHODS.items():
            T = min(seq_len, mc.block_size - method_of(method).reserved_positions(method))
            table[size][name] = training_memory(mc, method, batch_size, T, dtype)
        full = table[size]["full"]["bytes"]["total"]
        for name, m in table[size].items():
            b = m["bytes"]
            print(f"{size:<12} {base_count(mc) / 1e6:7.0f}M {name:<8} " + " ".join(f"{gib(b[p]):9.3f}" for p in PARTS)
                  + f" {gib(b['total']):9.2f} {b['total'] / full:8.2f}")
        print()
    big = sizes[-1]
    full, lora = table[big]["full"]["bytes"], table[big]["lora"]["bytes"]
    print(f"At {big}, full fine-tuning needs {gib(full['total']):.1f} GiB: the weights ({gib(full['weights']):.1f}) and "
          f"then {gib(full['gradients'] + full['adam']):.1f} GiB more for their gradients and AdamW state.")
    print(f"LoRA needs {gib(lora['total']):.1f} GiB ({lora['total'] / full['total']:.0%} of it): its gradients and "
          f"AdamW state are {(lora['gradients'] + lora['adam']) / MIB:.0f} MiB. Its activations, "
          f"{gib(lora['activations']):.1f} GiB, are about full fine-tuning's ({gib(full['activations']):.1f}): part 4 "
          f"says why.")
    return table


# the block's cache, per token (tinyllm.model.block_forward): what it is, its size, and whose backward reads it
def block_cache(C, NH, K):
    return [("ln_1's normalised input and 1/std", C + 1, "ln_1"),
            ("ln_1's output = c_attn's input", C, "c_attn's dW only"),
            ("c_attn's output: q, k, v", 3 * C, "attention"),
            ("attention weights", NH * K, "attention"),
            ("attention's output = attn.c_proj's input", C, "attention (its dy . y), and attn.c_proj's dW"),
            ("ln_2's normalised input and 1/std", C + 1, "ln_2"),
            ("ln_2's output = mlp.c_fc's input", C, "mlp.c_fc's dW only"),
            ("mlp.c_fc's output = GELU's input", 4 * C, "GELU"),
            ("GELU's tanh", 4 * C, "GELU"),
            ("GELU's output = mlp.c_proj's input", 4 * C, "mlp.c_proj's dW only")]


DW_ONLY = {"attn.c_attn": 1, "mlp.c_fc": 1, "mlp.c_proj": 4}   # linears whose input only their dW reads: width / C


def inputs_read(name, method, mc):
    """The linears whose stored input the method's own gradients read: every one for full fine-tuning (each
    weight's dW), LoRA's targets (A's gradient is scale * x^T (dout B^T)), none for the others: prefixes
    enter inside attention, prompts at the input, and adapters and (IA)^3's scalings keep what they need
    in their own cache."""
    if isinstance(method, FullFineTuningConfig):
        return set(DW_ONLY)
    if isinstance(method, LoraConfig):
        return {fused_module(t).split(".", 2)[2] for t in find_targets(method, mc)}
    return set()


def unread_inputs(name, method, mc, B, T):
    """Numbers tinyllm caches that no backward of this method reads: the inputs of frozen linears kept only
    for a weight gradient that is never computed, and ln_f's output (the tied head's input) when wte is
    frozen."""
    P = method_of(method).prompt_positions(method)
    read = inputs_read(name, method, mc)
    per_block = sum(w * mc.n_embd for lin, w in DW_ONLY.items() if lin not in read)
    head = 0 if isinstance(method, FullFineTuningConfig) else mc.n_embd
    return mc.n_layer * B * (T + P) * per_block + B * (T + P) * head


@lesson_section("4. the activations: what the backward reads")
def show_activations(size, batch_size, seq_len, dtype, table):
    """The backward must pass through every frozen layer to reach the trainable parameters below it, and
    passing through needs most of what the forward kept: layer norm's normalised input, attention's q, k, v
    and weights, GELU's input and tanh. That is why the activations barely change with the method. A frozen
    LINEAR layer is the exception: its dx = dout @ W^T needs W but no stored input; the input x is kept only
    for dW = x^T @ dout. tinyllm's linear_forward caches (x, W) whether or not W trains, so tinyllm keeps
    them all, and the counts above are what it holds. One of those inputs is read anyway: attn.c_proj's
    input is attention's output, which attention's own backward reads (tinyllm.layers.attention_backward
    uses dy . y for the softmax). The others are read by their dW alone: a framework that keeps a linear's
    input only when its weight needs a gradient (some do) saves them with every method but full
    fine-tuning, and LoRA keeps the inputs of the linears it adapts, since A's gradient reads them."""
    mc = GPT2_SIZES[size]
    C, NH, K = mc.n_embd, mc.n_head, seq_len
    rows = block_cache(C, NH, K)
    print(f"{size}, per block and token, with no virtual tokens (K = T = {K} keys), in numbers:")
    for what, n, reader in rows:
        print(f"  {what:<42} {n:>7,}   read by {reader}")
    per_block = sum(n for _, n, _ in rows)
    counted = activation_count(mc, FullFineTuningConfig(), batch_size, seq_len)
    after_blocks = batch_size * seq_len * (2 * C + 1 + mc.vocab_size)    # ln_f (xhat, 1/std, output), the softmax
    matches = mc.n_layer * batch_size * seq_len * per_block + after_blocks == counted
    print(f"  {'in all':<42} {per_block:>7,}   = 20C + 2 + NH*K")
    print(f"With ln_f and the logits' softmax after the blocks, these rows add up to tinyllm.memory's count: {matches}.")
    size_of = DTYPE_BYTES[dtype]
    print(f"\nPer method, one step of {batch_size} x {seq_len} tokens, {dtype}: the activations tinyllm keeps, and how "
          f"much of them no backward\nof that method reads (inputs of frozen linears, and the frozen head's input):")
    unread = {}
    for name, method in METHODS.items():
        m = table[name]
        kept = m["bytes"]["activations"]
        unread[name] = unread_inputs(name, method, mc, batch_size, m["seq_len"]) * size_of
        print(f"  {name:<8} kept {gib(kept):6.2f} GiB, of which unread {gib(unread[name]):5.2f} GiB "
              f"({unread[name] / kept:4.0%}); the method's whole step without them: "
              f"{gib(m['bytes']['total'] - unread[name]):6.2f} GiB")
    print("\nWhat is left still grows with the batch, and through attention's weights (NH*K per token) with the square\n"
          "of the sequence length. Gradient checkpointing keeps only some of it and recomputes the rest with a second\n"
          "forward during the backward.")
    return {"breakdown_matches": matches, "unread_bytes": unread}


@lesson_section("5. the figure")
def save_figure(table, sizes, batch_size, seq_len, dtype, out_dir):
    """memory_by_method_and_size.png: left, each method's total for one training step at every GPT-2 size,
    next to common accelerator memory sizes; right, where it goes at the largest size: weights, gradients,
    AdamW's m and v, and activations."""
    path = os.path.join(out_dir, "memory_by_method_and_size.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.3, 1]})
    names = list(METHODS)
    width = 0.8 / len(names)
    x = np.arange(len(sizes))
    for j, name in enumerate(names):
        totals = [gib(table[s][name]["bytes"]["total"]) for s in sizes]
        ax1.bar(x + (j - (len(names) - 1) / 2) * width, totals, width, color=PRESETS[name].color,
                label=PRESETS[name].label)
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
    ax2.set_xticklabels([PRESETS[n].label for n in names])
    ax2.set_xlabel("method")
    ax2.set_ylabel(f"GiB ({dtype}, log scale)")
    ax2.set_title(f"Where it goes, {big}")
    ax2.set_ylim(top=ax2.get_ylim()[1] * 30)    # room for the legend above the bars
    ax2.legend(loc="upper center", ncol=2, fontsize=9)
    ax2.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {os.path.relpath(path)}")
    return path


# ----------------------------------------------------------------------------------------------------

def main(sizes=tuple(GPT2_SIZES), batch_size=1, seq_len=1024, dtype="float32",
         check_config=None, check_batch=(2, 24), out_dir=OUT_DIR):
    """Run the lesson.

    sizes: keys of tinyllm.memory.GPT2_SIZES; batch_size, seq_len: the training step counted at those sizes
    (virtual tokens take their room from seq_len); dtype: of every array; check_config: GPTConfig fields of the
    small model the calculator is checked on (default: the lessons' model); check_batch: (B, T) of that
    check. Returns a dict of the numbers (and the figure's path).
    """
    os.makedirs(out_dir, exist_ok=True)
    sizes = list(sizes)
    counts = show_counts(GPT2_SIZES["gpt2"])
    rows, all_agree = check_calculator(GPTConfig(**(check_config or {})), *check_batch)
    table = show_table(sizes, batch_size, seq_len, dtype)
    activations = show_activations(sizes[-1], batch_size, seq_len, dtype, table[sizes[-1]])
    path = save_figure(table, sizes, batch_size, seq_len, dtype, out_dir)
    gib_table = {s: {n: {k: gib(v) for k, v in m["bytes"].items()} for n, m in table[s].items()} for s in table}
    return dict(gpt2_small_params=base_count(GPT2_SIZES["gpt2"]), trainable_gpt2_small=counts, check=rows,
                calculator_agrees=all_agree, gib=gib_table, breakdown_matches=activations["breakdown_matches"],
                unread_gib={n: gib(b) for n, b in activations["unread_bytes"].items()},
                params={s: base_count(GPT2_SIZES[s]) for s in sizes}, figures=[path])


if __name__ == "__main__":
    main()
