"""
Lessons 01-04 run end to end with tiny configs (a learner runs the defaults). Each test asserts on the
numbers the lesson's main() returns, in ways that fail when the lesson or the library breaks, and checks
that its figures are real PNG files. Outputs go to pytest's tmp_path, never to runs/.
"""
import math
import os

import pytest
from lesson_helpers import assert_figures, load_lesson


def test_01_tokens_and_embeddings(tmp_path):
    m = load_lesson("01_tokens_and_embeddings").main(n_chars=20_000, out_dir=str(tmp_path), checkpoints=())
    assert m["vocab_size"] == 64 and not m["pretrained"]
    assert m["round_trip_ok"]
    assert (m["unknown_char"], m["unknown_position"]) == ("M", 0)      # 'Mia lives in Oslo.'
    assert m["batch_shifted_by_one"]
    assert m["embedding_shape"] == (4, 24, 128)
    assert m["onehot_max_diff"] == 0.0 and m["embedding_forward_max_diff"] == 0.0
    assert abs(m["wpe_neighbour_cosine"]) < 0.1                 # random init: no structure between positions
    # a new model scores about ln(V); letter counts alone do much better; the two unigram numbers agree
    assert m["uniform_loss"] == pytest.approx(math.log(64))
    assert abs(m["init_loss"] - m["uniform_loss"]) < 0.1
    assert m["unigram_loss"] < m["uniform_loss"] - 0.8
    assert abs(m["unigram_model_loss"] - m["unigram_loss"]) < 0.1
    assert_figures(m["figures"], tmp_path, 2)


def test_02_attention(tmp_path):
    m = load_lesson("02_attention").main(sentence="mia lives in rome.", config=dict(n_layer=2, n_head=2, n_embd=32),
                                         out_dir=str(tmp_path), checkpoints=())   # checkpoints=(): a random model
    assert not m["pretrained"]
    assert m["head_size"] == 16 and m["n_tokens"] == 18
    assert m["by_hand_max_diff"] < 1e-5                    # float32: the by-hand walk is attention_forward
    assert m["att_by_hand_vs_model_max_diff"] < 1e-5
    assert m["att_rows_max_err"] < 1e-6
    assert m["att_future_max"] == 0.0                      # no weight on any future key, exactly
    assert m["causality_max_diff_before"] == 0.0           # earlier logits bit-identical
    assert m["causality_min_change_after"] > 0.0           # every later position did change
    assert m["kv_cache_max_diff_float32"] < 1e-5
    assert m["kv_cache_max_diff_float64"] < 1e-12
    assert_figures(m["figures"], tmp_path, 2)


def test_03_backprop_by_hand(tmp_path):
    m = load_lesson("03_backprop_by_hand").main(n_samples=10, out_dir=str(tmp_path))
    assert m["same_keys"] and len(m["model_rows"]) == 28   # 2 embeddings + 2 x 12 per block + ln_f's 2
    assert m["grad_vs_library_max_diff"] < 1e-12           # the walk-through is gpt_backward
    assert m["worst_model_rel_error"] < 1e-6
    assert m["worst_layer_rel_error"] < 1e-7
    assert {name.split(":")[0] for name, _, _ in m["layer_rows"]} == {"layernorm", "gelu", "attention",
                                                                      "cross_entropy"}
    assert m["float64_rel_error_at_1e5"] < 1e-7
    assert m["best_float32_rel_error"] > 1e-6              # the lesson's point: float32 cannot pass the check
    assert_figures(m["figures"], tmp_path, 2)


def test_04_pretraining(tmp_path):
    m = load_lesson("04_pretraining").main(quick=True, steps=10, sample_chars=20, out_dir=str(tmp_path))
    assert m["status"] == "completed" and m["steps"] == 10
    assert m["tokens_seen"] == 10 * 4 * 128                # QUICK: batches of 4 windows of 128
    assert m["first_val_loss"] == pytest.approx(m["uniform_loss"], abs=0.15)
    assert m["final_val_loss"] < m["first_val_loss"] - 0.5  # the loss went down
    assert m["final_train_loss"] < m["first_train_loss"]
    assert set(m["samples"]) == {0.0, 0.5, 1.0} and all(len(s) == 20 for s in m["samples"].values())
    assert 0.0 <= m["fact_recall"] <= 1.0 and len(m["fact_recall_by_attribute"]) == 6
    assert os.path.getsize(m["checkpoint"]) > 0
    assert_figures(m["figures"], tmp_path, 2)
