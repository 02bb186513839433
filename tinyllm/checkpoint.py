"""
Checkpoints: named arrays plus a JSON description, in one .npz file that loads without pickle.

    ckpt.npz
      model/<name>     every model parameter (GPT-2 names, e.g. model/h.0.attn.c_attn.weight)
      optim/<name>     the optimizer's state (optim/t, optim/m/<name>, optim/v/<name>)
      __meta__         uint8 bytes of a JSON object: format, version, config, step, rng state, history...

Writes are atomic: the file is written to a temporary file of its own beside its destination (a name
unique to the process, the thread and the call), flushed to disk, then renamed over it. A crash or Ctrl-C
mid-write leaves the previous checkpoint as it was; two threads or processes saving the same path each
leave a whole file of their own, and the last rename wins.

Reading trusts nothing in the file: every entry must be an array, the JSON must be tinyllm's, and each
section of the meta is checked for its type (check_meta) before anything reads it.
"""
import contextlib
import itertools
import json
import math
import os
import threading
import time

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
        # no allow_pickle=...: object arrays were refused above, so nothing can be pickled, and NumPy before 2.2
        # does not know the argument (it would store it as one more array named 'allow_pickle')
        np.savez(f, **arrays, **{META_KEY: blob})


_CALLS = itertools.count()          # with the pid, the thread and a random part: a temporary name per call
STRAY_AGE = 600                     # seconds a dead process's temporary is left before a save removes it


@contextlib.contextmanager
def atomic_open(path):
    """Open a temporary file beside path for binary writing; when the block ends without an error, it
    replaces path in one step. On any error, Ctrl-C included, path is left as it was.

    The temporary name is unique to this call (.NAME.<pid>.<thread>.<call>.<random>.tmp), so concurrent
    saves of one path never write into the same file; each renames a whole file of its own over path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_strays(folder, os.path.basename(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_native_id()}."
                               f"{next(_CALLS)}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:               # x: never open a file someone else is writing
            yield f
            f.flush()
            os.fsync(f.fileno())                 # the bytes are on disk before the name points at them
        os.replace(tmp, path)                    # atomic: readers see the old file or the new, never half
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    sync_folder(folder)                          # and the rename itself survives a power cut


def remove_strays(folder, name):
    """Delete temporaries of `name` left by a save that was killed (kill -9, a crash of the machine): those of a
    process that no longer runs, untouched for STRAY_AGE seconds. A live process's temporary is left alone,
    since it may be saving right now; so is a recent one, which may be another machine's on a shared folder
    (where this machine cannot ask whether its process runs). Loads never read a temporary in any case."""
    prefix = f".{name}."
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        parts = entry[len(prefix):-len(".tmp")].split(".")
        ours = (len(parts) == 1 or                                  # .NAME.<pid>.tmp, an older tinyllm's
                len(parts) == 4 and len(parts[3]) == 8)             # .NAME.<pid>.<thread>.<call>.<random>.tmp
        if not ours or not all(p.isdigit() for p in parts[:3]):     # another file's, e.g. NAME.5's
            continue
        pid, stray = int(parts[0]), os.path.join(folder, entry)
        with contextlib.suppress(OSError):       # another save may be removing it at the same moment
            if pid != os.getpid() and not process_exists(pid) and time.time() - os.path.getmtime(stray) > STRAY_AGE:
                os.remove(stray)


def process_exists(pid):
    try:
        os.kill(pid, 0)                          # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True                              # there, but another user's (or cannot tell): keep its file
    return True


def sync_folder(folder):
    """fsync a folder, so a rename inside it is on disk (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    for name, a in arrays.items():               # np.load hands back a zip entry that is not an .npy as bytes
        if not isinstance(a, np.ndarray):
            raise CheckpointError(f"{path!r} is not a tinyllm checkpoint: its entry {name!r} is raw bytes, not "
                                  f"an array (save_checkpoint writes every entry, {META_KEY!r} too, as an .npy)")
    if META_KEY not in arrays:
        raise CheckpointError(f"{path!r} is not a tinyllm checkpoint (an .npz without {META_KEY!r})")
    blob = arrays.pop(META_KEY)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise CheckpointError(f"{path!r} has a corrupted {META_KEY!r} entry: {blob.dtype} of shape {blob.shape}, "
                              f"not the bytes (uint8, 1-D) of a JSON object")
    try:
        meta = parse_json(blob.tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path!r} has a corrupted {META_KEY!r} entry ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a tinyllm checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{path!r} is not a tinyllm checkpoint")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format version {meta.get('version')!r}, but this "
                              f"tinyllm reads version {FORMAT_VERSION}; re-create it with this version")
    return arrays, meta


def parse_json(text):
    """json.loads, but refusing what tinyllm never writes and json.loads lets through: the same key twice in
    one object (json.loads keeps the last without a word) and nesting deep enough to exhaust Python's stack.
    Raises ValueError."""
    def no_duplicates(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"the key {k!r} appears twice in one object, so it is ambiguous")
            d[k] = v
        return d
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply to read (tinyllm's own files are a few levels deep)") from None


def read_json_object(path, what):
    """The JSON object in the file at path (a config), by parse_json; CheckpointError if it is unreadable or
    not an object. what: the file's role, for the message ('adapter config', ...)."""
    try:
        with open(path, encoding="utf-8") as f:
            fields = parse_json(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable {what} ({e})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path} holds {type(fields).__name__}, not a JSON object")
    return fields


# ----------------------------------------------------------------------------------------------------
# the meta's sections: valid JSON of any shape can sit in a file tinyllm did not write (or that was edited);
# each section a caller reads is checked for the type tinyllm writes before anything reads it, and a wrong one
# is a CheckpointError naming the field, never a KeyError or AttributeError from deep inside a later step

BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")   # numpy's; no other name is looked up
HISTORY_STATUS = ("running", "completed", "interrupted", "diverged")
DATA_FIELDS = ("world_seed", "n_people", "n_chars", "corpus_seed", "val_fraction")   # tinyllm.pretrain.PRETRAIN_DATA
MAX_CORPUS_CHARS = 100_000_000   # the corpus is rebuilt in memory from `data`; a crafted 10**15 would never end


def is_count(v):
    return type(v) is int and v >= 0            # JSON's true and false are bools, which are ints: not counts


def is_real(v):
    """A finite JSON number (JSON's NaN and Infinity, which Python writes and reads, are not)."""
    return type(v) is int or (type(v) is float and math.isfinite(v))


def is_number_or_nan(v):
    return type(v) in (int, float)


# each list of a history (tinyllm.train.new_history) and what it holds: the loop records only finite losses,
# rates and norms (a nan stops it), but an older tinyllm may have recorded a nan validation loss
HISTORY_LISTS = {"step": (is_count, "integers >= 0"), "tokens": (is_count, "integers >= 0"),
                 "val_step": (is_count, "integers >= 0"), "train_loss": (is_real, "finite numbers"),
                 "lr": (is_real, "finite numbers"), "grad_norm": (is_real, "finite numbers"),
                 "elapsed": (is_real, "finite numbers"), "val_loss": (is_number_or_nan, "numbers")}


def kind_of(v):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def rng_problem(state):
    if not isinstance(state, dict):
        return f"must be an object (numpy's bit_generator.state), got {kind_of(state)}"
    if state.get("bit_generator") not in BIT_GENERATORS:
        return f"names the bit generator {state.get('bit_generator')!r:.60}, not one of numpy's {list(BIT_GENERATORS)}"
    if not isinstance(state.get("state"), dict):
        return "has no 'state' object"
    return None


def history_problem(h):
    if not isinstance(h, dict):
        return f"must be an object of lists (step, train_loss, ...), got {kind_of(h)}"
    for key, (ok, what) in HISTORY_LISTS.items():
        v = h.get(key, [])
        if not (isinstance(v, list) and all(ok(x) for x in v)):
            bad = v if not isinstance(v, list) else next(x for x in v if not ok(x))
            return f".{key} must be a list of {what}, but holds {bad!r:.60}"
    if "status" in h and h["status"] not in HISTORY_STATUS:
        return f".status must be one of {list(HISTORY_STATUS)}, got {h['status']!r:.60}"
    for group in (("step", "train_loss", "lr", "grad_norm", "elapsed", "tokens"), ("val_step", "val_loss")):
        lengths = {k: len(h[k]) for k in group if k in h}
        if len(set(lengths.values())) > 1:
            return f" lists have different lengths {lengths}: one entry per step (per evaluation) in each"
    return None


def data_problem(data):
    from .data import NAMES, PET_NAMES
    if not isinstance(data, dict):
        return f"must be an object ({', '.join(DATA_FIELDS)}), got {kind_of(data)}"
    unknown, missing = sorted(set(data) - set(DATA_FIELDS)), [k for k in DATA_FIELDS if k not in data]
    if unknown or missing:
        return f"must have exactly the fields {list(DATA_FIELDS)}: missing {missing}, unknown {unknown}"
    most = min(len(NAMES), len(PET_NAMES))
    for key, ok, what in (("world_seed", is_count, "an integer >= 0"), ("corpus_seed", is_count, "an integer >= 0"),
                          ("n_people", lambda v: is_count(v) and 2 <= v <= most, f"an integer in [2, {most}]"),
                          ("n_chars", lambda v: is_count(v) and 1 <= v <= MAX_CORPUS_CHARS,
                           f"an integer in [1, {MAX_CORPUS_CHARS:,}]"),
                          ("val_fraction", lambda v: is_real(v) and 0 < v < 1, "a number in (0, 1)")):
        if not ok(data[key]):
            return f".{key} must be {what}, got {data[key]!r:.60}"
    return None


def config_problem(config):
    from .model import GPTConfig
    fields = list(GPTConfig.__dataclass_fields__)
    if not isinstance(config, dict):
        return f"must be an object of GPTConfig's fields, got {kind_of(config)}"
    if set(config) != set(fields):              # every one written: a default filling in would be a guess
        return f"has fields {sorted(config)}, but a GPTConfig has exactly {fields}"
    try:
        GPTConfig(**config)
    except ValueError as e:
        return f"is not a valid GPTConfig: {e}"
    return None


def chars_problem(chars):
    from .tokenizer import CharTokenizer
    try:
        CharTokenizer(chars)
    except ValueError as e:
        return f"is not a tokenizer's alphabet: {e}"
    return None


def train_config_problem(v):
    return None if isinstance(v, dict) else f"must be an object of TrainConfig's fields, got {kind_of(v)}"


SECTIONS = {   # meta field -> what is wrong with its value, or None
    "step": lambda v: None if is_count(v) else f"must be an integer >= 0, got {v!r:.60}",
    "rng_state": rng_problem,
    "model_rng_state": lambda v: None if v is None else rng_problem(v),
    "history": history_problem,
    "train_config": train_config_problem,          # its fields are checked where a TrainConfig is made of it
    "data": data_problem,
    "config": config_problem,
    "tokenizer_chars": chars_problem,
    "kind": lambda v: None if isinstance(v, str) else f"must be a string, got {v!r:.60}",
}


def check_meta(path, meta, fields):
    """Raise CheckpointError for the first of `fields` that meta holds with a value tinyllm never writes
    (a field meta lacks is the caller's to require, with a message of its own)."""
    for field in fields:
        if field in meta:
            problem = SECTIONS[field](meta[field])
            if problem is not None:
                sep = "" if problem.startswith((".", " ")) else " "
                raise CheckpointError(f"{path!r}: meta field {field}{sep}{problem}; the file was not written by "
                                      f"tinyllm, or was edited")
    if {"config", "tokenizer_chars"} <= set(fields) & set(meta) \
            and len(meta["tokenizer_chars"]) > meta["config"]["vocab_size"]:
        raise CheckpointError(f"{path!r}: meta field tokenizer_chars has {len(meta['tokenizer_chars'])} characters but "
                              f"config.vocab_size is {meta['config']['vocab_size']}: ids past the vocabulary")


# ----------------------------------------------------------------------------------------------------
# a whole training state: model, optimizer, batch RNG, step, history

TRAINING_STATE = ("step", "rng_state", "history", "model_rng_state", "train_config")


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


def load_training_state(path, model, optimizer, history_fields=()):
    """Load a save_training_state checkpoint into model and optimizer (in place). Everything is checked
    before anything is loaded; a file that does not fit leaves model and optimizer as they were.

    history_fields: the lists the history must have (train() appends to every one of new_history()'s).
    Returns: rng (a np.random.Generator in the saved state), step, history, meta.
    """
    arrays, meta = load_checkpoint(path)
    for key in ("step", "rng_state", "history"):
        if key not in meta:
            raise CheckpointError(f"{path!r} holds no training state ({key!r} missing), so a run cannot "
                                  f"resume from it; it may be a model-only checkpoint")
    check_meta(path, meta, TRAINING_STATE)
    history, step = meta["history"], meta["step"]
    missing = [k for k in history_fields if k not in history]
    if missing:
        raise CheckpointError(f"{path!r}: meta field history lacks {missing}, which train() records; the file was "
                              f"not written by train(), or was edited")
    if history.get("step") and history["step"][-1] != step:
        raise CheckpointError(f"{path!r}: meta field history ends at step {history['step'][-1]} but the checkpoint "
                              f"is at step {step}; the file was edited")
    rng = restore_rng(path, meta["rng_state"])          # before anything is loaded: a bad state changes nothing
    before = model.state_dict()
    try:                                                # each checks everything, then copies
        model.load_state_dict(strip_prefix("model/", arrays))
    except ValueError as e:
        raise CheckpointError(f"{path!r} does not fit this model: {e}") from None
    try:
        optimizer.load_state_dict(strip_prefix("optim/", arrays))
    except ValueError as e:
        model.load_state_dict(before)                   # a file that does not fit changes nothing
        raise CheckpointError(f"{path!r} does not fit this model: {e}") from None
    return rng, meta["step"], meta["history"], meta


def restore_rng(path, state, rng=None):
    """A np.random.Generator in a saved bit_generator.state; with rng given, that generator is set to it.
    Only numpy's own bit generators are looked up by the name the file gives (nothing else is called)."""
    problem = rng_problem(state)
    if problem is not None:
        raise CheckpointError(f"{path!r} has a corrupted random-number state: it {problem}")
    try:
        new = np.random.Generator(getattr(np.random, state["bit_generator"])())
        new.bit_generator.state = state                # numpy checks every field of the state
    except Exception as e:                             # Key-, Type-, Value-, Overflow-, IndexError: all mean one thing
        raise CheckpointError(f"{path!r} has a corrupted random-number state ({e!r})") from None
    if rng is None:
        return new
    try:
        rng.bit_generator.state = state
    except Exception as e:
        raise CheckpointError(f"{path!r} has a random-number state of {state['bit_generator']}, but the model's "
                              f"generator is {type(rng.bit_generator).__name__} ({e!r})") from None
    return rng


# ----------------------------------------------------------------------------------------------------
# where files will be written: checked before a run starts, so no run is lost at its end

def nearest_existing(path):
    """The path itself if it exists, else its nearest ancestor that does."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def can_write_in(folder):
    """Whether a file can be created in folder: tried, not read off the permission bits (which say nothing
    for root, nor for a read-only file system)."""
    probe = os.path.join(folder, f".tinyllm-probe.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return False
    os.remove(probe)
    return True


def check_writable(path):
    """Raise CheckpointError now, before any training, if a checkpoint could not be written at path."""
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
        raise CheckpointError(f"checkpoint path must be a file path, got {path!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a folder; give a file name, e.g. {path}/ckpt.npz")
    folder = nearest_existing(os.path.dirname(path))   # the nearest folder that exists must let us create the rest
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot write a checkpoint at {path!r}: {folder!r} is a file, not a writable folder")
    if not can_write_in(folder):
        raise CheckpointError(f"cannot write a checkpoint at {path!r}: {folder!r} is not a writable folder")


def check_writable_folder(path, what="the output folder"):
    """Raise CheckpointError now, before any work, unless path is (or can be made) a folder to write into."""
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
        raise CheckpointError(f"{what} must be a folder path, got {path!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{what} {path!r} is a file, not a folder; give a folder (it is created if missing)")
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise CheckpointError(f"{what} {path!r} cannot be created: {existing!r} is a file, not a folder")
    if not can_write_in(existing):
        raise CheckpointError(f"{what} {path!r} cannot be written: {existing!r} is not a writable folder")


# ----------------------------------------------------------------------------------------------------
# a pretrained model

PRETRAINED = ("config", "tokenizer_chars", "step", "history", "kind", "data")


def load_pretrained(path, allow_unfinished=False, need_data=False):
    """A pretrained GPT, its tokenizer and the checkpoint's meta, from a `tinyllm pretrain` checkpoint.

    A checkpoint of a run that has not finished (still running, or interrupted) is refused unless
    allow_unfinished: fine-tuning a half-trained model by accident would make every later number wrong.
    need_data: also require meta['data'], the corpus settings the tasks and the forgetting probe rebuild
    (a `tinyllm pretrain` checkpoint, kind 'pretrain', always has them).
    Returns: model (tinyllm.GPT, all parameters trainable), tokenizer (CharTokenizer), meta (dict).
    """
    from .model import GPT, GPTConfig
    from .tokenizer import CharTokenizer
    arrays, meta = load_checkpoint(path)
    if "config" not in meta or "tokenizer_chars" not in meta:
        raise CheckpointError(f"{path!r} is not a pretrained model checkpoint (no model config or "
                              f"tokenizer in it); make one with `python -m tinyllm pretrain`")
    if (need_data or meta.get("kind") == "pretrain") and "data" not in meta:
        raise CheckpointError(f"{path!r} lacks the meta field data (the corpus settings of its pretraining, which "
                              f"the tasks are built from); use a checkpoint made by `python -m tinyllm pretrain`")
    check_meta(path, meta, PRETRAINED)
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
