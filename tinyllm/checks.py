"""
Checks of what users hand to tinyllm, used at its public entry points (configs, GPT.forward, load_state_dict,
the optimizer, the training loop, the tasks). Each raises a ValueError or TypeError that names what is
wrong and what to do, before anything deep inside NumPy can fail on it.
"""
import math

import numpy as np

from .layers import IGNORE_INDEX


def is_int(v):
    """An integer, and not a bool (True would silently mean 1)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v):
    """A finite real number, and not a bool."""
    if is_int(v):
        return True
    return isinstance(v, (float, np.floating)) and bool(np.isfinite(v))


def as_array(x, what, hint="every row needs the same length"):
    """np.asarray(x), with a clear error for what numpy cannot make an array of (ragged nested lists)."""
    try:
        return np.asarray(x)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not an array: nested lists of different lengths? ({hint})") from None


# ----------------------------------------------------------------------------------------------------
# fields of a config


def positive_int(owner, name, value):
    if not is_int(value) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def positive_number(owner, name, value):
    if not is_number(value) or not value > 0:
        raise ValueError(f"{owner}.{name} must be a finite number > 0, got {value!r}")


def flag(owner, name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be True or False, got {value!r}")


def choice(owner, name, value, allowed):
    if not any(type(value) is type(a) and value == a for a in allowed):   # 1 is not True, "x" is not ["x"]
        raise ValueError(f"{owner}.{name} must be one of {list(allowed)}, got {value!r}")


def optional_text(owner, name, value):
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{owner}.{name} must be a string (or None), got {value!r}")


def block_list(owner, value):
    """layers_to_transform as a list of block indices (an int alone is one block), or None."""
    if value is None:
        return None
    layers = [value] if is_int(value) else value
    if not isinstance(layers, (list, tuple)) or not all(is_int(i) for i in layers):
        raise ValueError(f"{owner}.layers_to_transform must be None or a list of block indices (ints), got {value!r}")
    return [int(i) for i in layers]


def blocks_exist(owner, layers, n_layer):
    """Raise unless every block index in layers exists in a model of n_layer blocks."""
    bad = [i for i in layers or () if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"{owner}.layers_to_transform {bad} out of range: the model has blocks 0..{n_layer - 1}")


# ----------------------------------------------------------------------------------------------------
# arrays


def check_weights(name, value, shape, hint, dtype=None, where="the state dict"):
    """value as an array that can be loaded into the parameter `name` of this shape (and, given dtype, cast to
    that dtype), or a ValueError saying what is wrong with it (hint: the likely cause of a shape mismatch).

    Only integer and floating-point arrays are numbers a parameter can take: bool, complex, strings and
    objects are refused, since a cast would silently make them 0/1, drop the imaginary part or fail. The
    finite check comes after the cast: float64 weights of 1e39 are finite, and inf in a float32 model."""
    a = as_array(value, f"{name} in {where}")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} in {where} but {shape} in this model; {hint}")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} in {where} has dtype {a.dtype}; parameters are real numbers")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} in {where} holds nan or inf values; was it saved from a run that diverged?")
    if dtype is not None:
        with np.errstate(over="ignore"):          # an overflow is what the check below is for
            cast = a.astype(dtype)
        if not np.isfinite(cast).all():
            raise ValueError(f"{name} in {where} holds values too large for {np.dtype(dtype)} (largest magnitude "
                             f"{np.abs(a.astype(np.float64)).max():.3g}); they would load as inf")
        a = cast
    return a


def check_tokens(idx, vocab_size, what="idx"):
    """idx as a (B,T) integer array of token ids inside the vocabulary, or a clear error."""
    idx = as_array(idx, what, "pad the sequences of a batch to one length")
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{what} must be a 2-D integer array of token ids (batch, time), got shape "
                         f"{idx.shape} and dtype {idx.dtype}; wrap a single sequence as idx[None, :]")
    if idx.size == 0:
        raise ValueError(f"{what} is empty (shape {idx.shape}); give at least one sequence of at least one token")
    bad = np.argwhere((idx < 0) | (idx >= vocab_size))
    if len(bad):
        b, t = bad[0]
        raise ValueError(f"{what}[{b}, {t}] = {idx[b, t]} is not a token id: ids must lie in [0, {vocab_size}) "
                         f"(vocab_size); encode text with the model's tokenizer")
    return idx


def check_targets(targets, idx, vocab_size):
    """targets as a (B,T) integer array of the shape of idx, each a token id or IGNORE_INDEX."""
    targets = as_array(targets, "targets", "targets need the shape of idx")
    if targets.shape != idx.shape:
        raise ValueError(f"targets has shape {targets.shape} but idx has shape {idx.shape}; they must match")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    bad = np.argwhere((targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size)))
    if len(bad):
        b, t = bad[0]
        raise ValueError(f"targets[{b}, {t}] = {targets[b, t]} is not a token id: targets must lie in "
                         f"[0, {vocab_size}) or be {IGNORE_INDEX} (ignored)")
    return targets


def finite_positive(what, value):
    """A finite number > 0 as a float (math.isfinite refuses nan and inf)."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def check_token_ids(ids, vocab_size):
    """ids for a tokenizer's decode: a 1-D sequence of integers in [0, vocab_size), as an array."""
    try:
        ids = np.asarray(ids)
    except (ValueError, TypeError):
        raise ValueError("decode takes a 1-D sequence of ids; got nested lists of different lengths") from None
    if ids.ndim != 1:
        raise ValueError(f"decode takes a 1-D sequence of ids, got shape {ids.shape}; "
                         f"decode each row of a batch separately")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        pos = int(bad[0])
        raise ValueError(f"id {int(ids[pos])} at position {pos} is not a token id: "
                         f"ids must lie in [0, {vocab_size}) (vocab_size)")
    return ids
