"""
Checking hand-written gradients against centred finite differences.

    numeric = (f(x + h) - f(x - h)) / (2 h)       for one entry of x at a time

Run in float64: with h = 1e-5 the truncation error is about h^2 and the rounding error about 1e-16 / h,
both far below the 1e-7 relative error we demand. In float32 neither bound holds, so never check there.
"""
import numpy as np


def rel_error(analytic, numeric):
    """max |a - n| / max(1e-8, max(|a| + |n|)): the worst difference, relative to the gradient's size."""
    analytic, numeric = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    return float(np.max(np.abs(analytic - numeric)) / max(1e-8, np.max(np.abs(analytic) + np.abs(numeric))))


def numerical_gradient(f, x, h=1e-5, indices=None):
    """Centred differences of the scalar f() with respect to the array x, changed in place and restored.

    indices: flat positions to check (all when None). Returns an array shaped like x, zero elsewhere.
    """
    grad = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), grad.reshape(-1)   # views: writing flat[i] changes x
    for i in (range(x.size) if indices is None else indices):
        old = flat[i]
        flat[i] = old + h
        f_plus = f()
        flat[i] = old - h
        f_minus = f()
        flat[i] = old
        gflat[i] = (f_plus - f_minus) / (2 * h)
    return grad


def sample_indices(size, n, rng):
    """n distinct flat positions of an array with `size` entries (all of them when size <= n)."""
    return np.arange(size) if size <= n else rng.choice(size, n, replace=False)


def check_gradients(f, params, grads, n_samples=None, h=1e-5, seed=0):
    """Compare analytic grads with finite differences of f() for every tensor in grads.

    f: scalar function of the arrays in params (which are perturbed in place). n_samples: entries
    checked per tensor (all when None). Returns rows (name, max abs diff, relative error).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for name, analytic in grads.items():
        x = params[name]
        idx = None if n_samples is None else sample_indices(x.size, n_samples, rng)
        numeric = numerical_gradient(f, x, h, idx)
        a = analytic.reshape(-1) if idx is None else analytic.reshape(-1)[idx]
        n = numeric.reshape(-1) if idx is None else numeric.reshape(-1)[idx]
        rows.append((name, float(np.max(np.abs(a - n))), rel_error(a, n)))
    return rows


def print_table(rows, tol=1e-7):
    """A cmp-style table: name, max abs diff, relative error, ok."""
    width = max([len(r[0]) for r in rows] + [4])
    print(f"{'name':<{width}}  {'maxdiff':>10}  {'rel error':>10}  ok")
    for name, maxdiff, rel in rows:
        print(f"{name:<{width}}  {maxdiff:10.2e}  {rel:10.2e}  {'yes' if rel < tol else 'NO'}")
