"""
Lesson 01: tokens and embeddings.

A language model never sees text. It sees integers, token ids, and its first layer turns each id into a
vector by looking it up in a table. This lesson follows text along that path, then looks at what
pretraining wrote into those tables:

  1. the corpus: a synthetic world of 24 people, written about in short documents
  2. the tokenizer: one id per character, 64 characters in all
  3. a training batch: windows of the token stream, with the targets shifted by one
  4. a pretrained model, and a new one: what the rest of the lesson looks inside
  5. embeddings: x = wte[idx] + wpe[:T], two table look-ups
  6. what pretraining wrote into wte: which characters' vectors are alike (digits? vowels?)
  7. the baseline: what a model that learned nothing scores, one that learned only letter counts, and
     the pretrained one

Section 4 needs the pretrained model, runs/pretrain/ckpt.npz. If it is not there yet, the lesson makes it
first (a few minutes on 2 cores, with live progress; lesson 04 explains how) and every later lesson reuses
it. With it, the lesson takes seconds. Run from the repository root:

    python lessons/01_tokens_and_embeddings.py

Figures go to runs/lessons/01_tokens_and_embeddings/.

Legend: N characters in the corpus, B batch, T time (block size), C channels, V vocabulary.
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

from tinyllm.data import World, get_batch, make_corpus, split_corpus, unigram_loss
from tinyllm.layers import cross_entropy_forward, embedding_forward
from tinyllm.model import GPT
from tinyllm.pretrain import PRETRAIN_DATA
from tinyllm.tokenizer import TokenizerError, default_tokenizer
from lessons.common import CHECKPOINT, lesson_section, pretrained_model

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "01_tokens_and_embeddings")
# the groups of characters whose embeddings section 6 compares
GROUPS = {"vowels": "aeiou", "consonants": "bcdfghjklmnpqrstvwxyz", "digits": "0123456789",
          "space and punctuation": " .,'\n"}


def show(ch):
    """A character as it can be printed on one line or an axis: newline and space made visible."""
    return {"\n": "\\n", " ": "␣"}.get(ch, ch)


def cosine_matrix(rows):
    """(n,C) -> (n,n): the cosine similarity of every pair of rows."""
    unit = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    return unit @ unit.T


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. the corpus")
def the_corpus(n_chars):
    """The pretraining text is synthetic: a world of invented people with a city, a job, a pet, the pet's
    name, an age and a favourite colour each, written about in short documents, one per line. A document
    is a profile (every fact about one person), two short stories, some arithmetic with their ages, or a
    recap (an invented person's facts, stated twice in other words, so that the second half can only be
    predicted by reading the first). It is built exactly as lesson 04 and `python -m tinyllm pretrain`
    build it, from fixed seeds: the same text every time, nothing downloaded."""
    world = World(PRETRAIN_DATA["world_seed"], PRETRAIN_DATA["n_people"])
    text = make_corpus(world, n_chars=n_chars, seed=PRETRAIN_DATA["corpus_seed"])
    train_text, val_text = split_corpus(text, PRETRAIN_DATA["val_fraction"])
    docs = text.splitlines()
    print(f"A world of {len(world)} people. The first one, as a record: {world.people[0]}")
    print(f"{len(docs):,} documents, {len(text):,} characters in all. The first four:")
    for doc in docs[:4]:
        print(f"  | {doc}")
    print(f"The last {PRETRAIN_DATA['val_fraction']:.0%} of the documents are held out for validation: "
          f"{len(train_text):,} characters to train on, {len(val_text):,} to validate on.")
    return world, train_text, val_text


@lesson_section("2. the tokenizer: one id per character")
def the_tokenizer(world):
    """GPT-2 splits text into 50,257 byte-pair tokens. tinyllm uses single characters, so every id is a
    character you can read: encode() maps text to ids, decode() maps them back. A character outside the
    alphabet is an error, not a silent replacement."""
    tok = default_tokenizer()
    print(f"{tok.vocab_size} characters; id: character (\\n is newline, ␣ is space)")
    cells = [f"{i:2d}: {show(ch):<2}" for i, ch in enumerate(tok.chars)]
    for row in range(0, len(cells), 16):
        print("  " + "  ".join(cells[row:row + 16]))

    text = f"{world.people[0].name} lives in {world.people[0].city}."
    ids = tok.encode(text)
    back = tok.decode(ids)
    print(f"\nencode({text!r})\n  = {ids.tolist()}")
    print(f"decode(those ids) = {back!r}; the round trip gives the same text back: {back == text}")

    bad = "Mia lives in Oslo."
    try:
        tok.encode(bad)
        error = None
    except TokenizerError as e:
        error = e
        print(f"\nAn upper-case letter is not in the alphabet, so encode({bad!r}) raises TokenizerError:\n  {e}")
    return tok, dict(round_trip_ok=back == text, unknown_char=None if error is None else error.char,
                     unknown_position=None if error is None else error.position)


@lesson_section("3. a training batch")
def a_batch(train_ids, tok, batch_size, block_size, seed):
    """The training text becomes one long array of token ids. A batch is a few random windows of it (x),
    and the same windows moved one character to the right (y): y[b, t] is the character that comes after
    x[b, :t+1], the answer the model must predict at position t. One window therefore holds T predictions,
    all learned in parallel."""
    rng = np.random.default_rng(seed)
    x, y = get_batch(train_ids, batch_size, block_size, rng)             # (B,T), (B,T)
    print(f"{len(train_ids):,} training ids; {batch_size} windows of {block_size}: "
          f"x.shape = {x.shape}, y.shape = {y.shape}")
    for b in range(min(batch_size, 2)):
        print(f"  x[{b}] = {tok.decode(x[b])!r}")
        print(f"  y[{b}] = {tok.decode(y[b])!r}")
    shifted = bool(np.array_equal(x[:, 1:], y[:, :-1]))
    print(f"y[:, :-1] equals x[:, 1:] (the same characters, moved by one): {shifted}")
    print(f"The predictions in x[0]: '{show(tok.decode(x[0, :1]))}' -> '{show(tok.decode(y[0, :1]))}', "
          f"'{tok.decode(x[0, :2]).replace(chr(10), '|')}' -> '{show(tok.decode(y[0, 1:2]))}', ... "
          f"({block_size} in all)")
    return x, y, dict(batch_shifted_by_one=shifted)


@lesson_section("4. a pretrained model, and a new one")
def the_models(checkpoint, config, seed):
    """The rest of the lesson looks inside a model. A new model's tables hold random numbers (std 0.02), so
    there is nothing in them to see; a pretrained one has learned from the batches above. We load the
    default GPT pretrained on this corpus (lesson 04 shows how it is trained: next-character prediction,
    AdamW). It is saved in runs/pretrain/ckpt.npz (lesson 04's own copy is used if only that one exists).
    If neither exists yet, it is made now, with the recipe of lesson 04 and `python -m tinyllm pretrain`;
    the progress lines show the step, the loss and the time left (eta). Every later lesson reuses it.
    Next to it, a new, randomly initialised GPT of the same size: what training started from."""
    model, _, _, info = pretrained_model(checkpoint, config, seed)       # its tokenizer is the one above
    fresh = GPT(model.config, seed=seed + 1)                             # the same size, never trained
    print("The new model: the same GPTConfig, randomly initialised.")
    return model, fresh, info


@lesson_section("5. token and position embeddings")
def embeddings(model, fresh, tok, x, counts):
    """The model's first layer is two tables. wte holds one row of C numbers per token id, wpe one row per
    position. The input of the first transformer block is the sum of two look-ups:
        h = wte[x] + wpe[:T]
    A look-up is a matrix product with one-hot rows, which is why wte gets a gradient like any weight.
    The same character at two positions gets the same token vector but a different input vector: without
    wpe the model could not tell the order of its input."""
    wte, wpe = model.params["wte.weight"], model.params["wpe.weight"]   # (V,C), (block_size,C)
    B, T = x.shape
    print(f"wte.weight {wte.shape}: one row per token id (V={wte.shape[0]}), C={wte.shape[1]} numbers each")
    print(f"wpe.weight {wpe.shape}: one row per position, up to block_size={wpe.shape[0]}")
    tok_emb = wte[x]                                  # (B,T) -> (B,T,C): row x[b,t] of wte
    pos_emb = wpe[:T]                                 # (T,C): the first T rows
    h = tok_emb + pos_emb                             # (T,C) broadcasts over the batch: (B,T,C)
    print(f"  tok_emb = wte[x]       {x.shape} -> {tok_emb.shape}")
    print(f"  pos_emb = wpe[:T]      {pos_emb.shape}")
    print(f"  h = tok_emb + pos_emb  {h.shape}, the input of the first transformer block")

    onehot = np.eye(wte.shape[0], dtype=wte.dtype)[x]                     # (B,T,V)
    diff_onehot = float(np.max(np.abs(onehot @ wte - tok_emb)))
    lib, _ = embedding_forward(x, wte)
    diff_lib = float(np.max(np.abs(lib - tok_emb)))
    print(f"\nwte[x] against onehot(x) @ wte: max difference {diff_onehot:.1e}")
    print(f"wte[x] against tinyllm.layers.embedding_forward(x, wte): max difference {diff_lib:.1e}")

    t1, t2 = find_repeat(x[0])
    if t1 is not None:
        same_tok = float(np.max(np.abs(tok_emb[0, t1] - tok_emb[0, t2])))
        diff_h = float(np.max(np.abs(h[0, t1] - h[0, t2])))
        print(f"x[0] holds id {x[0, t1]} ('{show(tok.itos[x[0, t1]])}') at positions {t1} and {t2}: token vectors "
              f"differ by {same_tok:.1e}, inputs h by up to {diff_h:.3f}.")

    print("\nWhat training did to the position table (cosine similarity of rows; random vectors score about 0):")
    print(f"  {'':36} {'pretrained':>10} {'new':>6}")
    cos = {}
    for name, k in (("neighbours, wpe[t] and wpe[t+1]", 1), ("far apart, wpe[t] and wpe[t+64]", 64)):
        cos[k] = [float(np.mean(np.sum(unit(m.params["wpe.weight"][:-k]) * unit(m.params["wpe.weight"][k:]), -1)))
                  for m in (model, fresh)]
        print(f"  {name:36} {cos[k][0]:10.2f} {cos[k][1]:6.2f}")

    unused = np.flatnonzero(counts == 0)
    alike = [None, None]
    if len(unused) >= 2:
        pairs = np.triu_indices(len(unused), 1)
        alike = [float(cosine_matrix(m.params["wte.weight"][unused])[pairs].mean()) for m in (model, fresh)]
        print(f"  {f'the {len(unused)} characters never in the text':36} {alike[0]:10.2f} {alike[1]:6.2f}   "
              f"(e.g. {tok_list(tok, unused[:6])}; mean over their pairs of wte rows)")
        print("wte is also the output layer (logits = x @ wte^T). A character that is never the answer only ever "
              "gets the push\n'lower my logit', the same push for all of them, so training makes their rows alike.")
    return dict(embedding_shape=h.shape, onehot_max_diff=diff_onehot, embedding_forward_max_diff=diff_lib,
                wpe_neighbour_cosine=cos[1][0], wpe_far_cosine=cos[64][0], new_wpe_neighbour_cosine=cos[1][1],
                unused_rows_cosine=alike[0], new_unused_rows_cosine=alike[1])


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def tok_list(tok, ids):
    return " ".join(show(tok.chars[i]) for i in ids)


def find_repeat(row):
    """Two positions of one row that hold the same id, or (None, None)."""
    first = {}
    for t, i in enumerate(row.tolist()):
        if i in first:
            return first[i], t
        first[i] = t
    return None, None


@lesson_section("6. what pretraining wrote into wte")
def what_wte_learned(model, fresh, tok, counts):
    """Two characters whose rows of wte point the same way are, to the model, alike: they predict similar
    next characters and are predicted in similar places. Below, for every character that occurs in the
    text, the one whose row is closest (highest cosine similarity); then, for a few groups of characters,
    how alike their rows are inside the group and to everything else, and how often a character's nearest
    neighbour is in its own group. The chance column is what a random arrangement gives: (n-1) / (N-1) for
    a group of n of the N characters. A new model is measured the same way, to show the starting point."""
    used = np.flatnonzero(counts > 0)                                    # ids that occur in the text
    chars = [tok.itos[i] for i in used]
    nearest = nearest_neighbours(model.params["wte.weight"][used])
    print(f"Nearest neighbour of each of the {len(used)} characters in the pretrained model (character:neighbour):")
    cells = [f"{show(c)}:{show(chars[j])}" for c, j in zip(chars, nearest)]
    for row in range(0, len(cells), 14):
        print("  " + "  ".join(f"{cell:<5}" for cell in cells[row:row + 14]))

    stats = {name: group_similarity(m.params["wte.weight"][used], chars, GROUPS) for name, m in
             (("pretrained", model), ("new", fresh))}
    print(f"\n{'':22} {'n':>3} | {'cosine inside':>13} {'to the rest':>11} {'nearest inside':>14} | "
          f"{'new: inside':>11} {'nearest':>8} | {'chance':>6}")
    for g in GROUPS:
        s, f = stats["pretrained"][g], stats["new"][g]
        print(f"{g:22} {s['n']:3d} | {s['inside']:13.2f} {s['outside']:11.2f} {s['nearest_inside']:14.0%} | "
              f"{f['inside']:11.2f} {f['nearest_inside']:8.0%} | {s['chance']:6.0%}")
    tightest = max(GROUPS, key=lambda g: stats["pretrained"][g]["inside"] - stats["pretrained"][g]["outside"])
    s = stats["pretrained"][tightest]
    print(f"\nThe tightest group in the pretrained model: {tightest} (cosine {s['inside']:.2f} inside, "
          f"{s['outside']:.2f} to the rest; {s['nearest_inside']:.0%} of them have their nearest neighbour "
          f"inside, against {s['chance']:.0%} by chance).")

    digits = [chars.index(d) for d in "0123456789" if d in chars]
    adjacent = None
    if len(digits) == 10:
        sim = cosine_matrix(model.params["wte.weight"][used][digits])   # (10,10), row = digit
        np.fill_diagonal(sim, -np.inf)
        closest = sim.argmax(axis=1)
        adjacent = int(sum(abs(int(d) - int(c)) == 1 for d, c in enumerate(closest)))
        expected = sum(len([e for e in (d - 1, d + 1) if 0 <= e <= 9]) for d in range(10)) / 90
        print(f"Among the digits: {adjacent} of 10 have a numeric neighbour (d-1 or d+1) as their nearest digit "
              f"({', '.join(f'{d}:{c}' for d, c in enumerate(closest))}); picking at random would give "
              f"{10 * expected:.1f} of 10.")
    return dict(group_similarity=stats, nearest_neighbours={c: chars[j] for c, j in zip(chars, nearest)},
                tightest_group=tightest, digits_nearest_adjacent=adjacent)


def nearest_neighbours(rows):
    """(n,C) -> (n,): for each row, the index of the other row with the highest cosine similarity."""
    sim = cosine_matrix(rows)
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def group_similarity(rows, chars, groups):
    """How alike the rows (n,C) of each group of characters are. chars: the character of each row; groups:
    {name: characters}. Returns {name: dict(n, inside, outside, nearest_inside, chance)}: the mean cosine
    over pairs inside the group and from the group to the other rows, the share of the group whose nearest
    neighbour is in the group, and that share for a random arrangement."""
    sim = cosine_matrix(rows)
    nearest = nearest_neighbours(rows)
    N, out = len(chars), {}
    for name, members in groups.items():
        inside = np.array([c in members for c in chars])
        n = int(inside.sum())
        pairs = sim[np.ix_(inside, inside)][~np.eye(n, dtype=bool)]
        out[name] = dict(n=n, inside=float(pairs.mean()) if n > 1 else float("nan"),
                         outside=float(sim[np.ix_(inside, ~inside)].mean()),
                         nearest_inside=float(inside[nearest[inside]].mean()), chance=(n - 1) / (N - 1))
    return out


@lesson_section("7. the baseline loss")
def the_baseline(counts, val_ids, model, fresh, pretrained, n_windows, seed):
    """The loss is the cross-entropy: the mean of -ln p(correct next character). Reference points, all on
    the same validation windows: uniform guessing (p = 1/V for every character, a loss of ln V); a model
    that predicts every character by its frequency in the training text, whatever came before it (its loss
    is about the entropy of the character frequencies); a new GPT, whose random weights of std 0.02 make
    nearly equal logits, so it scores about ln V; and the pretrained GPT. Everything pretraining gains
    below the frequency model comes from context: what the earlier characters say about the next."""
    V, T = len(counts), model.config.block_size
    x, y = get_batch(val_ids, n_windows, T, np.random.default_rng(seed + 1))    # (n,T) each
    freq_logits = np.log((counts + 1) / (counts + 1).sum())             # +1: no character gets p = 0; (V,)
    logits = np.broadcast_to(freq_logits, (y.size, V))                  # (n*T,V): the same row everywhere
    unigram_model, _ = cross_entropy_forward(logits, y.reshape(-1))
    entropy = unigram_loss(val_ids, V)
    init_loss = float(fresh.forward(x, y)[1])
    model_loss = float(model.forward(x, y)[1])
    print(f"On {n_windows} validation windows of {T} characters, nats per character:")
    for name, loss in ((f"uniform guessing, ln({V})", math.log(V)), ("the new GPT", init_loss),
                       ("every character by its frequency", float(unigram_model)),
                       ("the pretrained GPT" if pretrained else "the model (not pretrained)", model_loss)):
        print(f"  {name:34} {loss:6.3f}")
    print(f"(tinyllm.data.unigram_loss, the entropy of the validation text's own character frequencies, is "
          f"{entropy:.3f}: the same model on all of the validation text, with its own counts.)")
    print(f"Letter counts alone are {math.log(V) - float(unigram_model):.2f} nats better than guessing"
          + (f"; context is worth another {float(unigram_model) - model_loss:.2f} to the pretrained model."
             if pretrained else "."))
    return dict(uniform_loss=math.log(V), unigram_loss=entropy, unigram_model_loss=float(unigram_model),
                init_loss=init_loss, model_loss=model_loss)


@lesson_section("figures")
def save_figures(model, fresh, tok, counts, entropy, pretrained, out_dir):
    state = "pretrained" if pretrained else "RANDOMLY INITIALISED (config given, not pretrained)"
    paths = [os.path.join(out_dir, name) for name in ("char_frequencies.png", "embeddings.png", "embedding_map.png")]
    plot_frequencies(counts, tok, entropy, paths[0])
    plot_embeddings(model, tok, state, paths[1])
    plot_embedding_map(model, fresh, tok, counts, state, paths[2])
    print(f"saved {os.path.relpath(paths[0])}: how often each character occurs")
    print(f"saved {os.path.relpath(paths[1])}: wte and wpe of the {state.split(' (')[0].lower()} model as "
          f"images, and how alike its positions are")
    print(f"saved {os.path.relpath(paths[2])}: the characters' wte rows projected to 2-D, and their cosine "
          f"similarities by group, {state.split(' (')[0].lower()} against new")
    return paths


def plot_frequencies(counts, tok, entropy, path):
    order = np.argsort(-counts, kind="stable")
    share = 100.0 * counts[order] / counts.sum()
    fig, ax = plt.subplots(figsize=(14, 4.5))
    ax.bar(np.arange(len(order)), share, color="tab:blue")
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels([show(tok.chars[i]) for i in order], fontsize=9)
    ax.set_xlim(-0.7, len(order) - 0.3)
    ax.set_xlabel("character (sorted by frequency; ␣ is space, \\n ends a document)")
    ax.set_ylabel("share of training characters (%)")
    unused = int((counts == 0).sum())
    ax.set_title(f"Character frequencies in the training text ({int(counts.sum()):,} characters); "
                 f"{unused} of the {len(counts)} characters never occur; entropy {entropy:.3f} nats")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_embeddings(model, tok, state, path):
    wte, wpe = model.params["wte.weight"], model.params["wpe.weight"]   # (V,C), (block_size,C)
    fig, axes = plt.subplots(1, 3, figsize=(17, 8), gridspec_kw=dict(width_ratios=[1, 1, 1.1]))
    lim = float(np.max(np.abs(wte)))
    im = axes[0].imshow(wte, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[0].set_yticks(np.arange(len(tok.chars)))
    axes[0].set_yticklabels([show(c) for c in tok.chars], fontsize=6.5)
    axes[0].set_xlabel("channel (0..C-1)")
    axes[0].set_ylabel("token (one row per character)")
    axes[0].set_title(f"token embeddings wte {wte.shape}")
    fig.colorbar(im, ax=axes[0], fraction=0.046, label="value")
    lim = float(np.max(np.abs(wpe)))
    im = axes[1].imshow(wpe, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[1].set_xlabel("channel (0..C-1)")
    axes[1].set_ylabel("position t")
    axes[1].set_title(f"position embeddings wpe {wpe.shape}")
    fig.colorbar(im, ax=axes[1], fraction=0.046, label="value")
    im = axes[2].imshow(cosine_matrix(wpe), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    axes[2].set_xlabel("position t'")
    axes[2].set_ylabel("position t")
    axes[2].set_title("cosine similarity of wpe rows t and t'")
    fig.colorbar(im, ax=axes[2], fraction=0.046, label="cosine similarity")
    fig.suptitle(f"The embedding tables of the {state} model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_embedding_map(model, fresh, tok, counts, state, path):
    """For each model: the used characters' wte rows on their first two principal components, coloured by
    group, and their cosine similarities with the characters sorted by group."""
    used = np.flatnonzero(counts > 0)
    chars = [tok.itos[i] for i in used]
    group_of = [next(g for g, members in GROUPS.items() if c in members) for c in chars]
    colors = dict(zip(GROUPS, ("tab:red", "tab:blue", "tab:green", "black")))
    order = sorted(range(len(chars)), key=lambda i: (list(GROUPS).index(group_of[i]), chars[i]))
    fig, axes = plt.subplots(2, 2, figsize=(15, 13))
    for row, (name, m) in enumerate(((state.split(" (")[0], model), ("new", fresh))):
        rows = m.params["wte.weight"][used].astype(np.float64)
        centred = rows - rows.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T                                           # (n,2): the two main directions
        explained = s[:2] ** 2 / np.sum(s ** 2)
        ax = axes[row, 0]
        for i, c in enumerate(chars):
            ax.text(xy[i, 0], xy[i, 1], show(c), color=colors[group_of[i]], fontsize=13, ha="center", va="center")
        pad = 0.1 * np.ptp(xy, axis=0)
        ax.set_xlim(xy[:, 0].min() - pad[0], xy[:, 0].max() + pad[0])
        ax.set_ylim(xy[:, 1].min() - pad[1], xy[:, 1].max() + pad[1])
        ax.set_xlabel(f"principal component 1 ({explained[0]:.0%} of the variance)")
        ax.set_ylabel(f"principal component 2 ({explained[1]:.0%} of the variance)")
        ax.set_title(f"{name} model: wte rows of the {len(chars)} characters in the text")
        ax.legend(handles=[plt.Line2D([], [], color=c, marker="s", ls="", label=g) for g, c in colors.items()],
                  fontsize=9, loc="best")
        ax.grid(alpha=0.3)
        ax = axes[row, 1]
        im = ax.imshow(cosine_matrix(rows)[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1,
                       interpolation="nearest")
        ax.set_xticks(np.arange(len(order)))
        ax.set_xticklabels([show(chars[i]) for i in order], fontsize=7)
        ax.set_yticks(np.arange(len(order)))
        ax.set_yticklabels([show(chars[i]) for i in order], fontsize=7)
        ax.set_title(f"{name} model: cosine similarity of wte rows, by group")
        fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    fig.suptitle(f"Which characters a model treats as alike: the {state} model (top), a new one (bottom)",
                 fontsize=14)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(n_chars=PRETRAIN_DATA["n_chars"], batch_size=4, block_size=24, n_windows=32, seed=0, out_dir=OUT_DIR,
         checkpoint=CHECKPOINT, config=None):
    """Run the lesson. n_chars: the corpus's size; config: GPTConfig fields of a new random model to look at
    instead of the pretrained one (the tests' tiny model). Returns a dict of what it measured (and the
    paths of its figures)."""
    os.makedirs(out_dir, exist_ok=True)
    world, train_text, val_text = the_corpus(n_chars)
    tok, m_tok = the_tokenizer(world)
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)   # (N,) each
    x, y, m_batch = a_batch(train_ids, tok, batch_size, block_size, seed)
    model, fresh, m_model = the_models(checkpoint, config, seed)
    counts = np.bincount(train_ids, minlength=tok.vocab_size)           # (V,) how often each id occurs
    m_emb = embeddings(model, fresh, tok, x, counts)
    m_wte = what_wte_learned(model, fresh, tok, counts)
    m_base = the_baseline(counts, val_ids, model, fresh, m_model["pretrained"], n_windows, seed)
    figures = save_figures(model, fresh, tok, counts, m_base["unigram_loss"], m_model["pretrained"], out_dir)
    return dict(n_chars=len(train_text) + len(val_text), n_train_tokens=len(train_ids), vocab_size=tok.vocab_size,
                figures=figures, **m_model, **m_tok, **m_batch, **m_emb, **m_wte, **m_base)


if __name__ == "__main__":
    main()
