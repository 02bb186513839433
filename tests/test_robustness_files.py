"""
Robustness of what tinyllm reads and writes (issue 14, round 2): files crafted to be valid JSON and valid
arrays but not what tinyllm wrote, values that are bad only once cast to the model's dtype, an adapter that
would write into the base other adapters share, and saves running at the same time or killed mid-way.

Every bad file must give a CheckpointError (a ValueError) that names the field or the array, and must change
nothing: not the model, not the optimizer, not the base under other adapters. test_cli.py checks the same
files through the command line.
"""
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

from tinyllm import GPT, GPTConfig
from tinyllm.checkpoint import (CheckpointError, atomic_open, load_checkpoint, load_pretrained, load_training_state,
                                save_checkpoint)
from tinyllm.optim import AdamW
from tinyllm.peft import LoraConfig, PeftModel, get_peft_model
from tinyllm.pretrain import PRETRAIN_DATA, pretrain
from tinyllm.safetensors import load_file, save_file
from tinyllm.train import TrainConfig, train
from train_helpers import DELETE, batches, changed

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
CHARS = "abcdefghij\n"


def quiet(line):
    pass


def tiny_config(path=None, **overrides):
    return TrainConfig(**{**dict(max_steps=2, batch_size=4, lr=1e-2, warmup_steps=1, eval_interval=1, eval_iters=1,
                                 log_interval=1, seed=3, checkpoint=None if path is None else str(path)), **overrides})


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A finished run's checkpoint with everything `tinyllm pretrain` puts in one: (arrays, meta)."""
    path = tmp_path_factory.mktemp("good") / "c.npz"
    train(GPT(TINY), batches(), tiny_config(path), out=quiet,
          meta={"kind": "pretrain", "tokenizer_chars": CHARS, "data": {**PRETRAIN_DATA, "n_chars": 2000}})
    return load_checkpoint(path)


def write_crafted(path, good, field, value):
    arrays, meta = good
    save_checkpoint(path, arrays, changed(meta, field, value))
    return str(path)


def write_raw_npz(path, entries):
    """An .npz written entry by entry: {name in the zip: bytes}, so that anything can be put in it."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return str(path)


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def meta_blob(text):
    return npy_bytes(np.frombuffer(text.encode(), np.uint8))


def same_state(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# 1. crafted metadata: a wrong type, a missing section, deep nesting, a raw zip entry

TRAINING_STATE_CASES = [          # (field, value, what the error must name)
    ("step", "3", "step"), ("step", -1, "step"), ("step", True, "step"), ("step", 2.0, "step"),
    ("step", DELETE, "'step' missing"),
    ("history", [], "history"), ("history", "abc", "history"), ("history", DELETE, "'history' missing"),
    ("history.train_loss", ["low"], "history.train_loss"), ("history.train_loss", None, "history.train_loss"),
    ("history.elapsed", [1.0, float("inf")], "history.elapsed"),
    ("history.step", [1, 2.5], "history.step"), ("history.tokens", [32, -64], "history.tokens"),
    ("history.status", "done", "history.status"), ("history.val_loss", [4.0], "different lengths"),
    ("history.lr", DELETE, "lr"), ("history.step", [1, 3], "ends at step 3"),
    ("train_config", [1, 2], "train_config"), ("train_config", "fast", "train_config"),
    ("rng_state", "state", "rng_state"), ("rng_state", DELETE, "'rng_state' missing"),
    ("rng_state.bit_generator", "seed", "bit generator"),          # np.random.seed() must never be called
    ("rng_state.bit_generator", "__class__", "bit generator"),
    ("rng_state.state", {"state": "x", "inc": 1}, "random-number"),
    ("rng_state.state", {"state": 2 ** 200, "inc": 1}, "random-number"),
    ("model_rng_state", 5, "model_rng_state"),
]


@pytest.mark.parametrize("field, value, named", TRAINING_STATE_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in TRAINING_STATE_CASES])
def test_a_crafted_training_state_is_refused_by_name_and_changes_nothing(field, value, named, good, tmp_path):
    path = write_crafted(tmp_path / "c.npz", good, field, value)
    model = GPT(TINY, seed=9)
    before = model.state_dict()
    np.random.seed(123)
    expected_global = np.random.random()
    np.random.seed(123)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.").replace("(", r"\(")) as info:
        train(model, batches(), tiny_config(max_steps=4), out=quiet, resume_from=path)
    assert "c.npz" in str(info.value)
    assert same_state(model.state_dict(), before)                  # nothing was loaded
    assert np.random.random() == expected_global                   # nothing from the file was called


PRETRAINED_CASES = [
    ("config", [11, 8, 2], "config"), ("config.n_layers", 2, "config"), ("config.n_layer", "2", "n_layer"),
    ("config.n_layer", 0, "n_layer"), ("config", DELETE, "not a pretrained model"),
    ("tokenizer_chars", 5, "tokenizer_chars"), ("tokenizer_chars", "aab", "tokenizer_chars"),
    ("tokenizer_chars", CHARS + "xyz", "vocab_size"),
    ("data", DELETE, "data"), ("data", [0, 24], "data"), ("data.n_people", "24", "data.n_people"),
    ("data.n_people", 1000, "data.n_people"), ("data.n_chars", 10 ** 15, "data.n_chars"),
    ("data.val_fraction", 1.5, "data.val_fraction"), ("data.world_seed", -1, "data.world_seed"),
    ("data.n_words", 5, "unknown ['n_words']"), ("data.corpus_seed", DELETE, "missing ['corpus_seed']"),
    ("kind", 5, "kind"), ("history", [1], "history"), ("history.status", ["completed"], "history.status"),
    ("step", "2", "step"),
]


@pytest.mark.parametrize("field, value, named", PRETRAINED_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in PRETRAINED_CASES])
def test_a_crafted_pretrained_checkpoint_is_refused_by_name(field, value, named, good, tmp_path):
    path = write_crafted(tmp_path / "c.npz", good, field, value)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_pretrained(path, need_data=True)


def test_data_is_required_only_where_it_is_read(good, tmp_path):
    """A model-only checkpoint without the corpus settings still loads; `need_data` (compare, sweep, the
    lessons) and a checkpoint that says it came from `tinyllm pretrain` require them."""
    arrays, meta = good
    plain = {k: v for k, v in meta.items() if k not in ("data", "kind")}
    save_checkpoint(tmp_path / "plain.npz", arrays, plain)
    model, tok, _ = load_pretrained(tmp_path / "plain.npz")
    assert model.config == TINY and tok.vocab_size == 11
    with pytest.raises(CheckpointError, match="lacks the meta field data"):
        load_pretrained(tmp_path / "plain.npz", need_data=True)
    save_checkpoint(tmp_path / "kind.npz", arrays, {**plain, "kind": "pretrain"})
    with pytest.raises(CheckpointError, match="lacks the meta field data"):
        load_pretrained(tmp_path / "kind.npz")


@pytest.mark.parametrize("field, value, named", [
    ("data", DELETE, "data"), ("train_config", DELETE, "train_config"), ("train_config", [3], "train_config"),
    ("train_config.max_stesp", 5, "max_stesp"), ("train_config.lr", "fast", "lr"),
    ("config", {"n_layer": 2}, "config"), ("config.vocab_size", DELETE, "config"), ("data.n_chars", "many", "n_chars"), ("kind", ["pretrain"], "kind"),
])
def test_pretrain_resume_refuses_a_crafted_checkpoint_before_any_work(field, value, named, good, tmp_path):
    path = write_crafted(tmp_path / "c.npz", good, field, value)
    lines = []
    with pytest.raises(CheckpointError, match=named):
        pretrain(out=str(tmp_path / "out.npz"), resume=path, echo=lines.append)
    assert lines == [] and not os.path.exists(tmp_path / "out.npz")


def nested(depth):
    return "[" * depth + "]" * depth


def test_meta_json_nested_too_deep_repeated_keys_or_not_bytes(tmp_path):
    header = '{"format": "tinyllm-checkpoint", "version": 1, '
    cases = {
        "deep": meta_blob(header + '"history": ' + nested(200_000) + "}"),
        "deep object": meta_blob(header + '"x": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}"),
        "twice": meta_blob(header + '"step": 1, "step": 2}'),
        "floats": npy_bytes(np.frombuffer((header + "}").encode(), np.uint8).astype(np.float64)),
        "2-D": npy_bytes(np.frombuffer((header + '"x": 1}').encode(), np.uint8).reshape(2, -1)),
    }
    for name, blob in cases.items():
        path = write_raw_npz(tmp_path / f"{name}.npz", {"__meta__.npy": blob, "x.npy": npy_bytes(np.zeros(2))})
        with pytest.raises(CheckpointError, match="__meta__"):
            load_checkpoint(path)


def test_entries_stored_as_raw_zip_entries_are_refused_by_name(tmp_path):
    """np.load hands back a zip entry without the .npy suffix as bytes, not as an array."""
    meta = json.dumps({"format": "tinyllm-checkpoint", "version": 1}).encode()
    raw_meta = write_raw_npz(tmp_path / "a.npz", {"__meta__": meta, "x.npy": npy_bytes(np.zeros(2))})
    raw_array = write_raw_npz(tmp_path / "b.npz", {"__meta__.npy": meta_blob(meta.decode()),
                                                   "model/wte.weight": b"\x00" * 64})
    for path, name in ((raw_meta, "__meta__"), (raw_array, "model/wte.weight")):
        with pytest.raises(CheckpointError, match=f"entry '{name}' is raw bytes"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="raw bytes"):
            load_pretrained(path)


def adapter_folder(tmp_path, format, bias="none", seed=0):
    """A saved LoRA (trained: its matrices moved off their init) and the PeftModel it came from."""
    pm = get_peft_model(GPT(TINY), LoraConfig(r=2, bias=bias, init_lora_weights=False))
    for v in pm.trainable_parameters().values():
        v += np.random.default_rng(seed).normal(0.0, 0.1, v.shape).astype(v.dtype)
    folder = tmp_path / f"{format}-{bias}-{seed}"
    pm.save_pretrained(folder, format=format)
    return str(folder), pm


def edit_tinyllm_config(folder, edit):
    """Change adapter_config.json and the copy of it in adapter_model.npz alike (as one consistent save would)."""
    fields = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    fields = edit(fields)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write(json.dumps(fields))
    arrays, meta = load_checkpoint(os.path.join(folder, "adapter_model.npz"))
    save_checkpoint(os.path.join(folder, "adapter_model.npz"), arrays, {**meta, "adapter": fields})


def renamed(old, new):
    return lambda f: {(new if k == old else k): v for k, v in f.items()}


TINYLLM_CONFIG_CASES = [
    ("lora_alpha '16'", lambda f: {**f, "lora_alpha": "16"}, "lora_alpha"),
    ("misspelled lora_alhpa", renamed("lora_alpha", "lora_alhpa"), "lora_alhpa"),
    ("target_modules 5", lambda f: {**f, "target_modules": 5}, "target_modules"),
    ("r [2]", lambda f: {**f, "r": [2]}, "LoraConfig.r"),
    ("no base_config", lambda f: {k: v for k, v in f.items() if k != "base_config"}, "base_config"),
    ("format", lambda f: {**f, "format": "tinyllm-adapter-9"}, "format"),
    ("peft_type LORA2", lambda f: {**f, "peft_type": "LORA2"}, "peft_type"),
    ("peft_type a list", lambda f: {**f, "peft_type": ["LORA"]}, "peft_type"),
]


@pytest.mark.parametrize("what, edit, named", TINYLLM_CONFIG_CASES, ids=[c[0] for c in TINYLLM_CONFIG_CASES])
def test_a_crafted_tinyllm_adapter_config_is_refused_by_name(what, edit, named, tmp_path):
    folder, _ = adapter_folder(tmp_path, "tinyllm")
    edit_tinyllm_config(folder, edit)
    with pytest.raises(CheckpointError, match=named):
        PeftModel.from_pretrained(GPT(TINY), folder)
    host = get_peft_model(GPT(TINY), LoraConfig(r=2))
    with pytest.raises(CheckpointError, match=named):
        host.load_adapter(folder, "other")
    assert list(host.adapters) == ["default"]


def edit_peft_folder(folder, edit_config=None, edit_facts=None):
    if edit_config is not None:
        path = os.path.join(folder, "adapter_config.json")
        with open(path) as f:
            fields = edit_config(json.load(f))
        with open(path, "w") as f:
            f.write(json.dumps(fields))
    if edit_facts is not None:
        path = os.path.join(folder, "adapter_model.safetensors")
        arrays, metadata = load_file(path, mmap=False)
        save_file(arrays, path, metadata={**metadata, "tinyllm": edit_facts(metadata["tinyllm"])})


PEFT_CASES = [
    ("no r", lambda f: {k: v for k, v in f.items() if k != "r"}, None, "'r'"),
    ("misspelled lora_alhpa", lambda f: {**f, "lora_alhpa": 16}, None, "lora_alhpa"),
    ("lora_alpha '16'", lambda f: {**f, "lora_alpha": "16"}, None, "lora_alpha"),
    ("facts not JSON", None, lambda s: s[:-3], "tinyllm"),
    ("facts a list", None, lambda s: json.dumps([json.loads(s)]), "not a JSON object"),
    ("facts nested deep", None, lambda s: s[:-1] + ', "x": ' + nested(100_000) + "}", "nested too deeply"),
    ("facts: misspelled field", None, lambda s: json.dumps({**json.loads(s), "lora_alhpa": 4}), "lora_alhpa"),
    ("facts: no base_config", None,
     lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "base_config"}), "base_config"),
]


@pytest.mark.parametrize("what, edit_config, edit_facts, named", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_a_crafted_peft_adapter_is_refused_by_name(what, edit_config, edit_facts, named, tmp_path):
    folder, _ = adapter_folder(tmp_path, "peft")
    edit_peft_folder(folder, edit_config, edit_facts)
    with pytest.raises(CheckpointError, match=named):
        PeftModel.from_pretrained(GPT(TINY), folder)


@pytest.mark.parametrize("content, named", [
    ('{"peft_type": ' + nested(100_000) + "}", "nested too deeply"),
    ('{"peft_type": "LORA", "peft_type": "IA3"}', "twice"),
    ("[1, 2]", "not a JSON object"),
    ('{"r": 8', "not a readable adapter config"),
])
def test_an_adapter_config_that_is_not_a_json_object_of_fields(content, named, tmp_path):
    for format in ("peft", "tinyllm"):
        folder, _ = adapter_folder(tmp_path, format)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write(content)
        with pytest.raises(CheckpointError, match=named):
            PeftModel.from_pretrained(GPT(TINY), folder)


def test_a_hugging_face_config_nested_too_deep_or_with_a_wrong_type(tmp_path):
    GPT(TINY).save_pretrained(tmp_path / "gpt")
    path = tmp_path / "gpt" / "config.json"
    config = json.loads(path.read_text())
    for content, named in ((json.dumps(config)[:-1] + ', "x": ' + nested(100_000) + "}", "nested too deeply"),
                           (json.dumps({**config, "n_inner": {}}), "n_inner"),
                           (json.dumps({**config, "n_embd": {}}), "n_embd")):
        path.write_text(content)
        with pytest.raises(CheckpointError, match=named):
            GPT.from_pretrained(tmp_path / "gpt")


# ----------------------------------------------------------------------------------------------------
# 2. values that are bad only after conversion, and dtypes that are not numbers

def test_weights_that_overflow_the_models_dtype_are_refused_and_change_nothing():
    cases = {np.float32: [np.full(8, 1e39), np.full(8, -1e39)],
             np.float16: [np.full(8, 1e5, np.float32), np.full(8, 70_000, np.int64), np.full(8, -1e300)]}
    for dtype, values in cases.items():
        model = GPT(TINY, dtype=dtype)
        before = model.state_dict()
        for value in values:
            with pytest.raises(ValueError, match=r"ln_f\.bias.*too large for " + np.dtype(dtype).name):
                model.load_state_dict({**before, "ln_f.bias": value})
            assert same_state(model.state_dict(), before)
    GPT(TINY, dtype=np.float64).load_state_dict({**GPT(TINY).state_dict(), "ln_f.bias": np.full((8,), 1e39)})


@pytest.mark.parametrize("kind", ["1e39 as float64", "nan", "complex", "bool", "str"])
def test_a_checkpoint_with_weights_that_are_not_float32_numbers(kind, good, tmp_path):
    arrays, meta = good
    w = arrays["model/h.1.mlp.c_fc.weight"]
    bad = {"1e39 as float64": np.full(w.shape, 1e39), "nan": np.where(w > 0, np.nan, w),
           "complex": w.astype(complex), "bool": w > 0, "str": w.astype(str)}[kind]
    save_checkpoint(tmp_path / "c.npz", {**arrays, "model/h.1.mlp.c_fc.weight": bad}, meta)
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight"):
        load_pretrained(tmp_path / "c.npz")
    model = GPT(TINY, seed=5)
    before = model.state_dict()
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight"):
        train(model, batches(), tiny_config(max_steps=4), out=quiet, resume_from=str(tmp_path / "c.npz"))
    assert same_state(model.state_dict(), before)


ADAPTER_BAD = {"nan": lambda a: np.where(a > 0, np.nan, a), "inf": lambda a: np.full(a.shape, -np.inf),
               "1e39 as float64": lambda a: np.full(a.shape, 1e39), "complex": lambda a: a.astype(complex),
               "bool": lambda a: a > 0, "str": lambda a: a.astype(str), "uint8": None}


@pytest.mark.parametrize("kind", list(ADAPTER_BAD))
def test_adapter_arrays_are_checked_as_the_models_dtype(kind, tmp_path):
    """tinyllm's format (.npz) can hold any dtype; each array is checked before anything is installed."""
    folder, pm = adapter_folder(tmp_path, "tinyllm")
    key = "h.1.attn.c_attn.lora_A"
    path = os.path.join(folder, "adapter_model.npz")
    arrays, meta = load_checkpoint(path)
    if kind == "uint8":                                   # whole numbers are numbers: they load
        arrays[key] = np.arange(arrays[key].size, dtype=np.uint8).reshape(arrays[key].shape)
        save_checkpoint(path, arrays, meta)
        loaded = PeftModel.from_pretrained(GPT(TINY), folder)
        assert loaded.adapters["default"][key].dtype == np.float32
        return
    arrays[key] = ADAPTER_BAD[kind](arrays[key])
    save_checkpoint(path, arrays, meta)
    base = GPT(TINY)
    before = base.state_dict()
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_attn\.lora_A"):
        PeftModel.from_pretrained(base, folder)
    assert same_state(base.state_dict(), before) and base.trainable == set(base.params)
    host = get_peft_model(GPT(TINY), LoraConfig(r=2))
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_attn\.lora_A"):
        host.load_adapter(folder, "other")
    assert list(host.adapters) == ["default"]


@pytest.mark.parametrize("kind", ["nan", "bool", "1e39 as float64", "int64"])
def test_peft_format_tensors_are_checked_as_the_models_dtype(kind, tmp_path):
    folder, _ = adapter_folder(tmp_path, "peft")
    path = os.path.join(folder, "adapter_model.safetensors")
    arrays, metadata = load_file(path, mmap=False)
    key = next(k for k in arrays if "lora_B" in k)
    a = arrays[key]
    arrays[key] = {"nan": np.full(a.shape, np.nan, np.float32), "bool": a > 0, "1e39 as float64": np.full(a.shape, 1e39),
                   "int64": np.ones(a.shape, np.int64)}[kind]
    save_file(arrays, path, metadata=metadata)
    if kind == "int64":
        PeftModel.from_pretrained(GPT(TINY), folder)
        return
    with pytest.raises(CheckpointError, match=r"lora_B"):
        PeftModel.from_pretrained(GPT(TINY), folder)


@pytest.mark.parametrize("kind", ["bool", "1e39 as float64"])
def test_a_hugging_face_folder_with_weights_that_are_not_float32_numbers(kind, tmp_path):
    GPT(TINY).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors, metadata = load_file(path, mmap=False)
    b = tensors["transformer.ln_f.bias"]
    tensors["transformer.ln_f.bias"] = b > 0 if kind == "bool" else np.full(b.shape, 1e39)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"ln_f\.bias"):
        GPT.from_pretrained(tmp_path)
    if kind != "bool":
        assert GPT.from_pretrained(tmp_path, dtype=np.float64).params["ln_f.bias"][0] == 1e39


@pytest.mark.parametrize("kind, named", [
    ("negative v", "v/wte.weight holds negative values"), ("nan m", "m/wte.weight"),
    ("1e39 m as float64", "m/wte.weight.*too large"), ("complex v", "v/wte.weight"), ("inf v", "v/wte.weight"),
])
def test_impossible_optimizer_state_is_refused_by_name(kind, named, tmp_path):
    model = GPT(TINY)
    opt = AdamW(model.trainable_parameters())
    opt.step({k: np.ones_like(v) for k, v in model.trainable_parameters().items()})
    state = opt.state_dict()
    m, v = state["m/wte.weight"], state["v/wte.weight"]
    state.update({"negative v": {"v/wte.weight": -v}, "nan m": {"m/wte.weight": np.full_like(m, np.nan)},
                  "1e39 m as float64": {"m/wte.weight": np.full(m.shape, 1e39)},
                  "complex v": {"v/wte.weight": v.astype(complex)}, "inf v": {"v/wte.weight": np.full_like(v, np.inf)}}[kind])
    fresh = AdamW(GPT(TINY).trainable_parameters())
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=named):
        fresh.load_state_dict(state)
    assert same_state(fresh.state_dict(), before)
    # and from a checkpoint: the model it was to resume is left as it was
    path = tmp_path / "c.npz"
    train(GPT(TINY), batches(), tiny_config(path), out=quiet)
    arrays, meta = load_checkpoint(path)
    save_checkpoint(path, {**arrays, **{f"optim/{k}": v for k, v in state.items() if k.endswith("wte.weight")}}, meta)
    model = GPT(TINY, seed=4)
    before = model.state_dict()
    with pytest.raises(CheckpointError, match=named):
        train(model, batches(), tiny_config(max_steps=4), out=quiet, resume_from=str(path))
    assert same_state(model.state_dict(), before)


# ----------------------------------------------------------------------------------------------------
# 3. an adapter that would write into the base other adapters share

@pytest.mark.parametrize("format", ["peft", "tinyllm"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_lora_with_trained_biases_is_refused_as_a_second_adapter(bias, format, tmp_path):
    folder, _ = adapter_folder(tmp_path, format, bias=bias)
    host = get_peft_model(GPT(TINY), LoraConfig(r=2))
    before = host.base_model.state_dict()
    with pytest.raises(ValueError, match=r"holds base weights.*bias.*overwrite the base the other adapters share"):
        host.load_adapter(folder, "biased")
    assert list(host.adapters) == ["default"] and same_state(host.base_model.state_dict(), before)
    alone = PeftModel.from_pretrained(GPT(TINY), folder)            # on a base of its own it loads, biases and all
    assert not np.array_equal(alone.base_model.params["h.0.attn.c_attn.bias"], before["h.0.attn.c_attn.bias"])


def test_an_adapter_whose_biases_equal_the_base_loads_as_a_second_adapter(tmp_path):
    folder, _ = adapter_folder(tmp_path, "peft", bias="all")
    pm = PeftModel.from_pretrained(GPT(TINY), folder)                # the base now holds the adapter's biases
    pm.load_adapter(folder, "again")                                 # so loading it again overwrites nothing
    assert set(pm.adapters) == {"default", "again"}
    pm.add_adapter("plain", LoraConfig(r=2))
    no_bias, _ = adapter_folder(tmp_path, "tinyllm", bias="none", seed=1)
    pm.load_adapter(no_bias, "no_bias")
    assert set(pm.adapters) == {"default", "again", "plain", "no_bias"}


@pytest.mark.parametrize("bad_key", ["h.0.attn.c_attn.bias", "h.1.attn.c_attn.lora_A"])
def test_a_nan_in_a_saved_adapter_never_reaches_the_base(bad_key, tmp_path):
    """The biases would be written into the base first; every array is checked before anything is written."""
    folder, _ = adapter_folder(tmp_path, "tinyllm", bias="all")
    path = os.path.join(folder, "adapter_model.npz")
    arrays, meta = load_checkpoint(path)
    arrays[bad_key] = arrays[bad_key].copy()
    arrays[bad_key].flat[0] = np.nan
    save_checkpoint(path, arrays, meta)
    base = GPT(TINY)
    before = base.state_dict()
    with pytest.raises(CheckpointError, match=bad_key.replace(".", r"\.")):
        PeftModel.from_pretrained(base, folder)
    assert same_state(base.state_dict(), before) and all(np.isfinite(v).all() for v in base.params.values())


# ----------------------------------------------------------------------------------------------------
# 6. saves at the same time, and a save killed mid-way

def test_two_threads_saving_one_path_each_leave_a_whole_file(tmp_path):
    """Each thread's arrays and meta say who wrote them: every file on disk, while they write and after, must
    be one thread's arrays with that same thread's meta (the old temporary name, pid only, was shared)."""
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"x": np.full(50_000, -1.0)}, {"who": -1})
    errors, seen = [], []
    stop = threading.Event()

    def writer(who):
        try:
            for i in range(15):
                save_checkpoint(path, {"x": np.full(50_000, 100 * who + i, dtype=np.float64)}, {"who": 100 * who + i})
        except Exception as e:                              # noqa: BLE001 - reported below
            errors.append(repr(e))

    def reader():
        while not stop.is_set():
            arrays, meta = load_checkpoint(path)
            seen.append(bool((arrays["x"] == meta["who"]).all()))
    threads = [threading.Thread(target=writer, args=(w,)) for w in (1, 2, 3)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert errors == []
    arrays, meta = load_checkpoint(path)
    assert (arrays["x"] == meta["who"]).all() and meta["who"] % 100 == 14
    assert seen and all(seen)
    assert os.listdir(tmp_path) == ["c.npz"]                  # no temporary left behind


def test_temporary_names_are_unique_per_call(tmp_path):
    """Two saves of one path open at once, even in one thread, write two files; the last to finish wins."""
    path = tmp_path / "c.npz"
    with atomic_open(path) as a, atomic_open(path) as b:
        assert a.name != b.name
        a.write(b"first")
        b.write(b"second")
    assert path.read_bytes() == b"first"                      # the outer block ended last
    assert os.listdir(tmp_path) == ["c.npz"]


def dead_pid():
    """A process id that no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_stray_temporary_is_ignored_and_the_next_save_cleans_it_up(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"x": np.ones(3)}, {"step": 1})
    dead = dead_pid()
    strays = [f".c.npz.{dead}.tmp", f".c.npz.{dead}.7.0.abcd1234.tmp"]      # an older tinyllm's name, and today's
    kept = [f".c.npz.{os.getppid()}.1.0.ffff0000.tmp",       # a live process's: it may be saving right now
            f".c.npz.{dead}.7.1.abcd1235.tmp",               # a recent one: maybe another machine's, on a shared disk
            f".c.npz.5.{dead}.7.0.abcd1234.tmp"]              # the temporary of another file, c.npz.5
    for name in strays + kept:
        (tmp_path / name).write_bytes(b"PK\x03\x04 half a checkpoint")
        if name != kept[1]:
            os.utime(tmp_path / name, (time.time() - 3600, time.time() - 3600))   # an hour old
    assert load_checkpoint(path)[1]["step"] == 1              # a load reads the path, whatever lies beside it
    save_checkpoint(path, {"x": np.ones(3)}, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == sorted(["c.npz"] + kept)
    assert load_checkpoint(path)[1]["step"] == 2


def test_kill_9_in_the_middle_of_a_save(tmp_path):
    """A real SIGKILL while a 16 MB checkpoint is being written: the old file stays whole, and the next save and
    load work (and, once it is old enough, remove the killed process's temporary)."""
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"x": np.zeros(10)}, {"step": 0})
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[2])\n"
            "from tinyllm.checkpoint import save_checkpoint\n"
            "for i in range(1, 1000):\n"
            "    save_checkpoint(sys.argv[1], {'x': np.full(2_000_000, float(i))}, {'step': i})\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), root])
    deadline = time.time() + 60
    while not any(n.endswith(".tmp") for n in os.listdir(tmp_path)) and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    arrays, meta = load_checkpoint(path)                      # the old file, or one whole new one
    assert (arrays["x"] == meta["step"]).all()
    save_checkpoint(path, {"x": np.full(10, -1.0)}, {"step": -1})
    arrays, meta = load_checkpoint(path)
    assert meta["step"] == -1
    for name in os.listdir(tmp_path):                         # what the kill left, an hour later
        os.utime(tmp_path / name, (time.time() - 3600, time.time() - 3600))
    save_checkpoint(path, {"x": np.full(10, -2.0)}, {"step": -2})
    assert os.listdir(tmp_path) == ["c.npz"] and load_checkpoint(path)[1]["step"] == -2


def test_a_failed_training_state_load_restores_the_model(good, tmp_path):
    """load_training_state loads the model, then the optimizer: if the optimizer's part does not fit, the
    model gets back what it had."""
    arrays, meta = good
    save_checkpoint(tmp_path / "c.npz", {**arrays, "optim/v/ln_f.bias": -np.ones(8, np.float32)}, meta)
    model = GPT(TINY, seed=8)
    before = model.state_dict()
    with pytest.raises(CheckpointError, match="v/ln_f.bias holds negative values"):
        load_training_state(tmp_path / "c.npz", model, AdamW(model.trainable_parameters()))
    assert same_state(model.state_dict(), before)
