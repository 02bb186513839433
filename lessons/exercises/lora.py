"""
Exercise: LoRA, forward and backward.

LoRA leaves a linear layer's weight W frozen and learns a low-rank update beside it: the layer computes
x @ W + b + scale * (x @ A) @ B, with A (in,r) and B (r,out) small (r is a few), scale = lora_alpha / r.
Here you write the LoRA branch alone, then check it (from the repository root):

    python -m tinyllm check lora

The checker compares out with tinyllm's, and dx, dA, dB with centred finite differences of the forward and
with tinyllm's lora_backward (tinyllm/layers.py: read them once you pass; theirs also takes an optional
dropout mask `keep`, left out here), and says what a wrong one looks like.

Legend: N rows (all leading axes of x flattened: B*T), in and out the layer's widths, r the rank. (B alone
is the LoRA matrix lora_B, as in PEFT; the batch is one of x's leading axes.)
"""
import numpy as np


def lora_forward(x, A, B, scale):
    """The LoRA branch of a linear layer:

        out = scale * (x @ A) @ B

    Inputs: x (...,in), any number of leading axes (the check uses (2,3,in)); A (in,r); B (r,out);
    scale, a float (lora_alpha / r).
    Returns: out (...,out); cache, anything your backward needs.
    """
    raise NotImplementedError(
        "flatten x to (N,in) with x.reshape(-1, A.shape[0]), multiply, and reshape the result back to "
        "(...,out). Scaling the small (N,r) product is cheaper than scaling (N,out).")


def lora_backward(dout, cache):
    """The gradients of the loss with respect to x, A and B.

    Inputs: dout (...,out), dL/dout; cache from lora_forward.
    Returns: dx (...,in), dA (in,r), dB (r,out).
    """
    raise NotImplementedError(
        "name the middle h = scale * (x @ A), (N,r), so out = h @ B; go backwards: dB from h and "
        "dout, dh from dout and B, then dA and dx from dh. Check every product's shape against the docstring.")
