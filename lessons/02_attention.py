"""
Lesson 02: causal self-attention.

Attention is the one place in a GPT where positions talk to each other. Every position asks a question
(its query q), every position offers a label (its key k) and a message (its value v); a position reads
the messages of the positions whose keys best match its query, and only of positions that came before
it. This lesson builds that step by step on a real sentence, with the pretrained GPT, then measures
where its heads look:

  1. the pretrained model and a sentence
  2. q, k, v from the fused projection c_attn, split into heads
  3. the scores q k^T / sqrt(hs), the causal mask, the softmax, the weighted sum of values
  4. where each head looks, measured on the corpus: the previous character, itself, the first one, the
     last space, the last full stop; against an even spread and against a new model
  5. every head on the sentence: what it reads when the next character is a name's first letter
  6. causality, measured: changing a later token never changes an earlier output
  7. the KV cache: generating one token at a time, reusing earlier keys and values, gives the same logits

The model is runs/pretrain/ckpt.npz; if it does not exist yet, the lesson pretrains it first (a few
minutes on 2 cores, with live progress; lesson 04 explains how) and every later lesson reuses it. With it,
the lesson takes seconds. Run from the repository root:

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

from tinyllm.data import World, corpus_splits, fact_sentence, get_batch
from tinyllm.layers import attention_forward, layernorm_forward, linear_forward
from tinyllm.model import GPT, gpt_forward
from lessons.common import CHECKPOINT, lesson_section, pretrained_model

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "02_attention")
LOCAL = 8          # "the last 8": the query and the 7 characters before it
STRONG = 2.0       # a head is named after a pattern it gives at least this many times an even spread's share


def show(ch):
    """A character as it can be printed on one line or an axis: newline and space made visible."""
    return {"\n": "\\n", " ": "␣"}.get(ch, ch)


def attention_maps(model, idx):
    """Every block's attention weights on idx (B,T): a list of L arrays (B,NH,T,T)."""
    _, _, cache = gpt_forward(model.params, idx, model.config)
    return [block["attn"][3] for block in cache["blocks"]]    # attention_forward's cache: (q, k, v, att, ...)


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. the pretrained model and a sentence")
def model_and_sentence(checkpoint, config, seed, sentence):
    """A new model's attention is nearly uniform: its random queries and keys are small, so every score is
    close to 0 and the softmax spreads each row evenly over the past. To see heads that look somewhere, we
    use the default GPT pretrained on the corpus of lesson 01 (lesson 04 shows how it is trained). It is
    saved in runs/pretrain/ckpt.npz (lesson 04's own copy is used if only that one exists). If neither
    exists yet, it is made now, with the recipe of lesson 04 and `python -m tinyllm pretrain`; the progress
    lines show the step, the loss and the time left (eta). Every later lesson reuses it.
    The sentence is written as the corpus writes about its first person: two facts, two sentences."""
    model, tok, data, info = pretrained_model(checkpoint, config, seed)
    world = World(data["world_seed"], data["n_people"])
    subject = None                                 # whom the sentence is about, when the lesson wrote it
    if sentence is None:
        person = world.people[0]
        sentence = f"{fact_sentence(person, 'city')} {fact_sentence(person, 'pet_name')}"
        subject = person.name
    idx = tok.encode(sentence)[None]                                            # (1,T)
    print(f"The sentence: {sentence!r}, {idx.shape[1]} tokens.")
    return model, tok, data, sentence, subject, idx, info


@lesson_section("2. queries, keys and values")
def queries_keys_values(model, idx):
    """Block 0 by hand. The tokens are embedded (lesson 01) and layer-normed; then one matrix multiply,
    c_attn, makes the queries, keys and values of every position at once, and the C channels are cut into
    NH heads of hs = C / NH channels each. Each head is an attention of its own, on its own (T, hs) slices."""
    p, NH = model.params, model.config.n_head
    B, T = idx.shape
    x = p["wte.weight"][idx] + p["wpe.weight"][:T]                              # (B,T,C), lesson 01
    C = x.shape[-1]
    hs = C // NH
    a, _ = layernorm_forward(x, p["h.0.ln_1.weight"], p["h.0.ln_1.bias"])       # (B,T,C)
    qkv, _ = linear_forward(a, p["h.0.attn.c_attn.weight"], p["h.0.attn.c_attn.bias"])   # (B,T,3C)
    print(f"embedded and layer-normed: ({B}, {T}, {C}); c_attn {p['h.0.attn.c_attn.weight'].shape} "
          f"makes qkv {qkv.shape}")
    q, k, v = np.split(qkv, 3, axis=2)                                          # 3 x (B,T,C)
    print(f"split into thirds: q, k, v each {q.shape}")
    q = q.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)                           # (B,NH,T,hs)
    k = k.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    v = v.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    print(f"{NH} heads of hs = {C} / {NH} = {hs}: reshape (B,T,C) -> (B,T,NH,hs) = {(B, T, NH, hs)}, then swap "
          f"T and NH: q, k, v each {q.shape}")
    return qkv, q, k, v, dict(head_size=hs)


@lesson_section("3. scores, the causal mask, the softmax")
def scores_mask_softmax(model, qkv, q, k, v, idx, tok):
    """scores = q @ k^T / sqrt(hs): one score per (query, key) pair in each head. A score is a sum of hs
    products, so its spread grows like sqrt(hs); dividing by sqrt(hs) undoes that, so a wider head does not
    push the softmax towards one-hot. The causal mask keeps key s for query t only when s <= t: the others
    become -inf, and exp(-inf) = 0, so a token gets exactly no weight from the future. The softmax turns
    each row into weights that sum to 1, and the output is the weighted sum of the values, y = att @ v."""
    B, NH, T, hs = q.shape
    raw = q @ k.transpose(0, 1, 3, 2)                                           # (B,NH,T,hs) @ (B,NH,hs,T)
    scores = raw / math.sqrt(hs)                                                # (B,NH,T,T)
    print(f"scores {scores.shape}: std {raw.std():.3f} before dividing by sqrt({hs}), {scores.std():.3f} after")
    mask = np.tri(T, T, dtype=bool)                                             # (T,T): key s <= query t
    masked = np.where(mask, scores, -np.inf)
    print(f"the mask keeps {int(mask.sum())} of {T * T} (query, key) pairs")
    e = np.exp(masked - masked.max(axis=-1, keepdims=True))                     # subtract the max: no overflow
    att = e / e.sum(axis=-1, keepdims=True)                                     # (B,NH,T,T), rows sum to 1
    rows_err = float(np.max(np.abs(att.sum(axis=-1) - 1.0)))
    future = float(np.max(att[..., ~mask]))
    print(f"softmax: every row sums to 1 (worst error {rows_err:.1e}); the largest weight on a future key is "
          f"{future}")
    n = min(T, 7)
    labels = [show(tok.itos[i]) for i in idx[0]]
    print(f"\nhead 0, the first {n} queries (rows) and keys (columns):")
    print("        " + "".join(f"{lab:>7}" for lab in labels[:n]))
    for t in range(n):
        print(f"  {labels[t]:>4}  " + "".join(f"{att[0, 0, t, s]:7.3f}" for s in range(n)))
    print("The first token sees only itself (weight 1.000); later ones share their weight among the past.")

    y = att @ v                                                                 # (B,NH,T,T) @ (B,NH,T,hs): (B,NH,T,hs)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)                        # heads side by side again: (B,T,C)
    lib, _ = attention_forward(qkv, NH)
    by_hand = float(np.max(np.abs(out - lib)))
    hand_vs_model = float(np.max(np.abs(attention_maps(model, idx)[0] - att)))
    print(f"\ny = att @ v: {y.shape}; the heads side by side again: {out.shape}")
    print(f"against tinyllm.layers.attention_forward: max difference {by_hand:.1e}; these weights against the "
          f"model's own block 0: {hand_vs_model:.1e}")
    return scores, masked, att, dict(att_rows_max_err=rows_err, att_future_max=future, by_hand_max_diff=by_hand,
                                     att_by_hand_vs_model_max_diff=hand_vs_model)


def pattern_masks(x, tok):
    """Where a head might look, as boolean masks (B,T,T) over (query t, key s), for x (B,T):
    the previous character (s = t-1), itself (s = t), the first position (s = 0), the last space and the
    last full stop before the query, and the last LOCAL characters (t-LOCAL < s <= t)."""
    B, T = x.shape
    eye = lambda k: np.broadcast_to(np.eye(T, k=k, dtype=bool), (B, T, T))
    first = np.zeros((T, T), dtype=bool)
    first[:, 0] = True
    masks = {"previous": eye(-1), "itself": eye(0), "first": np.broadcast_to(first, (B, T, T))}
    for name, ch in (("last ␣", " "), ("last .", ".")):
        seen = np.where(x == tok.stoi[ch], np.arange(T), -1)                     # (B,T): t where x[t] is ch
        last = np.concatenate([np.full((B, 1), -1), np.maximum.accumulate(seen, axis=1)[:, :-1]], axis=1)
        m = np.zeros((B, T, T), dtype=bool)                                     # last[b, t]: latest s < t
        b, t = np.nonzero(last >= 0)
        m[b, t, last[b, t]] = True
        masks[name] = m
    masks[f"last {LOCAL}"] = np.broadcast_to(np.tri(T, dtype=bool) & ~np.tri(T, k=-LOCAL, dtype=bool), (B, T, T))
    return masks


def pattern_shares(att, masks):
    """att (B,NH,T,T) -> {pattern: (NH,)}: the mean weight a head puts on the pattern's keys, over the queries
    t >= 1 that have such a key (query 0 sees only itself, whatever the head does). Also 'keys': the mean
    effective number of keys a query reads, exp(entropy of its row)."""
    out = {}
    for name, m in masks.items():
        rows = m.any(axis=-1)                                                   # (B,T): queries with such a key
        rows[:, 0] = False
        weight = (att * m[:, None]).sum(axis=-1)                               # (B,NH,T)
        out[name] = weight.transpose(1, 0, 2)[:, rows].mean(axis=1)             # (NH,)
    entropy = -(att * np.log(np.where(att > 0, att, 1.0))).sum(axis=-1)        # (B,NH,T)
    out["keys"] = np.exp(entropy[:, :, 1:]).mean(axis=(0, 2))
    return out


def even_spread(B, T):
    """(B,1,T,T): the attention of a head that spreads every query's weight evenly over its visible keys."""
    tri = np.tri(T)
    return np.broadcast_to((tri / tri.sum(axis=1, keepdims=True))[None, None], (B, 1, T, T))


def strongest(shares, even, h):
    """The pattern head h gives the most weight relative to an even spread, and that ratio."""
    name = max((n for n in shares if n != "keys"), key=lambda n: shares[n][h] / even[n][0])
    return name, float(shares[name][h] / even[name][0])


@lesson_section("4. where each head looks, measured on the corpus")
def where_heads_look(model, fresh, tok, data, n_windows, seed):
    """One sentence shows little; a head's habits show over many. Below, on validation windows of the
    corpus, the mean weight each head puts on a few places a head might look: the previous character,
    the query itself, the first position of the window, the last space and the last full stop before the
    query (where the current word and the current sentence began), and the last 8 characters together.
    'keys' is the effective number of keys a query reads, exp(entropy of its weights): 1 for a head that
    looks at one key, t+1 for one that spreads evenly over all t+1 it can see.
    A share means little alone: the first reference row is a head that spreads its weight evenly over
    the past; the second, the heads of a new model. Each head is named after the place it favours most,
    measured as its share over the even spread's, when that ratio is at least 2."""
    _, _, val_text = corpus_splits(data)
    T = model.config.block_size
    x, _ = get_batch(tok.encode(val_text), n_windows, T, np.random.default_rng(seed))   # (n,T)
    masks = pattern_masks(x, tok)
    even = pattern_shares(even_spread(*x.shape), masks)
    trained = [pattern_shares(att, masks) for att in attention_maps(model, x)]
    new = [pattern_shares(att, masks) for att in attention_maps(fresh, x)]
    names = [n for n in even if n != "keys"]
    print(f"{n_windows} validation windows of {T} characters; mean weight on each place, per head:\n")
    print(f"{'':17}" + "".join(f"{n:>10}" for n in names) + f"{'keys':>8}   favours (share / even spread's)")
    labels = {}
    for i, shares in enumerate(trained):
        for h in range(model.config.n_head):
            name, ratio = strongest(shares, even, h)
            labels[i, h] = (name, ratio) if ratio >= STRONG else (None, ratio)
            print(f"block {i} head {h:<5}" + "".join(f"{shares[n][h]:10.2f}" for n in names)
                  + f"{shares['keys'][h]:8.1f}   " + (f"{name} (x{ratio:.1f})" if ratio >= STRONG else "-"))
    print(f"{'even spread':17}" + "".join(f"{even[n][0]:10.3f}" for n in names) + f"{even['keys'][0]:8.1f}")
    new_mean = {n: float(np.mean([s[n] for s in new])) for n in even}
    print(f"{'new model, mean':17}" + "".join(f"{new_mean[n]:10.3f}" for n in names) + f"{new_mean['keys']:8.1f}")

    flat = [(i, h) for i in range(len(trained)) for h in range(model.config.n_head)]
    print("\nThe head that gives each place the most weight:")
    top = {}
    for n in names:
        i, h = max(flat, key=lambda ih: trained[ih[0]][n][ih[1]])
        share = float(trained[i][n][h])
        top[n] = dict(block=i, head=h, share=share, even=float(even[n][0]))
        print(f"  {n:>9}: block {i} head {h}, {share:.2f} of its weight ({share / even[n][0]:.1f} times an even "
              f"spread's {even[n][0]:.3f})")
    if top["first"]["share"] < STRONG * top["first"]["even"]:
        print("No head favours the first position of the window. (Large models often park spare weight on the "
              "first token, an 'attention sink'; this model's training windows start anywhere in the text.)")
    local = [float(np.mean(s[f"last {LOCAL}"])) for s in trained]
    print(f"\nShare of the weight on the last {LOCAL} characters, mean over each block's heads: "
          + ", ".join(f"block {i} {share:.2f}" for i, share in enumerate(local))
          + f" (an even spread: {even[f'last {LOCAL}'][0]:.2f}).")
    named = [n for n, _ in labels.values() if n]
    print(f"{len(named)} of {len(labels)} heads favour one place at least {STRONG:g} times an even spread: "
          + (", ".join(f"{named.count(n)} {n}" for n in names if n in named) or "none")
          + f"; the heads of the new model favour nothing (their best ratio: "
          f"{max(strongest(s, even, h)[1] for s in new for h in range(model.config.n_head)):.1f}).")
    keys = np.concatenate([s["keys"] for s in trained])
    print(f"A query of a trained head reads {keys.min():.1f} to {keys.max():.1f} keys' worth (mean over the "
          f"queries, per head); of a new head, {new_mean['keys']:.1f}, as many as an even spread.")
    return labels, dict(head_shares=[{n: s[n].tolist() for n in s} for s in trained],
                        new_head_shares=new_mean, even_shares={n: float(even[n][0]) for n in even},
                        top_head=top, local_share_by_block=local,
                        head_labels={f"{i}.{h}": n for (i, h), (n, _) in labels.items()})


@lesson_section("5. every head on the sentence")
def heads_on_the_sentence(model, tok, idx, sentence, subject, labels):
    """The same heads on the sentence of section 1, from one query: the space before the last word, where the
    model must predict the word's first letter. For each head, the three keys it weighs most, and the
    place section 4 found it favours. The last word is a fact about the person the sentence names, so the
    model must read that name somewhere: the last column is each head's total weight on the name's letters
    in the current sentence. attention_maps.png shows every query of every head."""
    att_all = attention_maps(model, idx)
    query = sentence.rfind(" ")
    if not 0 <= query < idx.shape[1] - 1:
        print("(the sentence has no space before its last character: nothing to show)")
        return att_all
    chars = [tok.itos[i] for i in idx[0]]
    start = sentence.rfind(subject, 0, query) if subject else -1                # the name's last mention
    span = slice(start, start + len(subject)) if start >= 0 else None
    print(f"query {query}: {sentence[:query + 1]!r} -> predicting {sentence[query + 1]!r}")
    if span:
        print(f"the name: {subject!r} at positions {span.start}..{span.stop - 1}")
    print(f"\n{'':18}{'the three keys it weighs most':48}{'favours (section 4)':>20}"
          + (f"{'on the name':>13}" if span else ""))
    on_name = {}
    for i, att in enumerate(att_all):                                           # att (1,NH,T,T)
        for h in range(att.shape[1]):
            row = att[0, h, query]
            top = np.argsort(-row)[:3]
            keys = "  ".join(f"{s:2d} {show(chars[s])!r:5} {row[s]:.2f}" for s in top)
            on_name[i, h] = float(row[span].sum()) if span else None
            print(f"  block {i} head {h}: {keys:48}{labels[i, h][0] or '-':>20}"
                  + (f"{on_name[i, h]:13.2f}" if span else ""))
    if span:
        (i, h), w = max(on_name.items(), key=lambda kv: kv[1])
        print(f"\nThe head that reads the name most: block {i} head {h}, {w:.2f} of its weight on "
              f"{subject!r} (an even spread would give {len(subject) / (query + 1):.2f}).")
    return att_all, dict(name_weight_by_head={f"{i}.{h}": w for (i, h), w in on_name.items()} if span else None)


@lesson_section("6. causality, measured")
def causality(model, idx, tok):
    """Change one character in the middle of the sentence and run the whole model again. Every logit before
    that position must stay bit-identical, through all the blocks; every logit from it on may change. That
    is what lets one forward pass train all T predictions at once: no position sees its answer."""
    t0 = idx.shape[1] // 2
    changed = idx.copy()
    changed[0, t0] = tok.stoi["z"] if tok.itos[idx[0, t0]] != "z" else tok.stoi["q"]
    logits, _ = model.forward(idx)                                              # (1,T,V)
    logits2, _ = model.forward(changed)
    before = float(np.max(np.abs(logits[:, :t0] - logits2[:, :t0])))
    after = np.max(np.abs(logits[:, t0:] - logits2[:, t0:]), axis=(0, 2))       # (T - t0,)
    print(f"original: {tok.decode(idx[0])!r}")
    print(f"changed:  {tok.decode(changed[0])!r}   (position {t0} only)")
    print(f"logits at positions 0..{t0 - 1}: largest change {before} "
          f"({'exactly zero' if before == 0 else 'NOT zero: the future leaks into the past'})")
    print(f"logits at positions {t0}..{idx.shape[1] - 1}: every one changed (smallest change {after.min():.2e}, "
          f"largest {after.max():.2e})")
    return dict(causality_max_diff_before=before, causality_min_change_after=float(after.min()))


def cached_logits(model, idx, n_prompt):
    """Logits (1,T,V) from a forward of the first n_prompt tokens, then one token at a time with a KV cache."""
    logits, _, cache = gpt_forward(model.params, idx[:, :n_prompt], model.config)
    parts = [logits]
    for t in range(n_prompt, idx.shape[1]):
        logits, _, cache = gpt_forward(model.params, idx[:, t:t + 1], model.config, past=cache["present"])
        parts.append(logits)                                                    # (1,1,V)
    return np.concatenate(parts, axis=1), cache["present"]


@lesson_section("7. the KV cache")
def kv_cache(model, idx):
    """Generating text adds one token at a time. Recomputing the whole sequence for every new token repeats
    work: the keys and values of earlier positions never change (causality, above). So we keep them, the
    KV cache, and run only the new token, which attends to the cached keys. Here: the first half of the
    sentence in one forward, then the rest one token at a time, in float32 and in float64, against one
    forward of the whole sentence."""
    T = idx.shape[1]
    n_prompt = T // 2
    diffs = {}
    for dtype in (np.float32, np.float64):
        m = GPT(model.config, dtype=dtype)
        m.load_state_dict(model.params)                                         # the same weights, cast
        full, _ = m.forward(idx)                                                # (1,T,V)
        cached, present = cached_logits(m, idx, n_prompt)
        diffs[np.dtype(dtype).name] = float(np.max(np.abs(full - cached)))
        scale = float(np.max(np.abs(full)))
    print(f"{n_prompt} tokens at once, then {T - n_prompt} one at a time. The cache holds, per block, keys and "
          f"values of shape {present[0][0].shape} (B, NH, T, hs).")
    print(f"max |logits with cache - logits recomputed| = {diffs['float32']:.1e} in float32, "
          f"{diffs['float64']:.1e} in float64: the same numbers up to rounding (the logits reach {scale:.1f}; "
          f"the cached sums are added in another order).")
    print(f"Work saved: without the cache, the {T - n_prompt} one-token steps would run {n_prompt + 1} + "
          f"{n_prompt + 2} + ... + {T} = {sum(range(n_prompt + 1, T + 1))} positions through the model; "
          f"with it, {T - n_prompt}.")
    return dict(kv_cache_max_diff_float32=diffs["float32"], kv_cache_max_diff_float64=diffs["float64"])


# ----------------------------------------------------------------------------------------------------
# figures

# weights spread over many keys are small; a square-root colour scale keeps them visible
WEIGHT_NORM = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)


@lesson_section("figures")
def save_figures(scores, masked, att, att_all, sentence, labels, m_heads, pretrained, out_dir):
    state = "pretrained" if pretrained else "RANDOMLY INITIALISED (config given, not pretrained)"
    chars = [show(ch) for ch in sentence]
    paths = [os.path.join(out_dir, name) for name in ("attention_steps.png", "attention_maps.png",
                                                      "head_patterns.png")]
    plot_steps(scores, masked, att, chars, state, paths[0])
    plot_maps(att_all, chars, labels, state, paths[1])
    plot_patterns(m_heads, state, paths[2])
    print(f"saved {os.path.relpath(paths[0])}: scores, mask and softmax for block 0, head 0")
    print(f"saved {os.path.relpath(paths[1])}: the attention weights of every head of every block on the sentence")
    print(f"saved {os.path.relpath(paths[2])}: section 4's table: where each head looks, against an even spread")
    return paths


def plot_steps(scores, masked, att, labels, state, path):
    """Block 0, head 0: the raw scores, the masked scores, the softmax."""
    fig, axes = plt.subplots(1, 3, figsize=(19, 6.6))
    shown = np.where(np.isfinite(masked[0, 0]), masked[0, 0], np.nan)           # -inf drawn as blank
    lim = float(np.max(np.abs(scores[0, 0])))
    panels = [(scores[0, 0], "1. scores q·k / sqrt(hs)", "RdBu_r", -lim, lim, "score"),
              (shown, "2. causal mask: future keys set to -inf (blank)", "RdBu_r", -lim, lim, "score"),
              (att[0, 0], "3. softmax of each row: attention weights", "viridis", None, None,
               "weight (square-root colour scale)")]
    for ax, (img, title, cmap, lo, hi, unit) in zip(axes, panels):
        norm = WEIGHT_NORM if lo is None else None
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, norm=norm, interpolation="nearest")
        label_axes(ax, labels, fontsize=6.5)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046, label=unit)
    fig.suptitle(f"From scores to attention weights: block 0, head 0 of the {state} model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_maps(att_all, labels, head_labels, state, path):
    """Every head of every block, one query x key heatmap each; characters on the outer axes only."""
    L, NH = len(att_all), att_all[0].shape[1]
    fig, axes = plt.subplots(L, NH, figsize=(5.2 * NH + 1.5, 5.2 * L + 0.8), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.9, bottom=0.05, top=0.93, wspace=0.06, hspace=0.14)
    for i in range(L):
        for h in range(NH):
            ax = axes[i, h]
            im = ax.imshow(att_all[i][0, h], cmap="viridis", norm=WEIGHT_NORM, interpolation="nearest")
            label_axes(ax, labels, fontsize=7, xlabel=i == L - 1, ylabel=h == 0)
            name, ratio = head_labels[i, h]
            ax.set_title(f"block {i}, head {h}" + (f": {name} (x{ratio:.1f})" if name else ""), fontsize=11)
    fig.colorbar(im, cax=fig.add_axes([0.92, 0.3, 0.012, 0.4]), label="attention weight (square-root colour scale)")
    fig.suptitle(f"Attention weights of the {state} model on one sentence: row = query (the token looking), "
                 f"column = key (the token looked at);\neach title names what the head favours on the corpus "
                 f"(lesson section 4)", fontsize=13)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_patterns(m_heads, state, path):
    """Section 4's table as two heatmaps: each head's share over an even spread's, and the new model's."""
    names = [n for n in m_heads["even_shares"] if n != "keys"]
    shares = np.array([[s[n][h] for n in names] for s in m_heads["head_shares"] for h in range(len(s[names[0]]))])
    even = np.array([m_heads["even_shares"][n] for n in names])
    NH = len(m_heads["head_shares"][0][names[0]])
    rows = [f"block {i} head {h}" for i in range(len(m_heads["head_shares"])) for h in range(NH)]
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(rows) + 2.5))
    ratio = shares / even
    im = ax.imshow(np.log2(np.maximum(ratio, 1 / 16)), cmap="RdBu_r", vmin=-4, vmax=4, aspect="auto")
    for r in range(len(rows)):
        for c in range(len(names)):
            ax.text(c, r, f"{shares[r, c]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(np.log2(max(ratio[r, c], 1 / 16))) > 2.5 else "black")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([f"{n}\n(even: {e:.3f})" for n, e in zip(names, even)], fontsize=9)
    ax.set_yticks(np.arange(len(rows)))
    ax.set_yticklabels(rows, fontsize=9)
    ax.set_xlabel("where the key is, relative to the query")
    bar = fig.colorbar(im, ax=ax, ticks=[-4, -2, 0, 2, 4])
    bar.set_ticklabels(["1/16", "1/4", "1", "4", "16"])
    bar.set_label("share / an even spread's share (log scale)")
    ax.set_title(f"Where each head of the {state} model looks, on validation text:\n"
                 f"numbers are the mean weight on that place; colour, how much more than an even spread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def label_axes(ax, labels, fontsize, xlabel=True, ylabel=True):
    """Characters as tick labels on the axes that get them (the outer ones); ticks only on the others."""
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(labels if xlabel else [], fontsize=fontsize)
    ax.set_yticklabels(labels if ylabel else [], fontsize=fontsize)
    if xlabel:
        ax.set_xlabel("key (the token looked at)")
    if ylabel:
        ax.set_ylabel("query (the token looking)")


# ----------------------------------------------------------------------------------------------------

def main(sentence=None, n_windows=16, seed=0, out_dir=OUT_DIR, checkpoint=CHECKPOINT, config=None):
    """Run the lesson. sentence: the text to walk through (default: two facts about the corpus's first
    person); n_windows: validation windows section 4 measures on; config: GPTConfig fields of a new random
    model instead of the pretrained one (the tests' tiny model). Returns a dict of what it measured (and
    the paths of its figures)."""
    os.makedirs(out_dir, exist_ok=True)
    model, tok, data, sentence, subject, idx, m_model = model_and_sentence(checkpoint, config, seed, sentence)
    qkv, q, k, v, m_qkv = queries_keys_values(model, idx)
    scores, masked, att, m_att = scores_mask_softmax(model, qkv, q, k, v, idx, tok)
    fresh = GPT(model.config, seed=seed + 1)                                    # the same size, never trained
    labels, m_heads = where_heads_look(model, fresh, tok, data, n_windows, seed)
    att_all, m_sentence = heads_on_the_sentence(model, tok, idx, sentence, subject, labels)
    m_causal = causality(model, idx, tok)
    m_kv = kv_cache(model, idx)
    figures = save_figures(scores, masked, att, att_all, sentence, labels, m_heads, config is None, out_dir)
    return dict(n_tokens=idx.shape[1], figures=figures, **m_model, **m_qkv, **m_att, **m_heads, **m_sentence,
                **m_causal, **m_kv)


if __name__ == "__main__":
    main()
