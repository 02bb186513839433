"""
Exercise: the backward of layer norm.

The forward is given. Write layernorm_backward, then check it (from the repository root):

    python -m tinyllm check layernorm

The checker compares dx, dw, db with centred finite differences of the forward and with tinyllm's own
layernorm_backward (tinyllm/layers.py: read it once you pass), and says what a wrong one looks like.

Legend: B batch, T time, C channels. The check uses x of shape (B,T,C) = (2,3,5); your code should work
for any number of leading axes (...,C).
"""
import numpy as np


def layernorm_forward(x, w, b, eps=1e-5):
    """Normalise each position's C features to mean 0 and variance 1, then scale and shift (given):

        mean = (1/C) sum_c x_c                          (...,1)
        var  = (1/C) sum_c (x_c - mean)^2               (...,1), the biased variance, as in GPT-2
        rstd = 1 / sqrt(var + eps)                      (...,1)
        xhat = (x - mean) * rstd                        (...,C)
        out  = xhat * w + b                             (...,C)

    Inputs: x (...,C); w, b (C,).
    Returns: out (...,C); cache = (xhat (...,C), rstd (...,1), w (C,)).
    """
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    out = xhat * w + b
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """The gradients of the loss with respect to x, w and b.

    w and b are shared by every position, so their gradients are sums over all the leading axes. x
    reaches xhat by three paths: directly, through mean and through rstd (both depend on all C features
    of the position); each path adds a term to dx.

    Inputs: dout (...,C), dL/dout; cache = (xhat, rstd, w) from layernorm_forward.
    Returns: dx (...,C), dw (C,), db (C,).
    """
    raise NotImplementedError(
        "start with db and dw (sums over every position: out = xhat * w + b), then "
        "dxhat = dout * w; for dx, differentiate xhat = (x - mean) * rstd keeping in mind that mean and rstd "
        "depend on x too. Everything you need is in the cache; C = dout.shape[-1].")
