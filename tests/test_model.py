"""
The whole model: tinyllm's GPT-2 against the independent reference (tests/reference_gpt2.py), a whole-model
gradient check of every parameter tensor, frozen parameters, the KV cache and generation, input and
config validation, state dicts, initialisation and float32.

Small configs throughout (float64 wherever a number is compared), so the file runs in seconds.
"""
import numpy as np
import pytest

import reference_gpt2 as ref
from tinyllm.gradcheck import check_gradients, numerical_gradient
from tinyllm.layers import IGNORE_INDEX
from tinyllm.model import GPT, GPT2_SMALL, GPTConfig, gpt_backward, gpt_forward, init_params, param_shapes

GRAD_TOL = 1e-6      # whole model, float64, centred differences
EXACT = 1e-12        # two float64 computations of the same numbers

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def random_params(config, seed=0, scale=0.3):
    """GPT-2-shaped float64 params moved well away from their init, so that no bias is zero, no layer-norm
    gain is one and attention is far from uniform: nothing is trivially right."""
    rng = np.random.default_rng(seed)
    p = init_params(config, seed, np.float64)
    for name, v in p.items():
        if ".ln_" in name or name.startswith("ln_f"):
            p[name] = (1.0 if name.endswith("weight") else 0.0) + 0.2 * rng.normal(size=v.shape)
        elif name.endswith("bias"):
            p[name] = 0.1 * rng.normal(size=v.shape)
        else:
            p[name] = scale * rng.normal(size=v.shape)
    return p


def random_batch(config, B, T, seed=0, n_ignored=0):
    rng = np.random.default_rng(100 + seed)
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    if n_ignored:
        flat = targets.reshape(-1)
        flat[rng.choice(flat.size, n_ignored, replace=False)] = IGNORE_INDEX
    return idx, targets


def max_rel_diff(a, b):
    return float(np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(b))))


# ----------------------------------------------------------------------------------------------------
# the forward equals the independent reference

CONFIGS = {
    "tiny": TINY,
    "one layer one head": dict(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=4),
    "three layers four heads": dict(vocab_size=13, block_size=6, n_layer=3, n_head=4, n_embd=12),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_ignored", [0, 3])
def test_logits_and_loss_equal_reference(name, n_ignored, record_error):
    config = GPTConfig(**CONFIGS[name])
    p = random_params(config, seed=1)
    idx, targets = random_batch(config, 2, config.block_size, seed=1, n_ignored=n_ignored)
    logits, loss, _ = gpt_forward(p, idx, config, targets)
    expected = ref.gpt2_batch(idx, p, config.n_layer, config.n_head)
    assert logits.shape == (2, config.block_size, config.vocab_size)
    record_error("model: logits vs reference (max rel diff)", max_rel_diff(logits, expected))
    assert max_rel_diff(logits, expected) < EXACT
    assert loss == pytest.approx(ref.cross_entropy(expected, targets), rel=EXACT)
    # a shorter sequence uses the first rows of wpe
    short, _, _ = gpt_forward(p, idx[:, :3], config)
    assert max_rel_diff(short, expected[:, :3]) < EXACT


def test_gpt_class_forward_equals_reference():
    model = GPT(TINY, seed=3, dtype=np.float64)
    model.load_state_dict(random_params(model.config, seed=3))
    idx, targets = random_batch(model.config, 3, 6, seed=3)
    logits, loss = model.forward(idx, targets)
    expected = ref.gpt2_batch(idx, model.params, model.config.n_layer, model.config.n_head)
    assert max_rel_diff(logits, expected) < EXACT
    assert loss == pytest.approx(ref.cross_entropy(expected, targets), rel=EXACT)
    assert model.forward(idx)[1] is None


# ----------------------------------------------------------------------------------------------------
# parameter names, shapes, counts, init

def gpt2_state_dict_names(n_layer):
    """Hugging Face GPT2Model's state-dict order (its attn.bias / masked_bias buffers are not parameters)."""
    names = ["wte.weight", "wpe.weight"]
    for i in range(n_layer):
        names += [f"h.{i}.{s}" for s in (
            "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
            "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias")]
    return names + ["ln_f.weight", "ln_f.bias"]


def test_param_names_in_gpt2_order():
    config = GPTConfig(**TINY)
    assert list(param_shapes(config)) == gpt2_state_dict_names(config.n_layer)
    assert list(GPT(config).params) == gpt2_state_dict_names(config.n_layer)
    assert list(GPT(config).state_dict()) == gpt2_state_dict_names(config.n_layer)


def test_gpt2_small_shapes_and_count():
    shapes = param_shapes(GPTConfig(**GPT2_SMALL))
    # the shapes of the released checkpoint (Conv1D weights stored (in, out))
    assert shapes["wte.weight"] == (50257, 768)
    assert shapes["wpe.weight"] == (1024, 768)
    assert shapes["h.11.attn.c_attn.weight"] == (768, 2304)
    assert shapes["h.0.mlp.c_fc.weight"] == (768, 3072)
    assert shapes["h.0.mlp.c_proj.weight"] == (3072, 768)
    assert len(shapes) == 2 + 12 * 12 + 2
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_439_808   # GPT-2 small, as published


def test_num_parameters_counts_the_arrays():
    model = GPT(TINY)
    assert model.num_parameters() == sum(v.size for v in model.params.values())
    assert model.num_parameters() == sum(int(np.prod(s)) for s in param_shapes(model.config).values())
    model.freeze(["wte.weight"])
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - model.params["wte.weight"].size


def test_init_statistics():
    config = GPTConfig(vocab_size=512, block_size=256, n_layer=4, n_head=4, n_embd=256)
    p = init_params(config, seed=0)
    residual_std = 0.02 / np.sqrt(2 * config.n_layer)
    for name, v in p.items():
        assert v.dtype == np.float32, name
        if ".ln_" in name or name.startswith("ln_f"):
            assert np.all(v == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert np.all(v == 0.0), name
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            x = v.astype(np.float64)
            # with n >= 65536 samples the estimate of std is good to ~0.3%, its mean to ~0.004 std
            assert abs(x.std() / std - 1.0) < 0.02, (name, x.std(), std)
            assert abs(x.mean()) < 0.02 * std, (name, x.mean())
    # seeded: the same seed gives the same weights, another seed other ones
    q = init_params(config, seed=0)
    assert all(np.array_equal(p[k], q[k]) for k in p)
    assert not np.array_equal(p["wte.weight"], init_params(config, seed=1)["wte.weight"])


# ----------------------------------------------------------------------------------------------------
# whole-model gradient check

GRAD_CASES = {  # (config, B, T, n_ignored)
    "tiny full context": (TINY, 2, 8, 0),
    "tiny short, some targets ignored": (TINY, 2, 5, 4),
    "one layer one head": (CONFIGS["one layer one head"], 1, 5, 0),
    "three layers four heads": (CONFIGS["three layers four heads"], 2, 4, 2),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_whole_model_gradcheck(case, record_error):
    cfg, B, T, n_ignored = GRAD_CASES[case]
    config = GPTConfig(**cfg)
    p = random_params(config, seed=2)
    idx, targets = random_batch(config, B, T, seed=2, n_ignored=n_ignored)
    _, _, cache = gpt_forward(p, idx, config, targets)
    grads = gpt_backward(cache, set(p))
    assert list(grads) and set(grads) == set(p), "every parameter must get a gradient"
    for name, g in grads.items():
        assert g.shape == p[name].shape and g.dtype == np.float64, name
    f = lambda: gpt_forward(p, idx, config, targets)[1]
    # 12 sampled entries of every tensor; all of wte, so both halves of the tied embedding are covered:
    # rows of tokens in idx (the input-embedding path plus the head) and rows of unused tokens (head only)
    full = {"wte.weight": grads["wte.weight"]}
    rows = check_gradients(f, p, full) + check_gradients(f, p, {k: g for k, g in grads.items() if k not in full},
                                                         n_samples=12, seed=2)
    worst = max(r for _, _, r in rows)
    record_error("model: whole-model gradcheck", worst)
    bad = [(n, r) for n, _, r in rows if not r < GRAD_TOL]
    assert not bad, f"gradient check failed: {bad}"
    # a position that is never used gets exactly no gradient
    assert np.all(grads["wpe.weight"][T:] == 0.0)


def test_tied_head_collects_both_gradients(record_error):
    """dL/dwte = (through the head) + (through the input embedding), each checked on its own against the
    reference, with a separate head matrix so the two uses can be varied independently."""
    config = GPTConfig(**TINY)
    p = random_params(config, seed=4)
    idx, targets = random_batch(config, 2, 5, seed=4)
    _, _, cache = gpt_forward(p, idx, config, targets)
    dwte = gpt_backward(cache, set(p))["wte.weight"]

    head = p["wte.weight"].copy()
    loss = lambda: ref.cross_entropy(ref.gpt2_batch(idx, p, config.n_layer, config.n_head, head), targets)
    num_head = numerical_gradient(loss, head)
    num_embed = numerical_gradient(loss, p["wte.weight"])           # the head is held fixed here
    rel = max_rel_diff(dwte, num_head + num_embed)
    record_error("model: tied wte (head + embedding, vs reference)", rel)
    assert rel < GRAD_TOL
    used = np.isin(np.arange(config.vocab_size), idx)
    assert np.all(num_embed[~used] == 0.0) and np.abs(num_embed[used]).max() > 1e-4   # the embedding path is real
    assert np.abs(num_head).max() > 1e-4


def test_gradients_with_past_as_constant(record_error):
    """A second chunk fed after a KV cache: the loss of the new tokens, the past held fixed. Checks that
    wpe's gradient lands on rows P..P+T-1."""
    config = GPTConfig(**TINY)
    p = random_params(config, seed=5)
    idx, targets = random_batch(config, 2, 7, seed=5)
    P = 3
    _, _, c0 = gpt_forward(p, idx[:, :P], config)
    past = [(k.copy(), v.copy()) for k, v in c0["present"]]
    f = lambda: gpt_forward(p, idx[:, P:], config, targets[:, P:], past=past)[1]
    _, _, cache = gpt_forward(p, idx[:, P:], config, targets[:, P:], past=past)
    grads = gpt_backward(cache, set(p))
    rows = check_gradients(f, p, grads, n_samples=12, seed=5)
    worst = max(r for _, _, r in rows)
    record_error("model: gradcheck after a KV cache", worst)
    assert worst < GRAD_TOL, rows
    dwpe = grads["wpe.weight"]
    assert np.all(dwpe[:P] == 0.0) and np.all(dwpe[7:] == 0.0) and np.all(np.abs(dwpe[P:7]).max(axis=1) > 0)


def test_ignored_targets_restrict_the_loss():
    config = GPTConfig(**TINY)
    p = random_params(config, seed=6)
    idx, targets = random_batch(config, 2, 6, seed=6)
    masked = targets.copy()
    masked[:, :4] = IGNORE_INDEX          # only the last two positions are predicted
    _, loss, cache = gpt_forward(p, idx, config, masked)
    grads = gpt_backward(cache, set(p))
    # the loss is the mean over the counted positions only
    logits = ref.gpt2_batch(idx, p, config.n_layer, config.n_head)
    assert loss == pytest.approx(ref.cross_entropy(logits[:, 4:], targets[:, 4:]), rel=EXACT)
    # and so is its gradient: the same as a forward that only ever had those targets
    f = lambda: ref.cross_entropy(ref.gpt2_batch(idx, p, config.n_layer, config.n_head)[:, 4:], targets[:, 4:])
    rows = check_gradients(f, p, {k: grads[k] for k in ("wpe.weight", "h.1.mlp.c_fc.weight", "ln_f.bias")},
                           n_samples=10, seed=6)
    assert max(r for _, _, r in rows) < GRAD_TOL, rows
    # positions 0..3 predict nothing, but they are still inputs that later positions attend to
    assert np.all(np.abs(grads["wpe.weight"][:4]).max(axis=1) > 0)


# ----------------------------------------------------------------------------------------------------
# frozen parameters

def _all_but(pred):
    return lambda names: {n for n in names if not pred(n)}


FREEZE = {
    "embeddings frozen": _all_but(lambda n: n in ("wte.weight", "wpe.weight")),
    "block 0 frozen": _all_but(lambda n: n.startswith("h.0.")),
    "only ln_f trains": lambda names: {"ln_f.weight", "ln_f.bias"},
    "nothing trains": lambda names: set(),
    "linear and embedding weights frozen":
        _all_but(lambda n: ".c_" in n and n.endswith("weight") or n in ("wte.weight", "wpe.weight")),
    "BitFit: only biases train": lambda names: {n for n in names if n.endswith("bias")},
    "one layer-norm gain frozen": _all_but(lambda n: n == "h.0.ln_1.weight"),
    "one layer-norm bias frozen": _all_but(lambda n: n == "h.1.ln_2.bias"),
}


@pytest.mark.parametrize("case", list(FREEZE))
def test_frozen_parameters(case):
    model = GPT(TINY, seed=7, dtype=np.float64)
    model.load_state_dict(random_params(model.config, seed=7))
    idx, targets = random_batch(model.config, 2, 6, seed=7)
    model.forward(idx, targets)
    full = model.backward()
    model.trainable = FREEZE[case](set(model.params))
    model.forward(idx, targets)
    grads = model.backward()
    assert set(grads) == model.trainable, (f"missing {sorted(model.trainable - set(grads))}, "
                                           f"frozen but returned {sorted(set(grads) - model.trainable)}")
    for name, g in grads.items():
        np.testing.assert_array_equal(g, full[name], err_msg=name)


def test_freeze_and_unfreeze():
    model = GPT(TINY)
    model.freeze()
    assert model.trainable == set() and model.trainable_parameters() == {}
    model.unfreeze(["ln_f.bias"])
    tp = model.trainable_parameters()
    assert list(tp) == ["ln_f.bias"] and tp["ln_f.bias"] is model.params["ln_f.bias"]   # live arrays
    model.unfreeze()
    assert model.trainable == set(model.params)


# ----------------------------------------------------------------------------------------------------
# KV cache and generation

@pytest.mark.parametrize("chunks", [[1] * 8, [3, 2, 3], [5, 1, 1, 1]])
def test_kv_cache_equals_full_recompute(chunks, record_error):
    config = GPTConfig(**TINY)
    p = random_params(config, seed=8)
    idx, _ = random_batch(config, 2, sum(chunks), seed=8)
    full, _, _ = gpt_forward(p, idx, config)
    assert max_rel_diff(full, ref.gpt2_batch(idx, p, config.n_layer, config.n_head)) < EXACT
    past, start = None, 0
    for n in chunks:
        logits, _, cache = gpt_forward(p, idx[:, start:start + n], config, past=past)
        diff = max_rel_diff(logits, full[:, start:start + n])
        record_error("model: KV cache vs full recompute (max rel diff)", diff)
        assert diff < EXACT, f"tokens {start}..{start + n - 1}"
        past, start = cache["present"], start + n
        assert past[0][0].shape == (2, config.n_head, start, config.n_embd // config.n_head)
    with pytest.raises(ValueError, match="block_size"):
        gpt_forward(p, idx[:, :1], config, past=past)     # the cache is full


def greedy_reference(p, config, idx, n_new):
    """Greedy decoding the slow way: recompute the whole (last block_size tokens of the) sequence each step."""
    out = [list(row) for row in idx]
    for _ in range(n_new):
        for row in out:
            logits = ref.gpt2(row[-config.block_size:], p, config.n_layer, config.n_head)
            row.append(int(np.argmax(logits[-1])))
    return np.array(out)


def generating_model(seed=9):
    model = GPT(dict(TINY, block_size=6), seed=seed, dtype=np.float64)
    model.load_state_dict(random_params(model.config, seed=seed, scale=0.6))
    return model


@pytest.mark.parametrize("n_new", [1, 2, 9])   # 9: 4 + 9 = 13 tokens, well past block_size 6
def test_generate_greedy_equals_full_recompute(n_new):
    model = generating_model()
    idx, _ = random_batch(model.config, 2, 4, seed=9)
    out = model.generate(idx, n_new, temperature=0)
    assert out.shape == (2, 4 + n_new)
    np.testing.assert_array_equal(out[:, :4], idx)
    np.testing.assert_array_equal(out, greedy_reference(model.params, model.config, idx, n_new))


def test_generate_top_k_1_is_greedy():
    model = generating_model()
    idx, _ = random_batch(model.config, 2, 3, seed=10)
    np.testing.assert_array_equal(model.generate(idx, 8, temperature=1.0, top_k=1, seed=0),
                                  model.generate(idx, 8, temperature=0))


def test_generate_with_a_seed_is_reproducible():
    model = generating_model()
    idx, _ = random_batch(model.config, 2, 3, seed=11)
    a = model.generate(idx, 10, temperature=1.0, seed=123)
    np.testing.assert_array_equal(a, model.generate(idx, 10, temperature=1.0, seed=123))
    np.testing.assert_array_equal(model.generate(idx, 10, temperature=0.8, top_k=3, seed=5),
                                  model.generate(idx, 10, temperature=0.8, top_k=3, seed=5))
    others = [model.generate(idx, 10, temperature=1.0, seed=s) for s in range(1, 5)]
    assert any(not np.array_equal(a, o) for o in others), "the seed must matter"
    assert all(np.all((o >= 0) & (o < model.config.vocab_size)) for o in others)


def test_generate_zero_tokens_and_bad_arguments():
    model = generating_model()
    idx, _ = random_batch(model.config, 1, 3, seed=12)
    np.testing.assert_array_equal(model.generate(idx, 0), idx)
    for kwargs, field in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2, temperature=-1.0),
                          "temperature"), (dict(max_new_tokens=2, top_k=0), "top_k")]:
        with pytest.raises(ValueError, match=field):
            model.generate(idx, **kwargs)


# ----------------------------------------------------------------------------------------------------
# input and config validation

def test_forward_input_errors():
    model = GPT(TINY)
    V, T = model.config.vocab_size, model.config.block_size
    good = np.zeros((2, 4), dtype=np.int64)
    bad = good.copy()
    bad[1, 3] = V
    with pytest.raises(ValueError, match=r"idx\[1, 3\] = 11.*\[0, 11\)"):
        model.forward(bad)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match=r"idx\[1, 3\] = -1"):
        model.forward(bad)
    with pytest.raises(ValueError, match="2-D.*idx\\[None, :\\]"):
        model.forward(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        model.forward(np.zeros((1, 2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        model.forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="empty"):
        model.forward(np.zeros((2, 0), dtype=np.int64))
    with pytest.raises(ValueError, match=f"{T + 1}.*block_size is {T}"):
        model.forward(np.zeros((1, T + 1), dtype=np.int64))
    with pytest.raises(ValueError, match=r"targets has shape \(2, 3\) but idx has shape \(2, 4\)"):
        model.forward(good, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="targets"):
        model.forward(good, np.full((2, 4), V))
    with pytest.raises(ValueError, match="-100"):
        model.forward(good, np.full((2, 4), IGNORE_INDEX))     # nothing to predict
    model.forward(good.tolist(), good.tolist())                   # lists are fine


def test_backward_needs_a_forward_with_targets():
    model = GPT(TINY)
    with pytest.raises(RuntimeError, match="targets"):
        model.backward()
    model.forward(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(RuntimeError, match="targets"):
        model.backward()


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_embd=10, n_head=3), "n_embd"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=-4), "block_size"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=True), "n_head"),
    (dict(n_layer=False), "n_layer"),
    (dict(n_embd=8.0), "n_embd"),
    (dict(vocab_size="11"), "vocab_size"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**dict(TINY, **kwargs))


def test_config_accepts_numpy_ints_and_round_trips():
    config = GPTConfig(**{k: np.int64(v) for k, v in TINY.items()})
    assert config.to_dict() == TINY and all(type(v) is int for v in config.to_dict().values())
    assert GPT(TINY).config == GPTConfig(**TINY)


# ----------------------------------------------------------------------------------------------------
# state dicts

def test_state_dict_round_trip():
    a, b = GPT(TINY, seed=0), GPT(TINY, seed=1)
    idx, _ = random_batch(a.config, 2, 5, seed=13)
    assert not np.array_equal(a.forward(idx)[0], b.forward(idx)[0])
    live = dict(b.params)
    state = a.state_dict()
    b.load_state_dict(state)
    np.testing.assert_array_equal(a.forward(idx)[0], b.forward(idx)[0])
    assert all(b.params[k] is live[k] for k in live), "loading writes into the live arrays (an optimizer holds them)"
    state["wte.weight"][...] = 0.0                     # state_dict returns copies
    assert np.any(a.params["wte.weight"] != 0.0)


def test_load_state_dict_errors():
    model = GPT(TINY)
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "h.1.ln_2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['h.1.ln_2.bias'\]"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['lm_head.weight'\]"):
        model.load_state_dict(dict(state, **{"lm_head.weight": state["wte.weight"]}))
    with pytest.raises(ValueError, match=r"h.0.attn.c_attn.weight has shape \(24, 8\).*\(8, 24\)"):
        model.load_state_dict(dict(state, **{"h.0.attn.c_attn.weight": state["h.0.attn.c_attn.weight"].T}))
    with pytest.raises(ValueError, match="missing keys"):
        model.load_state_dict(GPT(dict(TINY, n_layer=1)).state_dict())


# ----------------------------------------------------------------------------------------------------
# float32 stays float32

def test_float32_model_stays_float32():
    model = GPT(TINY)                                   # float32 is the default
    assert model.dtype == np.float32
    idx, targets = random_batch(model.config, 2, 6, seed=14, n_ignored=2)
    logits, loss = model.forward(idx, targets)
    assert logits.dtype == np.float32 and isinstance(loss, float)
    grads = model.backward()
    assert set(grads) == set(model.params)
    assert {n: g.dtype for n, g in grads.items() if g.dtype != np.float32} == {}
    assert model.generate(idx[:, :2], 3, temperature=0).dtype.kind == "i"
    # and the float32 numbers are the float64 ones, rounded
    m64 = GPT(TINY, dtype=np.float64)
    m64.load_state_dict(model.state_dict())
    logits64, loss64 = m64.forward(idx, targets)
    grads64 = m64.backward()
    assert max_rel_diff(logits, logits64) < 1e-5 and loss == pytest.approx(loss64, rel=1e-5)
    assert max(max_rel_diff(grads[n], grads64[n]) for n in grads) < 1e-3
