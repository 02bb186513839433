"""
safetensors files with NumPy only: the format Hugging Face models are shared in, read without running
anything from the file and without copying its weights into memory.

    byte 0       8                     8+N                                               end of file
         +-------+---------------------+-------------------------------------------------+
         |   N   | header: N bytes of  | data: every tensor's raw bytes, back to back,   |
         | u64   | UTF-8 JSON, padded  | little-endian, C order; no gaps, no overlaps,   |
         | (LE)  | with spaces         | nothing after the last tensor                   |
         +-------+---------------------+-------------------------------------------------+

    header = {"__metadata__": {"format": "np"},                        optional, str -> str only
              "wte.weight": {"dtype": "F32", "shape": [65, 64], "data_offsets": [0, 16640]},
              ...}                                                     offsets count from the data's start

Why it is safe: unlike a pickle (PyTorch's .bin), the file holds no code, only a JSON description and
raw numbers, and every field of the description (header size, dtypes, shapes, offsets, that the tensors
tile the data exactly) is checked before a single byte of data is used. A bad file raises
CheckpointError saying which file, which tensor, and what is wrong.

Why memory-map: load_file maps the file and hands back views into it, so loading copies nothing; the OS
reads each page from disk when it is first touched and may drop it again under memory pressure. The
views are read-only: copy one (a.copy()) before modifying it. save_file writes a new file and renames it
over the old one, so saving over a file that is mapped leaves the old views intact.
"""
import json
import math
import os
from mmap import ACCESS_READ, mmap as memory_map

import numpy as np

from .checkpoint import CheckpointError, atomic_open

# The dtypes tinyllm reads, in the reference library's order (smallest alignment first). NumPy has no
# bfloat16, so BF16 is read as its raw 16-bit patterns and then widened to float32.
DTYPES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "I16": "<i2", "U16": "<u2", "F16": "<f2", "BF16": "<u2",
          "I32": "<i4", "U32": "<u4", "F32": "<f4", "F64": "<f8", "I64": "<i8", "U64": "<u8"}
RANK = {code: i for i, code in enumerate(DTYPES)}
CODES = {(np.dtype(s).kind, np.dtype(s).itemsize): code for code, s in DTYPES.items() if code != "BF16"}
FIELDS = {"dtype", "shape", "data_offsets"}
META_KEY = "__metadata__"
MAX_HEADER = 100_000_000     # the reference's limit: real headers are kilobytes, a huge one is an attack


# ----------------------------------------------------------------------------------------------------
# writing

def save_file(tensors, path, metadata=None):
    """Write tensors to path as a safetensors file, atomically.

    Inputs:
    - tensors: {name: ndarray}; bool, int8..int64, uint8..uint64 or float16/32/64 arrays of any shape
      (0-d and empty included), any memory layout and byte order (written little-endian, C order)
    - path: where to write; a file already there is replaced only once the new one is complete
    - metadata: optional {str: str}, stored as the header's "__metadata__" (keys in the order given)
    Tensors are laid out as the reference library lays them out: largest alignment first, then by name,
    and the header padded with spaces to a multiple of 8 bytes, so every tensor starts at a multiple of its
    item size. With at most one metadata key the bytes equal the reference's (it orders keys by hash).
    Raises ValueError, before the file is touched, for anything that cannot be written.
    """
    if not isinstance(tensors, dict):
        raise ValueError(f"tensors must be a dict of name -> numpy array, got {type(tensors).__name__}")
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"metadata must be a dict of str -> str (safetensors stores nothing else), "
                         f"got {metadata!r:.200}; convert numbers with str() or json.dumps()")
    codes = {}
    for name, a in tensors.items():
        if not isinstance(name, str) or name == META_KEY:
            raise ValueError(f"cannot save tensor {name!r}: a name must be a str other than {META_KEY!r}")
        code = CODES.get((a.dtype.kind, a.dtype.itemsize)) if isinstance(a, np.ndarray) else None
        if code is None:
            got = (f"an array of {a.dtype}" if isinstance(a, np.ndarray) else
                   f"a {type(a).__name__}, not an ndarray (wrap it in np.asarray)")
            raise ValueError(f"cannot save tensor {name!r}: need a numpy array of bool, int8..int64, "
                             f"uint8..uint64 or float16/32/64, got {got}")
        codes[name] = code
    order = sorted(tensors, key=lambda name: (-RANK[codes[name]], name))
    header, offset = ({} if metadata is None else {META_KEY: metadata}), 0
    for name in order:
        nbytes = tensors[name].nbytes
        header[name] = {"dtype": codes[name], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    try:    # compact, non-ASCII kept as UTF-8: the same text the reference writes
        blob = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"cannot save: a tensor name or metadata string is not valid Unicode ({e})") from None
    blob += b" " * (-len(blob) % 8)      # data then starts at a multiple of 8, so every tensor is aligned
    with atomic_open(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in order:
            a = tensors[name]
            f.write(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")))   # a copy only if needed


# ----------------------------------------------------------------------------------------------------
# reading: the header is checked whole before any data is used

def read_header(path):
    """The validated header of a safetensors file, without reading its data.

    Returns: info ({name: {"dtype": str, "shape": [int], "data_offsets": [begin, end]}}, in header order),
    metadata ({str: str}, empty if the file has none). Raises CheckpointError for every kind of bad file.
    """
    path = regular_file(path)
    try:
        with open(path, "rb") as f:
            info, metadata, _ = parse_header(f, path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e.strerror}") from None
    return info, metadata


def load_file(path, mmap=True):
    """Read every tensor of a safetensors file.

    Inputs:
    - path: a .safetensors file
    - mmap: True maps the file and returns read-only views into it (nothing is copied; pages are read
      from disk as they are used); False reads each tensor into its own writable array (one copy)
    Returns: tensors ({name: ndarray}, in header order), metadata ({str: str}, empty if the file has none).
    Arrays keep the file's dtype, except BF16, which NumPy lacks: it becomes float32, exactly (every bf16
    value is a float32), in a new array even with mmap. Copy a mapped array before modifying it.
    Raises CheckpointError, naming the file, the tensor and the problem, for every kind of bad file.
    """
    path = regular_file(path)
    tensors = {}
    try:
        with open(path, "rb") as f:
            info, metadata, start = parse_header(f, path)
            size = start + max((t["data_offsets"][1] for t in info.values()), default=0)
            if mmap:
                buf = np.frombuffer(memory_map(f.fileno(), 0, access=ACCESS_READ), dtype=np.uint8)
                if len(buf) != size:
                    raise CheckpointError(f"{path!r} changed size while being read; load it again")
            for name, t in info.items():
                begin, end = t["data_offsets"]
                if mmap:
                    raw = buf[start + begin:start + end]
                else:
                    raw = np.empty(end - begin, dtype=np.uint8)
                    f.seek(start + begin)
                    if f.readinto(raw) != len(raw):
                        raise CheckpointError(f"{path!r} got shorter while being read; load it again")
                tensors[name] = to_array(raw, t["dtype"], t["shape"], path, name)
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e.strerror}") from None
    return tensors, metadata


def load_into(path, targets):
    """Read tensors of a safetensors file straight into existing arrays, one at a time: targets is {name in
    the file: destination ndarray of the tensor's shape}; a file dtype other than the destination's is read
    into a temporary of that one tensor and cast (a value too large for the destination's dtype becomes inf,
    without a warning: check what you load, as load_gpt2 does). The file is never held in memory whole: loading
    a model needs its arrays and one tensor more, not two copies of the file. Tensors not named are skipped.
    Raises CheckpointError for a bad file, a name it lacks, or a shape that differs."""
    path = regular_file(path)
    try:
        with open(path, "rb") as f:
            info, _, start = parse_header(f, path)
            for name, out in targets.items():
                if name not in info:
                    raise CheckpointError(f"{path!r} holds no tensor {name!r}")
                t = info[name]
                if tuple(t["shape"]) != out.shape:
                    raise CheckpointError(f"{path!r}: {name!r} has shape {tuple(t['shape'])}, expected {out.shape}")
                begin, end = t["data_offsets"]
                f.seek(start + begin)
                same = np.dtype(DTYPES[t["dtype"]]) == out.dtype and t["dtype"] != "BF16" and out.flags.c_contiguous
                raw = out.reshape(-1).view(np.uint8) if same else np.empty(end - begin, dtype=np.uint8)
                if f.readinto(raw) != len(raw):
                    raise CheckpointError(f"{path!r} got shorter while being read; load it again")
                if not same:
                    with np.errstate(over="ignore"):    # too large for out's dtype: inf, for the caller to check
                        out[...] = to_array(raw, t["dtype"], t["shape"], path, name)
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e.strerror}") from None


def to_array(raw, code, shape, path, name):
    """The tensor in raw (1-d uint8 bytes, already checked to be the right length) as an ndarray."""
    a = raw.view(DTYPES[code]).reshape(shape)
    if code == "BF16":      # a bf16 is the top half of a float32: move its bits up, zero the bottom half
        a = (a.astype(np.uint32) << 16).view(np.float32)
    if code == "BOOL" and raw.max(initial=0) > 1:   # NumPy assumes a bool byte is 0 or 1
        raise CheckpointError(f"{path!r}: BOOL tensor {name!r} holds bytes other than 0 and 1; the file "
                              f"is corrupted")
    return a


def regular_file(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or pathlib.Path), got {path!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = ("is a folder" if os.path.isdir(path) else "is not a regular file (a device or a pipe?)"
                if os.path.exists(path) else "does not exist")
        raise CheckpointError(f"{path!r} {what}; give the path of a .safetensors file")
    return path


class DuplicateKey(ValueError):
    pass


def no_duplicates(pairs):
    """json.loads keeps the last of two equal keys without a word; a file that says two things is refused."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise DuplicateKey(k)
        d[k] = v
    return d


def is_count(x):
    return type(x) is int and x >= 0       # JSON true/false are Python bools, an int subclass: not counts


def parse_header(f, path):
    """Read and check the header of the open file f. Returns: info, metadata (as read_header), and the
    file offset where the data starts."""
    def bad(what):
        return CheckpointError(f"{path!r} is not a valid safetensors file: {what}")
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise bad("it is empty (a save that never finished?)")
    if size < 8:
        raise bad(f"it is {size} bytes long, too short to hold the 8-byte header length (truncated?)")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER:
        raise bad(f"it declares a {n:,}-byte header, above the {MAX_HEADER:,}-byte limit")
    if 8 + n > size:
        raise bad(f"it declares a {n:,}-byte header but holds only {size - 8:,} bytes after the length "
                  f"(truncated, or not a safetensors file?)")
    try:
        text = f.read(n).decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the header is not UTF-8 text ({e.reason} at byte {8 + e.start})") from None
    if not text.startswith("{"):
        raise bad(f"the header starts with {text[:20]!r}, not with '{{' (it must be a JSON object)")
    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except DuplicateKey as e:
        raise bad(f"the header has the key {e.args[0]!r} twice in one object, so it is ambiguous") from None
    except (ValueError, RecursionError) as e:
        raise bad(f"the header is not valid JSON ({e})") from None
    metadata = header.pop(META_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"{META_KEY!r} must be an object of str -> str, got {metadata!r:.100}")
    data_size = size - 8 - n
    for name, t in header.items():
        if not isinstance(t, dict) or set(t) != FIELDS:
            raise bad(f"tensor {name!r} must be an object with exactly the fields dtype, shape, data_offsets; "
                      f"got {t!r:.100}")
        code, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise bad(f"tensor {name!r} has dtype {code!r:.40}, which tinyllm does not read (it reads "
                      f"{', '.join(DTYPES)}); convert the file with the safetensors package first")
        if not isinstance(shape, list) or not all(is_count(d) for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r:.100}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r:.100}, not [begin, end] with "
                      f"0 <= begin <= end")
        need = math.prod(shape) * np.dtype(DTYPES[code]).itemsize    # Python ints: no overflow
        if offsets[1] - offsets[0] != need:
            raise bad(f"tensor {name!r} spans {offsets[1] - offsets[0]:,} bytes, but shape {shape} of {code} "
                      f"needs {need:,}")
        if offsets[1] > data_size:
            raise bad(f"tensor {name!r} ends at byte {offsets[1]:,} of the data, which is only {data_size:,} "
                      f"bytes long (truncated?)")
    pos = 0     # the tensors, in offset order, must tile [0, data_size): each begins where the last ended
    for name, t in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = t["data_offsets"]
        if begin != pos:
            raise bad(f"tensor {name!r} begins at byte {begin:,} of the data, but the tensor before it ends "
                      f"at byte {pos:,}: " + ("they overlap" if begin < pos else "a gap between them"))
        pos = end
    if pos != data_size:
        raise bad(f"{data_size - pos:,} bytes follow the last tensor, which no tensor describes")
    return header, metadata, 8 + n
