"""finetune(): one method on one task, from a base it never changes, with every measurement the comparison needs."""
import dataclasses
import json
import time

import numpy as np
import pytest

import tinyllm.finetune as ft
from tinyllm import GPT, GPTConfig
from tinyllm.data import World
from tinyllm.peft import (AdapterConfig, FullFineTuningConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                          get_peft_model)
from tinyllm.tasks import context_room, evaluate, get_task
from tinyllm.tokenizer import default_tokenizer

TOK = default_tokenizer()
TINY = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
DATA = dict(world_seed=0, n_people=6, n_chars=3000, corpus_seed=0, val_fraction=0.2)
METHODS = {"full": FullFineTuningConfig, "lora": lambda: LoraConfig(r=2, lora_alpha=4),
           "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
           "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
           "adapter": lambda: AdapterConfig(bottleneck_size=4)}


@pytest.fixture(scope="module")
def setup():
    """A random tiny GPT, a small qa task (short examples) and a knowledge probe."""
    world = World(DATA["world_seed"], DATA["n_people"])
    task = get_task("qa", world)
    task = dataclasses.replace(task, val=task.val[:6], test=task.test[:4])
    probe = ft.knowledge_probe(DATA, TOK, TINY.block_size, n_windows=2, window=16)
    probe["recall"] = probe["recall"][:4]
    return GPT(TINY, seed=0), task, probe


def run(setup, config, **kw):
    base, task, probe = setup
    settings = dict(steps=3, batch_size=2, lr=1e-2, eval_interval=2, out=lambda line: None, probe=probe, n_val=4)
    return ft.finetune(base, TOK, config, task, **{**settings, **kw})


@pytest.mark.parametrize("method", list(METHODS))
def test_finetune_measures_every_method(setup, method, tmp_path):
    base, task, probe = setup
    pretrained = base.state_dict()
    r = run(setup, METHODS[method](), save_dir=str(tmp_path / method))
    json.dumps(r)                                              # every number is JSON-able
    for k, v in pretrained.items():                            # the base given is never touched, full included
        np.testing.assert_array_equal(base.params[k], v)
    pm = get_peft_model(GPT(TINY), METHODS[method]())
    assert r["trainable_params"] == pm.get_nb_trainable_parameters()[0]
    assert r["optimizer_state_bytes"] == 2 * 4 * r["trainable_params"]          # float32 m and v
    h = r["history"]
    assert h["step"] == [1, 2, 3] and len(h["train_loss"]) == len(h["train_seconds"]) == 3
    assert h["val_step"] == [0, 2, 3] and h["val_seconds"][0] == 0.0
    assert np.all(np.diff(h["train_seconds"]) > 0) and r["seconds_per_step"] > 0
    assert r["final_val_loss"] == h["val_loss"][-1]
    assert 0 <= r["accuracy_after"] <= 1 and 0 <= r["accuracy_before"] <= 1
    assert set(r["knowledge_after"]) == {"corpus_loss", "window_losses", "fact_recall", "recall_correct"}
    assert np.mean(r["knowledge_after"]["window_losses"]) == pytest.approx(r["knowledge_after"]["corpus_loss"])
    assert np.mean(r["correct_after"]) == r["accuracy_after"]
    weights = "adapter_model.npz" if method in ("full", "adapter") else "adapter_model.safetensors"  # PEFT's if it can
    assert sorted(p.name for p in (tmp_path / method).iterdir()) == ["adapter_config.json", weights]
    assert r["formula"] and r["virtual_tokens"] == getattr(METHODS[method](), "num_virtual_tokens", 0)
    if method == "full":
        assert not r["base_unchanged"] and r["disabled_max_diff"] > 0            # full has no off switch
        assert r["saved_bytes"] > 0.9 * r["full_copy_bytes"]
    else:
        assert r["base_unchanged"] and r["disabled_max_diff"] == 0.0
        assert r["saved_bytes"] < r["full_copy_bytes"] / 4


def test_lora_with_biases_changes_only_its_biases(setup):
    r = run(setup, LoraConfig(r=2, lora_alpha=4, bias="all"))
    assert not r["base_unchanged"]                             # the biases trained, nothing else moved (checked)


def test_a_moved_frozen_weight_is_caught(setup, monkeypatch):
    real_train = ft.train

    def leaky_train(model, *args, **kw):
        model.base_model.params["h.0.mlp.c_fc.weight"][0, 0] += 1.0      # a bug that writes into a frozen weight
        return real_train(model, *args, **kw)
    monkeypatch.setattr(ft, "train", leaky_train)
    with pytest.raises(AssertionError, match="frozen base weights"):
        run(setup, LoraConfig(r=2, lora_alpha=4))


def test_seconds_leave_out_the_evaluations(setup, monkeypatch):
    """A slow evaluation must not show up in the training seconds."""
    def slow_val_loss(*args, **kw):
        def eval_fn(model):
            time.sleep(0.3)
            return 1.0
        return eval_fn
    monkeypatch.setattr(ft, "val_loss_fn", slow_val_loss)
    r = run(setup, LoraConfig(r=2, lora_alpha=4), evaluate_test=False, eval_interval=1)
    assert r["accuracy_after"] is None and r["knowledge_after"] is None
    h = r["history"]
    assert h["train_seconds"][-1] < 0.3                        # 3 evaluations ran before the last step
    assert h["val_seconds"] == [0.0] + h["train_seconds"]      # each evaluation sits at its step's seconds


def test_val_loss_is_per_answer_token_whatever_the_chunks(setup):
    base, task, _ = setup
    one = ft.val_loss_fn(TOK, task, TINY.block_size, n=6, batch_size=100)(base)
    chunked = ft.val_loss_fn(TOK, task, TINY.block_size, n=6, batch_size=4)(base)
    assert chunked == pytest.approx(one, rel=1e-5)


def test_a_prefix_model_is_evaluated_with_room_for_its_tokens(setup):
    base, task, _ = setup
    pm = get_peft_model(GPT(TINY), PrefixTuningConfig(num_virtual_tokens=3))
    assert pm.config.block_size == TINY.block_size and pm.reserved_positions == 3
    assert context_room(pm) == TINY.block_size - 3
    assert 0 <= evaluate(pm, TOK, task)["accuracy"] <= 1


def test_knowledge_probe_is_fixed_and_measured(setup):
    base, _, probe = setup
    x, y = probe["windows"]
    assert x.shape == y.shape == (2, 16) and np.array_equal(x[:, 1:], y[:, :-1])
    again = ft.knowledge_probe(DATA, TOK, TINY.block_size, n_windows=2, window=16)
    np.testing.assert_array_equal(again["windows"][0], x)
    assert len(again["recall"]) == 6 * DATA["n_people"]
    k = ft.measure_knowledge(base, TOK, probe)
    assert k["corpus_loss"] > 0 and 0 <= k["fact_recall"] <= 1
