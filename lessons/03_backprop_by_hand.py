"""
Lesson 03: backpropagation by hand.

tinyllm has no autograd: every layer is a pair, `out, cache = X_forward(...)` and `dx, ... =
X_backward(dout, cache)`, and the model's backward is its forward read in reverse. This lesson walks a
tiny GPT through both, in float64:

  1. the model: a tiny GPT in float64, its parameters moved away from their initialisation (and why)
  2. the forward, layer by layer, keeping each layer's cache
  3. the backward: seed dloss/dloss = 1, then every layer's backward in exact reverse order
  4. the proof: every parameter tensor's gradient against centred finite differences,
         numeric = (loss(w + h) - loss(w - h)) / (2 h)
     in a cmp-style table (name, max abs diff, relative error, ok)
  5. the same check for single layers: layer norm, GELU, attention, cross-entropy
  6. why in float64: what float32 does to finite differences

Gradients are checked on a random model: a gradient is right or wrong whatever the weights, so this lesson
needs no pretrained one. Run from the repository root (seconds):

    python lessons/03_backprop_by_hand.py

Figures go to runs/lessons/03_backprop_by_hand/.

Legend: B batch, T time, C channels, NH heads, V vocabulary, L layers.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from tinyllm.data import World, get_batch, make_corpus
from tinyllm.gradcheck import check_gradients, numerical_gradient, print_table, rel_error
from tinyllm.layers import (attention_backward, attention_forward, cross_entropy_backward,
                            cross_entropy_forward, embedding_backward, embedding_forward, gelu_backward,
                            gelu_forward, layernorm_backward, layernorm_forward, linear_backward,
                            linear_forward)
from tinyllm.model import GPTConfig, gpt_backward, gpt_forward, init_params
from tinyllm.tokenizer import default_tokenizer
from lessons.common import indented, lesson_section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "03_backprop_by_hand")
TINY = dict(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)   # section 1 prints its size
MODEL_TOL = 1e-6    # a whole model, float64: many layers of rounding add up
LAYER_TOL = 1e-7    # one layer, float64 (cs231n's threshold for a correct gradient)


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. the model: a tiny GPT, moved away from its initialisation")
def the_model(config, batch_size, seed):
    """A gradient check runs the whole forward twice for every parameter entry it checks, so the model is
    tiny, and in float64 (section 6 shows why). Its parameters are not left at their initialisation: there
    every bias is 0 and every layer-norm gain 1, and a wrong gradient term multiplied by a zero vanishes, or
    by a one hides. A check there can pass with a bug in the code. So moved_from_init (below) shakes every
    parameter first: gains around 1 and biases around 0 with a spread, matrices with a larger one."""
    config = GPTConfig(**config)
    tok = default_tokenizer()
    text = make_corpus(World(0, 24), n_docs=8, seed=seed)
    idx, targets = get_batch(tok.encode(text), batch_size, config.block_size, np.random.default_rng(seed))
    p = moved_from_init(config, seed)
    n_params = sum(v.size for v in p.values())
    print(f"{config.n_layer} blocks, {config.n_head} heads, C = {config.n_embd}, V = {config.vocab_size}: "
          f"{n_params:,} parameters in {len(p)} tensors, float64.")
    init = init_params(config, seed, np.float64)
    spread = lambda q: [float(np.std(q[k])) for k in ("h.0.ln_1.weight", "h.0.attn.c_attn.bias",
                                                      "h.0.attn.c_attn.weight")]
    print("Spread (std) of block 0's ln_1 gain, c_attn bias and c_attn weight: at init "
          + ", ".join(f"{v:.2f}" for v in spread(init)) + "; moved " + ", ".join(f"{v:.2f}" for v in spread(p)) + ".")
    print(f"Batch: {batch_size} windows of {config.block_size} characters, e.g. {tok.decode(idx[0])!r}.")
    return config, p, idx, targets, n_params


def moved_from_init(config, seed):
    """float64 GPT-2 parameters, moved well away from their initialisation (see section 1)."""
    rng = np.random.default_rng(seed)
    p = init_params(config, seed, np.float64)
    for name, v in p.items():
        if ".ln_" in name or name.startswith("ln_f"):
            p[name] = (1.0 if name.endswith("weight") else 0.0) + 0.2 * rng.normal(size=v.shape)
        elif name.endswith("bias"):
            p[name] = 0.1 * rng.normal(size=v.shape)
        else:
            p[name] = 0.3 * rng.normal(size=v.shape)
    return p


@lesson_section("2. the forward")
def the_forward(p, idx, targets, config):
    """GPT-2's forward, one layer call per line (below, in forward): embeddings; per block, layer norm,
    attention and its projection added back to x (the residual), then layer norm, the MLP and its
    projection added back; a final layer norm; the logits, with wte itself as the output layer; the loss.
    Every call returns its output and a cache, what its backward will need; the caches are kept in order."""
    return forward(p, idx, targets, config, say=indented)


def forward(p, idx, targets, config, say):
    """GPT-2's forward, one layer call per line. Returns the loss and every cache the backward needs."""
    B, T = idx.shape
    V, C = p["wte.weight"].shape
    x, c_wte = embedding_forward(idx, p["wte.weight"])                          # (B,T,C)
    x = x + p["wpe.weight"][:T]                                                 # (B,T,C)
    say(f"x = wte[idx] + wpe[:T]                       {x.shape}")
    blocks = []
    for i in range(config.n_layer):
        w = lambda name: (p[f"h.{i}.{name}.weight"], p[f"h.{i}.{name}.bias"])
        a, c_ln1 = layernorm_forward(x, *w("ln_1"))                             # (B,T,C)
        a, c_attn = linear_forward(a, *w("attn.c_attn"))                        # (B,T,3C)
        a, c_att = attention_forward(a, config.n_head)                          # (B,T,C)
        a, c_aproj = linear_forward(a, *w("attn.c_proj"))                       # (B,T,C)
        x = x + a                                                               # residual
        m, c_ln2 = layernorm_forward(x, *w("ln_2"))                             # (B,T,C)
        m, c_fc = linear_forward(m, *w("mlp.c_fc"))                             # (B,T,4C)
        m, c_gelu = gelu_forward(m)                                             # (B,T,4C)
        m, c_mproj = linear_forward(m, *w("mlp.c_proj"))                        # (B,T,C)
        x = x + m                                                               # residual
        blocks.append((c_ln1, c_attn, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj))
        say(f"block {i}: ln_1 -> c_attn {(B, T, 3 * C)} -> attention -> c_proj, x = x + a")
        say(f"         ln_2 -> c_fc {(B, T, 4 * C)} -> gelu -> c_proj {(B, T, C)},     x = x + m")
    xf, c_lnf = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])          # (B,T,C)
    logits = xf @ p["wte.weight"].T                                             # (B,T,C) @ (C,V) -> (B,T,V)
    say(f"ln_f, then logits = x @ wte^T (the head is wte itself)  {logits.shape}")
    loss, c_loss = cross_entropy_forward(logits.reshape(B * T, V), targets.reshape(-1))
    say(f"loss = cross_entropy(logits, targets)        {loss:.6f}")
    return loss, (c_wte, blocks, xf, c_lnf, c_loss)


@lesson_section("3. the backward, in reverse order")
def the_backward(p, caches, config, idx, targets, loss):
    """The backward starts from the seed dloss/dloss = 1 and calls every layer's backward in exact reverse
    order of the forward (below, in backward), each step quoting the forward line it undoes. Two places
    sum gradients: a residual x = x + branch hands dx, unchanged, both to the branch and to the path around
    it; and wte, used twice (as the embedding and as the output layer), gets the sum of both uses.
    Then the same gradients from the library's own backward, tinyllm.model.gpt_backward."""
    grads = backward(p, caches, config, say=indented)
    _, lib_loss, lib_cache = gpt_forward(p, idx, config, targets)
    lib_grads = gpt_backward(lib_cache, set(p))
    same_keys = set(grads) == set(lib_grads) == set(p)
    vs_lib = max(float(np.max(np.abs(grads[k] - lib_grads[k]))) for k in p)
    print(f"\n{len(grads)} gradient tensors, one per parameter tensor: {same_keys}.")
    print(f"tinyllm.model.gpt_backward gives the same: loss difference {abs(loss - lib_loss):.1e}, largest "
          f"gradient difference {vs_lib:.1e}.")
    return grads, dict(same_keys=same_keys, grad_vs_library_max_diff=vs_lib)


def backward(p, caches, config, say):
    """Every parameter's gradient. Each step quotes the forward line it undoes."""
    c_wte, blocks, xf, c_lnf, c_loss = caches
    B, T, C = xf.shape
    V = p["wte.weight"].shape[0]
    g = {}
    dloss = 1.0                                                                 # the seed: dloss/dloss = 1
    say("dloss = 1.0                                   the seed: the gradient of the loss with respect to itself")
    dlogits = cross_entropy_backward(dloss, c_loss).reshape(B, T, V)            # (softmax - onehot) / (B*T)
    say(f"dlogits = (softmax - onehot) / (B*T)         {dlogits.shape}")
    # forward was: logits = xf @ wte^T
    g["wte.weight"] = dlogits.reshape(-1, V).T @ xf.reshape(-1, C)              # (V,C), the head's share
    dxf = dlogits @ p["wte.weight"]                                             # (B,T,V) @ (V,C) -> (B,T,C)
    dx, g["ln_f.weight"], g["ln_f.bias"] = layernorm_backward(dxf, c_lnf)
    say("dwte (head's share), dx through ln_f")
    for i in reversed(range(config.n_layer)):
        c_ln1, c_attn, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj = blocks[i]
        h = f"h.{i}."
        # forward was: x = x + m; the residual hands dx, unchanged, to the branch and to the path around it
        dm, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"] = linear_backward(dx, c_mproj)
        dm = gelu_backward(dm, c_gelu)
        dm, g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"] = linear_backward(dm, c_fc)
        dm, g[h + "ln_2.weight"], g[h + "ln_2.bias"] = layernorm_backward(dm, c_ln2)
        dx = dx + dm
        # forward was: x = x + a
        da, g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"] = linear_backward(dx, c_aproj)
        da, _, _ = attention_backward(da, c_att)                                # (B,T,3C)
        da, g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"] = linear_backward(da, c_attn)
        da, g[h + "ln_1.weight"], g[h + "ln_1.bias"] = layernorm_backward(da, c_ln1)
        dx = dx + da
        say(f"block {i}: c_proj <- gelu <- c_fc <- ln_2, dx += dm;  c_proj <- attention <- c_attn <- ln_1, dx += da")
    # forward was: x = wte[idx] + wpe[:T]
    g["wpe.weight"] = np.zeros_like(p["wpe.weight"])
    g["wpe.weight"][:T] = dx.sum(axis=0)                                        # every sequence used rows 0..T-1
    g["wte.weight"] += embedding_backward(dx, c_wte)                            # wte was used twice: sum both
    say("dwpe[:T] = dx summed over the batch;  dwte += scatter-add of dx (wte is the head AND the embedding)")
    return g


@lesson_section("4. every parameter tensor against finite differences")
def check_every_tensor(p, idx, targets, config, grads, n_params, n_samples, seed):
    """For each checked entry w of a parameter: nudge it by h = 1e-5 both ways, run the whole forward, and
    compare (loss(w + h) - loss(w - h)) / 2h with the analytic gradient. Per tensor, the relative error
    max|analytic - numeric| / max(|analytic| + |numeric|), the cs231n recipe. The rows come in the order
    the backward produced the gradients: from the head down to the embeddings."""
    n_checked = n_params if n_samples is None else sum(min(n_samples, v.size) for v in p.values())
    print(f"{n_checked:,} entries checked, {'every one' if n_samples is None else f'up to {n_samples} per tensor'}:\n")
    f = lambda: gpt_forward(p, idx, config, targets)[1]
    rows = check_gradients(f, p, grads, n_samples=n_samples, seed=seed)
    print_table(rows, tol=MODEL_TOL)
    worst = max(r[2] for r in rows)
    print(f"\nworst relative error {worst:.2e} (threshold {MODEL_TOL:g}): "
          f"{'every gradient is right' if worst < MODEL_TOL else 'SOMETHING IS WRONG'}.")
    return rows, dict(n_checked=n_checked, worst_model_rel_error=worst, model_rows=rows)


@lesson_section("5. single layers")
def check_single_layers(seed):
    """Each layer alone, with a random upstream gradient G: a layer's output is an array, so the checked
    scalar is sum(out * G), and the analytic side is X_backward(G, cache). Fewer operations than the whole
    model, so less rounding: the threshold is 1e-7."""
    rows = layer_checks(np.random.default_rng(seed + 1))
    print_table(rows, tol=LAYER_TOL)
    return rows, dict(worst_layer_rel_error=max(r[2] for r in rows), layer_rows=rows)


def layer_checks(rng):
    """Each layer alone: rows (name, max abs diff, relative error)."""
    B, T, C, NH, V = 2, 5, 8, 2, 7
    rows = []

    def check(layer, f, arrays, grads):
        rows.extend((f"{layer}: {name}", diff, rel) for name, diff, rel in check_gradients(f, arrays, grads))

    a = dict(x=rng.normal(size=(B, T, C)), w=1 + 0.2 * rng.normal(size=C), b=0.1 * rng.normal(size=C))
    G = rng.normal(size=(B, T, C))
    dx, dw, db = layernorm_backward(G, layernorm_forward(a["x"], a["w"], a["b"])[1])
    check("layernorm", lambda: np.sum(layernorm_forward(a["x"], a["w"], a["b"])[0] * G), a, dict(x=dx, w=dw, b=db))

    a = dict(x=2 * rng.normal(size=(B, T, 4 * C)))
    G = rng.normal(size=(B, T, 4 * C))
    dx = gelu_backward(G, gelu_forward(a["x"])[1])
    check("gelu", lambda: np.sum(gelu_forward(a["x"])[0] * G), a, dict(x=dx))

    a = dict(qkv=rng.normal(size=(B, T, 3 * C)))
    G = rng.normal(size=(B, T, C))
    dqkv, _, _ = attention_backward(G, attention_forward(a["qkv"], NH)[1])
    check("attention", lambda: np.sum(attention_forward(a["qkv"], NH)[0] * G), a, dict(qkv=dqkv))

    a = dict(logits=rng.normal(size=(B * T, V)))
    targets = rng.integers(0, V, size=B * T)
    dlogits = cross_entropy_backward(1.0, cross_entropy_forward(a["logits"], targets)[1])   # the loss is the scalar
    check("cross_entropy", lambda: cross_entropy_forward(a["logits"], targets)[0], a, dict(logits=dlogits))
    return rows


@lesson_section("6. why float64")
def why_float64(p, idx, targets, config, grads, loss, seed):
    """Finite differences of a few entries of one weight, with the loss computed in float64 and in float32,
    for steps h from 1e-1 down to 1e-9. Two errors pull against each other. A large h measures the slope of
    a curve over too wide a step (the error shrinks like h^2). A small h divides the loss's rounding error
    by 2h (the error grows like 1/h). float64 keeps about 16 significant digits, float32 about 7."""
    name = "h.0.attn.c_attn.weight"
    steps, errors = step_size_sweep(p, idx, targets, config, grads, name, 8, seed)
    print(f"8 entries of {name}; relative error against the float64 analytic gradient:")
    print(f"{'h':>8}  {'float64':>10}  {'float32':>10}")
    for h, e64, e32 in zip(steps, errors["float64"], errors["float32"]):
        print(f"{h:8.0e}  {e64:10.2e}  {e32:10.2e}")
    best32, best64 = min(errors["float32"]), min(errors["float64"])
    print(f"float64 gets down to {best64:.1e} (at h = {steps[int(np.argmin(errors['float64']))]:.0e}); float32's "
          f"best is {best32:.1e} (at h = {steps[int(np.argmin(errors['float32']))]:.0e}),")
    print(f"so in float32 a correct gradient would {'fail' if best32 > LAYER_TOL else 'pass'} a {LAYER_TOL:g} check.")
    at_1e7 = errors["float32"][int(np.argmin(np.abs(np.log10(steps) + 7)))]
    if at_1e7 > 0.99:
        g = float(np.max(np.abs(grads[name])))
        print(f"At h = 1e-7 the two float32 losses come out identical: a loss of {loss:.2f} is stored in steps "
              f"of {float(np.spacing(np.float32(loss))):.0e},")
        print(f"while h * gradient is at most 1e-7 * {g:.3f} = {1e-7 * g:.0e}. The difference is 0, the "
              f"relative error 1.")
    return name, steps, errors, dict(best_float32_rel_error=best32,
                                     float64_rel_error_at_1e5=errors["float64"][int(np.argmin(np.abs(np.log10(steps) + 5)))])


def step_size_sweep(p, idx, targets, config, grads, name, n_entries, seed):
    """Relative error of finite differences against the float64 analytic gradient, for a range of h,
    with the loss computed in float64 and in float32."""
    rng = np.random.default_rng(seed)
    entries = rng.choice(p[name].size, min(n_entries, p[name].size), replace=False)
    analytic = grads[name].reshape(-1)[entries]
    steps = 10.0 ** np.arange(-1, -10, -1)
    errors = {}
    for dtype in (np.float64, np.float32):
        q = {k: v.astype(dtype) for k, v in p.items()}
        f = lambda: gpt_forward(q, idx, config, targets)[1]
        errors[np.dtype(dtype).name] = [
            rel_error(analytic, numerical_gradient(f, q[name], h, entries).reshape(-1)[entries]) for h in steps]
    return steps, errors


# ----------------------------------------------------------------------------------------------------
# figures

@lesson_section("figures")
def save_figures(model_rows, layer_rows, steps, errors, name, out_dir):
    errors_path = os.path.join(out_dir, "gradcheck_errors.png")
    sweep_path = os.path.join(out_dir, "float32_vs_float64.png")
    plot_errors(model_rows, layer_rows, errors_path)
    plot_sweep(steps, errors, name, sweep_path)
    print(f"saved {os.path.relpath(errors_path)}: relative error of every gradient check, log scale")
    print(f"saved {os.path.relpath(sweep_path)}: finite-difference error against step size, float64 and float32")
    return [errors_path, sweep_path]


def plot_errors(model_rows, layer_rows, path):
    rows = model_rows + layer_rows
    rel = np.array([max(r[2], 1e-17) for r in rows])      # an exact 0 would vanish on a log axis
    colors = ["tab:blue"] * len(model_rows) + ["tab:orange"] * len(layer_rows)
    fig, ax = plt.subplots(figsize=(15, 6))
    ax.bar(np.arange(len(rows)), rel, color=colors)
    ax.set_yscale("log")
    lines = [ax.axhline(MODEL_TOL, color="tab:red", ls="--", label=f"{MODEL_TOL:g}: threshold for the whole model"),
             ax.axhline(LAYER_TOL, color="tab:purple", ls=":", label=f"{LAYER_TOL:g}: threshold for a single layer")]
    patches = [Patch(color="tab:blue", label="whole-model check, one bar per parameter tensor"),
               Patch(color="tab:orange", label="single-layer checks")]
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels([r[0] for r in rows], rotation=90, fontsize=8)
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_ylim(min(rel.min() / 10, 1e-12), 1e-4)
    ax.set_ylabel("relative error (log scale)\nmax|a-n| / max(|a|+|n|)")
    ax.set_title("Analytic gradients against centred finite differences, float64 (lower is better; "
                 "every bar must stay below its threshold)")
    ax.legend(handles=lines + patches, loc="upper right", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(steps, errors, name, path):
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for dtype, color in (("float64", "tab:blue"), ("float32", "tab:red")):
        ax.loglog(steps, np.maximum(errors[dtype], 1e-17), "o-", color=color, label=f"loss computed in {dtype}")
    ax.axhline(LAYER_TOL, color="gray", ls=":", label=f"{LAYER_TOL:g}, the single-layer threshold")
    ax.axvline(1e-5, color="gray", ls="--", lw=0.8, label="h = 1e-5, what the checks use")
    ax.invert_xaxis()
    ax.set_xlabel("finite-difference step h (smaller to the right)")
    ax.set_ylabel("relative error against the float64 analytic gradient")
    ax.set_title(f"Finite differences of {name}: too large an h is inexact,\n"
                 "too small drowns in rounding; float32 never gets close")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(config=None, batch_size=2, n_samples=None, seed=0, out_dir=OUT_DIR):
    """Run the lesson. config: GPTConfig fields (default TINY); n_samples: entries checked per tensor (None:
    every entry). Returns a dict of what it measured (and the paths of its figures)."""
    os.makedirs(out_dir, exist_ok=True)
    config, p, idx, targets, n_params = the_model(config or TINY, batch_size, seed)
    loss, caches = the_forward(p, idx, targets, config)
    grads, m_back = the_backward(p, caches, config, idx, targets, loss)
    model_rows, m_model = check_every_tensor(p, idx, targets, config, grads, n_params, n_samples, seed)
    layer_rows, m_layers = check_single_layers(seed)
    name, steps, errors, m_float = why_float64(p, idx, targets, config, grads, loss, seed)
    figures = save_figures(model_rows, layer_rows, steps, errors, name, out_dir)
    return dict(n_params=n_params, loss=loss, figures=figures, **m_back, **m_model, **m_layers, **m_float)


if __name__ == "__main__":
    main()
