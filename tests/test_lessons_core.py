"""
Lessons 01-04 run end to end with tiny configs (a learner runs the defaults). Each test asserts on the
numbers the lesson's main() returns, in ways that fail when the lesson or the library breaks, and checks
that its figures are real PNG files. Outputs go to pytest's tmp_path, never to runs/.
"""
import math
import os

import numpy as np
import pytest
from lesson_helpers import assert_figures, load_lesson


TINY = dict(n_layer=2, n_head=2, n_embd=32)        # config=...: a new random model instead of the pretrained one


def test_01_tokens_and_embeddings(tmp_path):
    m = load_lesson("01_tokens_and_embeddings").main(n_chars=20_000, n_windows=4, out_dir=str(tmp_path), config=TINY)
    assert m["vocab_size"] == 64 and not m["pretrained"]
    assert m["round_trip_ok"]
    assert (m["unknown_char"], m["unknown_position"]) == ("M", 0)      # 'Mia lives in Oslo.'
    assert m["batch_shifted_by_one"]
    assert m["embedding_shape"] == (4, 24, 32)
    assert m["onehot_max_diff"] == 0.0 and m["embedding_forward_max_diff"] == 0.0
    assert abs(m["wpe_neighbour_cosine"]) < 0.1                 # random init: no structure between positions
    assert abs(m["new_wpe_neighbour_cosine"]) < 0.1
    digits = m["group_similarity"]["new"]["digits"]             # random rows: nothing alike
    assert digits["n"] == 10 and abs(digits["inside"]) < 0.15 and digits["chance"] == pytest.approx(9 / 40)
    # a new model scores about ln(V); letter counts alone do much better; the two unigram numbers agree
    assert m["uniform_loss"] == pytest.approx(math.log(64))
    assert abs(m["init_loss"] - m["uniform_loss"]) < 0.1 and abs(m["model_loss"] - m["uniform_loss"]) < 0.1
    assert m["unigram_loss"] < m["uniform_loss"] - 0.8
    assert abs(m["unigram_model_loss"] - m["unigram_loss"]) < 0.1
    assert_figures(m["figures"], tmp_path, 3)


def test_01_group_similarity_finds_a_planted_group():
    lesson = load_lesson("01_tokens_and_embeddings")
    rng = np.random.default_rng(0)
    chars = list("0123456789abcdefghij")
    rows = rng.normal(size=(20, 64))
    rows[:10] += 4 * rng.normal(size=64)                        # the digits share one direction
    s = lesson.group_similarity(rows, chars, {"digits": "0123456789", "letters": "abcdefghij"})
    assert s["digits"]["inside"] > 0.8 and abs(s["digits"]["outside"]) < 0.2
    assert s["digits"]["nearest_inside"] == 1.0 and s["digits"]["chance"] == pytest.approx(9 / 19)
    assert abs(s["letters"]["inside"]) < 0.2
    assert set(lesson.nearest_neighbours(rows)[:10]) <= set(range(10))


def test_02_attention(tmp_path):
    m = load_lesson("02_attention").main(sentence="mia lives in rome.", config=TINY, n_windows=4,
                                         out_dir=str(tmp_path))
    assert not m["pretrained"]
    assert m["head_size"] == 16 and m["n_tokens"] == 18
    assert m["by_hand_max_diff"] < 1e-5                    # float32: the by-hand walk is attention_forward
    assert m["att_by_hand_vs_model_max_diff"] < 1e-5
    assert m["att_rows_max_err"] < 1e-6
    assert m["att_future_max"] == 0.0                      # no weight on any future key, exactly
    # a random model's heads spread evenly: they favour nothing
    assert all(label is None for label in m["head_labels"].values())
    for name, even in m["even_shares"].items():
        assert m["new_head_shares"][name] == pytest.approx(even, rel=0.2)
    assert m["causality_max_diff_before"] == 0.0           # earlier logits bit-identical
    assert m["causality_min_change_after"] > 0.0           # every later position did change
    assert m["kv_cache_max_diff_float32"] < 1e-5
    assert m["kv_cache_max_diff_float64"] < 1e-12
    assert_figures(m["figures"], tmp_path, 3)


def test_02_head_patterns_on_planted_attention():
    lesson = load_lesson("02_attention")
    from tinyllm.tokenizer import default_tokenizer
    tok = default_tokenizer()
    x = tok.encode("ab cd. ef")[None]                       # a0 b1 _2 c3 d4 .5 _6 e7 f8
    masks = lesson.pattern_masks(x, tok)
    assert np.flatnonzero(masks["last ␣"][0, 8]).tolist() == [6]
    assert np.flatnonzero(masks["last ␣"][0, 6]).tolist() == [2]      # strictly before the query
    assert np.flatnonzero(masks["last ."][0, 8]).tolist() == [5]
    assert not masks["last ."][0, 5].any()
    T = x.shape[1]
    previous = np.eye(T, k=-1)[None, None].copy()          # every query looks at the character before it
    previous[..., 0, 0] = 1.0
    s = lesson.pattern_shares(previous, masks)
    assert s["previous"][0] == 1.0 and s["itself"][0] == 0.0 and s["keys"][0] == pytest.approx(1.0)
    even = lesson.pattern_shares(lesson.even_spread(1, T), masks)
    assert even["keys"][0] == pytest.approx(np.mean(np.arange(2, T + 1)))
    assert even["previous"][0] == pytest.approx(np.mean(1 / np.arange(2, T + 1)))
    assert lesson.strongest(s, even, 0)[0] == "previous"


@pytest.mark.parametrize("name, kwargs", [("01_tokens_and_embeddings", dict(n_chars=20_000, n_windows=2)),
                                          ("02_attention", dict(n_windows=2))])
def test_01_02_pretrain_first_when_there_is_no_checkpoint(name, kwargs, tmp_path, monkeypatch):
    """A learner's first run has no checkpoint: the lesson pretrains one (here QUICK's recipe, 3 steps), saves it
    where later lessons look, and then shows the pretrained model."""
    from tinyllm.pretrain import pretrain
    import lessons.common as common
    lesson = load_lesson(name)
    calls = []

    def quick(out, echo, resume_command):
        calls.append(out)
        return pretrain(out=out, echo=echo, resume_command=resume_command, quick=True, steps=3)
    monkeypatch.setattr(common, "pretrain", quick)
    monkeypatch.setattr(common, "LESSON_04", str(tmp_path / "no_lesson_04.npz"))
    ckpt = tmp_path / "pretrain" / "ckpt.npz"
    m = lesson.main(out_dir=str(tmp_path), checkpoint=str(ckpt), **kwargs)
    assert calls == [str(ckpt)] and ckpt.exists() and m["pretrained"]
    assert m["pretrained_now"]
    if name.startswith("01"):
        m = lesson.main(out_dir=str(tmp_path), checkpoint=str(ckpt), **kwargs)   # the second run reuses it
        assert calls == [str(ckpt)] and m["pretrained"] and not m["pretrained_now"]


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
