"""
Lesson 02: causal self-attention.

Attention is the one place in a GPT where positions talk to each other. Every position asks a question
(its query q), every position offers a label (its key k) and a message (its value v); a position reads
the messages of the positions whose keys best match its query, and only of positions that came before
it. This lesson builds that step by step on a real sentence, with the first block of a GPT:

  1. q, k, v from the fused projection c_attn, split into heads
  2. the scores q k^T / sqrt(hs), the causal mask, the softmax, the weighted sum of values
  3. causality, measured: changing a later token never changes an earlier output
  4. the KV cache: generating one token at a time, reusing earlier keys and values, gives the same logits

The model is the pretrained one if a checkpoint exists (`python -m tinyllm pretrain` or lesson 04),
else a randomly initialised one (its attention is then nearly uniform, and the lesson says so).

Run from the repository root (a few seconds):

    python lessons/02_attention.py

Figures go to runs/lessons/02_attention/.

Legend: B batch, T time, C channels, NH heads, hs head size (C // NH), V vocabulary.
"""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm

from tinyllm.checkpoint import load_pretrained
from tinyllm.data import World
from tinyllm.layers import attention_forward, layernorm_forward, linear_forward
from tinyllm.model import GPT, GPTConfig, gpt_forward
from tinyllm.tokenizer import default_tokenizer
from tinyllm.pretrain import PRETRAIN_DATA
from lessons.common import section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "02_attention")
# a pretrained model, if there is one: `python -m tinyllm pretrain` writes the first, lesson 04 the second
CHECKPOINTS = (os.path.join(ROOT, "runs", "pretrain", "ckpt.npz"),
               os.path.join(ROOT, "runs", "lessons", "04_pretraining", "ckpt.npz"))


def show(ch):
    """A character as it can be printed on one line or an axis: newline and space made visible."""
    return {"\n": "\\n", " ": "␣"}.get(ch, ch)


def load_model(checkpoints, config, seed):
    """The first checkpoint that exists, else a new model. Returns model, tokenizer, source (None: new)."""
    for path in checkpoints:
        if os.path.exists(path):
            model, tok, _ = load_pretrained(path)
            return model, tok, path
    tok = default_tokenizer()
    return GPT(GPTConfig(**{"vocab_size": tok.vocab_size, **(config or {})}), seed=seed), tok, None


# ----------------------------------------------------------------------------------------------------
# 1. and 2. attention by hand, in block 0

def attention_by_hand(model, idx, tok):
    """Block 0's attention on idx (1,T), one step at a time.

    Returns: scores, masked scores, att (each (1,NH,T,T)), and a dict of metrics.
    """
    section("1. queries, keys and values")
    p, NH = model.params, model.config.n_head
    B, T = idx.shape
    x = p["wte.weight"][idx] + p["wpe.weight"][:T]                              # (B,T,C), lesson 01
    C = x.shape[-1]
    hs = C // NH
    a, _ = layernorm_forward(x, p["h.0.ln_1.weight"], p["h.0.ln_1.bias"])       # (B,T,C)
    qkv, _ = linear_forward(a, p["h.0.attn.c_attn.weight"], p["h.0.attn.c_attn.bias"])   # (B,T,3C)
    print(f"The sentence is {T} tokens; embedded and layer-normed it is a ({B}, {T}, {C}) array.")
    print(f"One matrix multiply, c_attn {p['h.0.attn.c_attn.weight'].shape}, makes queries, keys and values "
          f"at once: qkv {qkv.shape}")
    q, k, v = np.split(qkv, 3, axis=2)                                          # 3 x (B,T,C)
    print(f"split into thirds: q, k, v each {q.shape}")
    q = q.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)                           # (B,NH,T,hs)
    k = k.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    v = v.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    print(f"{NH} heads of size hs = C / NH = {C} / {NH} = {hs}: reshape (B,T,C) -> (B,T,NH,hs) = "
          f"{(B, T, NH, hs)},")
    print(f"then swap T and NH so each head is its own (T, hs) matrix: q, k, v each {q.shape}")

    section("2. scores, the causal mask, the softmax")
    raw = q @ k.transpose(0, 1, 3, 2)                                           # (B,NH,T,hs) @ (B,NH,hs,T)
    scores = raw / math.sqrt(hs)                                                # (B,NH,T,T)
    print(f"scores = q @ k^T / sqrt(hs): {scores.shape}, one score per (query, key) pair in each head.")
    print(f"A score is a sum of hs = {hs} products, so its spread grows like sqrt(hs); dividing by sqrt({hs}) "
          f"undoes that")
    print(f"(std {raw.std():.3f} before, {scores.std():.3f} after), so a wider head does not push the softmax "
          f"towards one-hot.")
    mask = np.tri(T, T, dtype=bool)                                             # (T,T): key s <= query t
    masked = np.where(mask, scores, -np.inf)
    print(f"The mask keeps key s for query t only when s <= t: {int(mask.sum())} of {T * T} pairs are visible. "
          f"The rest become -inf,")
    print("and exp(-inf) = 0: a token gets exactly no weight from the future.")
    e = np.exp(masked - masked.max(axis=-1, keepdims=True))                     # subtract the max: no overflow
    att = e / e.sum(axis=-1, keepdims=True)                                     # (B,NH,T,T), rows sum to 1
    rows_err = float(np.max(np.abs(att.sum(axis=-1) - 1.0)))
    future = float(np.max(att[..., ~mask]))
    print(f"softmax over each row: every row sums to 1 (worst error {rows_err:.1e}); the largest weight on a "
          f"future key is {future}.")
    n = min(T, 7)
    labels = [show(tok.itos[i]) for i in idx[0]]
    print(f"\nhead 0, the first {n} queries (rows) and keys (columns):")
    print("        " + "".join(f"{lab:>7}" for lab in labels[:n]))
    for t in range(n):
        print(f"  {labels[t]:>4}  " + "".join(f"{att[0, 0, t, s]:7.3f}" for s in range(n)))
    print("The first token can only see itself (weight 1.000); later ones share their weight among the past.")

    y = att @ v                                                                 # (B,NH,T,T) @ (B,NH,T,hs): (B,NH,T,hs)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)                              # heads side by side again: (B,T,C)
    lib, _ = attention_forward(qkv, NH)
    by_hand = float(np.max(np.abs(out - lib)))
    print(f"\ny = att @ v: {y.shape}; putting the heads back side by side gives {out.shape}.")
    print(f"tinyllm.layers.attention_forward computes the same: max difference {by_hand:.1e}.")
    return scores, masked, att, dict(att_rows_max_err=rows_err, att_future_max=future, by_hand_max_diff=by_hand,
                                     head_size=hs)


def where_heads_look(att_all, tok, idx, query):
    """Print the 3 keys each head of each block weighs most from one query position."""
    labels = [tok.itos[i] for i in idx[0]]
    text = "".join(labels)
    print(f"\nWhere the heads look from position {query} ({text[:query + 1]!r} -> predicting "
          f"{text[query + 1]!r}); top 3 keys and their weights:")
    for i, att in enumerate(att_all):                                           # att (B,NH,T,T)
        for h in range(att.shape[1]):
            row = att[0, h, query]
            top = np.argsort(-row)[:3]
            print(f"  block {i} head {h}: " + "  ".join(f"{s:2d} {show(labels[s])!r:5} {row[s]:.2f}" for s in top))


# ----------------------------------------------------------------------------------------------------
# 3. causality, measured on the whole model

def check_causality(model, idx, tok, t0):
    section("3. causality, measured")
    changed = idx.copy()
    changed[0, t0] = tok.stoi["z"] if tok.itos[idx[0, t0]] != "z" else tok.stoi["q"]
    logits, _ = model.forward(idx)                                              # (1,T,V)
    logits2, _ = model.forward(changed)
    before = float(np.max(np.abs(logits[:, :t0] - logits2[:, :t0])))
    after = np.max(np.abs(logits[:, t0:] - logits2[:, t0:]), axis=(0, 2))       # (T - t0,)
    print(f"original: {tok.decode(idx[0])!r}")
    print(f"changed:  {tok.decode(changed[0])!r}   (position {t0} only)")
    print(f"Through all {model.config.n_layer} blocks, the logits at positions 0..{t0 - 1} change by at most "
          f"{before} ({'exactly zero' if before == 0 else 'NOT zero: the future leaks into the past'}),")
    print(f"while every position from {t0} on changes (smallest change {after.min():.2e}, largest "
          f"{after.max():.2e}).")
    print("That is what lets one forward pass train all T predictions at once: no position sees its answer.")
    return dict(causality_max_diff_before=before, causality_min_change_after=float(after.min()))


# ----------------------------------------------------------------------------------------------------
# 4. the KV cache

def cached_logits(model, idx, n_prompt):
    """Logits (1,T,V) from a forward of the first n_prompt tokens, then one token at a time with a KV cache."""
    logits, _, cache = gpt_forward(model.params, idx[:, :n_prompt], model.config)
    parts = [logits]
    for t in range(n_prompt, idx.shape[1]):
        logits, _, cache = gpt_forward(model.params, idx[:, t:t + 1], model.config, past=cache["present"])
        parts.append(logits)                                                    # (1,1,V)
    return np.concatenate(parts, axis=1), cache["present"]


def check_kv_cache(model, idx):
    section("4. the KV cache")
    T = idx.shape[1]
    n_prompt = T // 2
    print("Generating text adds one token at a time. Recomputing the whole sequence for every new token")
    print("repeats work: the keys and values of earlier positions never change (causality, above).")
    print("So we keep them, the KV cache, and run only the new token, which attends to the cached keys.")
    print(f"Here: the first {n_prompt} tokens in one forward, then the other {T - n_prompt} one at a time.")
    diffs = {}
    for dtype in (np.float32, np.float64):
        m = GPT(model.config, dtype=dtype)
        m.load_state_dict(model.params)                                         # the same weights, cast
        full, _ = m.forward(idx)                                                # (1,T,V)
        cached, present = cached_logits(m, idx, n_prompt)
        diffs[np.dtype(dtype).name] = float(np.max(np.abs(full - cached)))
        scale = float(np.max(np.abs(full)))
    k0 = present[0][0]
    print(f"The cache holds, per block, keys and values of shape {k0.shape} (B, NH, T, hs).")
    print(f"max |logits with cache - logits recomputed| = {diffs['float32']:.1e} in float32, "
          f"{diffs['float64']:.1e} in float64:")
    print(f"the same numbers up to rounding (the logits themselves reach {scale:.1f}; the cached sums are added "
          f"in another order).")
    print(f"Work saved: without the cache, the {T - n_prompt} one-token steps would run {n_prompt + 1} + "
          f"{n_prompt + 2} + ... + {T} = {sum(range(n_prompt + 1, T + 1))} positions through the model; "
          f"with it, {T - n_prompt}.")
    return dict(kv_cache_max_diff_float32=diffs["float32"], kv_cache_max_diff_float64=diffs["float64"])


# ----------------------------------------------------------------------------------------------------
# figures

# weights spread over many keys are small; a square-root colour scale keeps them visible
WEIGHT_NORM = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)


def plot_steps(scores, masked, att, labels, source, path):
    """Block 0, head 0: the raw scores, the masked scores, the softmax."""
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2))
    shown = np.where(np.isfinite(masked[0, 0]), masked[0, 0], np.nan)           # -inf drawn as blank
    lim = float(np.max(np.abs(scores[0, 0])))
    panels = [(scores[0, 0], "1. scores q·k / sqrt(hs)", "RdBu_r", -lim, lim, "score"),
              (shown, "2. causal mask: future keys set to -inf (blank)", "RdBu_r", -lim, lim, "score"),
              (att[0, 0], "3. softmax of each row: attention weights", "viridis", None, None,
               "weight (square-root colour scale)")]
    for ax, (img, title, cmap, lo, hi, unit) in zip(axes, panels):
        norm = WEIGHT_NORM if lo is None else None
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, norm=norm, interpolation="nearest")
        label_axes(ax, labels, fontsize=8)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046, label=unit)
    state = f"pretrained ({os.path.relpath(source, ROOT)})" if source else "randomly initialised (no checkpoint)"
    fig.suptitle(f"From scores to attention weights: block 0, head 0 of the {state} model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_maps(att_all, labels, source, path):
    """Every head of every block, one query x key heatmap each."""
    L, NH = len(att_all), att_all[0].shape[1]
    fig, axes = plt.subplots(L, NH, figsize=(4.3 * NH + 1, 4.3 * L + 0.6), squeeze=False, layout="constrained")
    for i in range(L):
        for h in range(NH):
            ax = axes[i, h]
            im = ax.imshow(att_all[i][0, h], cmap="viridis", norm=WEIGHT_NORM, interpolation="nearest")
            label_axes(ax, labels, fontsize=7, xlabel=i == L - 1, ylabel=h == 0)
            ax.set_title(f"block {i}, head {h}", fontsize=11)
    fig.colorbar(im, ax=axes, shrink=0.5, label="attention weight (square-root colour scale)")
    state = f"pretrained ({os.path.relpath(source, ROOT)})" if source else "RANDOMLY INITIALISED (no checkpoint)"
    fig.suptitle(f"Attention weights of the {state} model: row = query (the token looking), "
                 f"column = key (the token looked at)", fontsize=13)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def label_axes(ax, labels, fontsize, xlabel=True, ylabel=True):
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=fontsize)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=fontsize)
    if xlabel:
        ax.set_xlabel("key (the token looked at)")
    if ylabel:
        ax.set_ylabel("query (the token looking)")


# ----------------------------------------------------------------------------------------------------

def main(sentence=None, config=None, seed=0, out_dir=OUT_DIR, checkpoints=CHECKPOINTS):
    """Run the lesson.

    sentence: the text to look at (default: a fact about the corpus's first person). config: GPTConfig
    fields for the random model used when no checkpoint exists (pass checkpoints=() to force it).
    Returns a dict of what it measured (and the paths of its figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    model, tok, source = load_model(checkpoints, config, seed)
    c = model.config
    print(f"The model: {c.n_layer} blocks, {c.n_head} heads, C = {c.n_embd}, "
          + (f"pretrained, from {os.path.relpath(source)}." if source else
             "RANDOMLY INITIALISED: no checkpoint found, so the attention maps show no learned pattern. "
             "Run lesson 04 (or `python -m tinyllm pretrain`) first to see trained ones."))
    if sentence is None:
        person = World(PRETRAIN_DATA["world_seed"], PRETRAIN_DATA["n_people"]).people[0]
        sentence = f"{person.name}'s {person.pet} is called {person.pet_name}."   # as the corpus says it
    idx = tok.encode(sentence)[None]                                            # (1,T)
    print(f"The sentence: {sentence!r}, {idx.shape[1]} tokens.")

    scores, masked, att, m_hand = attention_by_hand(model, idx, tok)
    _, _, cache = gpt_forward(model.params, idx, c)
    att_all = [blk[2][3] for blk in cache["blocks"]]                            # each block's att (1,NH,T,T)
    hand_vs_model = float(np.max(np.abs(att_all[0] - att)))
    query = sentence.rfind(" ")                                                 # the space before the last word
    if 0 <= query < idx.shape[1] - 1:
        where_heads_look(att_all, tok, idx, query)
    m_causal = check_causality(model, idx, tok, t0=idx.shape[1] // 2)
    m_kv = check_kv_cache(model, idx)

    section("figures")
    labels = [show(ch) for ch in sentence]
    steps_path = os.path.join(out_dir, "attention_steps.png")
    maps_path = os.path.join(out_dir, "attention_maps.png")
    plot_steps(scores, masked, att, labels, source, steps_path)
    plot_maps(att_all, labels, source, maps_path)
    print(f"saved {os.path.relpath(steps_path)}: scores, mask and softmax for block 0, head 0")
    print(f"saved {os.path.relpath(maps_path)}: the attention weights of every head of every block")
    return dict(pretrained=source is not None, n_tokens=idx.shape[1], att_by_hand_vs_model_max_diff=hand_vs_model,
                figures=[steps_path, maps_path], **m_hand, **m_causal, **m_kv)


if __name__ == "__main__":
    main()
