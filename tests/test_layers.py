"""
Every forward/backward pair in tinyllm.layers, checked against centred finite differences in float64.

For a layer out = f(inputs) we take the scalar L = sum(out * G) for a fixed random G, so dL/dout = G, and
compare each analytic gradient (inputs and parameters) with (L(x + h) - L(x - h)) / 2h, entry by entry.
Shapes are tiny so every entry is checked. Forward facts (layer-norm statistics, causality, softmax rows,
the GELU formula, -log softmax) are checked against formulas written here or in reference_gpt2.py.
"""
import math

import numpy as np
import pytest

import reference_gpt2 as ref
from tinyllm.gradcheck import (check_gradients, numerical_gradient, print_table, rel_error,
                               sample_indices)
from tinyllm.layers import (IGNORE_INDEX, adapter_backward, adapter_forward, attention_backward,
                            attention_forward, cross_entropy_backward, cross_entropy_forward,
                            embedding_backward, embedding_forward, gelu_backward, gelu_forward,
                            layernorm_backward, layernorm_forward, linear_backward, linear_forward,
                            lora_backward, lora_forward)

TOL = 1e-7   # per-layer relative error (cs231n's threshold for a correct gradient in float64)


def check(forward, arrays, grads, record, group, seed=0):
    """Finite differences of sum(forward() * G) against grads[name] for every name in grads.

    forward() reads its inputs from `arrays`, which the checker perturbs in place. G must be the one
    used to compute grads, so the caller passes grads already computed with G = upstream(out.shape).
    """
    for name, g in grads.items():
        assert g is not None, f"{name}: backward returned None"
        assert g.shape == arrays[name].shape, f"{name}: gradient shape {g.shape} != {arrays[name].shape}"
        assert g.dtype == np.float64, f"{name}: gradient dtype {g.dtype}"
        assert np.max(np.abs(g)) > 1e-6, f"{name}: gradient is all zero, the check would be vacuous"
    G = upstream(forward()[0].shape, seed)
    rows = check_gradients(lambda: float(np.sum(forward()[0] * G)), arrays, grads)
    worst = max(rel for _, _, rel in rows)
    record(group, worst)
    bad = [(n, rel) for n, _, rel in rows if not rel < TOL]
    assert not bad, f"gradient check failed: {bad}"


def upstream(shape, seed=0):
    """The fixed random dL/dout."""
    return np.random.default_rng(1000 + seed).normal(size=shape)


# ----------------------------------------------------------------------------------------------------
# embedding

def test_embedding_forward_looks_up_rows():
    rng = np.random.default_rng(0)
    wte = rng.normal(size=(7, 5))
    idx = np.array([[1, 3, 1, 0], [3, 3, 6, 2]])
    out, _ = embedding_forward(idx, wte)
    assert out.shape == (2, 4, 5)
    for b in range(2):
        for t in range(4):
            np.testing.assert_array_equal(out[b, t], wte[idx[b, t]])


def test_embedding_gradient(record_error):
    rng = np.random.default_rng(1)
    arrays = {"wte": rng.normal(size=(7, 5))}
    idx = np.array([[1, 3, 1, 0], [3, 3, 6, 2]])      # repeats (1 twice, 3 three times), 4 and 5 unused
    forward = lambda: embedding_forward(idx, arrays["wte"])
    _, cache = forward()
    dwte = embedding_backward(upstream((2, 4, 5)), cache)
    check(forward, arrays, {"wte": dwte}, record_error, "layers: embedding")
    assert np.all(dwte[[4, 5]] == 0.0), "unused tokens must get exactly zero gradient"


# ----------------------------------------------------------------------------------------------------
# layer norm

@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
def test_layernorm_forward_statistics(shape):
    rng = np.random.default_rng(2)
    x = 3.0 * rng.normal(size=shape) + 1.5
    C = shape[-1]
    out, _ = layernorm_forward(x, np.ones(C), np.zeros(C))
    var_x = np.var(x, axis=-1)
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-14)
    np.testing.assert_allclose(out.var(axis=-1), 1.0, atol=1e-5)                 # eps = 1e-5 shrinks it a hair
    np.testing.assert_allclose(out.var(axis=-1), var_x / (var_x + 1e-5), rtol=1e-12)   # exactly this much
    w, b = rng.normal(size=C), rng.normal(size=C)
    out2, _ = layernorm_forward(x, w, b)
    np.testing.assert_allclose(out2, ref.layer_norm(x, w, b), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
def test_layernorm_gradient(shape, record_error):
    rng = np.random.default_rng(3)
    C = shape[-1]
    arrays = {"x": rng.normal(size=shape), "w": 1.0 + 0.3 * rng.normal(size=C), "b": rng.normal(size=C)}
    forward = lambda: layernorm_forward(arrays["x"], arrays["w"], arrays["b"])
    _, cache = forward()
    G = upstream(shape)
    dx, dw, db = layernorm_backward(G, cache)
    check(forward, arrays, {"x": dx, "w": dw, "b": db}, record_error, "layers: layernorm")
    # a frozen layer norm: no dw, db computed, the same dx
    dx2, dw2, db2 = layernorm_backward(G, cache, need_dparams=False)
    assert dw2 is None and db2 is None
    np.testing.assert_array_equal(dx2, dx)


# ----------------------------------------------------------------------------------------------------
# linear

@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5)])
def test_linear_gradient(shape, record_error):
    rng = np.random.default_rng(4)
    arrays = {"x": rng.normal(size=shape), "w": rng.normal(size=(5, 4)), "b": rng.normal(size=4)}
    forward = lambda: linear_forward(arrays["x"], arrays["w"], arrays["b"])
    out, cache = forward()
    assert out.shape == shape[:-1] + (4,)
    np.testing.assert_allclose(out, np.einsum("...i,io->...o", arrays["x"], arrays["w"]) + arrays["b"],
                               rtol=1e-13, atol=1e-13)
    dx, dw, db = linear_backward(upstream(out.shape), cache)
    check(forward, arrays, {"x": dx, "w": dw, "b": db}, record_error, "layers: linear")


@pytest.mark.parametrize("need_dw,need_db", [(False, True), (True, False), (False, False)])
def test_linear_frozen_skips_weight_gradients(need_dw, need_db):
    rng = np.random.default_rng(5)
    x, w, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(5, 4)), rng.normal(size=4)
    out, cache = linear_forward(x, w, b)
    G = upstream(out.shape)
    dx, dw, db = linear_backward(G, cache)
    dx2, dw2, db2 = linear_backward(G, cache, need_dw=need_dw, need_db=need_db)
    np.testing.assert_array_equal(dx2, dx)
    assert (dw2 is None) == (not need_dw) and (db2 is None) == (not need_db)
    if need_dw:
        np.testing.assert_array_equal(dw2, dw)
    if need_db:
        np.testing.assert_array_equal(db2, db)


# ----------------------------------------------------------------------------------------------------
# GELU

def gelu_inputs():
    return np.concatenate([np.linspace(-6.0, 6.0, 25), np.random.default_rng(6).normal(size=11)]).reshape(4, 9)


def test_gelu_forward_is_the_tanh_formula():
    x = gelu_inputs()
    out, _ = gelu_forward(x)
    c = math.sqrt(2.0 / math.pi)
    expected = np.vectorize(lambda v: 0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v ** 3))))(x)
    np.testing.assert_allclose(out, expected, rtol=1e-14, atol=1e-15)
    # and it is an approximation of the exact GELU x * Phi(x), good to a few 1e-4
    exact = np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))(x)
    assert np.max(np.abs(out - exact)) < 1e-3
    assert gelu_forward(np.zeros(1))[0][0] == 0.0


def test_gelu_gradient(record_error):
    arrays = {"x": gelu_inputs()}
    forward = lambda: gelu_forward(arrays["x"])
    _, cache = forward()
    dx = gelu_backward(upstream(arrays["x"].shape), cache)
    check(forward, arrays, {"x": dx}, record_error, "layers: gelu")


# ----------------------------------------------------------------------------------------------------
# causal self-attention

B_, C_ = 2, 6
ATTN_CASES = [  # (T, P, n_head)
    (4, 0, 1), (4, 0, 2), (4, 0, 3),   # plain causal attention
    (4, 3, 2),                         # a past (KV cache or prefix) of 3 positions
    (1, 5, 2),                         # one generation step on a cache of 5
]


def attention_arrays(T, P, n_head, seed=7):
    rng = np.random.default_rng(seed)
    arrays = {"qkv": rng.normal(size=(B_, T, 3 * C_))}
    if P:
        hs = C_ // n_head
        arrays["past_k"] = rng.normal(size=(B_, n_head, P, hs))
        arrays["past_v"] = rng.normal(size=(B_, n_head, P, hs))
    return arrays


def attention_call(arrays, n_head):
    return attention_forward(arrays["qkv"], n_head, arrays.get("past_k"), arrays.get("past_v"))


@pytest.mark.parametrize("T,P,n_head", ATTN_CASES)
def test_attention_matches_reference(T, P, n_head):
    arrays = attention_arrays(T, P, n_head)
    out, cache = attention_call(arrays, n_head)
    assert out.shape == (B_, T, C_)
    for b in range(B_):
        expected = ref.causal_self_attention(arrays["qkv"][b], n_head,
                                             arrays["past_k"][b] if P else None,
                                             arrays["past_v"][b] if P else None)
        np.testing.assert_allclose(out[b], expected, rtol=1e-12, atol=1e-13)
    # the cache's keys and values are the past followed by this call's, for the next call
    k, v = cache[1], cache[2]
    assert k.shape == v.shape == (B_, n_head, P + T, C_ // n_head)
    if P:
        np.testing.assert_array_equal(k[:, :, :P], arrays["past_k"])
        np.testing.assert_array_equal(v[:, :, :P], arrays["past_v"])


@pytest.mark.parametrize("T,P,n_head", ATTN_CASES)
def test_attention_softmax_rows(T, P, n_head):
    arrays = attention_arrays(T, P, n_head)
    _, cache = attention_call(arrays, n_head)
    att = cache[3]                                                    # (B,NH,T,P+T)
    np.testing.assert_allclose(att.sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    visible = np.arange(P + T)[None, :] <= P + np.arange(T)[:, None]  # key j visible to new token t
    assert np.all(att[..., ~visible] == 0.0), "masked positions must get exactly zero weight"
    assert np.all(att[..., visible] > 0.0)


@pytest.mark.parametrize("T,P,n_head", [c for c in ATTN_CASES if c[0] > 1])
def test_attention_is_causal(T, P, n_head):
    arrays = attention_arrays(T, P, n_head)
    out, _ = attention_call(arrays, n_head)
    for t in range(T):
        changed = {k: a.copy() for k, a in arrays.items()}
        changed["qkv"][:, t] += 1.0 + np.random.default_rng(t).normal(size=(B_, 3 * C_))
        out2, _ = attention_call(changed, n_head)
        np.testing.assert_allclose(out2[:, :t], out[:, :t], rtol=0, atol=1e-15)  # the past never sees it
        assert np.all(np.abs(out2[:, t:] - out[:, t:]).max(axis=-1) > 1e-6)    # its own and later rows do


def test_attention_past_is_visible_to_every_new_token():
    arrays = attention_arrays(4, 3, 2)
    out, _ = attention_call(arrays, 2)
    changed = dict(arrays, past_v=arrays["past_v"] + 1.0)
    out2, _ = attention_call(changed, 2)
    assert np.all(np.abs(out2 - out).max(axis=-1) > 1e-6)


@pytest.mark.parametrize("T,P,n_head", ATTN_CASES)
def test_attention_gradient(T, P, n_head, record_error):
    arrays = attention_arrays(T, P, n_head)
    forward = lambda: attention_call(arrays, n_head)
    _, cache = forward()
    dqkv, dpast_k, dpast_v = attention_backward(upstream((B_, T, C_)), cache)
    grads = {"qkv": dqkv}
    if P:
        grads.update(past_k=dpast_k, past_v=dpast_v)
    else:
        assert dpast_k is None and dpast_v is None
    check(forward, arrays, grads, record_error, "layers: attention" + (" with past" if P else ""))


# ----------------------------------------------------------------------------------------------------
# cross-entropy

CE_TARGETS = {
    "all counted": [0, 4, 2, 2, 1, 3],
    "some ignored": [0, IGNORE_INDEX, 2, IGNORE_INDEX, 1, 3],
    "one counted": [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX],
}


@pytest.mark.parametrize("case", list(CE_TARGETS))
def test_cross_entropy_forward_is_minus_log_softmax(case):
    rng = np.random.default_rng(8)
    logits, targets = rng.normal(size=(6, 5)) * 2.0, np.array(CE_TARGETS[case])
    loss, _ = cross_entropy_forward(logits, targets)
    assert isinstance(loss, float)
    # written out by hand: -log(exp(z_t) / sum_j exp(z_j)), averaged over the counted rows only
    nll = [-math.log(math.exp(z[t]) / sum(math.exp(zj) for zj in z))
           for z, t in zip(logits, targets) if t != IGNORE_INDEX]
    assert loss == pytest.approx(sum(nll) / len(nll), rel=1e-13)
    assert loss == pytest.approx(ref.cross_entropy(logits, targets), rel=1e-13)
    # shifting every logit of a row changes nothing, even far beyond exp's range
    loss_shifted, _ = cross_entropy_forward(logits + 1000.0, targets)
    assert loss_shifted == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("case", list(CE_TARGETS))
def test_cross_entropy_gradient(case, record_error):
    rng = np.random.default_rng(9)
    arrays = {"logits": rng.normal(size=(6, 5)) * 2.0}
    targets = np.array(CE_TARGETS[case])
    dloss = 0.37    # any upstream gradient, not only 1
    _, cache = cross_entropy_forward(arrays["logits"], targets)
    dlogits = cross_entropy_backward(dloss, cache)
    assert np.all(dlogits[targets == IGNORE_INDEX] == 0.0), "ignored rows must get exactly zero gradient"
    f = lambda: dloss * cross_entropy_forward(arrays["logits"], targets)[0]
    rows = check_gradients(f, arrays, {"logits": dlogits})
    record_error("layers: cross_entropy", rows[0][2])
    assert rows[0][2] < TOL


def test_cross_entropy_all_ignored_is_an_error():
    with pytest.raises(ValueError, match="-100"):
        cross_entropy_forward(np.zeros((3, 5)), np.full(3, IGNORE_INDEX))


# ----------------------------------------------------------------------------------------------------
# LoRA

def lora_arrays(seed=10):
    rng = np.random.default_rng(seed)
    # B is random (not its zero init) so that every gradient is non-trivial
    return {"x": rng.normal(size=(2, 3, 5)), "A": rng.normal(size=(5, 2)), "B": rng.normal(size=(2, 4))}


def dropout_keep(shape, p=0.4, seed=11):
    return (np.random.default_rng(seed).random(shape) >= p) / (1.0 - p)


@pytest.mark.parametrize("dropout", [False, True])
def test_lora_forward(dropout):
    a = lora_arrays()
    keep = dropout_keep(a["x"].shape) if dropout else None
    out, _ = lora_forward(a["x"], a["A"], a["B"], 0.5, keep)
    xd = a["x"] * keep if dropout else a["x"]
    np.testing.assert_allclose(out, 0.5 * np.einsum("...i,ir,ro->...o", xd, a["A"], a["B"]), rtol=1e-13, atol=1e-13)
    zero, _ = lora_forward(a["x"], a["A"], np.zeros_like(a["B"]), 0.5, keep)
    assert np.all(zero == 0.0), "with B = 0 (its init) the update is exactly zero"


@pytest.mark.parametrize("dropout", [False, True])
def test_lora_gradient(dropout, record_error):
    arrays = lora_arrays()
    keep = dropout_keep(arrays["x"].shape) if dropout else None
    forward = lambda: lora_forward(arrays["x"], arrays["A"], arrays["B"], 0.5, keep)
    out, cache = forward()
    dx, dA, dB = lora_backward(upstream(out.shape), cache)
    if dropout:
        assert np.all(dx[keep == 0] == 0.0), "dropped inputs get no gradient through the LoRA path"
    check(forward, arrays, {"x": dx, "A": dA, "B": dB}, record_error, "layers: lora")


# ----------------------------------------------------------------------------------------------------
# adapter

def adapter_arrays(seed=12):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(2, 3, 6)), "w_down": rng.normal(size=(6, 3)), "b_down": rng.normal(size=3),
            "w_up": rng.normal(size=(3, 6)), "b_up": rng.normal(size=6)}


def adapter_call(a):
    return adapter_forward(a["x"], a["w_down"], a["b_down"], a["w_up"], a["b_up"])


def test_adapter_forward():
    a = adapter_arrays()
    out, _ = adapter_call(a)
    expected = a["x"] + ref.gelu(a["x"] @ a["w_down"] + a["b_down"]) @ a["w_up"] + a["b_up"]
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)
    identity, _ = adapter_call(dict(a, w_up=np.zeros((3, 6)), b_up=np.zeros(6)))
    np.testing.assert_array_equal(identity, a["x"])      # the init: exactly the identity


def test_adapter_gradient(record_error):
    arrays = adapter_arrays()
    forward = lambda: adapter_call(arrays)
    out, cache = forward()
    dx, dwd, dbd, dwu, dbu = adapter_backward(upstream(out.shape), cache)
    check(forward, arrays, {"x": dx, "w_down": dwd, "b_down": dbd, "w_up": dwu, "b_up": dbu},
          record_error, "layers: adapter")


# ----------------------------------------------------------------------------------------------------
# the gradient checker itself: it is exact where it should be, and it does catch wrong gradients

def test_numerical_gradient_of_a_known_function():
    rng = np.random.default_rng(13)
    x, w = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    x0 = x.copy()
    numeric = numerical_gradient(lambda: float(np.sum(np.sin(x) * w)), x)
    assert rel_error(w * np.cos(x), numeric) < 1e-9
    np.testing.assert_array_equal(x, x0)                 # x is restored exactly
    some = numerical_gradient(lambda: float(np.sum(np.sin(x) * w)), x, indices=[0, 5])
    assert np.count_nonzero(some) == 2 and some.reshape(-1)[5] == numeric.reshape(-1)[5]


def test_rel_error_definition():
    assert rel_error(np.ones(3), np.ones(3)) == 0.0
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0    # no 0/0
    assert rel_error([1.0, -2.0], [1.0, -2.2]) == pytest.approx(0.2 / 4.2)


def test_sample_indices():
    rng = np.random.default_rng(14)
    idx = sample_indices(100, 10, rng)
    assert len(set(idx.tolist())) == 10 and idx.min() >= 0 and idx.max() < 100
    np.testing.assert_array_equal(sample_indices(5, 10, rng), np.arange(5))


@pytest.mark.parametrize("mistake", ["scaled by 1 + 1e-6", "one entry off", "layernorm mean term dropped"])
def test_the_checker_catches_wrong_gradients(mistake, capsys):
    rng = np.random.default_rng(15)
    arrays = {"x": rng.normal(size=(3, 6)), "w": 1.0 + 0.3 * rng.normal(size=6), "b": rng.normal(size=6)}
    forward = lambda: layernorm_forward(arrays["x"], arrays["w"], arrays["b"])
    _, cache = forward()
    G = upstream((3, 6))
    dx, dw, db = layernorm_backward(G, cache)
    if mistake == "scaled by 1 + 1e-6":
        dx = dx * (1.0 + 1e-6)
    elif mistake == "one entry off":
        dx = dx.copy()
        dx[1, 2] += 1e-5 * np.abs(dx).max()
    else:
        xhat, rstd, w = cache
        dxhat = G * w
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    rows = check_gradients(lambda: float(np.sum(forward()[0] * G)), arrays, {"x": dx, "w": dw, "b": db})
    rel = {name: r for name, _, r in rows}
    assert rel["x"] > TOL, f"the checker missed a gradient {mistake}"
    assert rel["w"] < TOL and rel["b"] < TOL
    print_table(rows)
    table = capsys.readouterr().out
    assert "NO" in table and table.count("yes") == 2
