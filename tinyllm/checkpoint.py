"""
Checkpoints: named arrays plus a JSON description, in one .npz file that loads without pickle.

    ckpt.npz
      model/<name>     every model parameter (GPT-2 names, e.g. model/h.0.attn.c_attn.weight)
      optim/<name>     the optimizer's state (optim/t, optim/m/<name>, optim/v/<name>)
      __meta__         uint8 bytes of a JSON object: format, version, config, step, rng state, history...

Writes are atomic: the file is written beside its destination, flushed to disk, then renamed over it,
so a crash or Ctrl-C mid-write leaves the previous checkpoint as it was.
"""
import contextlib
import json
import os

import numpy as np

FORMAT = "tinyllm-checkpoint"
FORMAT_VERSION = 1
META_KEY = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one tinyllm can load."""


def save_checkpoint(path, arrays, meta):
    """Write arrays ({name: ndarray}) and meta (a JSON-able dict) to path, atomically."""
    for name, a in arrays.items():
        if name == META_KEY or not isinstance(a, np.ndarray) or a.dtype.hasobject:
            raise ValueError(f"cannot checkpoint {name!r}: need a numeric numpy array under a name other "
                             f"than {META_KEY!r}, got {type(a).__name__}")
    header = {**meta, "format": FORMAT, "version": FORMAT_VERSION}
    try:
        blob = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    except (TypeError, ValueError) as e:   # checked before the file is touched
        raise ValueError(f"cannot checkpoint meta: it must be JSON-able (dicts, lists, str, int, float, bool, "
                         f"None), but {e}") from None
    with atomic_open(path) as f:
        np.savez(f, allow_pickle=False, **arrays, **{META_KEY: blob})


@contextlib.contextmanager
def atomic_open(path):
    """Open a temporary file beside path for binary writing; when the block ends without an error, it
    replaces path in one step. On any error, Ctrl-C included, path is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())                 # the bytes are on disk before the name points at them
        os.replace(tmp, path)                    # atomic: readers see the old file or the new, never half
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint.

    Returns: arrays ({name: ndarray}), meta (dict). Raises CheckpointError for every kind of failure.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or pathlib.Path), got {path!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}; make one with `python -m tinyllm pretrain` "
                              f"(its --out flag sets where it is written)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e.strerror}") from None
    if magic == b"":
        raise CheckpointError(f"{path!r} is empty: a checkpoint whose writing never finished?")
    if magic != b"PK\x03\x04":                  # an .npz is a zip file, and every zip starts so
        raise CheckpointError(f"{path!r} is not a tinyllm checkpoint (not an .npz file)")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:   # our handle: closed on every error
            arrays = {k: z[k] for k in z.files}
    except Exception as e:                       # zipfile, numpy and OS errors all mean the same here
        raise CheckpointError(f"{path!r} is not a readable checkpoint, truncated or corrupted? "
                              f"({type(e).__name__}: {e})") from None
    if META_KEY not in arrays:
        raise CheckpointError(f"{path!r} is not a tinyllm checkpoint (an .npz without {META_KEY!r})")
    try:
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path!r} has a corrupted {META_KEY!r} entry ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a tinyllm checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{path!r} is not a tinyllm checkpoint")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format version {meta.get('version')!r}, but this "
                              f"tinyllm reads version {FORMAT_VERSION}; re-create it with this version")
    return arrays, meta


# ----------------------------------------------------------------------------------------------------
# a whole training state: model, optimizer, batch RNG, step, history

def with_prefix(prefix, d):
    return {prefix + k: v for k, v in d.items()}


def strip_prefix(prefix, d):
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def save_training_state(path, model, optimizer, rng_state, step, history, meta=None):
    """Everything a run needs to continue exactly where it stopped.

    rng_state is a numpy bit_generator.state (a dict of ints, stored in the JSON: Python's JSON keeps
    big ints exact). meta adds anything else (train config, tokenizer chars, kind...).
    """
    arrays = {**with_prefix("model/", model.state_dict()), **with_prefix("optim/", optimizer.state_dict())}
    info = {**(meta or {}), "config": model.config.to_dict(), "step": int(step), "rng_state": rng_state,
            "history": history}
    save_checkpoint(path, arrays, info)


def load_training_state(path, model, optimizer):
    """Load a save_training_state checkpoint into model and optimizer (in place).

    Returns: rng (a np.random.Generator in the saved state), step, history, meta.
    """
    arrays, meta = load_checkpoint(path)
    for key in ("step", "rng_state", "history"):
        if key not in meta:
            raise CheckpointError(f"{path!r} holds no training state ({key!r} missing), so a run cannot "
                                  f"resume from it; it may be a model-only checkpoint")
    try:
        model.load_state_dict(strip_prefix("model/", arrays))
        optimizer.load_state_dict(strip_prefix("optim/", arrays))
    except ValueError as e:
        raise CheckpointError(f"{path!r} does not fit this model: {e}") from None
    return restore_rng(path, meta["rng_state"]), meta["step"], meta["history"], meta


def restore_rng(path, state, rng=None):
    """A np.random.Generator in a saved bit_generator.state; with rng given, that generator is set to it."""
    try:
        if rng is None:
            rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
        rng.bit_generator.state = state
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path!r} has a corrupted random-number state ({e!r})") from None
    return rng


def check_writable(path):
    """Raise CheckpointError now, before any training, if a checkpoint could not be written at path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a folder; give a file name, e.g. {path}/ckpt.npz")
    folder = os.path.dirname(path)
    while not os.path.exists(folder):         # the nearest folder that exists must let us create the rest
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write a checkpoint at {path!r}: {folder!r} is not a writable folder")


def load_pretrained(path, allow_unfinished=False):
    """A pretrained GPT, its tokenizer and the checkpoint's meta, from a `tinyllm pretrain` checkpoint.

    A checkpoint of a run that has not finished (still running, or interrupted) is refused unless
    allow_unfinished: fine-tuning a half-trained model by accident would make every later number wrong.
    Returns: model (tinyllm.GPT, all parameters trainable), tokenizer (CharTokenizer), meta (dict).
    """
    from .model import GPT, GPTConfig
    from .tokenizer import CharTokenizer
    arrays, meta = load_checkpoint(path)
    if "config" not in meta or "tokenizer_chars" not in meta:
        raise CheckpointError(f"{path!r} is not a pretrained model checkpoint (no model config or "
                              f"tokenizer in it); make one with `python -m tinyllm pretrain`")
    status = meta.get("history", {}).get("status", "completed")
    if status != "completed" and not allow_unfinished:
        raise CheckpointError(f"{path!r} is from a pretraining run that has not finished ({status} at step "
                              f"{meta.get('step')}); finish it with `python -m tinyllm pretrain --resume {path}` "
                              f"(or wait for the run that is writing it)")
    try:
        model = GPT(GPTConfig(**meta["config"]))
        model.load_state_dict(strip_prefix("model/", arrays))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path!r} holds a model that is not a plain GPT ({e})") from None
    return model, CharTokenizer(meta["tokenizer_chars"]), meta

