"""
The exercises' checker (tinyllm/exercises.py) and the stubs in lessons/exercises/.

The checker must pass tinyllm's own functions (wrapped to the stubs' signatures) and a plain solution
written as a learner would, fail every planted mistake (a one-line change to that solution) with the hint
that names it, report the untouched stubs as not implemented yet, and answer on the command line with
the usual exit statuses: 0 all checks pass, 1 a check fails, 2 bad input.
"""
import ast
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tinyllm import layers
from tinyllm.__main__ import main
from tinyllm.exercises import (EXERCISES, EXERCISES_DIR, TOL, ExerciseError, adamw, adamw_forward, attention,
                               check, close)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = list(EXERCISES)


def stub_before(name, function):
    """The stub's text up to `def function`: its given forward and helpers, which a solution keeps."""
    with open(os.path.join(EXERCISES_DIR, f"{name}.py")) as f:
        text = f.read()
    return text[:text.index(f"def {function}(")]


def write(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def run_check(tmp_path, name, source):
    return check(name, write(tmp_path, name, source), out=None)


# ----------------------------------------------------------------------------------------------------
# tinyllm's own answers, wrapped to the stubs' signatures

REFERENCE = {
    "gelu": "from tinyllm.layers import gelu_backward, gelu_forward\n",
    "layernorm": "from tinyllm.layers import layernorm_backward, layernorm_forward\n",
    "cross_entropy": "from tinyllm.layers import cross_entropy_backward, cross_entropy_forward\n",
    "lora": "from tinyllm.layers import lora_backward, lora_forward\n",
    "attention": """
        from tinyllm import layers
        attention_forward = layers.attention_forward

        def attention_backward(dout, cache):
            return layers.attention_backward(dout, cache)[0]      # dqkv; there is no past here
    """,
    "prefix": "from tinyllm.layers import attention_backward, attention_forward\n",
    "adamw": """
        from tinyllm.optim import AdamW

        def adamw_step(p, g, m, v, t, lr, betas, eps, weight_decay):
            opt = AdamW({"p": p}, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            opt.m["p"], opt.v["p"], opt.t = m, v, t - 1            # the state after step t - 1
            opt.step({"p": g})
    """,
}


# ----------------------------------------------------------------------------------------------------
# plain solutions, as a learner would write them below the stub's given code

SOLUTION = {
    "gelu": stub_before("gelu", "gelu_backward") + """
def gelu_backward(dout, cache):
    x, t = cache
    du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x ** 2)
    local = 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * du
    return dout * local
""",
    "layernorm": stub_before("layernorm", "layernorm_backward") + """
def layernorm_backward(dout, cache):
    xhat, rstd, w = cache
    C = dout.shape[-1]
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    dxhat = dout * w
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw, db
""",
    "cross_entropy": """
import numpy as np

IGNORE_INDEX = -100


def cross_entropy_forward(logits, targets):
    rows = np.flatnonzero(targets != IGNORE_INDEX)
    n = len(rows)
    z = logits - logits.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=-1))
    loss = -(z[rows, targets[rows]] - logsumexp[rows]).sum() / n
    probs = np.exp(z - logsumexp[:, None])
    return loss, (probs, targets, rows, n)


def cross_entropy_backward(dloss, cache):
    probs, targets, rows, n = cache
    dlogits = np.zeros_like(probs)
    dlogits[rows] = probs[rows]
    dlogits[rows, targets[rows]] -= 1
    return dloss * dlogits / n
""",
    "lora": """
import numpy as np


def lora_forward(x, A, B, scale):
    x2 = x.reshape(-1, A.shape[0])
    h = scale * (x2 @ A)
    out = h @ B
    return out.reshape(*x.shape[:-1], B.shape[1]), (x, h, A, B, scale)


def lora_backward(dout, cache):
    x, h, A, B, scale = cache
    dout2 = dout.reshape(-1, B.shape[1])
    dB = h.T @ dout2
    dh = scale * (dout2 @ B.T)
    dA = x.reshape(-1, A.shape[0]).T @ dh
    dx = (dh @ A.T).reshape(x.shape)
    return dx, dA, dB
""",
    "attention": stub_before("attention", "attention_backward") + """
def attention_backward(dout, cache):
    q, k, v, att = cache
    NH, hs = q.shape[1], q.shape[3]
    dy = split_heads(dout, NH)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dq = dscores @ k / math.sqrt(hs)
    dk = dscores.transpose(0, 1, 3, 2) @ q / math.sqrt(hs)
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)
""",
    "prefix": stub_before("prefix", "attention_forward") + """
def attention_forward(qkv, n_head, past_k=None, past_v=None):
    B, T, C3 = qkv.shape
    q, k, v = (split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))
    P = 0 if past_k is None else past_k.shape[2]
    if P:
        k = np.concatenate([past_k, k], axis=2)
        v = np.concatenate([past_v, v], axis=2)
    hs = q.shape[-1]
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
    mask = np.tri(T, P + T, k=P, dtype=bool)
    scores = np.where(mask, scores, -np.inf)
    att = np.exp(scores - scores.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    return merge_heads(att @ v), (q, k, v, att, P)


def attention_backward(dout, cache):
    q, k, v, att, P = cache
    NH, hs = q.shape[1], q.shape[3]
    dy = split_heads(dout, NH)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dq = dscores @ k / math.sqrt(hs)
    dk = dscores.transpose(0, 1, 3, 2) @ q / math.sqrt(hs)
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk[:, :, P:]), merge_heads(dv[:, :, P:])], axis=-1)
    return dqkv, dk[:, :, :P], dv[:, :, :P]
""",
    "adamw": """
import numpy as np


def adamw_step(p, g, m, v, t, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    p *= 1 - lr * weight_decay
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    p -= lr * m_hat / (np.sqrt(v_hat) + eps)
""",
}


# (exercise, mistake, [(old, new) changes to the solution], the output or gradient hinted at, its key words)
MISTAKES = [
    ("gelu", "half the product rule",
     [("local = 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * du", "local = 0.5 * (1 + t)")],
     "dx", ["product rule"]),
    ("gelu", "the 3 of 3x^2 forgotten",
     [("3 * 0.044715", "0.044715")],
     "dx", ["the 3 of"]),
    ("gelu", "the tanh derivative forgotten",
     [("(1 - t ** 2) * du", "du")],
     "dx", ["derivative of tanh"]),
    ("gelu", "dout not multiplied",
     [("return dout * local", "return local")],
     "dx", ["chain rule"]),
    ("gelu", "off by a factor 2",
     [("return dout * local", "return 2 * dout * local")],
     "dx", ["twice", "0.5"]),
    ("gelu", "returns None",
     [("return dout * local", "dx = dout * local")],
     "dx", ["returned None"]),
    ("layernorm", "the path through the mean forgotten",
     [("dxhat - dxhat.mean(axis=-1, keepdims=True) - ", "dxhat - ")],
     "dx", ["through the mean"]),
    ("layernorm", "the path through rstd forgotten",
     [(" - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)", "")],
     "dx", ["through rstd"]),
    ("layernorm", "the gain forgotten",
     [("dxhat = dout * w", "dxhat = dout")],
     "dx", ["gain w"]),
    ("layernorm", "wrong sign",
     [("dx = rstd *", "dx = -rstd *")],
     "dx", ["wrong sign", "-1 x"]),
    ("layernorm", "dw not summed",
     [("dw = (dout * xhat).reshape(-1, C).sum(axis=0)", "dw = dout * xhat")],
     "dw", ["expected (5,), got (2, 3, 5)", "sum over the leading axes"]),
    ("layernorm", "dw and db swapped",
     [("return dx, dw, db", "return dx, db, dw")],
     "dw", ["this is db", "swapped"]),
    ("layernorm", "two gradients returned",
     [("return dx, dw, db", "return dx, dw")],
     "layernorm_backward", ["must return (dx, dw, db)", "a tuple of 2"]),
    ("cross_entropy", "ignored targets counted",
     [("n = len(rows)", "n = len(targets)")],
     "loss", ["-100 are counted", "n = 5", "N = 8"]),
    ("cross_entropy", "ignored rows get a gradient",
     [("dlogits[rows] = probs[rows]", "dlogits[:] = probs")],
     "dlogits", ["-100 get a gradient", "exactly 0"]),
    ("cross_entropy", "-100 used as an index",
     [("rows = np.flatnonzero(targets != IGNORE_INDEX)", "rows = np.arange(len(targets))")],
     "cross_entropy_forward", ["IndexError", "not an index", "line"]),
    ("cross_entropy", "no max subtracted",
     [("z = logits - logits.max(axis=-1, keepdims=True)", "z = logits")],
     "loss", ["nan or inf", "max"]),
    ("cross_entropy", "no max subtracted, seen in dlogits",
     [("z = logits - logits.max(axis=-1, keepdims=True)", "z = logits")],
     "dlogits", ["only row 2", "near 800"]),
    ("cross_entropy", "a sum, not a mean",
     [(".sum() / n", ".sum()")],
     "loss", ["a sum, not a mean"]),
    ("cross_entropy", "dloss ignored",
     [("return dloss * dlogits / n", "return dlogits / n")],
     "dlogits", ["dloss is ignored"]),
    ("cross_entropy", "wrong sign",
     [("loss = -(", "loss = (")],
     "loss", ["wrong sign"]),
    ("cross_entropy", "no one-hot",
     [("    dlogits[rows, targets[rows]] -= 1\n", "")],
     "dlogits", ["one-hot"]),
    ("lora", "dA transposed",
     [("dA = x.reshape(-1, A.shape[0]).T @ dh", "dA = dh.T @ x.reshape(-1, A.shape[0])")],
     "dA", ["transposed", "(2, 5)", "(5, 2)"]),
    ("lora", "the scale missing",
     [("h = scale * (x2 @ A)", "h = x2 @ A"), ("dh = scale * (dout2 @ B.T)", "dh = dout2 @ B.T")],
     "out", ["LoRA scale is missing", "1.75"]),
    ("lora", "the scale applied twice",
     [("dB = h.T @ dout2", "dB = scale * h.T @ dout2")],
     "dB", ["applied twice"]),
    ("lora", "off by a factor",
     [("dx = (dh @ A.T)", "dx = 0.5 * (dh @ A.T)")],
     "dx", ["constant factor", "0.5"]),
    ("lora", "a syntax error",
     [("def lora_backward(dout, cache):", "def lora_backward(dout, cache)")],
     "import", ["does not import", "SyntaxError"]),
    ("lora", "a function misnamed",
     [("def lora_backward(", "def lora_backwards(")],
     "lora_backward", ["defines no function lora_backward"]),
    ("lora", "the forward without its cache",
     [("return out.reshape(*x.shape[:-1], B.shape[1]), (x, h, A, B, scale)",
       "return out.reshape(*x.shape[:-1], B.shape[1])")],
     "lora_forward", ["must return the pair (out, cache)"]),
    ("attention", "the causal mask forgotten in the forward",
     [("    scores = np.where(mask, scores, -np.inf)\n", "")],
     "dqkv", ["causal mask is forgotten"]),
    ("attention", "att recomputed in the backward without the mask",
     [("    q, k, v, att = cache\n",
       "    q, k, v, _ = cache\n"
       "    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[3])\n"
       "    att = np.exp(s - s.max(axis=-1, keepdims=True))\n"
       "    att /= att.sum(axis=-1, keepdims=True)\n")],
     "dqkv", ["causal mask is forgotten"]),
    ("attention", "1/sqrt(hs) forgotten",
     [("dq = dscores @ k / math.sqrt(hs)", "dq = dscores @ k"),
      ("dk = dscores.transpose(0, 1, 3, 2) @ q / math.sqrt(hs)", "dk = dscores.transpose(0, 1, 3, 2) @ q")],
     "dqkv", ["dq part", "dk part", "1/sqrt(hs) scale of the scores is missing", "dv right"]),
    ("attention", "the softmax's row sum forgotten",
     [("att * (datt - (datt * att).sum(axis=-1, keepdims=True))", "att * datt")],
     "dqkv", ["subtracted term"]),
    ("attention", "att not transposed for dv",
     [("dv = att.transpose(0, 1, 3, 2) @ dy", "dv = att @ dy")],
     "dqkv", ["transpose"]),
    ("attention", "dv's sign",
     [("dv = att.", "dv = -att.")],
     "dqkv", ["dv part: wrong sign"]),
    ("prefix", "positions off by P",
     [("np.tri(T, P + T, k=P, dtype=bool)", "np.tri(T, P + T, dtype=bool)")],
     "out", ["off by P", "0..P+t"]),
    ("prefix", "the prefix masked out",
     [("mask = np.tri(T, P + T, k=P, dtype=bool)",
       "mask = np.concatenate([np.zeros((T, P), bool), np.tri(T, T, dtype=bool)], axis=1)")],
     "dpast_k", ["prefix is masked out"]),
    ("prefix", "the causal mask forgotten",
     [("    scores = np.where(mask, scores, -np.inf)\n", "")],
     "dqkv", ["causal mask among the new tokens"]),
    ("prefix", "dpast over all P+T positions",
     [("return dqkv, dk[:, :, :P], dv[:, :, :P]", "return dqkv, dk, dv")],
     "dpast_k", ["first P"]),
    ("prefix", "dpast from the last P positions",
     [("return dqkv, dk[:, :, :P], dv[:, :, :P]", "return dqkv, dk[:, :, -P:], dv[:, :, -P:]")],
     "dpast_v", ["first P"]),
    ("prefix", "dpast_k without 1/sqrt(hs)",
     [("return dqkv, dk[:, :, :P], dv[:, :, :P]", "return dqkv, dk[:, :, :P] * math.sqrt(hs), dv[:, :, :P]")],
     "dpast_k", ["1/sqrt(hs) scale of the scores is missing"]),
    ("prefix", "dpast_k and dpast_v swapped",
     [("return dqkv, dk[:, :, :P], dv[:, :, :P]", "return dqkv, dv[:, :, :P], dk[:, :, :P]")],
     "dpast_k", ["swapped"]),
    ("adamw", "no bias correction",
     [("m_hat = m / (1 - beta1 ** t)", "m_hat = m"), ("v_hat = v / (1 - beta2 ** t)", "v_hat = v")],
     "p", ["bias correction is missing"]),
    ("adamw", "no bias correction of m",
     [("m_hat = m / (1 - beta1 ** t)", "m_hat = m")],
     "p", ["bias correction of m"]),
    ("adamw", "weight decay coupled",
     [("    p *= 1 - lr * weight_decay\n", "    g = g + weight_decay * p\n")],
     "m", ["coupled", "decays p directly"]),
    ("adamw", "weight decay after the update",
     [("    p *= 1 - lr * weight_decay\n", ""),
      ("(np.sqrt(v_hat) + eps)\n", "(np.sqrt(v_hat) + eps)\n    p *= 1 - lr * weight_decay\n")],
     "p", ["after the Adam update"]),
    ("adamw", "weight decay without lr",
     [("p *= 1 - lr * weight_decay", "p *= 1 - weight_decay")],
     "p", ["not multiplied by lr"]),
    ("adamw", "p not in place",
     [("p *= 1 - lr * weight_decay", "p = p * (1 - lr * weight_decay)"), ("p -= lr * m_hat", "p = p - lr * m_hat")],
     "p", ["did not change", "in place"]),
    ("adamw", "m not in place",
     [("m *= beta1\n    m += (1 - beta1) * g", "m = beta1 * m + (1 - beta1) * g")],
     "m", ["m did not change", "in place"]),
    ("adamw", "eps inside the sqrt",
     [("(np.sqrt(v_hat) + eps)", "np.sqrt(v_hat + eps)")],
     "p", ["outside the square root"]),
    ("adamw", "t off by one",
     [("beta1 ** t", "beta1 ** (t + 1)"), ("beta2 ** t", "beta2 ** (t + 1)")],
     "p", ["wrong t"]),
    ("adamw", "v of g, not g^2",
     [("(1 - beta2) * g * g", "(1 - beta2) * g")],
     "v", ["squared gradient"]),
]


# ----------------------------------------------------------------------------------------------------
# the right answers pass

@pytest.mark.parametrize("name", NAMES)
def test_tinyllm_itself_passes(name, tmp_path, record_error):
    result = run_check(tmp_path, name, REFERENCE[name])
    assert result.ok and result.status == "passed", result.hints
    assert not result.hints and not result.not_implemented
    n_grads = len(EXERCISES[name].wrt)
    assert len(result.rows) == (3 if name == "adamw" else 1 + 2 * n_grads)       # forward, then 2 rows per gradient
    for row in result.rows:
        assert row.ok and row.rel < TOL and row.maxdiff >= 0
        if "finite diff" in row.name:
            record_error("exercise checker, tinyllm vs finite diff", row.rel)


@pytest.mark.parametrize("name", NAMES)
def test_a_plain_solution_passes(name, tmp_path):
    result = run_check(tmp_path, name, SOLUTION[name])
    assert result.ok, result.hints


def test_attention_backward_may_return_tinyllms_triple(tmp_path):
    assert run_check(tmp_path, "attention", "from tinyllm.layers import attention_backward, attention_forward\n").ok


# ----------------------------------------------------------------------------------------------------
# the planted mistakes fail, with the hint that names them

@pytest.mark.parametrize("name, mistake, changes, key, words", MISTAKES, ids=[f"{m[0]}: {m[1]}" for m in MISTAKES])
def test_a_planted_mistake_fails_with_its_hint(name, mistake, changes, key, words, tmp_path):
    source = SOLUTION[name]
    for old, new in changes:
        assert old in source, f"the mistake {mistake!r} changes nothing: {old!r} is not in the solution"
        source = source.replace(old, new)
    result = run_check(tmp_path, name, source)
    assert not result.ok and result.status == "failed"
    assert key in result.hints, f"no hint for {key}: {result.hints}"
    for word in words:
        assert word in result.hints[key], f"{word!r} not in the hint for {key}: {result.hints[key]}"


def test_both_rows_of_a_wrong_gradient_fail_and_the_right_ones_pass(tmp_path):
    result = run_check(tmp_path, "lora", SOLUTION["lora"].replace("dB = h.T @ dout2", "dB = scale * h.T @ dout2"))
    ok = {row.name: row.ok for row in result.rows}
    assert ok == {"out vs tinyllm": True, "dx vs finite diff": True, "dx vs tinyllm": True, "dA vs finite diff": True,
                  "dA vs tinyllm": True, "dB vs finite diff": False, "dB vs tinyllm": False}
    assert list(result.hints) == ["dB"]


def test_the_table_names_each_row_and_the_hint(tmp_path, capsys):
    path = write(tmp_path, "lora", SOLUTION["lora"].replace("dA = x.reshape(-1, A.shape[0]).T @ dh",
                                                            "dA = dh.T @ x.reshape(-1, A.shape[0])"))
    check("lora", path)
    out = capsys.readouterr().out
    assert "name" in out and "maxdiff" in out and "rel error" in out and "ok" in out
    assert "dA vs finite diff" in out and "NO" in out and "dB vs tinyllm" in out and "yes" in out
    assert "dA: transposed" in out and "2 of 7 checks fail" in out


def test_every_known_wrong_answer_differs_from_the_right_one():
    """Otherwise a right answer could be told it is wrong in that way (hints are looked up on failure only,
    but a wrong answer equal to the right one would also hide the others behind it)."""
    for name, ex in EXERCISES.items():
        if ex.wrong is None:
            continue
        a = ex.inputs(np.random.default_rng(0))
        right, cache = ex.forward(ex.reference, a)
        key = next(iter(right))
        dout = 1.7 if np.ndim(right[key]) == 0 else np.random.default_rng(1).normal(size=np.shape(right[key]))
        if ex.backward:
            right.update(ex.backward(ex.reference, dout, cache))
        for hint, answers in ex.wrong(a, dout):
            assert any(not close(w, right[k]) for k, w in answers.items()), f"{name}: {hint}"


def test_the_checkers_plain_attention_and_adamw_are_tinyllms_when_right():
    rng = np.random.default_rng(3)
    for P in (0, 3):
        qkv, dout = rng.normal(size=(2, 4, 18)), rng.normal(size=(2, 4, 6))
        past_k, past_v = rng.normal(size=(2, 2, P, 3)), rng.normal(size=(2, 2, P, 3))
        plain = attention(qkv, 2, past_k, past_v, dout)
        out, cache = layers.attention_forward(qkv, 2, past_k if P else None, past_v if P else None)
        dqkv, dpast_k, dpast_v = layers.attention_backward(dout, cache)
        assert close(plain["out"], out) and close(plain["dqkv"], dqkv)
        if P:
            assert close(plain["dpast_k"], dpast_k) and close(plain["dpast_v"], dpast_v)
    ex = EXERCISES["adamw"]
    a = ex.inputs(np.random.default_rng(0))
    right = adamw_forward(ex.reference, a)[0]
    assert all(close(adamw(a)[k], right[k]) for k in "pmv")


# ----------------------------------------------------------------------------------------------------
# the stubs: importable, unsolved, and mirroring tinyllm's signatures

@pytest.mark.parametrize("name", NAMES)
def test_a_stub_is_not_implemented_yet(name):
    result = check(name, out=None)
    assert not result.ok and result.status == "not implemented yet"
    assert result.not_implemented == [EXERCISES[name].todo[0]]
    assert "not implemented yet" in result.hints[EXERCISES[name].todo[0]]
    assert "where to start" in result.hints[EXERCISES[name].todo[0]]
    given = [f for f in EXERCISES[name].functions if f not in EXERCISES[name].todo]
    if given:                                     # the stub's given forward is right as it stands
        assert result.rows[0].ok


@pytest.mark.parametrize("name", NAMES)
def test_a_stub_states_shapes_is_unsolved_and_mirrors_tinyllms_signature(name):
    path = os.path.join(EXERCISES_DIR, f"{name}.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    defs = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for fname in EXERCISES[name].todo:                 # a docstring with shapes, then only the raise
        doc = ast.get_docstring(defs[fname])
        assert "Inputs:" in doc and "Returns:" in doc and "(" in doc
        body = defs[fname].body
        assert len(body) == 2 and isinstance(body[1], ast.Raise)
        assert body[1].exc.func.id == "NotImplementedError" and len(body[1].exc.args[0].value) > 40   # a hint
    spec = importlib.util.spec_from_file_location(f"stub_{name}", path)
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    for fname in EXERCISES[name].functions:
        ours = list(inspect.signature(getattr(stub, fname)).parameters)
        theirs = list(inspect.signature(getattr(EXERCISES[name].reference, fname)).parameters)
        assert theirs[:len(ours)] == ours, f"{fname}{ours} does not mirror tinyllm's {theirs}"


def test_the_readme_lists_every_exercise():
    with open(os.path.join(EXERCISES_DIR, "README.md")) as f:
        text = f.read()
    for name, ex in EXERCISES.items():
        assert f"{name}.py" in text and f"python -m tinyllm check {name}" in text


# ----------------------------------------------------------------------------------------------------
# the command line

def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def exit_status(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_exit_statuses(tmp_path, capsys):
    assert main(["check", "gelu", "--file", write(tmp_path, "gelu", REFERENCE["gelu"])]) == 0
    assert "all 3 checks pass" in capsys.readouterr().out
    buggy = write(tmp_path, "lora", SOLUTION["lora"].replace("dB = h.T @ dout2", "dB = scale * h.T @ dout2"))
    assert main(["check", "lora", "--file", buggy]) == 1
    assert "applied twice" in capsys.readouterr().out
    assert main(["check", "adamw"]) == 1                           # the stub
    assert "not implemented yet" in capsys.readouterr().out
    assert main(["check", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)


def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    assert exit_status(["check", "softmax"]) == 2
    one_line_error(capsys, "invalid choice", "softmax", "--help")
    assert exit_status(["check", "gelu", "--file", str(tmp_path / "missing.py")]) == 2
    one_line_error(capsys, "no file", "missing.py")
    assert exit_status(["check", "gelu", "--file", str(tmp_path)]) == 2
    one_line_error(capsys, "folder")
    (tmp_path / "notes.txt").write_text("not python\n")
    assert exit_status(["check", "gelu", "--file", str(tmp_path / "notes.txt")]) == 2
    one_line_error(capsys, "not a .py file")
    assert exit_status(["check"]) == 2
    one_line_error(capsys, "--list")
    with pytest.raises(ExerciseError, match="no exercise named"):
        check("softmax")


def test_cli_as_a_real_process_on_a_stub():
    proc = subprocess.run([sys.executable, "-m", "tinyllm", "check", "layernorm"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    assert "not implemented yet" in proc.stdout and "out vs tinyllm" in proc.stdout
