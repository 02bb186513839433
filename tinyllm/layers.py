"""
The layers of GPT-2, each written as a forward/backward pair.

Every layer is two pure functions, as in cs231n and llm.c:

    out, cache = X_forward(inputs, params)      # cache: what backward needs
    dinputs, dparams = X_backward(dout, cache)  # the forward read in reverse

The cache belongs to the call, not to an object, so one layer can be used any number of times in a
forward pass. Each backward sits directly below its forward. Weights are stored (in, out), so a linear
layer is `x @ w + b`, as in GPT-2's own checkpoints.

The last section holds the layers that fine-tuning adds (LoRA, adapters); prefix tuning needs no layer
of its own, only attention's `past_k, past_v` arguments.

Speed without tricks: every big matmul is one 2-D or batched `@` (BLAS does the work), and long elementwise
formulas are chains of in-place steps (`t *= x`), one pass over the array per line. `0.5 * x * (1 + t)`
would make a new array for every operator, and memory new to the process costs more than the arithmetic
(lesson 16 times both ways).

Legend: B batch, T time (new tokens), P past positions (KV cache or prefix), C channels (n_embd),
NH heads, hs head size (C // NH), V vocabulary, r LoRA rank, m adapter width.
"""
import math

import numpy as np

IGNORE_INDEX = -100  # targets equal to this are not predicted (prompt tokens, padding), as in PyTorch


# ----------------------------------------------------------------------------------------------------
# token embedding

def embedding_forward(idx, wte):
    """Look up one row of wte per token.

    Inputs: idx (B,T) ints in [0, V); wte (V,C).
    Returns: out (B,T,C), cache.
    """
    out = wte[idx]                                    # (B,T) -> (B,T,C)
    return out, (idx, wte.shape)


def embedding_backward(dout, cache):
    """Returns dwte (V,C). A token used several times collects all of its gradients."""
    idx, wte_shape = cache
    dwte = np.zeros(wte_shape, dtype=dout.dtype)
    np.add.at(dwte, idx.ravel(), dout.reshape(-1, wte_shape[1]))   # scatter-add, (B*T,C) -> (V,C)
    return dwte


# ----------------------------------------------------------------------------------------------------
# layer norm

def layernorm_forward(x, w, b, eps=1e-5):
    """Normalise each position's C features to mean 0, variance 1, then scale and shift.

    Inputs: x (...,C); w, b (C,).
    Returns: out (...,C), cache.
    """
    mean = x.mean(axis=-1, keepdims=True)             # (...,1)
    xhat = x - mean                                   # (...,C), centred
    var = np.vecdot(xhat, xhat)[..., None] / x.shape[-1]   # (...,1) biased variance, as in GPT-2 (vecdot:
                                                      # each row's dot product, with no (...,C) temporary)
    rstd = 1.0 / np.sqrt(var + eps)                   # (...,1)
    xhat *= rstd                                      # (...,C), normalised
    out = xhat * w
    out += b                                          # (...,C)
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache, need_dparams=True):
    """Returns dx (...,C), dw (C,), db (C,). dw, db are None when need_dparams is False."""
    xhat, rstd, w = cache
    C = dout.shape[-1]
    dw = db = None
    if need_dparams:
        dw = (dout * xhat).reshape(-1, C).sum(axis=0)  # forward was: out = xhat * w + b
        db = dout.reshape(-1, C).sum(axis=0)
    dxhat = dout * w                                  # (...,C)
    # xhat depends on x directly and through mean and rstd; those two paths give the two subtracted terms:
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dx = xhat * (np.vecdot(dxhat, xhat)[..., None] / C)
    np.subtract(dxhat, dx, out=dx)
    dx -= dxhat.mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------
# linear (GPT-2 calls it Conv1D; the weight is stored (in, out))

def linear_forward(x, w, b):
    """Inputs: x (...,in); w (in,out); b (out,). Returns: out (...,out), cache."""
    # one big 2-D matmul over all B*T rows: numpy runs (B,T,in) @ (in,out) as B small ones
    out = x.reshape(-1, w.shape[0]) @ w                # (B*T,in) @ (in,out) -> (B*T,out)
    out += b
    return out.reshape(*x.shape[:-1], w.shape[1]), (x, w)


def linear_backward(dout, cache, need_dw=True, need_db=True):
    """Returns dx (...,in), dw (in,out), db (out,).

    A frozen layer passes need_dw=need_db=False: the gradient still flows through to x, but the weight
    gradient, a matmul as large as the forward one, is never computed. That is where parameter-efficient
    fine-tuning saves its time.
    """
    x, w = cache
    n_in, n_out = w.shape
    dout2 = dout.reshape(-1, n_out)                                             # (B*T,out)
    dx = (dout2 @ w.T).reshape(x.shape)               # (B*T,out) @ (out,in) -> (B*T,in)
    dw = x.reshape(-1, n_in).T @ dout2 if need_dw else None                     # (in,B*T) @ (B*T,out) -> (in,out)
    db = dout2.sum(axis=0) if need_db else None                                 # (out,)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------
# GELU, the tanh approximation GPT-2 was trained with

GELU_SCALE = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """out = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Inputs: x (...). Returns: out (...), cache."""
    t = x * x                                         # x^2 by hand: np.power is far slower on float32
    t *= GELU_SCALE * 0.044715
    t += GELU_SCALE
    t *= x                                            # u = x (sqrt(2/pi) + sqrt(2/pi) 0.044715 x^2)
    np.tanh(t, out=t)                                 # t = tanh(u)
    out = t + 1.0
    out *= x
    out *= 0.5                                        # 0.5 x (1 + t)
    return out, (x, t)


def gelu_backward(dout, cache):
    """Returns dx (...)."""
    x, t = cache
    # forward was: out = 0.5 x (1 + t), t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3), so
    # dout/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx, with du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    du_dx = x * x
    du_dx *= GELU_SCALE * 3.0 * 0.044715
    du_dx += GELU_SCALE                               # du/dx
    dx = t * t
    np.subtract(1.0, dx, out=dx)                      # 1 - t^2, the derivative of tanh
    dx *= du_dx
    dx *= x                                           # x (1 - t^2) du/dx
    dx += t
    dx += 1.0
    dx *= 0.5                                         # 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx
    dx *= dout
    return dx


# ----------------------------------------------------------------------------------------------------
# causal self-attention

def causal_mask(T, P, dtype):
    """(T,P+T): 0 where new token t may look (keys 0..P+t), -inf elsewhere; added to the scores."""
    return np.where(np.tri(T, P + T, k=P, dtype=bool), 0.0, -np.inf).astype(dtype)


def attention_forward(qkv, n_head, past_k=None, past_v=None):
    """Multi-head causal self-attention on the output of the fused c_attn projection.

    past_k, past_v are keys and values of positions that come before the T new tokens: the KV cache
    during generation, or the learned prefix in prefix tuning (which is nothing else than a KV cache
    that was trained). Every new token attends to all P past positions and causally to new tokens.

    Inputs: qkv (B,T,3C); n_head NH; past_k, past_v (B,NH,P,hs) or None.
    Returns: out (B,T,C), cache. cache[1], cache[2] are this call's keys and values (B,NH,P+T,hs),
    the KV cache for the next call.
    """
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q, k, v = split_heads(qkv, n_head)                           # (B,T,3C) -> 3 x (B,NH,T,hs), views
    P = 0
    if past_k is not None:
        P = past_k.shape[2]
        k = np.concatenate([past_k, k], axis=2)                  # (B,NH,P+T,hs)
        v = np.concatenate([past_v, v], axis=2)                  # (B,NH,P+T,hs)
    scores = (q * (1.0 / math.sqrt(hs))) @ k.transpose(0, 1, 3, 2)   # (B,NH,T,hs) @ (B,NH,hs,P+T) -> (B,NH,T,P+T)
    scores += causal_mask(T, P, scores.dtype)                    # new token t (position P+t) sees keys 0..P+t
    scores -= scores.max(axis=-1, keepdims=True)                 # softmax, shifted for stability
    att = np.exp(scores, out=scores)                             # scores are not needed again
    att /= att.sum(axis=-1, keepdims=True)                       # (B,NH,T,P+T), rows sum to 1
    y = att @ v                                                  # (B,NH,T,P+T) @ (B,NH,P+T,hs) -> (B,NH,T,hs)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)         # re-assemble the heads, (B,T,C)
    return out, (q, k, v, att, out, P)               # out: no extra memory, c_proj keeps it anyway


def attention_backward(dout, cache):
    """Returns dqkv (B,T,3C), dpast_k, dpast_v (B,NH,P,hs) (None when there was no past)."""
    q, k, v, att, out, P = cache
    B, NH, T, hs = q.shape
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)      # (B,T,C) -> (B,NH,T,hs)
    y = out.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)        # (B,T,C) -> (B,NH,T,hs), the forward's y
    # forward was: y = att @ v
    datt = dy @ v.transpose(0, 1, 3, 2)                          # (B,NH,T,P+T)
    dv = att.transpose(0, 1, 3, 2) @ dy                          # (B,NH,P+T,hs)
    # forward was: att = softmax(scores), so row by row dscores = att * (datt - sum_j datt_j att_j).
    # That sum is datt . att = (dy @ v^T) . att = dy . (att @ v) = dy . y: a dot product of two short
    # (hs,) rows instead of two long (P+T,) ones (FlashAttention uses the same identity).
    datt -= np.vecdot(dy, y)[..., None]                          # (B,NH,T,P+T) - (B,NH,T,1)
    dscores = np.multiply(datt, att, out=datt)                   # (B,NH,T,P+T); masked entries: att = 0, no gradient
    # forward was: scores = (q / sqrt(hs)) @ k^T; the scale goes on the small (B,NH,*,hs) side
    scale = 1.0 / math.sqrt(hs)
    dqkv = np.empty((B, T, 3 * NH * hs), dtype=dout.dtype)
    dq, dk_new, dv_new = split_heads(dqkv, NH)                   # views into dqkv, filled in place
    np.matmul(dscores, k, out=dq)                                # (B,NH,T,hs)
    dq *= scale
    dk = dscores.transpose(0, 1, 3, 2) @ q                       # (B,NH,P+T,hs)
    # of the P+T keys and values the first P are the past's: their gradients go back as dpast_k, dpast_v
    dk_new[...] = dk[:, :, P:]
    dk_new *= scale
    dv_new[...] = dv[:, :, P:]
    if P == 0:
        return dqkv, None, None
    return dqkv, dk[:, :, :P] * scale, dv[:, :, :P]


def split_heads(qkv, n_head):
    """(B,T,3C) -> q, k, v, each (B,NH,T,hs): views into qkv, no copy."""
    B, T, C3 = qkv.shape
    return (a.reshape(B, T, n_head, -1).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=2))


# ----------------------------------------------------------------------------------------------------
# cross-entropy loss over the vocabulary, ignoring targets equal to IGNORE_INDEX

def cross_entropy_forward(logits, targets):
    """Mean negative log-likelihood of the targets.

    Inputs: logits (N,V); targets (N,) ints in [0, V) or IGNORE_INDEX.
    Returns: loss (a float, averaged over the counted targets), cache.
    """
    counted = targets != IGNORE_INDEX                            # (N,)
    n = int(counted.sum())
    if n == 0:
        raise ValueError("every target is -100 (ignored), so there is nothing to predict; "
                         "give at least one target token")
    z = logits - logits.max(axis=-1, keepdims=True)              # (N,V)
    probs = np.exp(z)
    sumexp = probs.sum(axis=-1, keepdims=True)                   # (N,1)
    probs /= sumexp
    rows = np.flatnonzero(counted)
    logp = z[rows, targets[rows]] - np.log(sumexp[rows, 0])     # log-prob of each counted target
    loss = -logp.sum(dtype=np.float64) / n
    return float(loss), (probs, targets, rows, n)


def cross_entropy_backward(dloss, cache):
    """Returns dlogits (N,V): (softmax - onehot) / n on counted rows, 0 elsewhere."""
    probs, targets, rows, n = cache
    dlogits = np.zeros_like(probs)
    dlogits[rows] = probs[rows]
    dlogits[rows, targets[rows]] -= 1.0
    dlogits *= dloss / n
    return dlogits


# ----------------------------------------------------------------------------------------------------
# fine-tuning layers

def lora_forward(x, A, B, scale, keep=None):
    """The LoRA update of a frozen linear layer: scale * (x @ A) @ B, added to x @ W + b by the caller.

    A starts random and B at zero, so the update starts at exactly zero. `keep` is an optional dropout
    mask (already divided by the keep probability) applied to the layer's input on the LoRA path only.
    Inputs: x (...,in); A (in,r); B (r,out); scale (lora_alpha / r).
    Returns: out (...,out), cache.
    """
    xd = x if keep is None else x * keep                         # (...,in)
    h = xd.reshape(-1, A.shape[0]) @ A                           # (N,in) @ (in,r) -> (N,r), N = B*T rows
    h *= scale                                                   # scaled on the small (N,r) side
    out = h @ B                                                  # (N,r) @ (r,out) -> (N,out)
    return out.reshape(*x.shape[:-1], B.shape[1]), (xd, h, A, B, scale, keep)


def lora_backward(dout, cache):
    """Returns dx (...,in), dA (in,r), dB (r,out). Every product here has r on one side: it is cheap."""
    xd, h, A, B, scale, keep = cache
    dout2 = dout.reshape(-1, B.shape[1])                         # (N,out)
    dB = h.T @ dout2                                             # (r,N) @ (N,out) -> (r,out); h holds the scale
    dh = dout2 @ B.T                                             # (N,r)
    dh *= scale
    dA = xd.reshape(-1, A.shape[0]).T @ dh                       # (in,N) @ (N,r) -> (in,r)
    dx = (dh @ A.T).reshape(xd.shape)                            # (N,r) @ (r,in) -> (...,in)
    if keep is not None:
        dx *= keep
    return dx, dA, dB


def adapter_forward(x, w_down, b_down, w_up, b_up):
    """A Houlsby adapter: a bottleneck with its own residual connection, x + up(gelu(down(x))).

    With w_up and b_up at zero the adapter is exactly the identity, so training starts from the base model.
    Inputs: x (...,C); w_down (C,m); b_down (m,); w_up (m,C); b_up (C,).
    Returns: out (...,C), cache.
    """
    h, c_down = linear_forward(x, w_down, b_down)               # (...,C) -> (...,m)
    a, c_gelu = gelu_forward(h)                                  # (...,m)
    u, c_up = linear_forward(a, w_up, b_up)                      # (...,m) -> (...,C)
    return x + u, (c_down, c_gelu, c_up)


def adapter_backward(dout, cache):
    """Returns dx (...,C), dw_down, db_down, dw_up, db_up."""
    c_down, c_gelu, c_up = cache
    da, dw_up, db_up = linear_backward(dout, c_up)
    dh = gelu_backward(da, c_gelu)
    dx, dw_down, db_down = linear_backward(dh, c_down)
    return dout + dx, dw_down, db_down, dw_up, db_up             # the residual passes dout straight through
