"""
The fine-tuning methods are exact: every gradient against centred finite differences, and every forward
against an independent computation of what the method is supposed to compute.

    LoRA      base + scale * (x @ A) @ B       == the plain GPT with A @ B merged into a copy of W
    prefix    the learned keys and values      == the plain GPT run with them as its KV cache (positions from P)
    prompt    learned vectors before the tokens == a hand-assembled forward over [prompt; wte[idx]]
    adapters  x + up(gelu(down(x)))            == a hand-assembled forward with the bottlenecks

The independent forward (`ref_logits`) is built from tests/reference_gpt2.py, which imports nothing from
tinyllm. Everything is float64 on a tiny GPT, with base and adapter weights moved away from their
initialisation (no zero LoRA B, no zero adapter up) so that no gradient and no difference is trivially zero.
"""
import re

import numpy as np
import pytest

import reference_gpt2 as ref
from tinyllm.gradcheck import check_gradients, numerical_gradient, rel_error
from tinyllm.layers import adapter_backward, adapter_forward, linear_forward, lora_backward, lora_forward
from tinyllm.model import GPT, gpt_forward, projection_forward
from tinyllm.peft import (AdapterConfig, LoraConfig, get_peft_model)
from tinyllm.peft.prefix import prefix_mlp_backward, prefix_mlp_forward
from peft_helpers import CFG, METHODS, make_base, make_batch, make_peft

PAIR_TOL = 1e-7      # one forward/backward pair, every entry
MODEL_TOL = 1e-6     # the whole model, sampled entries of every trainable tensor
EXACT = 1e-12        # two float64 computations of the same numbers

C, L, NH = CFG.n_embd, CFG.n_layer, CFG.n_head


# ----------------------------------------------------------------------------------------------------
# an independent forward: reference_gpt2's functions, one sequence at a time, with each method's addition

def heads(a):
    """(P,C) -> (NH,P,hs): head h owns columns h*hs:(h+1)*hs, as GPT-2 splits its keys."""
    return np.stack(np.split(a, NH, axis=-1))


def ref_logits(p, ids, prefix=None, prompt=None, adapters=False):
    """Logits (T,V) of the real tokens. prefix: {layer: (k (P,C), v (P,C))}; prompt: (P,C) input vectors."""
    x = p["wte.weight"][list(ids)]                                      # (T,C)
    n_prompt = 0
    if prompt is not None:
        x = np.vstack([prompt, x])                                      # (P+T,C)
        n_prompt = prompt.shape[0]
    P = 0 if prefix is None else prefix[0][0].shape[0]
    x = x + p["wpe.weight"][P:P + x.shape[0]]                           # real positions start after a prefix

    def adapter(a, name):
        if not adapters:
            return a
        d = ref.gelu(ref.linear(a, p[name + ".down.weight"], p[name + ".down.bias"]))
        return a + ref.linear(d, p[name + ".up.weight"], p[name + ".up.bias"])

    for i in range(L):
        h = f"h.{i}."
        a = ref.layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        a = ref.linear(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
        pk, pv = (None, None) if prefix is None else (heads(prefix[i][0]), heads(prefix[i][1]))
        a = ref.causal_self_attention(a, NH, pk, pv)
        a = ref.linear(a, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        x = x + adapter(a, h + "adapter_attn")
        m = ref.layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        m = ref.gelu(ref.linear(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"]))
        m = ref.linear(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
        x = x + adapter(m, h + "adapter_mlp")
    x = ref.layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])
    return (x @ p["wte.weight"].T)[n_prompt:]                           # (T,V)


def ref_batch(p, idx, **kw):
    return np.stack([ref_logits(p, row, **kw) for row in idx])


def merged_copy(base_params, adapter, scale):
    """The base weights with W += scale * A @ B for every LoRA pair, computed here, on copies."""
    p = {k: v.copy() for k, v in base_params.items()}
    for key in adapter:
        if not key.endswith(".lora_A"):
            continue
        module = key[:-len(".lora_A")]
        delta = scale * adapter[key] @ adapter[module + ".lora_B"]      # (in,r) @ (r,out)
        m = re.fullmatch(r"(.*\.c_attn)\.([qkv])", module)
        if m:                                                           # one third of the fused q|k|v
            j = "qkv".index(m.group(2))
            p[m.group(1) + ".weight"][:, j * C:(j + 1) * C] += delta
        else:
            p[module + ".weight"] += delta
    return p


def expected_scale(config):
    """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return config.lora_alpha / (np.sqrt(config.r) if config.use_rslora else config.r)


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ----------------------------------------------------------------------------------------------------
# each method's own forward/backward pair, every entry

def pair_check(f, arrays, analytic):
    """Worst relative error of analytic gradients of the scalar f() w.r.t. every array, all entries."""
    worst = 0.0
    for name, x in arrays.items():
        worst = max(worst, rel_error(analytic[name], numerical_gradient(f, x)))
    return worst


@pytest.mark.parametrize("with_dropout", [False, True])
def test_lora_pair_gradient(with_dropout, record_error):
    rng = np.random.default_rng(0)
    x, A, B = rng.normal(size=(2, 3, 5)), rng.normal(size=(5, 2)), rng.normal(size=(2, 4))
    keep = (rng.random((2, 3, 5)) >= 0.3) / 0.7 if with_dropout else None
    G = rng.normal(size=(2, 3, 4))                                      # dloss/dout of a loss sum(out * G)
    f = lambda: float(np.sum(lora_forward(x, A, B, 1.7, keep)[0] * G))
    out, cache = lora_forward(x, A, B, 1.7, keep)
    dx, dA, dB = lora_backward(G, cache)
    worst = pair_check(f, {"x": x, "A": A, "B": B}, {"x": dx, "A": dA, "B": dB})
    record_error("peft pair: lora", worst)
    assert worst < PAIR_TOL


def test_adapter_pair_gradient(record_error):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 6))
    wd, bd, wu, bu = rng.normal(size=(6, 3)), rng.normal(size=3), rng.normal(size=(3, 6)), rng.normal(size=6)
    G = rng.normal(size=(2, 3, 6))
    f = lambda: float(np.sum(adapter_forward(x, wd, bd, wu, bu)[0] * G))
    _, cache = adapter_forward(x, wd, bd, wu, bu)
    dx, dwd, dbd, dwu, dbu = adapter_backward(G, cache)
    worst = pair_check(f, dict(x=x, wd=wd, bd=bd, wu=wu, bu=bu), dict(x=dx, wd=dwd, bd=dbd, wu=dwu, bu=dbu))
    record_error("peft pair: adapter", worst)
    assert worst < PAIR_TOL


def test_prefix_mlp_pair_gradient(record_error):
    rng = np.random.default_rng(2)
    P, Cs, H, Ls = 2, 4, 3, 2
    e = "prefix_encoder."
    params = {e + "embedding.weight": rng.normal(size=(P, Cs)),
              e + "transform.0.weight": rng.normal(size=(Cs, H)), e + "transform.0.bias": rng.normal(size=H),
              e + "transform.2.weight": rng.normal(size=(H, 2 * Ls * Cs)),
              e + "transform.2.bias": rng.normal(size=2 * Ls * Cs)}
    prefixes, cache = prefix_mlp_forward(params, Ls)
    assert sorted(prefixes) == sorted(f"h.{i}.attn.prefix_{kv}" for i in range(Ls) for kv in "kv")
    G = {k: rng.normal(size=v.shape) for k, v in prefixes.items()}
    f = lambda: float(sum(np.sum(v * G[k]) for k, v in prefix_mlp_forward(params, Ls)[0].items()))
    grads = prefix_mlp_backward(G, cache, Ls)
    assert set(grads) == set(params)
    worst = pair_check(f, params, grads)
    record_error("peft pair: prefix mlp", worst)
    assert worst < PAIR_TOL


# ----------------------------------------------------------------------------------------------------
# through the whole model: backward() gives exactly the trainable keys, and every one is right

@pytest.mark.parametrize("method", list(METHODS))
def test_backward_returns_exactly_the_trainable_keys(method):
    pm = make_peft(method)
    idx, targets = make_batch()
    pm.forward(idx, targets)
    grads = pm.backward()
    params = pm.trainable_parameters()
    assert params, "a training method must train something"
    assert set(params) - set(grads) == set(), "trainable but given no gradient"
    assert set(grads) - set(params) == set(), "given a gradient but not trainable"
    for k, g in grads.items():
        assert g.shape == params[k].shape and g.dtype == np.float64, k


@pytest.mark.parametrize("method", list(METHODS))
def test_whole_model_gradcheck(method, record_error):
    pm = make_peft(method)
    idx, targets = make_batch()
    pm.forward(idx, targets)
    grads = pm.backward()
    params = pm.trainable_parameters()
    # every trainable tensor is checked; one that backward() left out counts as a zero gradient
    analytic = {k: grads.get(k, np.zeros_like(v)) for k, v in params.items()}
    rows = check_gradients(lambda: pm.forward(idx, targets)[1], params, analytic, n_samples=6, seed=1)
    worst = max(r[2] for r in rows)
    record_error(f"peft model: {method}", worst)
    assert worst < MODEL_TOL, [r for r in rows if r[2] >= MODEL_TOL]
    for k, g in analytic.items():
        assert np.any(g != 0), f"{k}: gradient is all zero, the check would prove nothing"


def test_gradcheck_with_lora_dropout(record_error):
    """With the dropout masks drawn from the same rng state in every call, dropout is a fixed function."""
    pm = get_peft_model(make_base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False,
                                                target_modules=["c_attn", "c_fc"]))
    idx, targets = make_batch()

    def loss():
        pm._rng = np.random.default_rng(5)       # the same masks in every call
        return pm.forward(idx, targets)[1]
    loss()
    grads = pm.backward()
    rows = check_gradients(loss, pm.trainable_parameters(), grads, n_samples=4, seed=2)
    worst = max(r[2] for r in rows)
    record_error("peft model: lora dropout", worst)
    assert worst < MODEL_TOL


# ----------------------------------------------------------------------------------------------------
# what each method computes

LORA_METHODS = ["lora c_attn", "lora all linears bias=all", "lora q,v slices", "lora rslora"]


@pytest.mark.parametrize("method", LORA_METHODS)
def test_lora_equals_weights_merged_by_hand(method):
    """The unmerged LoRA forward equals the plain GPT (the independent reference) with W + scale A @ B."""
    pm = make_peft(method)
    idx, _ = make_batch()
    adapter = pm.adapters["default"]
    merged = merged_copy(pm.base_model.params, adapter, expected_scale(pm.active_peft_config))
    logits = pm.forward(idx)[0]
    assert max_abs(logits, ref_batch(merged, idx)) < EXACT
    assert max_abs(logits, pm.base_model.forward(idx)[0]) > 1e-3        # and LoRA did change the output


def test_lora_scale():
    assert LoraConfig(r=4, lora_alpha=8).scale == 2.0
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scale == 4.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scale == 8.0
    assert LoraConfig(r=8).scale == 1.0                                   # PEFT's default lora_alpha is 8


@pytest.mark.parametrize("method", LORA_METHODS)
def test_merge_unmerge_and_merge_and_unload(method):
    pm = make_peft(method)
    idx, _ = make_batch()
    before = {k: v.copy() for k, v in pm.base_model.params.items()}
    unmerged = pm.forward(idx)[0]
    pm.merge_adapter()
    assert max_abs(pm.forward(idx)[0], unmerged) < EXACT
    changed = [k for k in before if not np.array_equal(before[k], pm.base_model.params[k])]
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in changed)
    pm.unmerge_adapter()
    for k, v in before.items():
        assert max_abs(pm.base_model.params[k], v) < EXACT, k
    assert max_abs(pm.forward(idx)[0], unmerged) < EXACT
    gpt = pm.merge_and_unload()
    assert isinstance(gpt, GPT) and gpt is pm.base_model
    assert not [k for k in gpt.params if "lora" in k]
    assert max_abs(gpt.forward(idx)[0], unmerged) < EXACT
    assert max_abs(ref_batch(gpt.params, idx), unmerged) < EXACT       # a plain GPT-2 now


@pytest.mark.parametrize("part", "qkv")
def test_slice_lora_changes_only_its_third(part):
    """LoRA on c_attn.q (or k, v) adds scale (x A) B to that third of c_attn's output and nothing else."""
    pm = get_peft_model(make_base(), LoraConfig(r=3, lora_alpha=5, target_modules=[f"c_attn.{part}"],
                                                init_lora_weights=False))
    base, adapter = pm.base_model.params, pm.adapters["default"]
    assert sorted(adapter) == sorted(f"h.{i}.attn.c_attn.{part}.lora_{ab}" for i in range(L) for ab in "AB")
    x = np.random.default_rng(3).normal(size=(2, 5, C))
    hooks = pm.method.hooks(pm.active_peft_config, adapter, CFG)
    out, _ = projection_forward(x, base, "h.1.attn.c_attn", hooks)
    plain, _ = linear_forward(x, base["h.1.attn.c_attn.weight"], base["h.1.attn.c_attn.bias"])   # the same matmul
    j = "qkv".index(part)
    ours = slice(j * C, (j + 1) * C)
    others = [k for k in range(3 * C) if not ours.start <= k < ours.stop]
    assert np.array_equal(out[..., others], plain[..., others])
    A, B = adapter[f"h.1.attn.c_attn.{part}.lora_A"], adapter[f"h.1.attn.c_attn.{part}.lora_B"]
    assert max_abs(out[..., ours], plain[..., ours] + (5 / 3) * (x @ A) @ B) < EXACT
    assert max_abs(out[..., ours], plain[..., ours]) > 1e-3
    # merging touches only that third of W, too
    W = base["h.1.attn.c_attn.weight"].copy()
    pm.merge_adapter()
    W_merged = base["h.1.attn.c_attn.weight"]
    assert np.array_equal(W_merged[:, others], W[:, others])
    assert max_abs(W_merged[:, ours], W[:, ours] + (5 / 3) * A @ B) < EXACT


INIT_IDENTITY = {
    "lora default init": lambda: LoraConfig(r=4, lora_alpha=16),
    "lora gaussian init": lambda: LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["c_attn", "c_fc"]),
    "lora q,v slices": lambda: LoraConfig(r=2, target_modules=["c_attn.q", "c_attn.v"]),
    "lora all linears": lambda: LoraConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"], bias="all"),
    "adapters": lambda: AdapterConfig(bottleneck_size=4),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", list(INIT_IDENTITY))
def test_lora_and_adapters_start_as_the_base_model_bit_for_bit(method, dtype):
    base = GPT(CFG, seed=0, dtype=dtype)
    rng = np.random.default_rng(9)
    for v in base.params.values():
        v += rng.normal(0.0, 0.1, v.shape).astype(dtype)
    idx, _ = make_batch()
    expected = base.forward(idx)[0]
    pm = get_peft_model(base, INIT_IDENTITY[method]())
    nonzero = [k for k, v in pm.adapters["default"].items() if np.any(v != 0)]
    assert nonzero, "the adapter's parameters should not all be zero (only B / up are)"
    logits = pm.forward(idx)[0]
    assert logits.dtype == dtype
    assert np.array_equal(logits, expected)


@pytest.mark.parametrize("method", ["prefix", "prefix projection"])
def test_prefix_equals_base_model_with_prefix_as_kv_cache(method):
    pm = make_peft(method)
    idx, _ = make_batch()
    P, B = 3, idx.shape[0]
    adapter = pm.adapters["default"]
    if method == "prefix":
        prefixes = adapter
    else:   # the MLP computed here: tanh(E W0 + b0) W2 + b2, columns laid out k0 | v0 | k1 | v1
        e = "prefix_encoder."
        hidden = np.tanh(adapter[e + "embedding.weight"] @ adapter[e + "transform.0.weight"]
                         + adapter[e + "transform.0.bias"])                                     # (P,H)
        out = hidden @ adapter[e + "transform.2.weight"] + adapter[e + "transform.2.bias"]       # (P,2LC)
        assert out.shape == (P, 2 * L * C)
        prefixes = {f"h.{i}.attn.prefix_{kv}": out[:, (2 * i + j) * C:(2 * i + j + 1) * C]
                    for i in range(L) for j, kv in enumerate("kv")}
    kv = {i: (prefixes[f"h.{i}.attn.prefix_k"], prefixes[f"h.{i}.attn.prefix_v"]) for i in range(L)}
    assert kv[0][0].shape == (P, C)
    logits = pm.forward(idx)[0]
    # 1. tinyllm's plain forward, the prefix handed over as a KV cache of P positions
    past = [tuple(np.broadcast_to(heads(a)[None], (B, NH, P, C // NH)) for a in kv[i]) for i in range(L)]
    plain, _, _ = gpt_forward(pm.base_model.params, idx, CFG, past=past)
    assert max_abs(logits, plain) < EXACT
    # 2. the independent reference: the real tokens sit at positions P, P+1, ...
    assert max_abs(logits, ref_batch(pm.base_model.params, idx, prefix=kv)) < EXACT
    assert max_abs(logits, pm.base_model.forward(idx)[0]) > 1e-3


def test_prompt_equals_base_model_on_prompt_then_tokens():
    pm = make_peft("prompt")
    idx, _ = make_batch()
    prompt = pm.adapters["default"]["prompt_embeddings"]
    assert prompt.shape == (3, C)
    logits = pm.forward(idx)[0]
    assert logits.shape == (2, idx.shape[1], CFG.vocab_size)              # only the real tokens are read out
    assert max_abs(logits, ref_batch(pm.base_model.params, idx, prompt=prompt)) < EXACT
    assert max_abs(logits, pm.base_model.forward(idx)[0]) > 1e-3


def test_adapters_equal_hand_assembled_forward():
    pm = make_peft("adapters")
    idx, _ = make_batch()
    p = {**pm.base_model.params, **pm.adapters["default"]}
    logits = pm.forward(idx)[0]
    assert max_abs(logits, ref_batch(p, idx, adapters=True)) < EXACT
    assert max_abs(logits, pm.base_model.forward(idx)[0]) > 1e-3


def test_full_fine_tuning_is_the_plain_model():
    pm = make_peft("full")
    idx, _ = make_batch()
    assert max_abs(pm.forward(idx)[0], ref_batch(pm.base_model.params, idx)) < EXACT


# ----------------------------------------------------------------------------------------------------
# LoRA dropout: on in train mode, off in eval mode

def test_lora_dropout_train_and_eval():
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    pm = get_peft_model(make_base(), LoraConfig(lora_dropout=0.5, **cfg))
    no_dropout = get_peft_model(make_base(), LoraConfig(lora_dropout=0.0, **cfg))
    for k, v in pm.adapters["default"].items():
        no_dropout.adapters["default"][k][...] = v
    idx, _ = make_batch()
    pm.train()
    a, b = pm.forward(idx)[0], pm.forward(idx)[0]
    assert max_abs(a, b) > 1e-3                                         # fresh masks each call
    pm.eval()
    c, d = pm.forward(idx)[0], pm.forward(idx)[0]
    assert np.array_equal(c, d)
    assert np.array_equal(c, no_dropout.forward(idx)[0])
    assert max_abs(a, c) > 1e-3
