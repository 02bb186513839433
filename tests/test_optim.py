"""AdamW against Adam's formulas written out by hand, gradient clipping, and the learning-rate schedule."""
import math

import numpy as np
import pytest

from tinyllm.optim import AdamW, clip_grad_norm, lr_schedule


def adamw_reference(p, g, m, v, t, lr, b1, b2, eps, wd):
    """One AdamW step from the paper's formulas, on float64 copies: returns the new p, m, v."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def test_adamw_matches_hand_computed_steps():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(2, 3)), rng.normal(size=3)
    params = {"w": w.copy(), "b": b.copy()}
    opt = AdamW(params, lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.5)
    m = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    v = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    expected = {"w": w, "b": b}
    for t, lr in ((1, None), (2, 0.05), (3, 0.2)):         # lr=None: the optimizer's own 0.1
        grads = {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}
        for k in grads:
            wd = 0.5 if k == "w" else 0.0                  # the 1-D tensor is not decayed
            expected[k], m[k], v[k] = adamw_reference(expected[k], grads[k], m[k], v[k], t,
                                                      0.1 if lr is None else lr, 0.8, 0.9, 1e-6, wd)
        opt.step(grads, lr=lr)
        for k in params:
            np.testing.assert_allclose(params[k], expected[k], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(opt.m[k], m[k], rtol=1e-12)
            np.testing.assert_allclose(opt.v[k], v[k], rtol=1e-12)
    assert opt.t == 3


def test_first_step_moves_each_entry_by_lr():
    # With bias correction, step 1 is lr * g / (|g| + eps): every entry moves by about lr, whatever |g|.
    params = {"b": np.array([1.0, 1.0, 1.0])}
    AdamW(params, lr=0.01, weight_decay=0.0).step({"b": np.array([1e-3, -5.0, 100.0])})
    np.testing.assert_allclose(params["b"], [0.99, 1.01, 0.99], rtol=1e-6)


def test_weight_decay_only_on_matrices():
    params = {"w": np.ones((3, 4)), "bias": np.ones(4), "ln.weight": np.ones(4)}
    zero = {k: np.zeros_like(a) for k, a in params.items()}     # Adam's own update is then exactly 0
    AdamW(params, lr=0.1, weight_decay=0.5).step(zero)
    np.testing.assert_array_equal(params["w"], np.full((3, 4), 1 - 0.1 * 0.5))
    np.testing.assert_array_equal(params["bias"], np.ones(4))
    np.testing.assert_array_equal(params["ln.weight"], np.ones(4))


def test_updates_in_place_keeps_float32_and_skips_missing_grads():
    w, b = np.ones((2, 2), np.float32), np.ones(2, np.float32)
    params = {"w": w, "b": b}
    opt = AdamW(params, lr=0.1)
    opt.step({"w": np.full((2, 2), 0.5)})                      # a float64 gradient; no gradient for b
    assert params["w"] is w and w.dtype == np.float32 and not np.all(w == 1)
    assert opt.m["w"].dtype == np.float32 and opt.v["w"].dtype == np.float32
    np.testing.assert_array_equal(b, np.ones(2, np.float32))


def test_state_dict_resumes_bit_identically_and_state_bytes():
    rng = np.random.default_rng(1)
    start = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    grads = [{k: rng.normal(size=a.shape).astype(np.float32) for k, a in start.items()} for _ in range(5)]
    a = AdamW({k: x.copy() for k, x in start.items()})
    for g in grads:
        a.step({k: x.copy() for k, x in g.items()})
    b_params = {k: x.copy() for k, x in start.items()}
    b = AdamW(b_params)
    for g in grads[:3]:
        b.step({k: x.copy() for k, x in g.items()})
    state = b.state_dict()
    c = AdamW(b_params)                                        # a fresh optimizer, as after a restart
    c.load_state_dict(state)
    for g in grads[3:]:
        c.step({k: x.copy() for k, x in g.items()})
    for k in start:
        np.testing.assert_array_equal(b_params[k], a.params[k])
        np.testing.assert_array_equal(c.m[k], a.m[k])
        np.testing.assert_array_equal(c.v[k], a.v[k])
    assert c.t == a.t == 5
    assert a.state_bytes() == 2 * (6 + 2) * 4
    with pytest.raises(ValueError, match="missing"):
        AdamW({"other": np.zeros(2)}).load_state_dict(state)


@pytest.mark.parametrize("kwargs, field", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=float("inf")), "lr"),
    (dict(betas=(1.0, 0.9)), "betas"), (dict(betas=(0.9, -0.1)), "betas"),
    (dict(eps=0.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdamW({"w": np.zeros((2, 2))}, **kwargs)


def test_step_rejects_unknown_names_and_wrong_shapes():
    opt = AdamW({"w": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="does not hold"):
        opt.step({"x": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": np.zeros(3)})


def test_clip_grad_norm_scales_all_tensors_together():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}      # global norm 5
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose([grads["a"][0], grads["b"][0, 0]], [0.6, 0.8], rtol=1e-5)
    small = {"a": np.array([0.3, 0.4])}                         # norm 0.5, under the limit: untouched
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])
    assert math.isnan(clip_grad_norm({"a": np.array([np.nan])}, 1.0))


def test_lr_schedule_endpoints_and_shape():
    lr = lambda s: lr_schedule(s, max_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr(0) == pytest.approx(0.1)                         # warmup starts at max_lr / warmup_steps
    assert lr(9) == pytest.approx(1.0) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)                        # half way down the cosine
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    decay = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_schedule(0, 3e-4, 0, 100) == pytest.approx(3e-4)  # no warmup: full lr at once
