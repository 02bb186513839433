"""Checkpoints: round trips, atomic writes, and a clear CheckpointError for every bad file."""
import json
import os

import numpy as np
import pytest

from tinyllm import GPT, GPTConfig
from tinyllm.checkpoint import (CheckpointError, load_checkpoint, load_pretrained, load_training_state,
                                save_checkpoint, save_training_state)
from tinyllm.optim import AdamW

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def sample_arrays():
    return {"model/h.0.attn.c_attn.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "optim/t": np.array(7, dtype=np.int64), "ids": np.arange(5, dtype=np.uint8)}


def test_round_trip_keeps_values_dtypes_and_meta(tmp_path):
    path = tmp_path / "sub" / "ckpt.npz"                       # the folder is created
    meta = {"step": 3, "history": {"loss": [2.5, 1.25]}, "rng": {"state": 2 ** 127 + 5}, "chars": "ab\n"}
    save_checkpoint(path, sample_arrays(), meta)
    arrays, loaded = load_checkpoint(path)
    assert set(arrays) == set(sample_arrays())
    for k, a in sample_arrays().items():
        assert arrays[k].dtype == a.dtype
        np.testing.assert_array_equal(arrays[k], a)
    assert {k: loaded[k] for k in meta} == meta                # big ints and floats come back exact
    assert loaded["format"] == "tinyllm-checkpoint" and loaded["version"] == 1


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_crash_mid_write_leaves_the_old_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"x": np.zeros(3)}, {"step": 1})
    before = path.read_bytes()

    def crashing_savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip file")               # some bytes reach the disk, then...
        raise error("crash while writing")
    monkeypatch.setattr(np, "savez", crashing_savez)
    with pytest.raises(error):
        save_checkpoint(path, {"x": np.ones(3)}, {"step": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1]["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.npz"]                # no temporary file left behind


def bad_files(tmp_path):
    good = tmp_path / "good.npz"
    save_checkpoint(good, sample_arrays(), {"step": 1})
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "empty": b"", "text": b"hello, not a checkpoint\n"}
    flipped = bytearray(data)
    flipped[200] ^= 0xFF                                       # inside the first array's bytes
    files["corrupted"] = bytes(flipped)
    for name, content in files.items():
        (tmp_path / f"{name}.npz").write_bytes(content)
    np.save(tmp_path / "array.npy", np.ones(3))
    np.savez(tmp_path / "plain.npz", x=np.ones(3))            # an .npz, but not one of ours
    np.savez(tmp_path / "future.npz", __meta__=np.frombuffer(
        json.dumps({"format": "tinyllm-checkpoint", "version": 99}).encode(), np.uint8))
    np.savez(tmp_path / "pickled.npz", obj=np.array([{"a": 1}], dtype=object), __meta__=np.frombuffer(
        json.dumps({"format": "tinyllm-checkpoint", "version": 1}).encode(), np.uint8))
    return {"truncated": "truncated or corrupted", "empty": "empty", "text": "not a tinyllm checkpoint",
            "corrupted": "truncated or corrupted", "array": "not a tinyllm checkpoint",
            "plain": "not a tinyllm checkpoint", "future": "version 99", "pickled": "truncated or corrupted"}


def test_every_bad_file_raises_checkpoint_error(tmp_path):
    for name, message in bad_files(tmp_path).items():
        path = tmp_path / (f"{name}.npy" if name == "array" else f"{name}.npz")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


def test_missing_file_names_the_path_and_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match="nope.npz.*python -m tinyllm pretrain"):
        load_checkpoint(tmp_path / "nope.npz")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)                              # a folder is not a checkpoint either
    assert issubclass(CheckpointError, ValueError)


def test_save_rejects_object_arrays(tmp_path):
    with pytest.raises(ValueError, match="numeric"):
        save_checkpoint(tmp_path / "c.npz", {"x": np.array([None])}, {})


def test_training_state_round_trip(tmp_path):
    model = GPT(TINY, seed=1)
    opt = AdamW(model.trainable_parameters())
    grads = {k: np.ones_like(v) for k, v in model.trainable_parameters().items()}
    opt.step(grads)
    rng = np.random.default_rng(5)
    rng.integers(10, size=3)                                   # somewhere in the middle of its stream
    save_training_state(tmp_path / "c.npz", model, opt, rng.bit_generator.state, 1, {"loss": [1.0]},
                        {"kind": "test"})
    fresh = GPT(TINY, seed=2)
    fresh_opt = AdamW(fresh.trainable_parameters())
    rng2, step, history, meta = load_training_state(tmp_path / "c.npz", fresh, fresh_opt)
    for k, v in model.params.items():
        np.testing.assert_array_equal(fresh.params[k], v)
        np.testing.assert_array_equal(fresh_opt.m[k], opt.m[k])
    assert fresh_opt.t == 1 and step == 1 and history == {"loss": [1.0]} and meta["kind"] == "test"
    np.testing.assert_array_equal(rng2.integers(1000, size=5), rng.integers(1000, size=5))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_training_state(tmp_path / "c.npz", GPT(GPTConfig(**{**TINY.to_dict(), "n_embd": 8})),
                            AdamW(GPT(TINY).trainable_parameters()))


def test_load_pretrained(tmp_path):
    model = GPT(TINY, seed=3)
    save_training_state(tmp_path / "c.npz", model, AdamW(model.trainable_parameters()),
                        np.random.default_rng(0).bit_generator.state, 0, {}, {"tokenizer_chars": "abcdefghij\n"})
    loaded, tokenizer, meta = load_pretrained(tmp_path / "c.npz")
    assert loaded.config == TINY and tokenizer.vocab_size == 11
    for k, v in model.params.items():
        np.testing.assert_array_equal(loaded.params[k], v)
    save_checkpoint(tmp_path / "other.npz", {"x": np.zeros(1)}, {})
    with pytest.raises(CheckpointError, match="not a pretrained model"):
        load_pretrained(tmp_path / "other.npz")
