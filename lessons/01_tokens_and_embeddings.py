"""
Lesson 01: tokens and embeddings.

A language model never sees text. It sees integers, token ids, and its first layer turns each id into a
vector by looking it up in a table. This lesson follows text along that path:

  1. the corpus: a synthetic world of 24 people, written about in short documents
  2. the tokenizer: one id per character, 64 characters in all
  3. a training batch: windows of the token stream, with the targets shifted by one
  4. embeddings: x = wte[idx] + wpe[:T], two table look-ups
  5. the baseline: what a model that learned nothing scores, and one that learned only letter counts

Run from the repository root (a few seconds):

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

from tinyllm.checkpoint import load_pretrained
from tinyllm.data import World, get_batch, make_corpus, split_corpus, unigram_loss
from tinyllm.layers import cross_entropy_forward, embedding_forward
from tinyllm.model import GPT, GPTConfig
from tinyllm.tokenizer import TokenizerError, default_tokenizer
from tinyllm.pretrain import PRETRAIN_DATA
from lessons.common import section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "01_tokens_and_embeddings")
# a pretrained model, if there is one: `python -m tinyllm pretrain` writes the first, lesson 04 the second
CHECKPOINTS = (os.path.join(ROOT, "runs", "pretrain", "ckpt.npz"),
               os.path.join(ROOT, "runs", "lessons", "04_pretraining", "ckpt.npz"))


def show(ch):
    """A character as it can be printed on one line or an axis: newline and space made visible."""
    return {"\n": "\\n", " ": "␣"}.get(ch, ch)


# ----------------------------------------------------------------------------------------------------
# 1. the corpus

def show_corpus(n_chars):
    """Build the pretraining corpus exactly as lesson 04 and `python -m tinyllm pretrain` do."""
    section("1. the corpus")
    world = World(PRETRAIN_DATA["world_seed"], PRETRAIN_DATA["n_people"])
    text = make_corpus(world, n_chars=n_chars, seed=PRETRAIN_DATA["corpus_seed"])
    train_text, val_text = split_corpus(text, PRETRAIN_DATA["val_fraction"])
    docs = text.splitlines()
    print(f"A world of {len(world)} people. The first one, as a record: {world.people[0]}")
    print(f"The corpus writes about them in {len(docs):,} documents, one per line, {len(text):,} characters "
          f"in all.")
    print("Each document is a profile (every fact about one person), two short stories, or some arithmetic. "
          "The first three:")
    for doc in docs[:3]:
        print(f"  | {doc}")
    print(f"The last {PRETRAIN_DATA['val_fraction']:.0%} of the documents are held out for validation: "
          f"{len(train_text):,} characters to train on, {len(val_text):,} to validate on.")
    return world, train_text, val_text


# ----------------------------------------------------------------------------------------------------
# 2. the tokenizer

def show_tokenizer(world):
    section("2. the tokenizer: one id per character")
    tok = default_tokenizer()
    print(f"GPT-2 splits text into 50,257 byte-pair tokens. We use single characters: {tok.vocab_size} of them.")
    print("id: character (\\n is newline, ␣ is space)")
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


# ----------------------------------------------------------------------------------------------------
# 3. a batch: x and y = x shifted by one

def show_batch(train_ids, tok, batch_size, block_size, seed):
    section("3. a training batch")
    print(f"The training text becomes one long array of {len(train_ids):,} token ids. A batch is "
          f"{batch_size} random windows of {block_size} ids (x),")
    print("and the same windows moved one character to the right (y): y[b, t] is the character that comes")
    print("after x[b, :t+1], the answer the model must predict at position t.")
    rng = np.random.default_rng(seed)
    x, y = get_batch(train_ids, batch_size, block_size, rng)             # (B,T), (B,T)
    print(f"x.shape = {x.shape}, y.shape = {y.shape}")
    for b in range(min(batch_size, 2)):
        print(f"  x[{b}] = {tok.decode(x[b])!r}")
        print(f"  y[{b}] = {tok.decode(y[b])!r}")
    shifted = bool(np.array_equal(x[:, 1:], y[:, :-1]))
    print(f"y[:, :-1] equals x[:, 1:] (the same characters, moved by one): {shifted}")
    print(f"One window holds {block_size} predictions: '{show(tok.decode(x[0, :1]))}' -> "
          f"'{show(tok.decode(y[0, :1]))}', '{tok.decode(x[0, :2]).replace(chr(10), '|')}' -> "
          f"'{show(tok.decode(y[0, 1:2]))}', ... , all learned in parallel.")
    return x, y, dict(batch_shifted_by_one=shifted)


# ----------------------------------------------------------------------------------------------------
# 4. embeddings: two table look-ups

def show_embeddings(model, x, counts, pretrained):
    section("4. token and position embeddings")
    wte, wpe = model.params["wte.weight"], model.params["wpe.weight"]   # (V,C), (block_size,C)
    B, T = x.shape
    print(f"The model's first layer is two tables ({'pretrained' if pretrained else 'randomly initialised'}):")
    print(f"  wte.weight {wte.shape}: one row of C={wte.shape[1]} numbers per token id (V={wte.shape[0]})")
    print(f"  wpe.weight {wpe.shape}: one row per position, up to block_size={wpe.shape[0]}")
    tok_emb = wte[x]                                  # (B,T) -> (B,T,C): row x[b,t] of wte
    pos_emb = wpe[:T]                                 # (T,C): the first T rows
    h = tok_emb + pos_emb                             # (T,C) broadcasts over the batch: (B,T,C)
    print(f"  tok_emb = wte[x]     {x.shape} -> {tok_emb.shape}")
    print(f"  pos_emb = wpe[:T]    {pos_emb.shape}")
    print(f"  h = tok_emb + pos_emb  -> {h.shape}, the input of the first transformer block")

    # a look-up is a matrix product with one-hot rows, which is why wte gets a gradient like any weight
    onehot = np.eye(wte.shape[0], dtype=wte.dtype)[x]                     # (B,T,V)
    diff_onehot = float(np.max(np.abs(onehot @ wte - tok_emb)))
    lib, _ = embedding_forward(x, wte)
    diff_lib = float(np.max(np.abs(lib - tok_emb)))
    print(f"\nwte[x] is the same as onehot(x) @ wte: max difference {diff_onehot:.1e}. The look-up is just the")
    print("fast way to multiply by a one-hot vector.")
    print(f"tinyllm.layers.embedding_forward(x, wte) computes the same: max difference {diff_lib:.1e}.")

    # the same character at two positions: same token vector, different input vector
    t1, t2 = find_repeat(x[0])
    if t1 is not None:
        same_tok = float(np.max(np.abs(tok_emb[0, t1] - tok_emb[0, t2])))
        diff_h = float(np.max(np.abs(h[0, t1] - h[0, t2])))
        print(f"x[0] has the same id {x[0, t1]} at positions {t1} and {t2}: their token vectors differ by "
              f"{same_tok:.1e},")
        print(f"but after adding the position vectors the inputs differ by up to {diff_h:.3f}.")
        print("Without wpe the model could not tell the order of its input.")

    # what training did to the tables (for a random model both numbers are near 0)
    def mean_cosine(a, b):
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        b = b / np.linalg.norm(b, axis=-1, keepdims=True)
        return float(np.mean(np.sum(a * b, axis=-1)))
    near = mean_cosine(wpe[:-1], wpe[1:])                                 # positions t and t+1
    far = mean_cosine(wpe[:-64], wpe[64:])                                # positions t and t+64
    print(f"\nNeighbouring positions: mean cosine similarity of wpe[t] and wpe[t+1] is {near:.2f}; of wpe[t] "
          f"and wpe[t+64], {far:.2f}.")
    print("Random vectors score about 0 on both. Training makes nearby positions alike and distant ones different.")
    unused = np.flatnonzero(counts == 0)
    if len(unused) >= 2:
        rows = wte[unused]
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        alike = float((unit @ unit.T)[np.triu_indices(len(unused), 1)].mean())
        print(f"The {len(unused)} characters that never occur in the text (e.g. {tok_list(unused[:6])}): mean "
              f"cosine similarity of their wte rows {alike:.2f}.")
        print("wte is also the output layer (logits = x @ wte^T). A character that is never the answer only "
              "ever gets")
        print("the push 'lower my logit', the same for all of them; in a trained model their rows become alike.")
        unused_alike = alike
    else:
        unused_alike = None
    return dict(embedding_shape=h.shape, onehot_max_diff=diff_onehot, embedding_forward_max_diff=diff_lib,
                wpe_neighbour_cosine=near, wpe_far_cosine=far, unused_rows_cosine=unused_alike)


def tok_list(ids):
    chars = default_tokenizer().chars
    return " ".join(show(chars[i]) for i in ids)


def find_repeat(row):
    """Two positions of one row that hold the same id, or (None, None)."""
    first = {}
    for t, i in enumerate(row.tolist()):
        if i in first:
            return first[i], t
        first[i] = t
    return None, None


# ----------------------------------------------------------------------------------------------------
# 5. the baseline: what "learned nothing" scores

def show_baseline(counts, val_ids, model, x, y, V):
    section("5. the baseline loss")
    print("The loss is the cross-entropy: the mean of -ln p(correct next character). Three reference points:")
    uniform = math.log(V)
    print(f"  uniform guessing, p = 1/V for every character:   ln({V}) = {uniform:.3f} nats")

    # a "model" that predicts the training frequencies at every position, whatever came before
    freq_logits = np.log((counts + 1) / (counts + 1).sum())             # +1: no character gets p = 0; (V,)
    _, yv = get_batch(val_ids, 64, x.shape[1], np.random.default_rng(1))   # targets of 64 validation windows
    logits = np.broadcast_to(freq_logits, (yv.size, V))                 # (B*T,V): the same row everywhere
    unigram_model, _ = cross_entropy_forward(logits, yv.reshape(-1))
    entropy = unigram_loss(val_ids, V)
    print(f"  predicting every character by its frequency:      {unigram_model:.3f} nats on 64 validation windows")
    print(f"    (the entropy of the validation text's character frequencies, tinyllm.data.unigram_loss: {entropy:.3f})")

    init = GPT(model.config, seed=0)                                    # a fresh, untrained GPT
    _, init_loss = init.forward(x, y)
    print(f"  a freshly initialised GPT on the batch above:     {init_loss:.3f} nats")
    print("Random weights of std 0.02 make nearly equal logits, so a new model scores about ln(V). A model")
    print(f"that learned only how common each letter is gets {uniform - entropy:.2f} nats lower. Everything")
    print(f"pretraining gains below {entropy:.3f} comes from context: what the earlier characters say about the next.")
    return dict(uniform_loss=uniform, unigram_loss=entropy, unigram_model_loss=float(unigram_model),
                init_loss=float(init_loss))


# ----------------------------------------------------------------------------------------------------
# figures

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


def plot_embeddings(model, tok, source, path):
    wte, wpe = model.params["wte.weight"], model.params["wpe.weight"]   # (V,C), (block_size,C)
    unit = wpe / np.linalg.norm(wpe, axis=1, keepdims=True)
    cosine = unit @ unit.T                                              # (block_size, block_size)
    state = f"pretrained ({os.path.relpath(source, ROOT)})" if source else "randomly initialised (no checkpoint yet)"
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
    im = axes[2].imshow(cosine, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    axes[2].set_xlabel("position t'")
    axes[2].set_ylabel("position t")
    axes[2].set_title("cosine similarity of wpe rows t and t'")
    fig.colorbar(im, ax=axes[2], fraction=0.046, label="cosine similarity")
    fig.suptitle(f"The embedding tables of the {state} model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(n_chars=PRETRAIN_DATA["n_chars"], batch_size=4, block_size=24, seed=0, out_dir=OUT_DIR,
         checkpoints=CHECKPOINTS):
    """Run the lesson. Returns a dict of what it measured (and the paths of its figures)."""
    os.makedirs(out_dir, exist_ok=True)
    world, train_text, val_text = show_corpus(n_chars)
    tok, m_tok = show_tokenizer(world)
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)   # (N,) each
    x, y, m_batch = show_batch(train_ids, tok, batch_size, block_size, seed)

    source = next((path for path in checkpoints if os.path.exists(path)), None)   # None: no checkpoint
    pretrained = source is not None
    model = load_pretrained(source)[0] if pretrained else GPT(GPTConfig(vocab_size=tok.vocab_size), seed=seed)
    counts = np.bincount(train_ids, minlength=tok.vocab_size)           # (V,) how often each id occurs
    m_emb = show_embeddings(model, x, counts, pretrained)
    m_base = show_baseline(counts, val_ids, model, x, y, tok.vocab_size)

    section("figures")
    freq_path = os.path.join(out_dir, "char_frequencies.png")
    emb_path = os.path.join(out_dir, "embeddings.png")
    plot_frequencies(counts, tok, m_base["unigram_loss"], freq_path)
    plot_embeddings(model, tok, source, emb_path)
    print(f"saved {os.path.relpath(freq_path)}: how often each character occurs")
    print(f"saved {os.path.relpath(emb_path)}: wte and wpe as images, "
          + ("pretrained" if pretrained else "random (lesson 04 or `python -m tinyllm pretrain` trains them)"))
    return dict(n_chars=len(train_text) + len(val_text), n_train_tokens=len(train_ids), vocab_size=tok.vocab_size,
                pretrained=pretrained, figures=[freq_path, emb_path], **m_tok, **m_batch, **m_emb, **m_base)


if __name__ == "__main__":
    main()
