"""
Exercise: the backward of GELU, the tanh approximation GPT-2 was trained with.

The forward is given. Write gelu_backward, then check it (from the repository root):

    python -m tinyllm check gelu

The checker compares your dx with centred finite differences of the forward and with tinyllm's own
gelu_backward (tinyllm/layers.py: read it once you pass), and says what a wrong dx looks like.
"""
import math

import numpy as np

GELU_SCALE = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """GELU, entry by entry (given):

        u = sqrt(2/pi) (x + 0.044715 x^3)
        t = tanh(u)
        out = 0.5 x (1 + t)

    Inputs: x (...), any shape.
    Returns: out (...), shaped like x; cache = (x, t), both (...), for the backward.
    """
    u = GELU_SCALE * (x + 0.044715 * x ** 3)
    t = np.tanh(u)
    out = 0.5 * x * (1.0 + t)
    return out, (x, t)


def gelu_backward(dout, cache):
    """The gradient of the loss with respect to x.

    Each out depends on its own x only, so the chain rule is entry by entry, with no sums:

        dx = dout * d(out)/dx

    Inputs: dout (...), dL/dout, shaped like out; cache = (x, t) from gelu_forward.
    Returns: dx (...), dL/dx, shaped like x.
    """
    raise NotImplementedError(
        "out = 0.5 x (1 + t) is a product of two factors that both depend on x, so start with "
        "the product rule; then t = tanh(u) (d tanh(u)/du = 1 - tanh(u)^2) and u(x). Reuse t from the cache.")
