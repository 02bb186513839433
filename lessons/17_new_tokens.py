"""
Lesson 17: a token the model never saw. Fine-tuning data often brings symbols pretraining never showed (a
chat template's special tokens, a format's delimiters). Their embeddings were never trained, and with GPT-2's
tied head their output rows were only ever pushed down: the model starts out certain they never come. A
method that cannot train those rows starts far behind and may never catch up, whatever it is good at.

  1. the record task written with '=' and '|' (record_symbols): how often pretraining showed each character
  2. what the base model makes of them: the loss on each answer character, and the unseen ones' head rows
  3. LoRA alone, LoRA that also trains those rows (PEFT's trainable_token_indices), and full fine-tuning,
     on the same task, the same steps: what the rows cost and what they change
  4. the same record task written with characters pretraining knows (', ' and spaces): LoRA alone is fine

This is why the comparison (lesson 09) uses only seen characters: on record_symbols, the table would measure
who may train a new symbol's embedding, not the methods. A test checks every lab task against the corpus.

Run from the repository root (README.md has the measured time):

    python lessons/17_new_tokens.py

Figures go to runs/lessons/17_new_tokens/.
"""
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.data import World, corpus_splits
from tinyllm.finetune import finetune
from tinyllm.peft import FullFineTuningConfig, LoraConfig
from tinyllm.presets import tuned_lrs
from tinyllm.tasks import encode_examples, get_task
from lessons.common import CHECKPOINT, load_base, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "17_new_tokens")


def corpus_counts(data, tasks):
    """1. Every character of the answers, and how many times the pretraining text holds it."""
    section("1. the characters of the answers, in the pretraining text")
    _, train_text, _ = corpus_splits(data)
    counts = collections.Counter(train_text)
    for task in tasks:
        chars = sorted(set("".join(a for _, a in task.train)))
        unseen = [c for c in chars if counts[c] == 0]
        print(f"{task.name:15} answers use {len(chars)} characters; never in the pretraining text: "
              f"{' '.join(repr(c) for c in unseen) or 'none'}")
    return counts


def base_surprise(base, tok, task, counts):
    """2. The base model's loss on each answer character of the record_symbols task, by character: the unseen
    ones cost about ln(1 / a probability that training pushed towards 0). Their rows of the tied head:
    pretraining's gradient for a token that never comes only lowers its logit, pushing its row away from
    every hidden state the model produces; the rows grow long doing so."""
    section("2. what the base model makes of them")
    idx, targets = encode_examples(tok, task.val[:64], base.config.block_size)
    logits, _ = base.forward(idx)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    per_char = collections.defaultdict(list)
    for b, t in zip(*np.nonzero(targets >= 0)):
        per_char[tok.decode([targets[b, t]])].append(-logp[b, t, targets[b, t]])
    loss = {c: float(np.mean(v)) for c, v in per_char.items()}
    for c in sorted(loss, key=loss.get, reverse=True)[:6]:
        print(f"  {c!r:6} loss {loss[c]:6.2f} nats   (pretraining showed it {counts[c]:,} times)")
    wte = base.params["wte.weight"]
    seen = [i for i, c in enumerate(tok.chars) if counts[c] > 0]
    unseen = [i for i, c in enumerate(tok.chars) if counts[c] == 0]
    print(f"mean loss over the answers: {np.mean([x for v in per_char.values() for x in v]):.2f} nats per character")
    print(f"the head's rows (= the embeddings): seen characters {np.linalg.norm(wte[seen], axis=1).mean():.3f} long, "
          f"unseen {np.linalg.norm(wte[unseen], axis=1).mean():.3f}")
    return loss


def compare_fixes(base, tok, task, steps, lrs, seed):
    """3. LoRA on every linear, then the same LoRA plus the rows of the unseen answer characters (PEFT's
    trainable_token_indices: n rows of C numbers, shared by the embedding and the tied head), then full
    fine-tuning, which trains every row. Same task, steps, seed; each at its tuned learning rate."""
    section("3. three ways to fine-tune on it")
    unseen = sorted({c for _, a in task.train for c in a if c in "=|"})
    ids = [int(i) for i in tok.encode("".join(unseen))]
    lora = lambda **kw: LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], **kw)
    configs = {"LoRA": (lora(), lrs["lora"]),
               f"LoRA + rows of {' '.join(unseen)}": (lora(trainable_token_indices=ids), lrs["lora"]),
               "full": (FullFineTuningConfig(), lrs["full"])}
    runs = {}
    for name, (cfg, lr) in configs.items():
        r = finetune(base, tok, cfg, task, steps=steps, batch_size=8, lr=lr, seed=seed,
                     eval_interval=max(1, steps // 10), out=lambda line: None, n_val=64)
        runs[name] = r
        print(f"  {name:22} {r['trainable_params']:>9,} trainable ({r['formula'].split(':')[-1].strip()}): "
              f"val loss {r['history']['val_loss'][0]:.2f} -> {r['final_val_loss']:.3f}, "
              f"exact match {r['accuracy_after']:.2f}")
    return runs


def seen_version(base, tok, task, steps, lrs, seed):
    """4. The same records written with ', ' and spaces, characters pretraining is full of: LoRA alone."""
    section("4. the same task in characters the model knows")
    r = finetune(base, tok, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]), task, steps=steps,
                 batch_size=8, lr=lrs["lora"], seed=seed, eval_interval=max(1, steps // 10), out=lambda line: None,
                 n_val=64)
    print(f"  LoRA on record: val loss {r['history']['val_loss'][0]:.2f} -> {r['final_val_loss']:.3f}, "
          f"exact match {r['accuracy_after']:.2f}")
    return r


def plot(runs, seen, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in {**runs, "LoRA, seen characters (record)": seen}.items():
        h = r["history"]
        ax.plot(h["val_step"], h["val_loss"], marker="o", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val loss per answer character (nats, log scale)")
    ax.set_title("A symbol pretraining never showed: who may train its row")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(steps=300, seed=0, checkpoint=CHECKPOINT, config=None, n_test=100, out_dir=OUT_DIR):
    """Run the lesson. steps: each fine-tuning run's; config: GPTConfig fields of a random model instead of the
    pretrained one (for tests); n_test: test examples scored. Returns a dict of what it measured."""
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config, seed)
    print(f"The base: {source}.")
    world = World(data["world_seed"], data["n_people"])
    symbols, plain = (get_task(n, world) for n in ("record_symbols", "record"))
    symbols.test, plain.test = symbols.test[:n_test], plain.test[:n_test]
    print(f"record_symbols: {symbols.train[0][0]!r} -> {symbols.train[0][1]!r}")
    print(f"record:         {plain.train[0][0]!r} -> {plain.train[0][1]!r}")
    counts = corpus_counts(data, [symbols, plain])
    loss = base_surprise(base, tok, symbols, counts)
    lrs = tuned_lrs()
    runs = compare_fixes(base, tok, symbols, steps, lrs, seed)
    seen = seen_version(base, tok, plain, steps, lrs, seed)
    path = os.path.join(out_dir, "new_tokens.png")
    plot(runs, seen, path)
    print(f"\nsaved {os.path.relpath(path)}")
    return {"unseen_in_corpus": [c for c in "=|" if counts[c] == 0], "base_loss": loss,
            "runs": {k: {"trainable": r["trainable_params"], "val_loss": r["final_val_loss"],
                         "accuracy": r["accuracy_after"]} for k, r in runs.items()},
            "seen_val_loss": seen["final_val_loss"], "figures": [path]}


if __name__ == "__main__":
    main()
