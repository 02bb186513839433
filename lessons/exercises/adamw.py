"""
Exercise: one step of AdamW, exactly as torch.optim.AdamW computes it.

Write adamw_step, then check it (from the repository root):

    python -m tinyllm check adamw

The checker runs your step and tinyllm's AdamW.step (tinyllm/optim.py: read it once you pass) from the
same p, g, m, v and t, compares the change in p and the new m and v, and says what a wrong one looks like:
a bias correction missing, weight decay coupled into the gradient, eps in the wrong place, ...
"""
import numpy as np


def adamw_step(p, g, m, v, t, lr, betas, eps, weight_decay):
    """One AdamW step (Loshchilov & Hutter) for one parameter array, in place, as torch.optim.AdamW does it:

        p = p - lr * weight_decay * p                    decoupled weight decay, first, from p as it is now
        m = beta1 m + (1 - beta1) g                      running mean of the gradient
        v = beta2 v + (1 - beta2) g^2                    running mean of its square, entry by entry
        m_hat = m / (1 - beta1^t)                        bias corrections: m and v start at 0, so early on
        v_hat = v / (1 - beta2^t)                        they are too small by exactly these factors
        p = p - lr * m_hat / (sqrt(v_hat) + eps)

    (Which parameters decay is the caller's choice: tinyllm decays only matrices, as nanoGPT does. Here,
    decay p whatever its shape.)

    Inputs: p, g, m, v: arrays of one shape (the parameter, its gradient, and the optimizer's two running
    means from the step before, zeros before the first step); t, this step's number, counting from 1;
    lr, eps, weight_decay floats; betas = (beta1, beta2).
    Returns: nothing. p, m and v are changed in place: they are the model's and the optimizer's own arrays.
    """
    raise NotImplementedError(
        "one line per line of the docstring, in that order, each in place (p *= ..., m *= ...; "
        "m += ...); `p = p - ...` would only rebind the local name. t is an int: beta1 ** t.")
