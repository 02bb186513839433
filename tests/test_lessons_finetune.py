"""
Lessons 05-08 (full fine-tuning, LoRA, prefix tuning, prompt tuning and adapters) run end to end on a tiny,
randomly initialised GPT for a handful of steps. Each test asserts on the numbers the lesson's main()
returns: the exact identities each lesson demonstrates (a no-op start, a prefix that is a KV cache, a
merge that changes nothing), the sizes it prints with their formulas, and that training lowered the loss.
Outputs go to pytest's tmp_path, never to runs/.
"""

import pytest
from lesson_helpers import assert_figures, load_lesson

TINY = dict(n_layer=2, n_head=2, n_embd=32)      # C = 32, L = 2: ~32k parameters, a second or two per lesson
C, L = TINY["n_embd"], TINY["n_layer"]
GPT_PARAMS = 64 * C + 128 * C + L * (12 * C * C + 13 * C) + 2 * C   # V*C + T*C + L*(12C^2 + 13C) + 2C
RUN = dict(config=TINY, n_test=4, n_val=8)       # a random model (no checkpoint needed), 4 test, 8 val examples


def test_05_full_finetuning(tmp_path):
    m = load_lesson("05_full_finetuning").main(steps=3, out_dir=str(tmp_path), **RUN)
    assert not m["pretrained"]
    assert m["trainable_params"] == m["total_params"] == m["formula_count"] == GPT_PARAMS
    assert m["optimizer_state_bytes"] == 2 * m["weight_bytes"] == 2 * 4 * m["total_params"]   # float32 m and v
    assert m["saved_bytes"] == pytest.approx(m["full_copy_bytes"], rel=0.02)   # a full copy per task
    assert m["val_loss_after"] < m["val_loss_before"]
    # the variant: the last block and ln_f only, and a smaller file (that still needs the base)
    assert m["last_k_trainable_params"] == m["last_k_formula_count"] == 12 * C * C + 13 * C + 2 * C
    assert m["last_k_optimizer_state_bytes"] == 2 * 4 * m["last_k_trainable_params"]
    assert m["last_k_saved_bytes"] < m["saved_bytes"]
    assert m["last_k_val_loss_after"] < m["val_loss_before"]
    for k in (m["knowledge_before"], m["knowledge_after"]):
        assert 0.0 <= k["fact_recall"] <= 1.0 and k["corpus_loss"] > 0
    assert set(m["scores"]) == {"before", "after"}
    assert m["scores"]["before"]["accuracy"] == m["accuracy_before"]
    assert m["scores"]["after"]["accuracy"] == m["accuracy_after"]
    for s in m["scores"].values():
        assert 0.0 <= s["format_rate"] <= 1.0 and s["by_field"]
    assert_figures(m["figures"], tmp_path, 2)


def test_06_lora(tmp_path):
    m = load_lesson("06_lora").main(steps=3, second_steps=3, out_dir=str(tmp_path), **RUN)
    r = 8                                               # every linear: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert m["trainable_params"] == m["formula_count"] == L * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert m["noop_max_diff"] == 0.0                    # B = 0: exactly the base
    assert m["base_unchanged"]
    assert m["val_loss_after"] < m["val_loss_before"]
    assert m["second_val_loss_after"] < m["second_val_loss_before"]
    assert m["merged_vs_unmerged_max_diff"] < 1e-4      # float32 rounding, nothing more
    assert m["unmerge_restores_max_diff"] < 1e-5
    assert m["merged_is_plain_gpt"] and m["merged_num_parameters"] == GPT_PARAMS
    assert m["merge_and_unload_max_diff"] < 1e-4
    assert m["adapter_bytes"] < m["full_copy_bytes"] / 2
    assert m["reload_max_diff"] == 0.0                  # the saved adapter is the trained one, bit for bit
    assert m["disabled_max_diff"] == 0.0
    rows = m["task_table"]
    assert set(rows) == {"base (disable_adapter)", "adapter 'extract'", "adapter 'qa'"}
    # each adapter lowered the loss of its own task below the base's
    assert rows["adapter 'extract'"]["extract"]["val_loss"] < rows["base (disable_adapter)"]["extract"]["val_loss"]
    assert rows["adapter 'qa'"]["qa"]["val_loss"] < rows["base (disable_adapter)"]["qa"]["val_loss"]
    assert_figures(m["figures"], tmp_path, 2)


def test_07_prefix_tuning(tmp_path):
    P = 5
    m = load_lesson("07_prefix_tuning").main(steps=3, num_virtual_tokens=P, lengths=(1, P), out_dir=str(tmp_path),
                                             **RUN)
    assert m["trainable_params"] == 2 * L * P * C
    assert m["prefix_vs_kv_cache_max_diff"] < 1e-5      # the prefix model is the base with a pre-filled KV cache
    assert m["text_prefix_vs_text_max_diff"] < 1e-5     # a prefix from text is the base reading that text
    assert m["prompt_trainable"] == P * C                # a prompt: P input vectors, 2L times fewer numbers
    assert m["prompt_as_prefix_max_diff"] < 1e-5        # every prompt is the prefix its blocks compute
    assert m["prompt_vs_prefix_from_text_max_diff"] < 1e-5   # from the same text: the same model at the start
    assert m["generation_matches_cache"]
    assert m["val_loss_after"] < m["val_loss_before"]
    assert m["length_trainable"] == {n: 2 * L * n * C for n in (1, P)}
    assert m["projection_saved_numbers"] == 2 * L * P * C < m["projection_trainable_params"]
    assert m["projection_reloaded_val_loss"] == pytest.approx(m["projection_val_loss"], abs=1e-6)
    assert m["saved_bytes"] < m["full_copy_bytes"]
    assert_figures(m["figures"], tmp_path, 2)


def test_08_prompt_tuning_and_adapters(tmp_path):
    P, mb = 5, 4
    m = load_lesson("08_prompt_tuning_and_adapters").main(steps=3, num_virtual_tokens=P, bottleneck_size=mb,
                                                          out_dir=str(tmp_path), **RUN)
    assert m["prompt_trainable"] == P * C
    assert m["prompt_vs_text_max_diff"] < 1e-6          # a prompt from text is that text
    assert m["adapter_trainable"] == L * 2 * (2 * C * mb + mb + C)
    assert m["adapter_noop_max_diff"] == 0.0            # up = 0: each adapter is the identity
    assert m["adapter_val_loss_after"] < m["adapter_val_loss_before"]
    assert len(m["prompt_val_loss"]) == 3
    assert m["text_prompt_distance"] > 0                # training moved the TEXT prompt off the token embeddings
    rows = {row["method"].split(",")[0]: row for row in m["table"]}
    assert set(rows) == {"full fine-tuning", "LoRA r=8", "prefix tuning", "adapters", "prompt tuning", "(IA)^3"}
    assert rows["prompt tuning"]["trainable_params"] < rows["prefix tuning"]["trainable_params"] \
        < rows["full fine-tuning"]["trainable_params"]
    assert m["ia3_trainable"] == rows["(IA)^3"]["trainable_params"] == L * 7 * C     # c_attn's 3C, mlp.c_proj's 4C
    assert m["ia3_noop_max_diff"] == 0.0 and m["ia3_merge_max_diff"] < 1e-5        # ones: the base; merges exactly
    for row in m["table"]:
        assert row["final_val_loss"] < row["val_loss_before"], row["method"]
        assert row["saved_bytes"] <= 1.02 * m["full_copy_bytes"]
    assert_figures(m["figures"], tmp_path, 2)
