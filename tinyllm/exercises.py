"""
The checker of the exercises in lessons/exercises/: `python -m tinyllm check NAME`, or check(NAME).

Each exercise is a stub, lessons/exercises/NAME.py: a forward/backward pair of tinyllm.layers (or one AdamW
step) with its maths and shapes in the docstring and `raise NotImplementedError` where your code goes.
The checker imports your file and, on small random float64 inputs,

  (a) compares your forward's output with tinyllm's,
  (b) compares every gradient your backward returns with centred finite differences of tinyllm's forward
      (the gradient check of lesson 03 and tests/test_layers.py) and with tinyllm's own backward,

and prints a cmp-style table: name, max abs diff, relative error, ok (relative error below 1e-7). When a
row fails it says what the mistake looks like, by comparing your answer with answers known to be wrong in
one particular way: the transpose, a constant factor (a sign, the LoRA scale, a mean's 1/n), the causal
mask forgotten or shifted by P, targets of -100 counted, AdamW without its bias correction or with its
weight decay coupled into the gradient, and so on.

Each exercise below is one section: its inputs, the answers known to be wrong, and its entry in EXERCISES.
Then the diagnosis (what a wrong answer looks like) and the check itself.

Legend: B batch, T time (new tokens), P prefix positions, C channels, NH heads, hs head size (C // NH),
N rows, V vocabulary, r LoRA rank.
"""
import importlib.util
import math
import os
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import numpy as np

from . import layers
from .gradcheck import numerical_gradient, rel_error
from .optim import AdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES_DIR = os.path.join(ROOT, "lessons", "exercises")
TOL = 1e-7       # relative error of a correct float64 gradient (cs231n's threshold, lesson 03's LAYER_TOL)
DLOSS = 1.7      # the upstream gradient of a scalar loss: not 1, so that a backward ignoring dloss shows


class ExerciseError(Exception):
    """Bad input to the checker (an unknown exercise, a missing file): the CLI's exit status 2."""


class Mistake(Exception):
    """Your function returned something that cannot be compared at all (a wrong tuple); the message says what."""


@dataclass
class Row:
    """One line of the table: your `name` against tinyllm's answer or against finite differences."""
    name: str
    maxdiff: float      # None when there was nothing to compare (an error, a wrong shape)
    rel: float
    ok: bool


@dataclass
class Result:
    """What check() found. hints: {output, gradient or function: what looks wrong}, empty when ok."""
    exercise: str
    path: str
    rows: list = field(default_factory=list)
    hints: dict = field(default_factory=dict)
    not_implemented: list = field(default_factory=list)   # your functions that still raise NotImplementedError

    @property
    def ok(self):
        return bool(self.rows) and all(r.ok for r in self.rows) and not self.hints

    @property
    def status(self):
        return "passed" if self.ok else "not implemented yet" if self.not_implemented else "failed"


@dataclass
class Exercise:
    name: str
    title: str                  # one line, for --list
    solution: str               # where tinyllm's own answer is, to read once you pass
    functions: tuple            # the functions your file defines, forward first
    todo: tuple                 # those you write (the others are given in the stub)
    reference: object           # the same functions, tinyllm's: a namespace with the stub's names
    inputs: Callable            # rng -> {name: float64 array or setting}
    forward: Callable           # (module, inputs) -> ({output: array}, cache)
    backward: Callable = None   # (module, dout, cache) -> {gradient: array}
    wrt: dict = field(default_factory=dict)   # {gradient: the input it is the gradient of}
    wrong: Callable = None      # (inputs, dout) -> [(hint, {output or gradient: wrong answer})], most specific first
    factors: Callable = None    # inputs -> [(factor, hint)]: constant factors with a known cause
    parts: dict = None          # {gradient: array -> {part: array}}: which part of a fused gradient is wrong
    extra: Callable = None      # (name, yours, inputs) -> hint or None: a mistake no single wrong answer shows


EXERCISES = {}                  # name -> Exercise, in the order to do them


def register(ex):
    EXERCISES[ex.name] = ex


def pair(r, fname, what):
    if not (isinstance(r, tuple) and len(r) == 2):
        raise Mistake(f"{fname} must return the pair {what}, got {type(r).__name__}"
                      + (f" of length {len(r)}" if isinstance(r, tuple) else ""))
    return r


def grads(r, fname, names):
    """{name: array} from what a backward returned: the tuple `names` (or, for one name, the array)."""
    if len(names) == 1 and not isinstance(r, tuple):
        return {names[0]: r}
    if not isinstance(r, tuple) or len(r) != len(names):
        got = f"a tuple of {len(r)}" if isinstance(r, tuple) else type(r).__name__
        raise Mistake(f"{fname} must return ({', '.join(names)}), got {got}")
    return dict(zip(names, r))


def layer_forward(fname, args, out="out"):
    """(module, inputs) -> ({out: array}, cache): module.fname(*inputs[args]), which returns (out, cache)."""
    def forward(mod, a):
        r = pair(getattr(mod, fname)(*(a[k] for k in args)), fname, f"({out}, cache)")
        return {out: r[0]}, r[1]
    return forward


def layer_backward(fname, names):
    """(module, dout, cache) -> {name: gradient}: module.fname(dout, cache), which returns `names`."""
    return lambda mod, dout, cache: grads(getattr(mod, fname)(dout, cache), fname, names)


def stub_names(fnames, module):
    """tinyllm's functions under the stub's names (module: tinyllm.layers)."""
    return SimpleNamespace(**{f: getattr(module, f) for f in fnames})


# ----------------------------------------------------------------------------------------------------
# GELU

def gelu_wrong(a, dout):
    x = a["x"]
    s = math.sqrt(2 / math.pi)
    t = np.tanh(s * (x + 0.044715 * x ** 3))
    local = lambda du, dtanh: 0.5 * (1 + t) + 0.5 * x * dtanh * du       # d out / d x
    du = s * (1 + 3 * 0.044715 * x * x)
    exact = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return [
        ("the local derivative alone: multiply by dout (the chain rule, dx = dout * dout/dx)",
         dict(dx=local(du, 1 - t * t))),
        ("that is the derivative of the exact GELU, x Phi(x); GPT-2 uses the tanh approximation "
         "0.5 x (1 + tanh(u)): differentiate that", dict(dx=dout * exact)),
        ("only the first term of the product rule: out = 0.5 x (1 + t) changes with x also through t; "
         "add 0.5 x dt/dx", dict(dx=dout * 0.5 * (1 + t))),
        ("du/dx is missing the derivative of the x^3 term of u = sqrt(2/pi) (x + 0.044715 x^3)",
         dict(dx=dout * local(s, 1 - t * t))),
        ("the 3 of d(x^3)/dx = 3 x^2 is missing from du/dx",
         dict(dx=dout * local(s * (1 + 0.044715 * x * x), 1 - t * t))),
        ("the derivative of tanh is missing: dt/du = 1 - tanh(u)^2 = 1 - t^2", dict(dx=dout * local(du, 1.0))),
    ]


register(Exercise(
    name="gelu", title="the backward of GELU, the tanh approximation", solution="gelu_backward in tinyllm/layers.py",
    functions=("gelu_forward", "gelu_backward"), todo=("gelu_backward",),
    reference=stub_names(("gelu_forward", "gelu_backward"), layers),
    inputs=lambda rng: dict(x=1.5 * rng.normal(size=(2, 3, 8))),
    forward=layer_forward("gelu_forward", ["x"]), backward=layer_backward("gelu_backward", ("dx",)), wrt=dict(dx="x"),
    wrong=gelu_wrong,
    factors=lambda a: [(2.0, "twice too large: the 0.5 of 0.5 x (1 + t) is missing"), (0.5, "half what it should be")]))


# ----------------------------------------------------------------------------------------------------
# layer norm

def layernorm_wrong(a, dout):
    x, w = a["x"], a["w"]
    mean = lambda z: z.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt(mean((x - mean(x)) ** 2) + 1e-5)
    xhat = (x - mean(x)) * rstd
    dxhat = dout * w
    return [
        ("only the direct path: x reaches xhat = (x - mean) * rstd also through the mean and through rstd, "
         "and each path adds a term", dict(dx=rstd * dxhat)),
        ("the path through the mean is missing: subtract mean(dxhat)",
         dict(dx=rstd * (dxhat - xhat * mean(dxhat * xhat)))),
        ("the path through rstd (the variance) is missing: subtract xhat * mean(dxhat * xhat)",
         dict(dx=rstd * (dxhat - mean(dxhat)))),
        ("the gain w is missing: the forward multiplies xhat by w, so dxhat = dout * w",
         dict(dx=rstd * (dout - mean(dout) - xhat * mean(dout * xhat)))),
        ("dw uses x; the forward multiplies w by xhat, the normalised x: dw = sum of dout * xhat",
         dict(dw=(dout * x).reshape(-1, x.shape[-1]).sum(axis=0))),
    ]


register(Exercise(
    name="layernorm", title="the backward of layer norm", solution="layernorm_backward in tinyllm/layers.py",
    functions=("layernorm_forward", "layernorm_backward"), todo=("layernorm_backward",),
    reference=stub_names(("layernorm_forward", "layernorm_backward"), layers),
    inputs=lambda rng: dict(x=0.5 + 2 * rng.normal(size=(2, 3, 5)), w=1 + 0.3 * rng.normal(size=5),
                            b=0.2 * rng.normal(size=5)),                      # B=2, T=3, C=5
    forward=layer_forward("layernorm_forward", ["x", "w", "b"]),
    backward=layer_backward("layernorm_backward", ("dx", "dw", "db")), wrt=dict(dx="x", dw="w", db="b"),
    wrong=layernorm_wrong))


# ----------------------------------------------------------------------------------------------------
# cross-entropy with ignored targets

BIG_ROW = 2     # the row of logits near 800, where exp overflows unless the row's max is subtracted first


def cross_entropy_inputs(rng):
    logits = 1.5 * rng.normal(size=(8, 7))                  # N=8, V=7
    logits[BIG_ROW] += 800.0
    targets = rng.integers(0, 7, size=8)
    targets[[1, 4, 6]] = layers.IGNORE_INDEX
    return dict(logits=logits, targets=targets)


def cross_entropy_wrong(a, dout):
    targets = a["targets"]
    counted = targets != layers.IGNORE_INDEX
    N, n = len(targets), int(counted.sum())
    loss, cache = layers.cross_entropy_forward(a["logits"], targets)
    dlogits, probs = layers.cross_entropy_backward(dout, cache), cache[0]
    with_ignored = dlogits.copy()
    with_ignored[~counted] = dout * probs[~counted] / n
    all_rows = dlogits * n / N
    all_rows[~counted] = dout * probs[~counted] / N
    return [
        (f"targets of -100 are counted: the mean is over the n = {n} counted targets (targets != -100), not "
         f"over all N = {N} rows", dict(loss=loss * n / N, dlogits=dlogits * n / N)),
        (f"targets of -100 are counted: their rows must get no gradient, and the mean is over the n = {n} "
         f"counted targets, not over all N = {N} rows", dict(dlogits=all_rows)),
        ("rows whose target is -100 get a gradient: they take no part in the loss, so their dlogits is exactly 0",
         dict(dlogits=with_ignored)),
        ("the one-hot term is missing: a counted row's gradient is (softmax - onehot(target)) / n",
         dict(dlogits=np.where(counted[:, None], dout * probs / n, 0.0))),
    ]


def cross_entropy_factors(a):
    n = int((a["targets"] != layers.IGNORE_INDEX).sum())
    return [(-1.0, "wrong sign: the loss is the NEGATIVE mean log-probability of the targets"),
            (1 / DLOSS, f"dloss is ignored: multiply by it (the checker passes dloss = {DLOSS})"),
            (float(n), f"a sum, not a mean: divide by n = {n}, the number of counted targets")]


def cross_entropy_extra(name, yours, a):
    ignored = a["targets"] == layers.IGNORE_INDEX
    if name == "dlogits" and np.any(yours[ignored] != 0):
        return "rows whose target is -100 get a gradient: they take no part in the loss, so their dlogits is exactly 0"
    if name == "dlogits":                           # only the row of logits near 800 wrong: exp overflowed there
        right = layers.cross_entropy_backward(DLOSS, layers.cross_entropy_forward(a["logits"], a["targets"])[1])
        wrong_rows = np.flatnonzero(~np.isclose(yours, right, rtol=1e-6, atol=1e-12).all(axis=1))
        if list(wrong_rows) == [BIG_ROW]:
            return (f"only row {BIG_ROW} is wrong, the one whose logits are near 800: exp(800) overflows, so subtract "
                    f"each row's max from its logits before exp (the softmax is the same)")
    return None


register(Exercise(
    name="cross_entropy", title="cross-entropy forward and backward, targets of -100 ignored",
    solution="cross_entropy_forward and cross_entropy_backward in tinyllm/layers.py",
    functions=("cross_entropy_forward", "cross_entropy_backward"),
    todo=("cross_entropy_forward", "cross_entropy_backward"),
    reference=stub_names(("cross_entropy_forward", "cross_entropy_backward"), layers), inputs=cross_entropy_inputs,
    forward=layer_forward("cross_entropy_forward", ["logits", "targets"], out="loss"),
    backward=layer_backward("cross_entropy_backward", ("dlogits",)), wrt=dict(dlogits="logits"),
    wrong=cross_entropy_wrong, factors=cross_entropy_factors, extra=cross_entropy_extra))


# ----------------------------------------------------------------------------------------------------
# LoRA

def lora_factors(a):
    s = a["scale"]
    return [(1 / s, f"the LoRA scale is missing (scale = {s}): out = scale * (x @ A) @ B, so every gradient "
                    f"carries it once"),
            (s, f"the LoRA scale is applied twice (scale = {s}): every gradient carries it exactly once"),
            (s * s, f"the LoRA scale is applied three times (scale = {s})")]


register(Exercise(
    name="lora", title="LoRA forward and backward: scale * (x @ A) @ B", solution="lora_forward and lora_backward "
    "in tinyllm/layers.py", functions=("lora_forward", "lora_backward"), todo=("lora_forward", "lora_backward"),
    reference=stub_names(("lora_forward", "lora_backward"), layers),
    inputs=lambda rng: dict(x=rng.normal(size=(2, 3, 5)), A=0.5 * rng.normal(size=(5, 2)),    # in=5, r=2
                            B=0.5 * rng.normal(size=(2, 4)), scale=1.75),     # out=4; B not 0, or dA would be 0
    forward=layer_forward("lora_forward", ["x", "A", "B", "scale"]),
    backward=layer_backward("lora_backward", ("dx", "dA", "dB")), wrt=dict(dx="x", dA="A", dB="B"),
    factors=lora_factors))


# ----------------------------------------------------------------------------------------------------
# causal attention, and attention with a prefix (past_k, past_v): one plain implementation for the wrong answers

def heads(a, n_head):
    """(B,T,C) -> (B,NH,T,hs)."""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge(a):
    """(B,NH,T,hs) -> (B,T,C)."""
    B, NH, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def attention(qkv, n_head, past_k, past_v, dout, allowed=None, softmax_sum=True, dv_from_att=False):
    """Masked attention's forward and backward written out plainly, with switches for the usual mistakes.

    allowed (T,P+T) bool: the keys each new token sees (default: the right ones, all P past keys and new
    keys 0..t). Returns {out, dqkv, dpast_k, dpast_v, dk, dv}, dk and dv (B,NH,P+T,hs) for every key.
    """
    T = qkv.shape[1]
    q, k, v = (heads(a, n_head) for a in np.split(qkv, 3, axis=-1))                 # 3 x (B,NH,T,hs)
    hs, P = q.shape[-1], past_k.shape[2]
    k, v = np.concatenate([past_k, k], axis=2), np.concatenate([past_v, v], axis=2)   # (B,NH,P+T,hs)
    allowed = np.tri(T, P + T, k=P, dtype=bool) if allowed is None else allowed
    scores = np.where(allowed, q @ k.swapaxes(-1, -2) / math.sqrt(hs), -np.inf)      # (B,NH,T,P+T)
    att = np.exp(scores - scores.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    dy = heads(dout, n_head)                                                         # (B,NH,T,hs)
    datt = dy @ v.swapaxes(-1, -2)                                                   # (B,NH,T,P+T)
    dv = (att if dv_from_att else att.swapaxes(-1, -2)) @ dy                         # (B,NH,P+T,hs)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) if softmax_sum else att * datt
    dq = dscores @ k / math.sqrt(hs)                                                 # (B,NH,T,hs)
    dk = dscores.swapaxes(-1, -2) @ q / math.sqrt(hs)                                # (B,NH,P+T,hs)
    dqkv = np.concatenate([merge(dq), merge(dk[:, :, P:]), merge(dv[:, :, P:])], axis=-1)
    return dict(out=merge(att @ v), dqkv=dqkv, dpast_k=dk[:, :, :P], dpast_v=dv[:, :, :P], dk=dk, dv=dv)


MASK_FORGOTTEN = ("the causal mask is forgotten: new token t may attend only to keys 0..t (scores above the "
                  "diagonal are -inf before the softmax, so their att is 0 and they get no gradient)")
SOFTMAX_SUM = ("the softmax backward is missing its subtracted term: dscores = att * (datt - sum_j datt_j att_j), "
               "row by row (each att depends on every score of its row)")


def attention_factors(a):
    hs = a["qkv"].shape[-1] // 3 // a["n_head"]
    return [(math.sqrt(hs), f"the 1/sqrt(hs) scale of the scores is missing (hs = {hs})"),
            (1 / math.sqrt(hs), f"the 1/sqrt(hs) scale is applied twice (hs = {hs})")]


QKV_PARTS = dict(dqkv=lambda dqkv: dict(zip(("dq", "dk", "dv"), np.split(dqkv, 3, axis=-1))))


def attention_wrong(a, dout):
    B, T, C3 = a["qkv"].shape
    none = np.zeros((B, a["n_head"], 0, C3 // 3 // a["n_head"]))                   # P = 0
    run = lambda **kw: attention(a["qkv"], a["n_head"], none, none, dout, **kw)
    return [(MASK_FORGOTTEN, run(allowed=np.ones((T, T), bool))),
            (SOFTMAX_SUM, run(softmax_sum=False)),
            ("dv uses att where y = att @ v needs its transpose: dv = att^T @ dy", run(dv_from_att=True))]


def attention_backward_dqkv(mod, dout, cache):
    """dqkv; (dqkv, None, None), as tinyllm's attention_backward returns it, is accepted too."""
    r = mod.attention_backward(dout, cache)
    if isinstance(r, tuple) and len(r) == 3 and r[1] is None and r[2] is None:
        r = r[0]
    return grads(r, "attention_backward", ("dqkv",))


register(Exercise(
    name="attention", title="the backward of causal multi-head attention", solution="attention_backward in "
    "tinyllm/layers.py", functions=("attention_forward", "attention_backward"), todo=("attention_backward",),
    reference=stub_names(("attention_forward", "attention_backward"), layers),
    inputs=lambda rng: dict(qkv=rng.normal(size=(2, 4, 18)), n_head=2),        # B=2, T=4, C=6, NH=2, hs=3
    forward=layer_forward("attention_forward", ["qkv", "n_head"]), backward=attention_backward_dqkv,
    wrt=dict(dqkv="qkv"), wrong=attention_wrong, factors=attention_factors, parts=QKV_PARTS))


def prefix_wrong(a, dout):
    T, P = a["qkv"].shape[1], a["past_k"].shape[2]
    run = lambda **kw: attention(a["qkv"], a["n_head"], a["past_k"], a["past_v"], dout, **kw)
    right = run()
    return [
        (f"the positions are off by P: new token t is at position P+t and sees keys 0..P+t (all P = {P} prefix "
         f"positions, then new tokens 0..t), but your mask lets it see keys 0..t only, the plain causal mask "
         f"without the shift by P", run(allowed=np.tri(T, P + T, dtype=bool))),
        ("the prefix is masked out: every new token must see all P prefix positions (the mask's first P columns "
         "are all allowed)", run(allowed=np.tri(T, P + T, k=P, dtype=bool) & (np.arange(P + T) >= P))),
        ("the causal mask among the new tokens is forgotten: new token t sees the prefix and new tokens 0..t only",
         run(allowed=np.ones((T, P + T), bool))),
        ("these are the gradients of all P+T keys or values; the past's are the first P of them: dk[:, :, :P]",
         dict(dpast_k=right["dk"], dpast_v=right["dv"])),
        ("these are the last P key or value positions; the prefix comes first (keys = [past_k, k]), so its "
         "gradients are the first P: dk[:, :, :P]",
         dict(dpast_k=right["dk"][:, :, -P:], dpast_v=right["dv"][:, :, -P:])),
        (SOFTMAX_SUM, run(softmax_sum=False)),
    ]


register(Exercise(
    name="prefix", title="attention with a prefix (past_k, past_v): forward and backward",
    solution="attention_forward and attention_backward in tinyllm/layers.py (their past_k, past_v)",
    functions=("attention_forward", "attention_backward"), todo=("attention_forward", "attention_backward"),
    reference=stub_names(("attention_forward", "attention_backward"), layers),
    inputs=lambda rng: dict(qkv=rng.normal(size=(2, 4, 18)), n_head=2,         # B=2, T=4, C=6, NH=2, hs=3
                            past_k=rng.normal(size=(2, 2, 3, 3)), past_v=rng.normal(size=(2, 2, 3, 3))),   # P=3
    forward=layer_forward("attention_forward", ["qkv", "n_head", "past_k", "past_v"]),
    backward=layer_backward("attention_backward", ("dqkv", "dpast_k", "dpast_v")),
    wrt=dict(dqkv="qkv", dpast_k="past_k", dpast_v="past_v"), wrong=prefix_wrong, factors=attention_factors,
    parts=QKV_PARTS))


# ----------------------------------------------------------------------------------------------------
# AdamW: one step, no gradient to check; the rows are p (its change, so that a small mistake in the update
# is not hidden by the size of p), m and v

def adamw_step_reference(p, g, m, v, t, lr, betas, eps, weight_decay):
    """tinyllm's AdamW.step for one parameter at step t, in place, with the stub's signature."""
    opt = AdamW({"p": p}, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    opt.m["p"], opt.v["p"], opt.t = m, v, t - 1          # after t - 1 steps; step() updates m, v in place
    opt.step({"p": g})


def adamw_forward(mod, a):
    p, m, v = a["p"].copy(), a["m"].copy(), a["v"].copy()
    mod.adamw_step(p, a["g"], m, v, a["t"], a["lr"], a["betas"], a["eps"], a["weight_decay"])
    return dict(p=p - a["p"], m=m, v=v), None


def adamw(a, bc1=True, bc2=True, decay="decoupled", eps_at="end", v_of_g2=True, t=None):
    """One AdamW step written out plainly, with switches for the usual mistakes. Returns {p (change), m, v}."""
    p, g, lr, wd, eps = a["p"].copy(), a["g"], a["lr"], a["weight_decay"], a["eps"]
    (b1, b2), t = a["betas"], a["t"] if t is None else t
    if decay in ("decoupled", "without lr"):
        p *= 1 - (lr * wd if decay == "decoupled" else wd)
    if decay == "coupled":
        g = g + wd * p                                   # Adam with L2: the decay goes through m and v
    m = b1 * a["m"] + (1 - b1) * g
    v = b2 * a["v"] + (1 - b2) * (g * g if v_of_g2 else g)
    mhat = m / (1 - b1 ** t) if bc1 else m
    c2 = 1 - b2 ** t if bc2 else 1.0
    denom = {"end": np.sqrt(v / c2) + eps,                       # torch: sqrt(v) / sqrt(1 - beta2^t) + eps
             "in sqrt": np.sqrt(v / c2 + eps), "before": (np.sqrt(v) + eps) / math.sqrt(c2)}
    p -= lr * mhat / denom[eps_at]
    if decay == "after":
        p *= 1 - lr * wd
    return dict(p=p - a["p"], m=m, v=v)


def adamw_wrong(a, dout):
    wrong_t = "the bias correction uses the wrong t: t is the number of this step, counting from 1"
    return [
        ("the bias correction is missing: m and v start at 0, so divide m by (1 - beta1^t) and v by (1 - beta2^t)",
         adamw(a, bc1=False, bc2=False)),
        ("the bias correction of m is missing: m_hat = m / (1 - beta1^t)", adamw(a, bc1=False)),
        ("the bias correction of v is missing: v_hat = v / (1 - beta2^t)", adamw(a, bc2=False)),
        ("weight decay is coupled into the gradient (g + weight_decay * p, Adam with L2): AdamW decays p "
         "directly, p *= 1 - lr * weight_decay, and m and v never see it", adamw(a, decay="coupled")),
        ("weight decay is applied after the Adam update: torch.optim.AdamW decays p first, from its value "
         "before this step", adamw(a, decay="after")),
        ("weight decay is not multiplied by lr: p *= 1 - lr * weight_decay", adamw(a, decay="without lr")),
        ("weight decay is missing: p *= 1 - lr * weight_decay, before the update", adamw(a, decay="none")),
        (wrong_t, adamw(a, t=a["t"] - 1)),
        (wrong_t, adamw(a, t=a["t"] + 1)),
        ("v is the running mean of the squared gradient: v = beta2 v + (1 - beta2) g^2", adamw(a, v_of_g2=False)),
        ("eps goes outside the square root: sqrt(v_hat) + eps", adamw(a, eps_at="in sqrt")),
        ("eps is added before the bias correction: torch computes sqrt(v) / sqrt(1 - beta2^t) + eps",
         adamw(a, eps_at="before")),
    ]


def adamw_extra(name, yours, a):
    if name == "p" and not np.any(yours):
        return ("p did not change: update it in place (p *= ..., p -= ...); `p = p - ...` only makes a new local "
                "array, and returning it is not enough: the optimizer's arrays are the model's parameters")
    if name in ("m", "v") and np.array_equal(yours, a[name]):
        return f"{name} did not change: update it in place ({name} *= beta; {name} += ...), the optimizer keeps it"
    return None


register(Exercise(
    name="adamw", title="one AdamW step, as torch.optim.AdamW computes it", solution="AdamW.step in tinyllm/optim.py",
    functions=("adamw_step",), todo=("adamw_step",), reference=SimpleNamespace(adamw_step=adamw_step_reference),
    inputs=lambda rng: dict(p=rng.normal(size=(3, 4)), g=rng.normal(size=(3, 4)), m=0.1 * rng.normal(size=(3, 4)),
                            v=0.01 * rng.random(size=(3, 4)) + 1e-3, t=3, lr=0.05, betas=(0.9, 0.999),
                            eps=1e-3, weight_decay=0.1),       # eps this large so that where it goes shows
    forward=adamw_forward, wrong=adamw_wrong, extra=adamw_extra))


def list_exercises(out=print):
    out("the exercises, in the order to do them (stubs in lessons/exercises/, whose README.md says more):")
    width = max(len(ex.title) for ex in EXERCISES.values())
    for ex in EXERCISES.values():
        out(f"  {ex.name:<14} {ex.title:<{width}}  you write {' and '.join(ex.todo)}")
    out("check one with: python -m tinyllm check NAME [--file PATH]")


# ----------------------------------------------------------------------------------------------------
# diagnosis: what a wrong answer looks like

def close(a, b):
    return np.shape(a) == np.shape(b) and rel_error(a, b) < TOL


def constant_factor(yours, right):
    """c when yours == c * right for a c other than 1 (and 0), else None."""
    den = float(np.sum(right * right))
    c = float(np.sum(yours * right)) / den if den else 0.0
    return c if abs(c - 1) > 1e-6 and c != 0 and close(yours, c * right) else None


def factor_hint(c, named):
    for value, hint in list(named) + [(-1.0, "wrong sign")]:
        if abs(c - value) <= 1e-6 * abs(value):
            return f"{hint} (yours = {c:.4g} x the right answer)"
    return (f"off by a constant factor: yours = {c:.6g} x the right answer (a scale missing or applied twice, "
            f"a sum where a mean belongs?)")


def shape_hint(got, want):
    if len(got) == len(want) >= 2 and got == want[::-1]:
        return f"transposed: shape {got}, expected {want} (for y = x @ W, dW = x^T @ dy, not dy^T @ x)"
    if len(got) > len(want) and got[len(got) - len(want):] == want:
        return (f"wrong shape: expected {want}, got {got}: sum over the leading axes (every position adds to "
                f"the gradient of a shared parameter)")
    same = " (the same number of entries: a reshape or transpose missing?)" if math.prod(got) == math.prod(want) else ""
    return f"wrong shape: expected {want}, got {got}{same}"


def diagnose(yours, right, wrong=(), factors=(), parts=None, extra=None):
    """What the mistake in `yours` looks like: a known wrong answer it matches, else a description of it."""
    if yours is None:
        return "returned None: not written yet? (return the array; computing it is not enough)"
    try:
        yours = np.asarray(yours, dtype=np.float64)
    except (TypeError, ValueError):
        return f"not an array of numbers: got {type(yours).__name__}"
    for hint, w in wrong:                                   # the most specific first
        if close(yours, w):
            return hint
    if yours.shape != right.shape:
        return shape_hint(yours.shape, right.shape)
    if not np.all(np.isfinite(yours)):
        return "nan or inf in it: did an exp overflow? subtract each row's max before exp (the softmax is the same)"
    hint = extra(yours) if extra else None
    if hint:
        return hint
    if right.ndim == 2 and right.shape[0] == right.shape[1] and close(yours, right.T):
        return "transposed: yours is the transpose of the right answer"
    c = constant_factor(yours, right)
    if c is not None:
        return factor_hint(c, factors)
    if parts:                                           # a fused gradient: say which part is wrong
        mine, good = parts(yours), parts(right)
        bad = [k for k in good if not close(mine[k], good[k])]
        if len(bad) < len(good):
            return "; ".join(f"its {k} part: {diagnose(mine[k], good[k], (), factors)}" for k in bad) + \
                f" (its {' and '.join(k for k in good if k not in bad)} right)"
    if not np.any(yours):
        return "all zeros"
    off = ~np.isclose(yours, right, rtol=1e-6, atol=1e-9 * float(np.max(np.abs(right))))
    first = tuple(int(i) for i in np.argwhere(off)[0]) if off.ndim else ()
    return (f"{int(off.sum())} of {off.size} entries differ, the first at index {first}: yours "
            f"{yours[first]:.6g}, right {right[first]:.6g}")


def raised(e, fname, path):
    """The hint for an exception your function raised, with the line of your file it came from."""
    if isinstance(e, NotImplementedError):
        return "not implemented yet (it raises NotImplementedError)" + (f"; where to start: {e}" if str(e) else "")
    if isinstance(e, Mistake):
        return str(e)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    where = f", line {frames[-1].lineno} of your file: {frames[-1].line}" if frames else ""
    hint = f"{fname} raised {type(e).__name__}: {e}{where}"
    if isinstance(e, IndexError) and "-100" in str(e):
        hint += " (a target of -100 is not an index: keep only the counted rows, targets != -100)"
    return hint


# ----------------------------------------------------------------------------------------------------
# the check

def check(name, path=None, out=print):
    """Check your solution to exercise `name`: lessons/exercises/<name>.py, or the file at path.

    Prints the table and what looks wrong (out=None: nothing). Returns a Result: .ok, .status, .rows and
    .hints ({output, gradient or function: hint}). Raises ExerciseError for an unknown name or a missing file.
    """
    if name not in EXERCISES:
        raise ExerciseError(f"no exercise named {name!r}; the exercises are {', '.join(EXERCISES)}")
    ex = EXERCISES[name]
    path = os.path.abspath(path or os.path.join(EXERCISES_DIR, f"{name}.py"))
    if not os.path.isfile(path):
        raise ExerciseError(f"no file {path}" + (" (it is a folder)" if os.path.isdir(path) else ""))
    result = Result(name, path)
    module = load(path, result)
    if module is not None:
        with np.errstate(all="ignore"):          # an overflow in your code shows as nan in the table instead
            run(ex, module, result)
    if out:
        report(ex, result, out)
    return result


def load(path, result):
    """Import your file by its path (which runs it, as `import` does); None, with a hint, if it fails."""
    spec = importlib.util.spec_from_file_location(f"tinyllm_exercise_{os.path.basename(path)[:-3]}", path)
    if spec is None:
        raise ExerciseError(f"cannot import {path}: not a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:                       # a syntax error or a failing import: yours to fix, not bad input
        result.rows.append(Row("import", None, None, False))
        result.hints["import"] = f"your file does not import: {type(e).__name__}: {e}"   # a SyntaxError names its line
        return None
    return module


def call(result, fname, f, *args):
    """f(*args), where f calls your function fname; None, with the hint for fname, when it raised."""
    try:
        return f(*args)
    except Exception as e:
        if isinstance(e, NotImplementedError):
            result.not_implemented.append(fname)
        result.hints[fname] = raised(e, fname, result.path)
        return None


def compare(result, ex, a, key, yours, right, against, wrong, others=None, ran=True):
    """One row of the table, yours against the right answer; on failure the hint for key (once per key).

    wrong() lists the known wrong answers; others: the other gradients' right answers (swapped?);
    ran=False: your function raised, and its own hint says why.
    """
    right = np.asarray(right, np.float64)
    try:
        y = None if yours is None else np.asarray(yours, np.float64)
    except (TypeError, ValueError):
        y = None
    if y is not None and right.ndim == 0 and y.size == 1:
        y = y.reshape(())                                # a loss as a 1-element array is fine
    comparable = ran and y is not None and y.shape == right.shape
    maxdiff = float(np.max(np.abs(y - right))) if comparable else None
    rel = rel_error(y, right) if comparable else None
    ok = comparable and rel < TOL                        # False for nan
    result.rows.append(Row(f"{key} vs {against}", maxdiff, rel, bool(ok)))
    if ok or not ran or key in result.hints:
        return
    swapped = [(f"this is {k}, not {key}: are they swapped in what you return?", v)
               for k, v in (others or {}).items() if k != key and np.shape(v) == right.shape]
    known = [(hint, w[key]) for hint, w in wrong() if key in w] + swapped
    extra = (lambda z: ex.extra(key, z, a)) if ex.extra else None
    result.hints[key] = diagnose(yours if y is None else y, right, known, ex.factors(a) if ex.factors else (),
                                 (ex.parts or {}).get(key), extra)


def run(ex, module, result):
    missing = [f for f in ex.functions if not callable(getattr(module, f, None))]
    for f in missing:
        result.rows.append(Row(f, None, None, False))
        result.hints[f] = f"your file defines no function {f}: keep the stub's names and signatures"
    if missing:
        return
    a = ex.inputs(np.random.default_rng(0))
    yours_to_change = lambda: {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in a.items()}
    right, cache = ex.forward(ex.reference, a)                     # tinyllm's answer
    key = next(iter(right))
    dout = DLOSS if np.ndim(right[key]) == 0 else np.random.default_rng(1).normal(size=np.shape(right[key]))
    made = {}
    wrong = lambda: made.setdefault("wrong", ex.wrong(a, dout) if ex.wrong else [])   # made only when needed

    # (a) the forward (given in some stubs, and checked all the same, in case it was changed)
    forward = ex.functions[0]
    got = call(result, forward, ex.forward, module, yours_to_change())
    for k, r in right.items():
        compare(result, ex, a, k, None if got is None else got[0].get(k), r, "tinyllm", wrong, ran=got is not None)
    if ex.backward is None:
        return

    # (b) every gradient, against finite differences of tinyllm's forward and against tinyllm's backward
    right_grads = ex.backward(ex.reference, dout, cache)
    loss = lambda: float(np.sum(ex.forward(ex.reference, a)[0][key] * dout))      # so d loss / d out = dout
    numeric = {d: numerical_gradient(loss, a[x]) for d, x in ex.wrt.items()}
    backward = ex.functions[1]
    yours = None
    if got is None:
        result.hints.setdefault(backward, f"not run: {forward} has to work first")
    else:
        mine = dout.copy() if isinstance(dout, np.ndarray) else dout              # yours may change it in place
        yours = call(result, backward, ex.backward, module, mine, got[1])
    for d in ex.wrt:
        y = None if yours is None else yours[d]
        compare(result, ex, a, d, y, numeric[d], "finite diff", wrong, right_grads, ran=yours is not None)
        compare(result, ex, a, d, y, right_grads[d], "tinyllm", wrong, right_grads, ran=yours is not None)


def report(ex, result, out):
    shown = os.path.relpath(result.path)
    shown = result.path if shown.startswith("..") else shown
    out(f"exercise {ex.name}: {ex.title} ({shown})")
    width = max(len(r.name) for r in result.rows)
    out(f"{'name':<{width}}  {'maxdiff':>10}  {'rel error':>10}  ok")
    for r in result.rows:
        numbers = f"{'-':>10}  {'-':>10}" if r.maxdiff is None else f"{r.maxdiff:10.2e}  {r.rel:10.2e}"
        out(f"{r.name:<{width}}  {numbers}  {'yes' if r.ok else 'NO'}")
    keys_of = {}                                    # one line per hint, however many rows it explains
    for key, hint in result.hints.items():
        keys_of.setdefault(hint, []).append(key)
    for hint, keys in keys_of.items():
        rels = [r.rel for r in result.rows if r.name.split(" vs ")[0] in keys and r.rel is not None]
        worst = f" (relative error {max(rels):.2e})" if rels else ""
        out(f"{', '.join(keys)}{worst}: {hint}")
    if result.ok:
        out(f"all {len(result.rows)} checks pass. Now read tinyllm's answer: {ex.solution}")
    elif result.not_implemented:
        out(f"not implemented yet: write {' and '.join(result.not_implemented)} in {shown}, then run this again")
    else:
        out(f"{sum(not r.ok for r in result.rows)} of {len(result.rows)} checks fail")
