"""
Exercise: attention with a prefix (past keys and values), forward and backward.

Prefix tuning learns P key and value vectors per layer and head and puts them in front of the keys and
values the tokens compute: a trained KV cache. The T new tokens sit at positions P .. P+T-1: each attends
to all P prefix positions and, causally, to the new tokens up to itself. Write both functions, then
check them (from the repository root):

    python -m tinyllm check prefix

The checker compares out with tinyllm's, and dqkv, dpast_k, dpast_v with centred finite differences of
the forward and with tinyllm's attention_forward / attention_backward (tinyllm/layers.py, their past_k and
past_v arguments: read them once you pass), and says what a wrong one looks like. Do attention.py first.

Legend: B batch, T new tokens, P prefix (past) positions, C channels, NH heads, hs head size (C // NH).
The check uses B=2, T=4, P=3, C=6, NH=2.
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


def attention_forward(qkv, n_head, past_k=None, past_v=None):
    """Multi-head self-attention of T new tokens that also see P past positions. For each batch row and head:

        k_all = [past_k, k], v_all = [past_v, v]         (P+T,hs): the past first, then the new tokens
        scores = q @ k_all^T / sqrt(hs)                  (T,P+T)
        new token t is at position P+t: it sees keys 0..P+t (every past position, and new tokens 0..t);
        scores of the keys it may not see are -inf
        att = softmax(scores), row by row                (T,P+T)
        y = att @ v_all                                  (T,hs)

    and out is y with the heads put side by side again.

    Inputs: qkv (B,T,3C): q, k, v side by side; n_head NH; past_k, past_v (B,NH,P,hs) (the check always
    passes them; P = 0, None, is plain causal attention).
    Returns: out (B,T,C); cache, anything your backward needs.
    """
    raise NotImplementedError(
        "start from attention.py's forward; np.concatenate along the time axis (axis 2) "
        "puts the past in front. For the mask, np.tri(N, M, k, dtype=bool) is True where column <= row + k: "
        "which k puts new token t at position P+t?")


def attention_backward(dout, cache):
    """The gradients of the loss with respect to qkv and the past keys and values.

    Inputs: dout (B,T,C), dL/dout; cache from attention_forward.
    Returns: dqkv (B,T,3C), dq, dk, dv of the new tokens side by side, in the layout of qkv;
             dpast_k, dpast_v (B,NH,P,hs).
    """
    raise NotImplementedError(
        "the same steps as attention.py's backward, with keys and values of length P+T; "
        "at the end, split dk_all and dv_all (B,NH,P+T,hs) into the past's part and the new tokens' part.")
