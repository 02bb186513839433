"""
PeftModel's behaviour: the base stays frozen (and gets no weight gradient computed), parameters are
counted as PEFT counts them, target_modules and configs are checked, several adapters share one base,
adapters save and load on their own, and generation with a KV cache equals full recomputes.

float64 on a tiny GPT, base and adapter weights moved off their initial values, as in test_peft_methods.py.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import tinyllm.model
from tinyllm.checkpoint import CheckpointError, save_checkpoint
from tinyllm.layers import IGNORE_INDEX
from tinyllm.model import GPT, GPTConfig, param_shapes
from tinyllm.peft import (AdapterConfig, FullFineTuningConfig, LoraConfig, PeftModel, PrefixTuningConfig,
                          PromptTuningConfig, get_peft_model)
from tinyllm.peft.saving import read_adapter, weights_file
from peft_helpers import CFG, METHODS, make_base, make_peft

EXACT = 1e-12
V, T_MAX, C, L = CFG.vocab_size, CFG.block_size, CFG.n_embd, CFG.n_layer
P = 3    # virtual tokens of the prefix and prompt configs in METHODS
PEFT_METHODS = [m for m in METHODS if not m.startswith("full")]

def make_batch(B=2, T=6, seed=0):
    rng = np.random.default_rng(100 + seed)
    idx = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    targets[0, 1] = IGNORE_INDEX
    return idx, targets


def sgd_steps(pm, n=3, lr=0.1, seed=0):
    """n plain steps p -= lr * g on pm.trainable_parameters() (the live arrays)."""
    for step in range(n):
        idx, targets = make_batch(seed=seed + step)
        pm.forward(idx, targets)
        grads = pm.backward()
        params = pm.trainable_parameters()
        for k, g in grads.items():
            params[k] -= lr * g


def snapshot(params):
    return {k: v.copy() for k, v in params.items()}


# ----------------------------------------------------------------------------------------------------
# the base model stays frozen

@pytest.mark.parametrize("method", list(METHODS))
def test_training_leaves_the_frozen_base_bit_identical(method):
    pm = make_peft(method)
    base_before = snapshot(pm.base_model.params)
    adapter_before = snapshot(pm.adapters["default"])
    trainable = set(pm.trainable_parameters())
    sgd_steps(pm)
    for k, v in pm.base_model.params.items():
        if k in trainable:            # full fine-tuning, or base biases under LoraConfig(bias='all'|'lora_only')
            assert not np.array_equal(v, base_before[k]), f"{k} is trainable but did not change"
        else:
            assert np.array_equal(v, base_before[k]), f"{k} is frozen but changed"
    for k, v in pm.adapters["default"].items():
        assert not np.array_equal(v, adapter_before[k]), f"{k} did not train"
    if method.startswith("full"):
        assert any(k.endswith(".weight") for k in trainable)
    else:
        assert all(k.endswith(".bias") for k in trainable & set(base_before)), "only biases of the base may train"


@pytest.mark.parametrize("method", PEFT_METHODS + ["full"])
def test_frozen_linears_never_compute_weight_gradients(method, monkeypatch):
    """Spy on the linear and layer-norm backwards the model calls: under a PEFT method every base linear is
    asked for dx only (bias gradients only with bias='all'|'lora_only'), every layer norm for dx only."""
    linear_calls, ln_calls = [], []
    real_linear, real_ln = tinyllm.model.linear_backward, tinyllm.model.layernorm_backward

    def linear_spy(dout, cache, need_dw=True, need_db=True):
        linear_calls.append((need_dw, need_db))
        return real_linear(dout, cache, need_dw, need_db)

    def ln_spy(dout, cache, need_dparams=True):
        ln_calls.append(need_dparams)
        return real_ln(dout, cache, need_dparams)
    monkeypatch.setattr(tinyllm.model, "linear_backward", linear_spy)
    monkeypatch.setattr(tinyllm.model, "layernorm_backward", ln_spy)
    pm = make_peft(method)
    pm.forward(*make_batch())
    pm.backward()
    assert len(linear_calls) == 4 * L and len(ln_calls) == 2 * L + 1   # every base linear and layer norm
    if method.startswith("full"):                                       # the spy does see weight gradients
        assert all(dw and db for dw, db in linear_calls) and all(ln_calls)
        return
    assert not any(dw for dw, _ in linear_calls)
    if "bias=" in method:
        assert all(db for _, db in linear_calls)
    else:
        assert not any(db for _, db in linear_calls)
        assert not any(ln_calls)


# ----------------------------------------------------------------------------------------------------
# counting parameters

def test_print_trainable_parameters_gpt2_small_matches_peft(capsys, monkeypatch):
    """PEFT's published output for GPT-2 small with LoRA r=8 on c_attn. Building GPT-2 small with its
    random init takes ~6-7 s here; the count does not depend on the values, so zeros stand in for them."""
    def zeros(config, seed=0, dtype=np.float32):
        return {k: np.zeros(s, dtype) for k, s in param_shapes(config).items()}
    monkeypatch.setattr(tinyllm.model, "init_params", zeros)
    gpt2 = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert gpt2.dtype == np.float32 and gpt2.num_parameters() == 124_439_808
    pm = get_peft_model(gpt2, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    capsys.readouterr()
    pm.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364\n"


def expected_trainable(method):
    """The count of each method on CFG, worked out from the method's definition."""
    r_attn = 4 * (C + 3 * C) * L                                           # r (in + out), c_attn in every block
    linears = (C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C)            # in + out of the four linears
    block = 12 * C * C + 13 * C                                            # one transformer block
    base = V * C + T_MAX * C + L * block + 2 * C
    return {
        "lora c_attn": r_attn,
        "lora rslora": r_attn,
        "lora q,v slices": 4 * (C + C) * 2 * L,
        # every bias, the layer norms' too (as PEFT's bias='all'), or only the targeted linears'
        "lora all linears bias=all": 2 * linears * L + L * (C + 3 * C + C + C + 4 * C + C) + C,
        "lora all linears bias=lora_only": 2 * linears * L + L * (3 * C + C + 4 * C + C),
        "prefix": 2 * L * P * C,
        "prefix projection": P * C + (C * 8 + 8) + (8 * 2 * L * C + 2 * L * C),
        "prompt": P * C,
        "adapters": 2 * L * (C * 4 + 4 + 4 * C + C),
        "ia3": (3 * C + 4 * C) * L,                                          # c_attn's output, mlp.c_proj's input
        "ia3 every linear": (3 * C + C + C + 4 * C) * L,                     # + attn.c_proj's output, c_fc's input
        "full": base,
        "full last_k_blocks=1": block + 2 * C,
    }[method], base


@pytest.mark.parametrize("method", list(METHODS))
def test_counting_rule_and_formula(method, capsys):
    pm = make_peft(method)
    trainable, base = expected_trainable(method)
    adapters = sum(v.size for v in pm.adapters["default"].values())
    assert trainable == sum(v.size for v in pm.trainable_parameters().values())
    assert pm.get_nb_trainable_parameters() == (trainable, base + adapters)
    capsys.readouterr()
    pm.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,} || all params: {base + adapters:,} || "
                                       f"trainable%: {100 * trainable / (base + adapters):.4f}\n")
    totals = [int(n.replace(",", "")) for n in re.findall(r"= ([\d,]+)(?=\s|\)|$)", pm.formula())]
    assert totals, pm.formula()
    # the formula's result is the trainable count (with prefix_projection: its first total, the MLP's size)
    assert (totals[0] if method == "prefix projection" else totals[-1]) == trainable, pm.formula()


# ----------------------------------------------------------------------------------------------------
# target_modules

def lora_modules(config):
    pm = get_peft_model(make_base(), config)
    return sorted(k[:-len(".lora_A")] for k in pm.adapters["default"] if k.endswith(".lora_A"))


def test_target_modules_suffix_regex_full_names_and_layers():
    assert lora_modules(LoraConfig(target_modules=["c_proj"], r=2)) == sorted(
        f"h.{i}.{m}.c_proj" for i in range(L) for m in ("attn", "mlp"))
    assert lora_modules(LoraConfig(target_modules=["c_attn", "c_fc"], r=2)) == sorted(
        [f"h.{i}.attn.c_attn" for i in range(L)] + [f"h.{i}.mlp.c_fc" for i in range(L)])
    assert lora_modules(LoraConfig(target_modules=["mlp.c_proj"], r=2)) == [f"h.{i}.mlp.c_proj" for i in range(L)]
    assert lora_modules(LoraConfig(target_modules=r"h\.1\.(attn\.c_proj|mlp\.c_fc)", r=2)) == [
        "h.1.attn.c_proj", "h.1.mlp.c_fc"]
    assert lora_modules(LoraConfig(target_modules=r".*c_proj", r=2)) == sorted(
        f"h.{i}.{m}.c_proj" for i in range(L) for m in ("attn", "mlp"))
    assert lora_modules(LoraConfig(target_modules=["h.0.attn.c_attn", "h.1.mlp.c_proj"], r=2)) == [
        "h.0.attn.c_attn", "h.1.mlp.c_proj"]
    assert lora_modules(LoraConfig(target_modules=["c_attn.v"], r=2)) == [f"h.{i}.attn.c_attn.v" for i in range(L)]
    assert lora_modules(LoraConfig(target_modules=["c_proj"], layers_to_transform=[1], r=2)) == [
        "h.1.attn.c_proj", "h.1.mlp.c_proj"]
    assert lora_modules(LoraConfig(target_modules=["c_attn"], layers_to_transform=0, r=2)) == ["h.0.attn.c_attn"]


def test_lora_shapes():
    pm = get_peft_model(make_base(), LoraConfig(r=3, target_modules=["c_attn", "c_fc", "mlp.c_proj"]))
    a = pm.adapters["default"]
    assert a["h.0.attn.c_attn.lora_A"].shape == (C, 3) and a["h.0.attn.c_attn.lora_B"].shape == (3, 3 * C)
    assert a["h.1.mlp.c_fc.lora_A"].shape == (C, 3) and a["h.1.mlp.c_fc.lora_B"].shape == (3, 4 * C)
    assert a["h.1.mlp.c_proj.lora_A"].shape == (4 * C, 3) and a["h.1.mlp.c_proj.lora_B"].shape == (3, C)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["q_proj"]), r"'q_proj'.*valid names.*c_attn.*c_fc.*c_proj"),
    (dict(target_modules=["c_attn", "nope"]), r"'nope'.*c_attn"),
    (dict(target_modules=r"h\.9\..*"), r"regex.*matches no module"),
    (dict(target_modules=["c_attn"], r=C + 1), r"r = 17.*larger"),
    (dict(target_modules=["c_attn.q"], r=C + 1), r"r = 17.*larger"),
    (dict(target_modules=["c_proj"], r=C + 1), r"r = 17.*larger"),
    (dict(target_modules=["c_attn", "c_attn.q"]), r"c_attn.*slices"),
    (dict(target_modules=r"h\.0\.attn\.c_attn.*"), r"c_attn.*slices"),
    (dict(target_modules=["c_attn"], layers_to_transform=[2]), r"layers_to_transform"),
])
def test_target_modules_errors(config, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_base(), LoraConfig(**{"r": 2, **config}))


def test_largest_allowed_rank():
    assert len(lora_modules(LoraConfig(target_modules=["c_attn.k"], r=C))) == L


# ----------------------------------------------------------------------------------------------------
# config validation

@pytest.mark.parametrize("cls, kwargs, field", [
    (LoraConfig, dict(r=0), r"LoraConfig\.r\b"),
    (LoraConfig, dict(r=2.5), r"LoraConfig\.r\b"),
    (LoraConfig, dict(r=True), r"LoraConfig\.r\b"),
    (LoraConfig, dict(lora_alpha=0), "lora_alpha"),
    (LoraConfig, dict(lora_alpha=-4), "lora_alpha"),
    (LoraConfig, dict(lora_dropout=1.0), "lora_dropout"),
    (LoraConfig, dict(lora_dropout=-0.1), "lora_dropout"),
    (LoraConfig, dict(bias="some"), "bias"),
    (LoraConfig, dict(init_lora_weights="kaiming"), "init_lora_weights"),
    (LoraConfig, dict(target_modules=[]), "target_modules"),
    (PrefixTuningConfig, dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (PrefixTuningConfig, dict(num_virtual_tokens=2.0), "num_virtual_tokens"),
    (PrefixTuningConfig, dict(encoder_hidden_size=0), "encoder_hidden_size"),
    (PrefixTuningConfig, dict(init="zeros"), r"PrefixTuningConfig\.init\b"),
    (PrefixTuningConfig, dict(init="text"), "init_text"),
    (PrefixTuningConfig, dict(init_std=0.0), "init_std"),
    (PromptTuningConfig, dict(num_virtual_tokens=-1), "num_virtual_tokens"),
    (PromptTuningConfig, dict(prompt_tuning_init="random"), "prompt_tuning_init"),
    (PromptTuningConfig, dict(prompt_tuning_init="TEXT"), "prompt_tuning_init_text"),
    (AdapterConfig, dict(bottleneck_size=0), "bottleneck_size"),
    (AdapterConfig, dict(init_std=-1.0), "init_std"),
    (FullFineTuningConfig, dict(last_k_blocks=0), "last_k_blocks"),
])
def test_config_errors_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


@pytest.mark.parametrize("config, field", [
    (lambda: FullFineTuningConfig(last_k_blocks=L + 1), "last_k_blocks"),
    (lambda: AdapterConfig(layers_to_transform=[L]), "layers_to_transform"),
    (lambda: PrefixTuningConfig(prefix_projection=True, init="text", init_text="abc"), "prefix_projection"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=T_MAX), "num_virtual_tokens"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=T_MAX + 5), "num_virtual_tokens"),
    (lambda: PromptTuningConfig(num_virtual_tokens=T_MAX), "num_virtual_tokens"),
])
def test_config_errors_that_need_the_model(config, field):
    with pytest.raises(ValueError, match=field):
        get_peft_model(make_base(), config())


def test_get_peft_model_rejects_a_non_config():
    with pytest.raises(TypeError, match="LoraConfig"):
        get_peft_model(make_base(), {"r": 8})


@pytest.mark.parametrize("method", ["prefix", "prefix projection", "prompt"])
def test_virtual_tokens_plus_input_must_fit_the_context(method):
    pm = make_peft(method)
    pm.forward(np.zeros((1, T_MAX - P), dtype=np.int64))                # exactly full: fine
    with pytest.raises(ValueError, match="block_size"):
        pm.forward(np.zeros((1, T_MAX - P + 1), dtype=np.int64))


# ----------------------------------------------------------------------------------------------------
# several adapters on one base

def test_multiple_lora_adapters(tmp_path):
    base = make_base()
    idx, _ = make_batch()
    base_logits = base.forward(idx)[0]
    pm = make_peft("lora c_attn", base=base)
    pm.add_adapter("mlp", LoraConfig(r=2, lora_alpha=2, target_modules=["c_fc"], init_lora_weights=False))
    assert pm.active_adapter == "default"                               # adding does not activate
    a = pm.forward(idx)[0]
    pm.set_adapter("mlp")
    b = pm.forward(idx)[0]
    assert np.abs(a - b).max() > 1e-3 and np.abs(b - base_logits).max() > 1e-3
    assert sorted(pm.trainable_parameters()) == sorted(f"h.{i}.mlp.c_fc.lora_{ab}" for i in range(L) for ab in "AB")
    pm.set_adapter("default")
    assert np.array_equal(pm.forward(idx)[0], a)
    with pm.disable_adapter():
        assert np.array_equal(pm.forward(idx)[0], base_logits)
    assert np.array_equal(pm.forward(idx)[0], a)                        # enabled again on leaving the block

    # training one adapter leaves the other exactly as it was
    other = snapshot(pm.adapters["mlp"])
    mine = snapshot(pm.adapters["default"])
    sgd_steps(pm)
    assert all(np.array_equal(v, other[k]) for k, v in pm.adapters["mlp"].items())
    assert not any(np.array_equal(v, mine[k]) for k, v in pm.adapters["default"].items())
    pm.set_adapter("mlp")
    assert np.array_equal(pm.forward(idx)[0], b)

    # each adapter saves on its own: 'default' in the folder, the others in sub-folders
    pm.save_pretrained(tmp_path)
    assert all(os.path.isfile(f / "adapter_model.safetensors") for f in (tmp_path, tmp_path / "mlp"))   # PEFT's format
    pm.load_adapter(str(tmp_path / "mlp"), "mlp copy")
    pm.set_adapter("mlp copy")
    assert np.array_equal(pm.forward(idx)[0], b)

    with pytest.raises(ValueError, match="exists"):
        pm.add_adapter("mlp", LoraConfig(r=2))
    with pytest.raises(ValueError, match="active"):
        pm.delete_adapter("mlp copy")
    pm.delete_adapter("mlp")
    assert sorted(pm.adapters) == ["default", "mlp copy"]
    with pytest.raises(ValueError, match="no adapter named 'mlp'"):
        pm.set_adapter("mlp")


def test_adapters_of_different_methods_on_one_base():
    base = make_base()
    idx, _ = make_batch()
    pm = make_peft("lora c_attn", base=base)
    lora_logits = pm.forward(idx)[0]
    pm.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=P))
    pm.set_adapter("prompt")
    alone = get_peft_model(make_base(), PromptTuningConfig(num_virtual_tokens=P))
    alone.adapters["default"]["prompt_embeddings"][...] = pm.adapters["prompt"]["prompt_embeddings"]
    assert np.array_equal(pm.forward(idx)[0], alone.forward(idx)[0])
    assert sorted(pm.trainable_parameters()) == ["prompt_embeddings"]
    pm.set_adapter("default")
    assert np.array_equal(pm.forward(idx)[0], lora_logits)


def test_merged_adapter_blocks_switching_and_training():
    pm = make_peft("lora c_attn")
    pm.add_adapter("other", LoraConfig(r=2))
    pm.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        pm.set_adapter("other")
    pm.forward(*make_batch())
    with pytest.raises(RuntimeError):
        pm.backward()
    pm.unmerge_adapter()
    pm.set_adapter("other")


# ----------------------------------------------------------------------------------------------------
# saving and loading adapters

def saved_keys(method):
    """The keys the adapter file must hold, from the method's definition."""
    linears = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    block = lambda i: [n for n in param_shapes(CFG) if n.startswith(f"h.{i}.")]
    lora = lambda mods: [f"h.{i}.{m}.lora_{ab}" for i in range(L) for m in mods for ab in "AB"]
    return sorted({
        "lora c_attn": lora(["attn.c_attn"]),
        "lora rslora": lora(["attn.c_attn"]),
        "lora q,v slices": lora(["attn.c_attn.q", "attn.c_attn.v"]),
        "lora all linears bias=all": lora(linears) + [k for k in param_shapes(CFG) if k.endswith(".bias")],
        "lora all linears bias=lora_only": lora(linears) + [f"h.{i}.{m}.bias" for i in range(L) for m in linears],
        "prefix": [f"h.{i}.attn.prefix_{kv}" for i in range(L) for kv in "kv"],
        "prefix projection": [f"h.{i}.attn.prefix_{kv}" for i in range(L) for kv in "kv"],
        "prompt": ["prompt_embeddings"],
        "adapters": [f"h.{i}.adapter_{w}.{ud}.{wb}" for i in range(L) for w in ("attn", "mlp")
                     for ud in ("down", "up") for wb in ("weight", "bias")],
        "full": list(param_shapes(CFG)),
        "full last_k_blocks=1": block(L - 1) + ["ln_f.weight", "ln_f.bias"],
        "ia3": [f"h.{i}.{m}.ia3_l" for i in range(L) for m in ("attn.c_attn", "mlp.c_proj")],
        "ia3 every linear": [f"h.{i}.{m}.ia3_l" for i in range(L) for m in linears],
    }[method])


TINYLLM_FORMAT = ("lora q,v slices", "adapters", "full", "full last_k_blocks=1")   # no PEFT equivalent


@pytest.mark.parametrize("method", list(METHODS))
def test_save_and_load_round_trip(method, tmp_path):
    pm = make_peft(method)
    sgd_steps(pm, n=1)                       # with bias='all' the base biases are part of the adapter now
    idx, _ = make_batch(seed=7)
    logits = pm.forward(idx)[0]
    trainable_keys = sorted(pm.trainable_parameters())
    pm.save_pretrained(tmp_path)
    weights = "adapter_model.npz" if method in TINYLLM_FORMAT else "adapter_model.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", weights]

    _, arrays = read_adapter(make_base(), str(tmp_path), False)      # in tinyllm's names, whichever the format
    assert sorted(arrays) == saved_keys(method)
    if method == "prefix projection":        # only the prefixes the MLP made, not the MLP
        assert all(a.shape == (P, C) for a in arrays.values()) and len(arrays) == 2 * L
    # onto a fresh copy of the same base: same logits; inference mode unless is_trainable
    loaded = PeftModel.from_pretrained(make_base(), str(tmp_path))
    np.testing.assert_allclose(loaded.forward(idx)[0], logits, rtol=0, atol=EXACT)
    assert loaded.trainable_parameters() == {}
    assert loaded.active_peft_config.inference_mode
    trainable = PeftModel.from_pretrained(make_base(), str(tmp_path), is_trainable=True)
    np.testing.assert_allclose(trainable.forward(idx)[0], logits, rtol=0, atol=EXACT)
    if method == "prefix projection":
        assert sorted(trainable.trainable_parameters()) == sorted(saved_keys(method))
    else:
        assert sorted(trainable.trainable_parameters()) == trainable_keys
    before = snapshot(trainable.trainable_parameters())
    sgd_steps(trainable, n=1)                # and it does train
    after = trainable.trainable_parameters()
    assert [k for k in before if np.array_equal(before[k], after[k])] == []


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_file_is_far_smaller_than_the_model(method, tmp_path):
    """On a model big enough for the comparison to mean something (C=64: the matrices outweigh the rest)."""
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)
    base = GPT(config, dtype=np.float64)
    get_peft_model(base, METHODS[method]()).save_pretrained(tmp_path / "adapter")
    save_checkpoint(tmp_path / "full.npz", base.state_dict(), {})
    ratio = os.path.getsize(weights_file(tmp_path / "adapter")) / os.path.getsize(tmp_path / "full.npz")
    if method == "full":
        assert ratio > 0.99                                            # a full copy of the model
    elif method == "full last_k_blocks=1":
        assert 0.2 < ratio < 0.99
    else:
        assert ratio < 0.1, f"an adapter file should be far smaller than the model, got {ratio:.3f}"


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_load_adapter_onto_a_peft_model(method, tmp_path):
    pm = make_peft(method)
    idx, _ = make_batch(seed=3)
    logits = pm.forward(idx)[0]
    pm.save_pretrained(tmp_path)
    host = get_peft_model(make_base(), LoraConfig(r=2, target_modules=["c_fc"]))
    host.load_adapter(str(tmp_path), "loaded")
    host.set_adapter("loaded")
    np.testing.assert_allclose(host.forward(idx)[0], logits, rtol=0, atol=EXACT)
    assert host.trainable_parameters() == {}                            # loaded for inference


def test_loading_a_full_fine_tuning_adapter_leaves_the_other_adapters_alone(tmp_path):
    """A saved full fine-tuning is a whole model. load_adapter() may refuse it, but it must not overwrite the
    shared base in place and so silently change what every other adapter computes."""
    full = make_peft("full")
    sgd_steps(full)
    full.save_pretrained(tmp_path)
    pm = make_peft("lora c_attn")
    idx, _ = make_batch()
    before = pm.forward(idx)[0]
    try:
        pm.load_adapter(str(tmp_path), "full")
    except ValueError:
        pass
    assert np.array_equal(pm.forward(idx)[0], before)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_loading_onto_the_wrong_base_is_an_error(method, tmp_path):
    pm = make_peft(method)
    pm.save_pretrained(tmp_path)
    other_config = GPTConfig(vocab_size=32, block_size=16, n_layer=3, n_head=2, n_embd=16)
    with pytest.raises(CheckpointError, match="config"):
        PeftModel.from_pretrained(make_base(config=other_config), str(tmp_path))
    with pytest.raises(CheckpointError, match="different base weights"):
        PeftModel.from_pretrained(make_base(seed=1), str(tmp_path))
    host = get_peft_model(make_base(seed=1), LoraConfig(r=2))
    with pytest.raises(CheckpointError, match="different base weights"):
        host.load_adapter(str(tmp_path), "x")


def test_full_checkpoint_onto_another_config_is_an_error(tmp_path):
    make_peft("full").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="config"):
        PeftModel.from_pretrained(make_base(config=GPTConfig(vocab_size=32, block_size=16, n_layer=1,
                                                             n_head=2, n_embd=16)), str(tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing weights", "missing config",
                                    "bad json", "other method's weights"])
@pytest.mark.parametrize("method", ["lora c_attn", "adapters"])           # PEFT's format and tinyllm's
def test_damaged_adapter_folder_is_a_checkpoint_error(damage, method, tmp_path):
    make_peft(method).save_pretrained(tmp_path)
    weights, config = Path(weights_file(tmp_path)), tmp_path / "adapter_config.json"
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(b"not a zip file at all" * 10)
    elif damage == "truncated":
        weights.write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "missing config":
        config.unlink()
    elif damage == "bad json":
        config.write_text("{ not json")
    else:
        make_peft("prompt" if method == "lora c_attn" else "lora q,v slices").save_pretrained(tmp_path / "other")
        weights.write_bytes(Path(weights_file(tmp_path / "other")).read_bytes())
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(make_base(), str(tmp_path))


def test_config_that_does_not_fit_the_weights_is_a_checkpoint_error(tmp_path):
    """adapter_config.json says r=2 but the file holds rank-4 matrices: refuse, do not run a wrong scale."""
    make_peft("lora c_attn").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["r"] = 2
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(make_base(), str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# generation: the KV-cached loop equals full recomputes, also once the context window slides

def recompute_loop(pm, idx, n_new, window, temperature, seed):
    """What generate must produce: every step a full pm.forward over the last `window` tokens. A random
    tiny model repeats itself under greedy decoding, so sampling (same rng, same sampler) is checked too."""
    rng = np.random.default_rng(seed)
    out = idx
    for _ in range(n_new):
        logits = pm.forward(out[:, -window:])[0]
        nxt = tinyllm.model.sample_next(logits[:, -1], temperature, None, rng)
        out = np.concatenate([out, nxt[:, None]], axis=1)
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("method", PEFT_METHODS + ["full"])
def test_generate_equals_full_recompute(method, temperature):
    pm = make_peft(method).eval()
    idx = np.random.default_rng(4).integers(0, V, (2, 4))
    n_new = 18                                          # 4 + 18 > block_size: the window slides
    out = pm.generate(idx, n_new, temperature=temperature, seed=11)
    window = T_MAX - (P if method.startswith(("prefix", "prompt")) else 0)
    assert out.shape == (2, 4 + n_new)
    assert np.array_equal(out, recompute_loop(pm, idx, n_new, window, temperature, seed=11))


def test_generate_with_disabled_adapter_is_the_base_model():
    base = make_base()
    idx = np.random.default_rng(5).integers(0, V, (2, 3))
    expected = base.generate(idx, 15, temperature=1.0, seed=3)
    pm = make_peft("prompt", base=base)
    assert not np.array_equal(pm.generate(idx, 15, temperature=1.0, seed=3), expected)
    with pm.disable_adapter():
        assert np.array_equal(pm.generate(idx, 15, temperature=1.0, seed=3), expected)


def test_unmerge_restores_the_base_bit_for_bit_so_its_adapters_still_load(tmp_path):
    from tinyllm import GPT, GPTConfig
    from tinyllm.peft import LoraConfig, PeftModel, get_peft_model
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    base = GPT(cfg, seed=3)
    before = base.state_dict()
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn.q", "c_attn.v", "c_fc"], init_lora_weights=False))
    pm.merge_adapter()
    assert not np.array_equal(base.params["h.0.attn.c_attn.weight"], before["h.0.attn.c_attn.weight"])
    pm.unmerge_adapter()
    assert all(np.array_equal(base.params[k], before[k]) for k in before)
    pm.save_pretrained(tmp_path)
    PeftModel.from_pretrained(base, tmp_path)    # the fingerprint still matches


def test_a_format_the_method_lacks_is_refused_before_anything_is_written(tmp_path):
    """PEFT has no Houlsby adapters: format='peft' says so, and leaves no folder behind."""
    pm = get_peft_model(make_base(), AdapterConfig(bottleneck_size=4))
    with pytest.raises(ValueError, match="tinyllm's format"):
        pm.save_pretrained(tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()
