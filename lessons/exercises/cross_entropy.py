"""
Exercise: the cross-entropy loss, forward and backward, with ignored targets.

Fine-tuning computes the loss on the answer tokens only: every other target is set to -100 (IGNORE_INDEX,
as in PyTorch) and takes no part in the loss. Write both functions, then check them (from the
repository root):

    python -m tinyllm check cross_entropy

The checker compares your loss with tinyllm's, your dlogits with centred finite differences of the loss
and with tinyllm's own cross_entropy_backward (tinyllm/layers.py: read them once you pass), and says
what a wrong one looks like.

Legend: N rows (B*T positions, flattened), V vocabulary.
"""
import numpy as np

IGNORE_INDEX = -100


def cross_entropy_forward(logits, targets):
    """The mean negative log-likelihood of the targets, over the targets that are not -100:

        p_i = softmax(logits_i)                         (V,), for each row i
        counted = {i : targets_i != -100},  n = |counted|
        loss = -(1/n) sum_{i in counted} log p_i[targets_i]

    Compute it stably: subtracting a row's max from its logits leaves its softmax unchanged, and the check
    has a row of logits near 800, where exp overflows.

    Inputs: logits (N,V) floats; targets (N,) ints in [0, V) or -100.
    Returns: loss (a float); cache, anything your backward needs.
    """
    raise NotImplementedError(
        "find the counted rows first (targets != IGNORE_INDEX); a target of -100 is "
        "not an index. log softmax(z)[y] = z[y] - log(sum_j exp(z_j)), after z -= z.max(axis=-1, keepdims=True).")


def cross_entropy_backward(dloss, cache):
    """The gradient of the loss with respect to the logits.

    Inputs: dloss, a float, dL/dloss (1.0 when the loss is what we minimise; the check passes another
    number); cache from cross_entropy_forward.
    Returns: dlogits (N,V). A row whose target is -100 takes no part in the loss.
    """
    raise NotImplementedError(
        "for one counted row, the derivative of -log softmax(z)[y] with respect to z_j "
        "is softmax(z)_j - [j == y]; then the 1/n of the mean, the ignored rows, and dloss.")
