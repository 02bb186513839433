"""
What the lessons share: headings and indented progress lines, where the pretrained checkpoints live,
and loading the base model. A lesson imports it as `from lessons.common import ...`, after putting the
repository root on sys.path (as every lesson does first).
"""
import functools
import inspect
import os

import numpy as np

from tinyllm.checkpoint import load_checkpoint
from tinyllm.pretrain import PRETRAIN, pretrain
from tinyllm.pretrain import load_base as train_load_base
from tinyllm.train import duration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "runs", "pretrain", "ckpt.npz")      # `python -m tinyllm pretrain` writes it
LESSON_04 = os.path.join(ROOT, "runs", "lessons", "04_pretraining", "ckpt.npz")


def section(title):
    print(f"\n{'-' * 100}\n{title}\n")


def lesson_section(title):
    """A lesson's numbered section: a function whose docstring is the section's explanation. Calling it prints
    the title and the explanation, then runs the code below them, so the file and its output read in the
    same order, each explanation next to the code it explains.

        @lesson_section("3. adapters start as the identity")
        def show_identity(model):
            \"\"\"An adapter adds up(gelu(down(a))) to a; with up = 0 that is a + 0 ...\"\"\"
            ...
    """
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            section(title)
            if fn.__doc__:
                print(inspect.cleandoc(fn.__doc__) + "\n")
            return fn(*args, **kwargs)
        return run
    return wrap


def indented(line):
    print("  " + line.replace("\n", "\n  "), flush=True)


def load_base(checkpoint, config, seed=0):
    """The base model, its tokenizer, its corpus settings and where it came from: the checkpoint (or lesson
    04's, or a new pretraining run), or with config a new random GPT of that size (the tests' tiny one)."""
    return train_load_base(checkpoint, config, seed, fallback=LESSON_04, echo=indented)


def pretrained_model(checkpoint, config=None, seed=0):
    """The model a lesson looks inside, said what it is: the pretrained checkpoint (lesson 04's copy if only
    that exists; made now, with live progress, if neither does), or with config a new random GPT (the
    tests' tiny one). Returns model, tokenizer, corpus settings, {pretrained, pretrained_now}."""
    origin = checkpoint if os.path.exists(checkpoint) else LESSON_04 if os.path.exists(LESSON_04) else None
    if config is None and origin is None:
        pretrain_first(checkpoint)
    model, tok, data, source = load_base(checkpoint, config, seed)
    c = model.config
    print(f"The model: {source}; {c.n_layer} blocks of {c.n_head} heads, C = {c.n_embd}, "
          f"{model.num_parameters():,} parameters.")
    if config is None:
        history = load_checkpoint(origin or checkpoint)[1]["history"]
        print(f"It was trained for {history['step'][-1]} steps ({duration(history['elapsed'][-1])}), to a "
              f"validation loss of {history['val_loss'][-1]:.3f} nats per character.")
    return model, tok, data, dict(pretrained=config is None, pretrained_now=config is None and origin is None)


def pretrain_first(checkpoint):
    """No pretrained model exists yet: make it, with the recipe of lesson 04 (tinyllm.pretrain.PRETRAIN)."""
    print(f"No pretrained model yet, so this lesson makes it first: the default GPT, pretrained for "
          f"{PRETRAIN.max_steps} steps on the corpus. That takes a few minutes on 2 cores (the eta on each "
          f"progress line is the time left). It is saved to {os.path.relpath(checkpoint)}, and every later "
          f"lesson reuses it. Ctrl-C stops it and saves where it got to.\n")
    resume = f"python -m tinyllm pretrain --resume {os.path.relpath(checkpoint)}"
    result = pretrain(out=checkpoint, echo=indented, resume_command=resume)
    if result["history"]["status"] != "completed":
        raise SystemExit(f"\nPretraining stopped before the end. Finish it with `{resume}`, then run this "
                         f"lesson again.")
    print()


def same_length_prompts(tok, examples, n):
    """Up to n prompts of the most common length, stacked into one (B,T) batch with no padding."""
    ids = [tok.encode(prompt) for prompt, _ in examples]
    lengths = [len(i) for i in ids]
    T = max(set(lengths), key=lengths.count)
    return np.stack([i for i in ids if len(i) == T][:n])


def max_diff(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def lr_source(method, lr, task_name):
    """Where a lesson's learning rate for a method came from, for its output: the sweep's results file,
    the method's preset (no sweep has covered it yet), or the caller."""
    from tinyllm.presets import tuned
    t = tuned(task_name)[method]
    if lr != t["lr"]:
        return "given to main()"
    return f"chosen by the sweep, {t['source']}" if t["source"] != "fallback" else \
        f"the preset's: `python -m tinyllm sweep` has not covered {method} on {task_name} yet"


def human_bytes(n_bytes):
    """A size as a learner reads it, in 1024-based units: '812 bytes', '260.7 KiB', '3.13 MiB'."""
    if n_bytes < 2 ** 10:
        return f"{n_bytes:,} bytes"
    return f"{n_bytes / 2 ** 10:.1f} KiB" if n_bytes < 2 ** 20 else f"{n_bytes / 2 ** 20:.2f} MiB"
