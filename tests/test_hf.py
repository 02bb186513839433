"""Hugging Face GPT-2 folders (config.json + model.safetensors): written and read back bit for bit, every
variant of a real folder read, what tinyllm does not compute refused by name; and, when transformers is
installed, the same logits in both directions."""
import json
import os

import numpy as np
import pytest

from tinyllm import GPT, GPTConfig
from tinyllm.checkpoint import CheckpointError
from tinyllm.hf import hf_config
from tinyllm.peft import LoraConfig, PeftModel, get_peft_model
from tinyllm.safetensors import load_file, save_file

TINY = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=8)


def folder_with(tmp_path, weights, config=None, name="gpt2"):
    """A GPT-2 folder holding these arrays (named as given) and this config.json (default: TINY's)."""
    folder = tmp_path / name
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or hf_config(TINY)))
    return folder


def test_round_trip_is_bit_exact(tmp_path):
    for dtype in (np.float32, np.float64):
        model = GPT(TINY, seed=3, dtype=dtype)
        model.save_pretrained(tmp_path / str(np.dtype(dtype)))
        back = GPT.from_pretrained(tmp_path / str(np.dtype(dtype)), dtype=dtype)
        assert back.config == TINY and all(np.array_equal(back.params[k], v) for k, v in model.params.items())
    arrays, meta = load_file(str(tmp_path / "float32" / "model.safetensors"))
    assert meta == {"format": "pt"} and all(k.startswith("transformer.") for k in arrays)


def test_every_variant_of_a_real_folder_reads(tmp_path):
    """Names with or without 'transformer.', a tied lm_head.weight or none, the old attention-mask buffers,
    half-precision weights: all read as the same model."""
    model = GPT(TINY, seed=1)
    plain = dict(model.params)
    variants = {
        "prefixed": {"transformer." + k: v for k, v in plain.items()},
        "bare with head": {**plain, "lm_head.weight": plain["wte.weight"]},
        "with buffers": {**{"transformer." + k: v for k, v in plain.items()},
                         **{f"transformer.h.{i}.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32))
                            for i in range(TINY.n_layer)},
                         **{f"transformer.h.{i}.attn.masked_bias": np.array(-1e4, np.float32) for i in range(TINY.n_layer)}},
    }
    for name, weights in variants.items():
        back = GPT.from_pretrained(folder_with(tmp_path, weights, name=name.replace(" ", "_")))
        assert all(np.array_equal(back.params[k], v) for k, v in plain.items()), name
    half = GPT.from_pretrained(folder_with(tmp_path, {k: v.astype(np.float16) for k, v in plain.items()}, name="half"))
    assert max(np.max(np.abs(half.params[k] - v)) for k, v in plain.items()) < 1e-3


@pytest.mark.parametrize("field, value", [("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True),
                                          ("reorder_and_upcast_attn", True), ("n_inner", 12),
                                          ("layer_norm_epsilon", 1e-6), ("scale_attn_weights", False),
                                          ("model_type", "llama"), ("add_cross_attention", True)])
def test_what_tinyllm_does_not_compute_is_refused_by_name(field, value, tmp_path):
    folder = folder_with(tmp_path, GPT(TINY).params, {**hf_config(TINY), field: value})
    with pytest.raises(CheckpointError, match=field):
        GPT.from_pretrained(folder)


def test_dropout_and_gelu_pytorch_tanh_are_accepted(tmp_path):
    folder = folder_with(tmp_path, GPT(TINY).params, {**hf_config(TINY), "resid_pdrop": 0.1, "attn_pdrop": 0.1,
                                                      "activation_function": "gelu_pytorch_tanh"})
    assert GPT.from_pretrained(folder).config == TINY


def test_bad_folders_say_what_is_wrong(tmp_path):
    params = GPT(TINY).params
    with pytest.raises(CheckpointError, match="not a folder"):
        GPT.from_pretrained(tmp_path / "nowhere")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(hf_config(TINY)))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    with pytest.raises(CheckpointError, match="pickle.*model.safetensors"):
        GPT.from_pretrained(pickled)
    with pytest.raises(CheckpointError, match="lacks the field 'n_layer'"):
        GPT.from_pretrained(folder_with(tmp_path, params, {k: v for k, v in hf_config(TINY).items() if k != "n_layer"},
                                        name="no_layers"))
    with pytest.raises(CheckpointError, match="missing"):
        GPT.from_pretrained(folder_with(tmp_path, {k: v for k, v in params.items() if k != "ln_f.bias"}, name="short"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        GPT.from_pretrained(folder_with(tmp_path, {**params, "lm_head.weight": params["wte.weight"] + 1}, name="untied"))
    with pytest.raises(CheckpointError, match="nan or inf"):
        GPT.from_pretrained(folder_with(tmp_path, {**params, "ln_f.bias": np.full(8, np.nan, np.float32)}, name="nan"))
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="JSON"):
        GPT.from_pretrained(tmp_path / "json")


def test_a_peft_adapter_saved_on_a_hf_folder_base_loads_back(tmp_path):
    """The bridge in one line each way: a GPT-2 folder, a LoRA trained on it in PEFT's format, both read back."""
    GPT(TINY, seed=2).save_pretrained(tmp_path / "base")
    pm = get_peft_model(GPT.from_pretrained(tmp_path / "base"), LoraConfig(r=2, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    idx = np.arange(10).reshape(2, 5)
    back = PeftModel.from_pretrained(GPT.from_pretrained(tmp_path / "base"), str(tmp_path / "lora"))
    assert np.array_equal(back.forward(idx)[0], pm.forward(idx)[0])
    assert sorted(os.listdir(tmp_path / "lora")) == ["adapter_config.json", "adapter_model.safetensors"]

# ----------------------------------------------------------------------------------------------------
# with transformers installed (a developer's machine): the same logits in both directions


def test_transformers_loads_what_tinyllm_writes_and_the_other_way(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import contextlib
    import io
    model = GPT(TINY, seed=5, dtype=np.float64)
    model.save_pretrained(tmp_path / "ours")
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ours")).eval()
    assert "UNEXPECTED" not in log.getvalue() and "MISSING" not in log.getvalue()
    idx = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    assert np.max(np.abs(model.forward(idx)[0] - theirs)) < 1e-10
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        transformers.GPT2LMHeadModel(config).double().save_pretrained(str(tmp_path / "theirs"))
        hf2 = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "theirs")).double().eval()
    ours = GPT.from_pretrained(tmp_path / "theirs", dtype=np.float64)
    with torch.no_grad():
        theirs = hf2(torch.from_numpy(idx)).logits.numpy()
    assert np.max(np.abs(ours.forward(idx)[0] - theirs)) < 1e-10
