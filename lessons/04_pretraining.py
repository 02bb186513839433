"""
Lesson 04: pretraining.

Pretraining is next-character prediction on a lot of text, nothing more: draw a batch of windows (lesson
01), run the forward and the loss, the backward (lesson 03), clip the gradient, take an AdamW step, and
repeat. This lesson runs tinyllm's pretraining recipe, tinyllm.pretrain.PRETRAIN, the same one as
`python -m tinyllm pretrain` (tinyllm.pretrain.pretrain, which calls the shared loop tinyllm.train.train),
and then looks at the result:

  1. the recipe: data, model and optimizer settings
  2. training: the loss falls, printed as it goes
  3. the curve: train and validation loss against tokens seen, next to the unigram baseline
  4. samples at a few temperatures
  5. fact recall: does the model know what the corpus says about each person?
  6. the checkpoint: this run's, and the one the other lessons load

Lessons 01 and 02 already made (or found) runs/pretrain/ckpt.npz with this recipe; this lesson trains its
own copy in runs/lessons/04_pretraining/ckpt.npz, so you watch it happen. Run from the repository root (a
few minutes on 2 cores; Ctrl-C saves a checkpoint):

    python lessons/04_pretraining.py              # train from scratch
    python lessons/04_pretraining.py --resume     # continue an interrupted run exactly

Figures go to runs/lessons/04_pretraining/.
"""
import math
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.checkpoint import load_checkpoint
from tinyllm.data import ATTRIBUTES, World, fact_recall_examples, make_corpus
from tinyllm.model import GPTConfig
from tinyllm.plots import smooth
from tinyllm.pretrain import PRETRAIN, PRETRAIN_DATA, QUICK, pretrain
from tinyllm.tasks import evaluate
from tinyllm.train import duration
from lessons.common import CHECKPOINT, indented, lesson_section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "04_pretraining")


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. the recipe")
def the_recipe(steps, batch_size, quick, resume):
    """The recipe is tinyllm.pretrain.PRETRAIN (a TrainConfig) with the corpus settings PRETRAIN_DATA and
    the default GPTConfig: what `python -m tinyllm pretrain` runs, and what lessons 01 and 02 ran if they
    had to make the pretrained model. The learning rate warms up linearly, then decays along a cosine; weight
    decay applies to matrices only (nanoGPT's rule); the gradient's norm is clipped. (main(quick=True), what
    the tests run, uses tinyllm.pretrain.QUICK instead: a small corpus and a few steps.)"""
    if resume:
        print("(resuming: the settings saved in the checkpoint apply; the defaults are shown below)")
    config = GPTConfig()
    settings = {**PRETRAIN.to_dict(), **({k: v for k, v in QUICK.items() if k != "n_chars"} if quick else {})}
    steps = steps or settings["max_steps"]
    batch_size = batch_size or settings["batch_size"]
    n_chars = QUICK["n_chars"] if quick else PRETRAIN_DATA["n_chars"]
    print(f"data:  the corpus of lesson 01, {n_chars:,} characters about {PRETRAIN_DATA['n_people']} people, "
          f"{PRETRAIN_DATA['val_fraction']:.0%} held out for validation")
    print(f"model: GPTConfig({', '.join(f'{k}={v}' for k, v in config.to_dict().items())})")
    print(f"steps: {steps} steps of {batch_size} windows x {config.block_size} characters = "
          f"{steps * batch_size * config.block_size:,} tokens seen")
    print(f"AdamW: peak lr {settings['lr']:g} after {settings['warmup_steps']} warmup steps, cosine decay to "
          f"{settings['lr'] * settings['min_lr_ratio']:g}, weight decay {settings['weight_decay']} on matrices, "
          f"gradient norm clipped at {settings['grad_clip']}")
    print(f"validation loss every {settings['eval_interval']} steps, on the same {settings['eval_iters']} "
          f"held-out batches each time")
    return config


@lesson_section("2. training")
def training(ckpt, steps, batch_size, seed, quick, resume):
    """tinyllm.pretrain.pretrain builds the corpus and the model and hands them to the training loop,
    tinyllm.train.train. Its progress lines: the step, the training loss, the learning rate, the speed,
    the time so far and the time left (eta); at every evaluation, the validation loss. It saves a
    checkpoint as it goes: Ctrl-C stops it cleanly, and --resume continues exactly where it stopped."""
    if resume and not os.path.exists(ckpt):
        raise FileNotFoundError(f"nothing to resume: no checkpoint at {os.path.relpath(ckpt)}; run without --resume")
    return pretrain(out=ckpt, steps=steps, batch_size=batch_size, seed=seed, quick=quick,
                    resume=ckpt if resume else None, echo=indented,
                    resume_command=f"python {os.path.relpath(__file__)} --resume")


def val_tokens(history):
    """Tokens seen at each validation: history['tokens'][s - 1] after step s, 0 before the first."""
    return [history["tokens"][s - 1] if s > 0 else 0 for s in history["val_step"]]


@lesson_section("3. the loss, step by step")
def the_curve(history, baseline, V):
    """The validation loss at each evaluation, next to the training loss (the mean of the last 20 steps:
    one step's loss is noisy). The two reference points of lesson 01: uniform guessing, ln V, where a new
    model starts; and the unigram baseline, what letter counts alone achieve. The loss is in nats per
    character; exp(-loss) is the probability the model gives the right next character (a geometric mean)."""
    train_smooth = smooth(history["train_loss"], 20)
    print(f"{'step':>6}  {'tokens seen':>12}  {'train loss':>10}  {'val loss':>9}")
    for s, tokens, val in zip(history["val_step"], val_tokens(history), history["val_loss"]):
        train = f"{train_smooth[s - 1]:10.3f}" if s > 0 else f"{'-':>10}"
        print(f"{s:6d}  {tokens:12,d}  {train}  {val:9.3f}")
    final = history["val_loss"][-1]
    print(f"\nuniform guessing ln({V}) = {math.log(V):.3f}; the unigram baseline {baseline:.3f}; the final "
          f"validation loss {final:.3f}, {baseline - final:.3f} nats below the baseline.")
    print(f"The right next character gets a probability of exp(-{final:.3f}) = {math.exp(-final):.2f}; letter "
          f"counts alone give exp(-{baseline:.3f}) = {math.exp(-baseline):.2f}.")
    gap = final - train_smooth[-1]
    print(f"Validation minus train loss: {gap:+.3f}. " + (
        "Clearly better on its training text than on held-out text: the model has begun to memorise."
        if gap > 0.05 else
        "Lower on held-out text: the train loss averages the last 20 steps, which lag a loss still falling fast."
        if gap < -0.05 else
        "About as good on held-out text as on training text: no sign of overfitting."))
    return train_smooth


@lesson_section("4. samples at a few temperatures")
def the_samples(model, tok, world, temperatures, n_chars, seed):
    """Each sample starts from a newline (the start of a document). The model's logits are divided by the
    temperature before the softmax: 0 always takes the most likely character (greedy), 1 samples from the
    model's own distribution, and higher flattens it towards uniform. A word the corpus never contains is
    the model's invention. '|' marks where the model ended a document and began the next."""
    corpus = make_corpus(world, n_chars=PRETRAIN_DATA["n_chars"], seed=PRETRAIN_DATA["corpus_seed"])
    corpus_words = set(words_of(corpus))
    samples = {}
    for t in temperatures:
        ids = model.generate(tok.encode("\n")[None], n_chars, temperature=t, seed=seed)[0]
        text = tok.decode(ids[1:])
        samples[t] = text
        words = words_of(text)[:-1]                             # the last word may be cut off mid-way
        invented = [w for w in words if w not in corpus_words]
        print(f"{'' if t == temperatures[0] else chr(10)}temperature {t:g}:\n  {text.replace(chr(10), ' | ')}")
        print(f"  {len(invented)} of {len(words)} words never occur in the corpus"
              + (f": {', '.join(repr(w) for w in invented[:5])}" if invented else ""))
    return samples


def words_of(text):
    """Lower-case words and numbers, with punctuation taken off."""
    return "".join(ch if ch.isalnum() or ch == "'" else " " for ch in text).split()


@lesson_section("5. fact recall")
def fact_recall(model, tok, world):
    """One cloze prompt per fact, phrased as the corpus phrases it: a sentence about a person, cut before the
    value. Correct when greedy decoding writes exactly the answer (the value and its full stop). The last
    column is what a model would score that knew the lists of values but nothing about the people: always
    answering each attribute's most common value."""
    examples = fact_recall_examples(world)                     # person by person, ATTRIBUTES in order
    attrs = [attr for _ in world.people for attr in ATTRIBUTES]
    assert len(attrs) == len(examples)
    result = evaluate(model, tok, examples)
    print(f"{len(examples)} prompts, e.g. {examples[0][0]!r} -> {examples[0][1]!r}\n")
    print(f"{'attribute':<10} {'recalled':>9}   {'guess the most common value':>28}")
    per_attr, guess = {}, {}
    for attr in ATTRIBUTES:
        hits = [c for c, a in zip(result["correct"], attrs) if a == attr]
        per_attr[attr] = float(np.mean(hits))
        values = Counter(getattr(p, attr) for p in world.people)
        guess[attr] = values.most_common(1)[0][1] / len(world)
        print(f"{attr:<10} {per_attr[attr]:9.0%}   {guess[attr]:28.0%}")
    print(f"{'all':<10} {result['accuracy']:9.0%}   {np.mean(list(guess.values())):28.0%}")
    print("\nA few answers (prompt, greedy answer, the truth):")
    right = [i for i, c in enumerate(result["correct"]) if c][:3]
    wrong = [i for i, c in enumerate(result["correct"]) if not c][:3]
    for i in right + wrong:
        prompt, answer = examples[i]
        said = result["predictions"][i].split(".")[0] + "." if "." in result["predictions"][i] \
            else result["predictions"][i]
        print(f"  {'right' if result['correct'][i] else 'wrong'}: {prompt!r} -> {said!r}   (truth {answer!r})")
    return result["accuracy"], per_attr, guess


@lesson_section("6. the checkpoint")
def the_checkpoint(ckpt, result, shared=CHECKPOINT):
    """This run's model is saved in runs/lessons/04_pretraining/ckpt.npz: weights, optimizer state, the
    history and the settings, everything --resume needs. The other lessons load runs/pretrain/ckpt.npz,
    made with the same recipe by lesson 01 or 02 on a first run, or by `python -m tinyllm pretrain`; they
    fall back to this lesson's checkpoint when that one does not exist."""
    history = result["history"]
    print(f"this run: {os.path.relpath(ckpt)}, {history['step'][-1]} steps in {duration(result['seconds'])}, "
          f"validation loss {history['val_loss'][-1]:.3f}")
    if not os.path.exists(shared) or os.path.abspath(shared) == os.path.abspath(ckpt):
        print(f"{os.path.relpath(shared)} does not exist: the other lessons will use this run's checkpoint.")
        return None
    meta = load_checkpoint(shared)[1]
    theirs = meta["history"]
    mine = load_checkpoint(ckpt)[1]
    logging = ("checkpoint", "workers", "log_interval", "checkpoint_interval", "eval_interval", "eval_iters")
    differ = [k for k, v in mine["train_config"].items() if k not in logging and meta["train_config"].get(k) != v]
    differ += [f"data.{k}" for k, v in mine["data"].items() if meta["data"].get(k) != v]
    print(f"the other lessons': {os.path.relpath(shared)}, {theirs['step'][-1]} steps in "
          f"{duration(theirs['elapsed'][-1])}, validation loss {theirs['val_loss'][-1]:.3f}; settings "
          + (f"differ from this run's in {', '.join(differ)}" if differ else "that shape the model: the same as "
             "this run's"))
    return theirs["val_loss"][-1]


# ----------------------------------------------------------------------------------------------------
# figures

@lesson_section("figures")
def save_figures(history, train_smooth, baseline, V, per_attr, guess, accuracy, out_dir):
    curve_path = os.path.join(out_dir, "loss_curve.png")
    recall_path = os.path.join(out_dir, "fact_recall.png")
    plot_curve(history, train_smooth, baseline, V, curve_path)
    plot_recall(per_attr, guess, accuracy, recall_path)
    print(f"saved {os.path.relpath(curve_path)}: train and validation loss against tokens seen")
    print(f"saved {os.path.relpath(recall_path)}: facts recalled per attribute")
    return [curve_path, recall_path]


def plot_curve(history, train_smooth, baseline, V, path):
    fig, ax = plt.subplots(figsize=(10, 6))
    tokens = np.asarray(history["tokens"])
    ax.plot(tokens, history["train_loss"], color="tab:blue", alpha=0.25, lw=0.8, label="train loss (each step)")
    ax.plot(tokens, train_smooth, color="tab:blue", lw=2, label="train loss (mean of the last 20 steps)")
    ax.plot(val_tokens(history), history["val_loss"], "o-", color="tab:orange", lw=2, label="validation loss")
    ax.axhline(baseline, color="tab:red", ls="--", label=f"unigram baseline (letter counts only): {baseline:.3f}")
    ax.axhline(math.log(V), color="gray", ls=":", label=f"uniform guessing, ln({V}): {math.log(V):.3f}")
    ax.set_xlabel("tokens seen (characters)")
    ax.set_ylabel("cross-entropy loss (nats per character)")
    ax.set_ylim(0, math.log(V) + 0.3)
    ax.set_title(f"Pretraining the default GPT: final validation loss {history['val_loss'][-1]:.3f}")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    per_step = history["tokens"][0]                             # every step sees batch_size x block_size tokens
    top = ax.secondary_xaxis("top", functions=(lambda t: t / per_step, lambda s: s * per_step))
    top.set_xlabel("optimizer steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall(per_attr, guess, accuracy, path):
    fig, ax = plt.subplots(figsize=(9, 5))
    x = np.arange(len(ATTRIBUTES))
    ax.bar(x - 0.2, [100 * per_attr[a] for a in ATTRIBUTES], 0.4, color="tab:green", label="pretrained model")
    ax.bar(x + 0.2, [100 * guess[a] for a in ATTRIBUTES], 0.4, color="lightgray",
           label="always the most common value")
    ax.set_xticks(x)
    ax.set_xticklabels(ATTRIBUTES)
    ax.set_xlabel("attribute asked about")
    ax.set_ylabel("facts recalled exactly (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Fact recall after pretraining: {accuracy:.0%} of all facts, greedy decoding")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=None, batch_size=None, quick=False, seed=None, resume=False, temperatures=(0.0, 0.5, 1.0),
         sample_chars=160, out_dir=OUT_DIR):
    """Run the lesson.

    steps, batch_size, seed: override the recipe's (None keeps PRETRAIN's); quick: tinyllm's QUICK recipe
    (a small corpus, a few seconds, for tests); resume: continue the run whose checkpoint is in out_dir.
    Returns a dict of what it measured (and the paths of its figures and checkpoint).
    """
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "ckpt.npz")
    config = the_recipe(steps, batch_size, quick, resume)
    result = training(ckpt, steps, batch_size, seed, quick, resume)
    history = result["history"]
    if history["status"] != "completed":
        print(f"\nTraining stopped ({history['status']}) before the end; the lesson continues after a resumed run.")
        return dict(status=history["status"], checkpoint=ckpt)
    model, tok, V = result["model"], result["tokenizer"], result["tokenizer"].vocab_size
    train_smooth = the_curve(history, result["unigram_loss"], V)
    world = World(PRETRAIN_DATA["world_seed"], PRETRAIN_DATA["n_people"])
    samples = the_samples(model, tok, world, temperatures, sample_chars, seed=0)
    accuracy, per_attr, guess = fact_recall(model, tok, world)
    shared_val_loss = the_checkpoint(ckpt, result)
    figures = save_figures(history, train_smooth, result["unigram_loss"], V, per_attr, guess, accuracy, out_dir)
    return dict(status=history["status"], steps=history["step"][-1], tokens_seen=history["tokens"][-1],
                seconds=result["seconds"], first_train_loss=history["train_loss"][0],
                final_train_loss=float(train_smooth[-1]), first_val_loss=history["val_loss"][0],
                final_val_loss=history["val_loss"][-1], unigram_loss=result["unigram_loss"],
                uniform_loss=math.log(V), samples=samples, fact_recall=accuracy, fact_recall_by_attribute=per_attr,
                most_common_value_recall=guess, shared_checkpoint_val_loss=shared_val_loss, checkpoint=ckpt,
                figures=figures, config=config.to_dict())


if __name__ == "__main__":
    main(resume="--resume" in sys.argv[1:])
