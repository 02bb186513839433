"""
What the lessons share: headings and indented progress lines, where the pretrained checkpoints live,
and loading the base model. A lesson imports it as `from lessons.common import ...`, after putting the
repository root on sys.path (as every lesson does first).
"""
import functools
import inspect
import os

import numpy as np

from tinyllm.pretrain import load_base as train_load_base

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


def same_length_prompts(tok, examples, n):
    """Up to n prompts of the most common length, stacked into one (B,T) batch with no padding."""
    ids = [tok.encode(prompt) for prompt, _ in examples]
    lengths = [len(i) for i in ids]
    T = max(set(lengths), key=lengths.count)
    return np.stack([i for i in ids if len(i) == T][:n])


def max_diff(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
