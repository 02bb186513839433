"""
An independent GPT-2 forward pass, for tests only.

Written separately from tinyllm, in the style of picoGPT: one sequence at a time, small pure functions,
a Python loop over the heads, an additive -1e10 causal mask instead of -inf, variance from np.var.
It imports nothing from tinyllm, so an error in tinyllm.layers cannot hide by being copied here.
It reads the same flat parameter dict with GPT-2 names (weights stored (in, out)).

Legend: T time, P past positions, C channels, NH heads, hs head size, V vocabulary.
"""
import math

import numpy as np


def gelu(x):
    """GPT-2's GELU, the tanh approximation."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def log_softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def layer_norm(x, g, b, eps=1e-5):
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(var + eps) + b


def linear(x, w, b):
    return x @ w + b                                              # (T,in) @ (in,out) -> (T,out)


def causal_self_attention(qkv, n_head, past_k=None, past_v=None):
    """qkv (T,3C) -> (T,C). past_k, past_v (NH,P,hs): positions before the T new ones, all visible."""
    T = qkv.shape[0]
    q, k, v = np.split(qkv, 3, axis=-1)                           # 3 x (T,C)
    heads = []
    for h, (qh, kh, vh) in enumerate(zip(np.split(q, n_head, axis=-1),
                                         np.split(k, n_head, axis=-1),
                                         np.split(v, n_head, axis=-1))):   # each (T,hs)
        if past_k is not None:
            kh = np.vstack([past_k[h], kh])                       # (P+T,hs)
            vh = np.vstack([past_v[h], vh])
        n_k = kh.shape[0]
        mask = (1 - np.tri(T, n_k, k=n_k - T)) * -1e10            # (T,P+T), new token t sits at P+t
        att = softmax(qh @ kh.T / math.sqrt(qh.shape[-1]) + mask)
        heads.append(att @ vh)                                    # (T,hs)
    return np.hstack(heads)                                       # (T,C)


def transformer_block(x, p, i, n_head):
    h = f"h.{i}."
    a = layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
    a = linear(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
    a = causal_self_attention(a, n_head)
    x = x + linear(a, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
    m = layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
    m = gelu(linear(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"]))
    return x + linear(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])


def gpt2(ids, p, n_layer, n_head, head=None):
    """ids: a list of T token ids. Returns logits (T,V).

    head: the output matrix (V,C); GPT-2 ties it to wte (the default). Passing a separate array lets a
    test take finite differences through the embedding alone or the head alone.
    """
    ids = list(ids)
    x = p["wte.weight"][ids] + p["wpe.weight"][range(len(ids))]   # (T,C)
    for i in range(n_layer):
        x = transformer_block(x, p, i, n_head)
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])
    return x @ (p["wte.weight"] if head is None else head).T     # (T,V)


def gpt2_batch(idx, p, n_layer, n_head, head=None):
    """idx (B,T) -> logits (B,T,V), one sequence at a time."""
    return np.stack([gpt2(row, p, n_layer, n_head, head) for row in idx])


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean of -log softmax(logits)[target] over the rows whose target is not ignore_index."""
    logits = np.asarray(logits).reshape(-1, np.shape(logits)[-1])
    targets = np.asarray(targets).reshape(-1)
    nll = [-log_softmax(row)[t] for row, t in zip(logits, targets) if t != ignore_index]
    return float(np.mean(nll))
