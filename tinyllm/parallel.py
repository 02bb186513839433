"""
Data parallelism on one machine: training on many cores is training on many machines, in miniature.

    loss, grads = model.forward_backward(idx, targets, workers=2)

splits the batch into `workers` shards of rows, runs forward and backward of each shard in its own thread
(each with its own caches: they belong to the call, not to the model), and combines the gradients. The
loss is a mean over the batch's target tokens, so shard s, with n_s of the N target tokens, is weighted
n_s / N:

    loss = sum_s (n_s / N) loss_s          grads = sum_s (n_s / N) grads_s

which is exactly the one-worker result, up to float rounding. The sum is the all-reduce of distributed
training; here the "machines" are threads and it is a dict comprehension.

Threads run in parallel because NumPy releases the GIL inside its loops and BLAS calls. BLAS must then use
one thread per worker: two workers each asking BLAS for both cores put four busy threads on two cores, and
every step slows down. blas_threads(1) sets that while the workers run and restores it afterwards, through
the BLAS library's own call (OpenBLAS's openblas_set_num_threads, found among the libraries this process
has loaded; NumPy's wheels bring OpenBLAS). Without a BLAS it can find, it changes nothing.
"""
import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .checks import is_int
from .layers import IGNORE_INDEX


def cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        return os.cpu_count() or 1


def default_workers(rows):
    """As many workers as cores, but no more than there are rows to split."""
    return max(1, min(cores(), rows))


def check_workers(workers):
    if workers is not None and (not is_int(workers) or workers < 1):
        raise ValueError(f"workers must be None (one per core) or an integer >= 1, got {workers!r}")
    return workers

# ----------------------------------------------------------------------------------------------------
# the BLAS library's thread count


def find_openblas():
    """(set, get) for the thread count of the OpenBLAS this process loaded, or None. The library's name
    and symbols differ between builds (NumPy's is libscipy_openblas64_ with scipy_openblas_*64_)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            setter, getter = (getattr(lib, f"{prefix}_{what}_num_threads{suffix}", None) for what in ("set", "get"))
            if setter is not None and getter is not None:
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                return setter, getter
    return None


_BLAS = None
_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def blas_threads(n):
    """Inside this block, each BLAS call uses at most n threads; afterwards what it used before."""
    global _BLAS
    with _BLAS_LOCK:
        if _BLAS is None:
            _BLAS = find_openblas() or False
    if not _BLAS:
        yield
        return
    set_threads, get_threads = _BLAS
    before = get_threads()
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


def parallel_map(fn, items, workers):
    """[fn(item) for item in items], on `workers` threads with one BLAS thread each (in order). Each runs under
    the caller's NumPy floating-point error settings (np.errstate), which a new thread would not inherit."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    settings = np.geterr()

    def call(item):
        with np.errstate(**settings):
            return fn(item)
    with blas_threads(1), ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(call, items))

# ----------------------------------------------------------------------------------------------------
# one training step's forward and backward, split over workers


def shards(targets, workers):
    """Split the batch's rows into at most `workers` contiguous shards with about the same number of target
    tokens each; shards without a target token are left out (they add nothing to the loss).
    Returns [(rows slice, n target tokens)]."""
    counts = (np.asarray(targets) != IGNORE_INDEX).sum(axis=1)                  # (B,) target tokens per row
    cut = np.searchsorted(np.cumsum(counts), counts.sum() * np.arange(1, workers) / workers, side="right")
    edges = [0, *sorted(set(int(c) for c in cut) - {0, len(counts)}), len(counts)]
    out = [(slice(a, b), int(counts[a:b].sum())) for a, b in zip(edges, edges[1:])]
    return [(rows, n) for rows, n in out if n > 0]


def forward_backward(run, idx, targets, workers):
    """Data-parallel forward and backward. run(idx, targets, shard) -> (loss, grads) does one shard (shard:
    its index, for any randomness it draws). Returns (loss, grads) of the whole batch."""
    idx, targets = np.asarray(idx), np.asarray(targets)
    parts = shards(targets, workers) if idx.ndim == 2 and targets.shape == idx.shape else []
    if len(parts) <= 1:                            # one worker (or bad input: let run() say what is wrong)
        return run(idx, targets, 0)
    total = sum(n for _, n in parts)
    results = parallel_map(lambda k: run(idx[parts[k][0]], targets[parts[k][0]], k), range(len(parts)), len(parts))
    loss = sum(n / total * r[0] for (_, n), r in zip(parts, results))
    grads = {}
    for (_, n), (_, g) in zip(parts, results):     # the all-reduce: a weighted sum of every shard's gradients
        for k, v in g.items():
            grads[k] = grads[k] + (n / total) * v if k in grads else (n / total) * v
    return float(loss), grads
