"""
Exercise: the backward of causal multi-head self-attention.

The forward is given: it takes the output of the fused c_attn projection, qkv, splits it into queries,
keys and values for NH heads, and lets each token attend to itself and the tokens before it. Write
attention_backward, then check it (from the repository root):

    python -m tinyllm check attention

The checker compares your dqkv with centred finite differences of the forward and with tinyllm's own
attention_backward (tinyllm/layers.py: read it once you pass; it also handles past keys and values, the
next exercise, prefix.py), and says what a wrong dqkv looks like.

Legend: B batch, T time, C channels, NH heads, hs head size (C // NH). The check uses B=2, T=4, C=6, NH=2.
"""
import math

import numpy as np


def split_heads(a, n_head):
    """(B,T,C) -> (B,NH,T,hs): head h holds channels h*hs .. (h+1)*hs - 1."""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(a):
    """(B,NH,T,hs) -> (B,T,C), the inverse of split_heads."""
    B, NH, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def attention_forward(qkv, n_head):
    """Causal multi-head self-attention (given). For each batch row and head:

        scores = q @ k^T / sqrt(hs)                      (T,T)
        scores[t, s] = -inf where s > t                  the causal mask: token t sees tokens 0..t
        att = softmax(scores), row by row                (T,T), each row sums to 1
        y = att @ v                                      (T,hs)

    and out is y with the heads put side by side again.

    Inputs: qkv (B,T,3C): q, k, v side by side (channels 0..C-1, C..2C-1, 2C..3C-1); n_head NH.
    Returns: out (B,T,C); cache = (q, k, v, att): q, k, v (B,NH,T,hs), att (B,NH,T,T).
    """
    B, T, C3 = qkv.shape
    q, k, v = (split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))    # 3 x (B,NH,T,hs)
    hs = q.shape[-1]
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)                       # (B,NH,T,T)
    mask = np.tri(T, T, dtype=bool)                                            # True on and below the diagonal
    scores = np.where(mask, scores, -np.inf)
    att = np.exp(scores - scores.max(axis=-1, keepdims=True))                  # exp(-inf) = 0: masked out
    att /= att.sum(axis=-1, keepdims=True)
    y = att @ v                                                                # (B,NH,T,hs)
    return merge_heads(y), (q, k, v, att)


def attention_backward(dout, cache):
    """The gradient of the loss with respect to qkv.

    Inputs: dout (B,T,C), dL/dout; cache = (q, k, v, att) from attention_forward.
    Returns: dqkv (B,T,3C): dq, dk, dv side by side, in the layout of qkv
             (np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)).
    """
    raise NotImplementedError(
        "read the forward from the bottom up. dy = split_heads(dout, NH); y = att @ v gives "
        "datt and dv (two matmuls, mind the transposes); the softmax couples every entry of a row, so dscores "
        "is not just att * datt; scores = q @ k^T / sqrt(hs) gives dq and dk. What do masked entries (att = 0) get?")
