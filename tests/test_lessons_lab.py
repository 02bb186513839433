"""
Lessons 10-15 (the ablations and the memory calculator) run end to end with a tiny random GPT and a few
steps; a learner runs the defaults. The assertions check the numbers each main() returns against what
they must be (parameter counts, consistency between two ways of computing one thing), and that the
figures are real PNG files. Outputs go to pytest's tmp_path, never to runs/.
"""
import math

import numpy as np
import pytest
from tinyllm.presets import MAIN_METHODS
from lesson_helpers import assert_figures, load_lesson

TINY = dict(n_layer=1, n_head=2, n_embd=32)       # block_size stays 128: the tasks' examples must fit
C, L = TINY["n_embd"], TINY["n_layer"]


def finite(x):
    return isinstance(x, float) and math.isfinite(x)


def test_10_lora_rank_and_targets(tmp_path):
    m = load_lesson("10_lora_rank_and_targets").main(ranks=(1, 2), steps=2, batch_size=2, noise_seeds=(1,),
                                                    config=TINY, out_dir=str(tmp_path))
    assert set(m["ranks"]) == {1, 2, 8}                                  # the main rank always runs
    for r, run in m["ranks"].items():
        assert run["params"] == r * (C + 3 * C) * L                      # r * (in + out) on c_attn
        assert finite(run["val_loss"]) and 0.0 <= run["accuracy"] <= 1.0 and run["update_norm"] > 0
    assert m["budget"] == 8 * 4 * C * L
    for label, run in m["targets"].items():                              # every target near the budget
        assert abs(run["params"] - m["budget"]) <= 0.25 * m["budget"], label
    assert m["targets"]["q,v"]["params"] == m["budget"] and m["targets"]["q"]["r"] == 16
    assert m["targets"]["q|k|v (c_attn)"]["val_loss"] == m["ranks"][8]["val_loss"]   # the same run, reused
    noise = [run["val_loss"] for run in m["noise"]]
    assert len(noise) == 2 and m["seed_spread"] == pytest.approx(max(noise) - min(noise))
    assert sorted(m["target_order"]) == sorted(m["targets"])
    order_losses = [m["targets"][k]["val_loss"] for k in m["target_order"]]
    assert order_losses == sorted(order_losses)                          # best to worst
    assert_figures(m["figures"], tmp_path, 2)


def test_11_prefix_prompt_adapter_sizes(tmp_path):
    m = load_lesson("11_prefix_prompt_adapter_sizes").main(lengths=(2, 50), widths=(2,), steps=2, batch_size=2,
                                                          noise_seeds=(), mlp_lr_scales=(0.1,), config=TINY,
                                                          out_dir=str(tmp_path))
    assert set(m["prefix"]) == set(m["prompt"]) == {2, 10, 50} and set(m["adapter"]) == {2, 16}
    for P in (2, 10, 50):
        assert m["prefix"][P]["params"] == 2 * L * P * C                 # a key and a value per layer
        assert m["prompt"][P]["params"] == P * C
    for w in (2, 16):
        assert m["adapter"][w]["params"] == L * 2 * (2 * C * w + w + C)
    H = 64                                                               # PrefixTuningConfig's encoder_hidden_size
    assert set(m["prefix_init"]) == {"random", "real text", f"MLP, lr {0.1 * m['lrs']['prefix']:g}"}
    mlp = m["prefix_init"][f"MLP, lr {0.1 * m['lrs']['prefix']:g}"]
    assert mlp["params"] == 10 * C + C * H + H + H * 2 * L * C + 2 * L * C
    assert set(m["prompt_init"]) == {"RANDOM", "SAMPLE_VOCAB", "TEXT"}
    assert m["dropped"] == {}                                            # extract examples fit even with P = 50
    runs = [*m["prefix"].values(), *m["prompt"].values(), *m["adapter"].values()]
    assert all(finite(r["val_loss"]) and r["dropped"] == 0 for r in runs)
    assert_figures(m["figures"], tmp_path, 1)


def test_11_drops_examples_that_do_not_fit(tmp_path):
    lesson = load_lesson("11_prefix_prompt_adapter_sizes")
    from tinyllm.data import World
    from tinyllm.tasks import get_task
    from tinyllm.tokenizer import default_tokenizer
    tok = default_tokenizer()
    task = get_task("record", World(0, 24))
    small, dropped = lesson.fitting(task, tok, 128 - 50)
    assert dropped["train"] > 0 and len(small.train) + dropped["train"] == len(task.train)
    assert all(len(p) + len(a) - 1 <= 78 for p, a in small.train + small.val + small.test)


def test_12_data_size(tmp_path):
    m = load_lesson("12_data_size").main(sizes=(5, None), methods=("full", "lora", "prompt"), steps=3,
                                        batch_size=2, tail=2, config=TINY, out_dir=str(tmp_path))
    from tinyllm.data import World
    from tinyllm.presets import DEFAULT_TASK
    from tinyllm.tasks import get_task
    assert m["sizes"] == [5, len(get_task(DEFAULT_TASK, World()).train)]  # None: all of the task's training examples
    assert set(m["results"]) == {"full", "lora", "prompt"}
    for method, by_n in m["results"].items():
        for n, r in by_n.items():
            assert finite(r["val_loss"]) and finite(r["train_loss"])
            assert r["gap"] == pytest.approx(r["val_loss"] - r["train_loss"])
    assert m["results"]["full"][5]["params"] > m["results"]["lora"][5]["params"] > m["results"]["prompt"][5]["params"]
    assert set(m["seed_spread"]) == {"full", "lora", "prompt"} and all(v > 0 for v in m["seed_spread"].values())
    assert_figures(m["figures"], tmp_path, 1)


def test_13_is_the_update_low_rank(tmp_path):
    m = load_lesson("13_is_the_update_low_rank").main(steps=3, batch_size=2, ranks=(1, 8, 64), n_test=10, config=TINY,
                                                     out_dir=str(tmp_path))
    rows = m["truncation"]
    assert set(rows) == {0, 1, 8, "full"}                                # 64 > C is left out
    # rebuilding the model from its pieces with the whole dW gives back the fine-tuned model's val loss
    assert rows["full"]["val_loss"] == pytest.approx(m["full_val_loss"], rel=1e-5)
    for name, e in m["energy_at_lora_r"].items():
        assert 0 < e <= 1 and 0 < m["random_energy_at_lora_r"][name] <= 1 and m["directions_for_90"][name] <= C
    assert len(m["overlap"]) == L and all(0 <= o["overlap"] <= 1 + 1e-9 for o in m["overlap"].values())
    assert all(0 <= o["overlap_out"] <= 1 + 1e-9 for o in m["overlap"].values())
    assert all(o["chance"] == pytest.approx(8 / C) for o in m["overlap"].values())        # c_attn's input: C
    assert all(o["chance_out"] == pytest.approx(8 / (3 * C)) for o in m["overlap"].values())   # its output: 3C
    assert_figures(m["figures"], tmp_path, 2)


def test_13_truncation_is_the_best_low_rank_approximation():
    lesson = load_lesson("13_is_the_update_low_rank")
    rng = np.random.default_rng(0)
    dW = rng.standard_normal((12, 7))
    s = np.linalg.svd(dW, compute_uv=False)
    for r in (1, 3, 7):
        approx = lesson.truncated(dW, r)
        assert np.linalg.matrix_rank(approx) == r
        assert np.linalg.norm(dW - approx) ** 2 == pytest.approx(np.sum(s[r:] ** 2))   # Eckart-Young
    assert lesson.energy(s)[-1] == pytest.approx(1.0)
    assert lesson.subspace_overlap(dW, dW, 3) == pytest.approx(1.0)
    # weights are (in, out): two updates that read the same input direction and write orthogonal outputs
    u, v1, v2 = np.eye(12)[0], np.eye(7)[0], np.eye(7)[1]
    a, b = np.outer(u, v1), np.outer(u, v2)                             # (in, out) = (12, 7)
    assert lesson.subspace_overlap(a, b, 1, "input") == pytest.approx(1.0)
    assert lesson.subspace_overlap(a, b, 1, "output") == pytest.approx(0.0)


def test_14_few_shot_vs_finetuning(tmp_path):
    # qa, where two shots fit (on the default task, extract, one at most)
    m = load_lesson("14_few_shot_vs_finetuning").main(task_name="qa", max_shots=3, seeds=(0, 1), methods=("lora",),
                                                     steps=2, batch_size=2, config=TINY, out_dir=str(tmp_path))
    from tinyllm.data import World
    from tinyllm.tasks import TASKS, few_shot_task, get_task
    from tinyllm.tokenizer import default_tokenizer
    tok, world, block_size = default_tokenizer(), World(), 128

    def fits(task):                      # greedy decoding of n answer tokens after p prompt tokens: p + n - 1
        return all(len(tok.encode(p)) + len(tok.encode(a)) - 1 <= block_size for p, a in task.val + task.test)
    for name in TASKS:
        task = get_task(name, world)
        fit = {k: sum(fits(few_shot_task(task, k, s) if k else task) for s in (0, 1)) for k in range(4)}
        assert m["fit"][name] == fit, name
        assert m["largest_k"][name] == max([k for k, n in fit.items() if n == 2], default=None), name
    tokens = [np.mean([r["tokens"] for r in m["prompted"][k]]) for k in (0, 1, 2)]
    assert tokens[0] < tokens[1] < tokens[2]                             # every shot costs tokens
    assert len(m["prompted"][0]) == 1 and len(m["prompted"][2]) == 2     # k = 0 has no shots to choose
    lora = m["tuned"]["lora"]
    assert lora["tokens"] == pytest.approx(tokens[0]) and lora["train_examples"] == 2 * 2
    assert m["extra_tokens"] == pytest.approx(tokens[2] - tokens[0])
    assert_figures(m["figures"], tmp_path, 1)


def test_15_memory_at_scale(tmp_path):
    m = load_lesson("15_memory_at_scale").main(check_config=dict(n_layer=1, n_head=2, n_embd=16, block_size=32),
                                              check_batch=(2, 8), out_dir=str(tmp_path))
    assert m["calculator_agrees"] and all(row["agree"] for row in m["check"].values())
    assert m["gpt2_small_params"] == 124_439_808
    assert m["trainable_gpt2_small"]["lora"] == 294_912
    assert m["params"]["gpt2-xl"] == 1_557_611_200
    xl = m["gib"]["gpt2-xl"]
    assert xl["full"]["adam"] == pytest.approx(2 * xl["full"]["weights"])
    assert all(xl[k]["total"] < xl["full"]["total"] for k in xl if k != "full")
    # the per-block breakdown adds up to tinyllm.memory's count; only full fine-tuning reads every linear's input
    assert m["breakdown_matches"]
    unread = m["unread_gib"]
    assert unread["full"] == 0 and all(unread[k] > 0 for k in unread if k != "full")
    assert unread["lora"] < unread["prompt"]                             # LoRA's A gradient reads c_attn's input
    assert all(unread[k] < xl[k]["activations"] for k in unread)
    assert_figures(m["figures"], tmp_path, 1)


def test_16_speed(tmp_path):
    """The lesson's measurements on a tiny model: no timing goals (those are the bench's), only that every
    part ran, its numbers are sane, and the two GELUs agree."""
    tiny = dict(vocab_size=16, block_size=32, n_layer=1, n_head=2, n_embd=16)
    m = load_lesson("16_speed").main(config=tiny, batch_size=2, repeats=1, gelu_shape=(64, 32), out_dir=tmp_path)
    assert m["peak_gflops"] > 0 and m["model"]["tokens_per_s"] > 0
    layers = {r["layer"] for r in m["profile"]}
    assert {"linear", "attention", "gelu", "layernorm"} <= layers
    assert sum(r["forward"] + r["backward"] for r in m["profile"]) <= 1.5 * m["step_seconds"]
    assert m["gelu"]["max_difference"] < 1e-5 and all(t > 0 for t in m["gelu"]["seconds"].values())
    assert set(m["methods"]) == {"frozen", *MAIN_METHODS}
    assert m["methods"]["frozen"]["trainable"] == 0
    assert all(r["ratio_to_full"] == pytest.approx(r["seconds"] / m["methods"]["full"]["seconds"])
               for r in m["methods"].values())
    assert m["generation"]["base"]["speedup"] > 0
    assert_figures(m["figures"], tmp_path, 1)



def test_18_to_hugging_face_and_back(tmp_path):
    """Without --gpt2 on a tiny random model; then --gpt2 on a tiny GPT-2 folder with a small BPE vocabulary,
    made here the way the lesson learns its merges."""
    lesson = load_lesson("18_to_hugging_face_and_back")
    m = lesson.main(steps=2, config=dict(n_layer=1, n_head=2, n_embd=16), out_dir=str(tmp_path / "out"))
    assert m["round_trip_exact"] and m["adapter_round_trip_max_diff"] == 0.0
    assert m["tensors"] == 2 + 12 + 2 and m["adapter_arrays"] == 2              # one block: 16 weights; A, B
    assert m["round_trip"] and m["merge_steps"] >= 2
    if m["pytorch_max_diff"] is not None:                                       # transformers and peft installed
        assert m["pytorch_max_diff"] < 1e-4
    import json
    from tinyllm import GPT, GPTConfig
    vocab, merges = lesson.learn_merges("the cat sat on the mat and the cat ate. " * 20, 20)
    folder = tmp_path / "gpt2"
    GPT(GPTConfig(vocab_size=len(vocab), block_size=64, n_layer=1, n_head=2, n_embd=16)).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    m = lesson.real_gpt2(str(folder), steps=3, echo=lambda line: None)
    assert m["gpt2_trainable"] == 8 * (16 + 48) and len(m["gpt2_losses"]) == 3


def test_17_new_tokens(tmp_path):
    m = load_lesson("17_new_tokens").main(steps=2, n_test=4, config=dict(n_layer=1, n_head=2, n_embd=16),
                                          out_dir=str(tmp_path))
    assert m["unseen_in_corpus"] == ["=", "|"]                   # the premise: pretraining never shows them
    runs = m["runs"]
    lora, rows = runs["LoRA"], runs["LoRA + rows of = |"]
    assert rows["trainable"] - lora["trainable"] == 2 * 16       # two rows of C numbers, the tied head's too
    assert runs["full"]["trainable"] > rows["trainable"]
    assert all(np.isfinite(r["val_loss"]) for r in runs.values()) and np.isfinite(m["seen_val_loss"])
    assert_figures(m["figures"], tmp_path, 1)


def test_19_many_cores(tmp_path):
    m = load_lesson("19_many_cores").main(config=dict(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16),
                                          batch_size=4, repeats=1, out_dir=str(tmp_path))
    assert abs(m["loss_n"] - m["loss_1"]) < 1e-5 and m["grad_rel_diff"] < 1e-4     # one big batch's result
    assert sum(m["shards"]) > 0 and len(m["shards"]) >= 2
    assert m["allreduce_numbers"]["lora"] < m["allreduce_numbers"]["full"]
    assert all(s > 0 for s in m["seconds"].values())
    assert_figures(m["figures"], tmp_path, 1)
