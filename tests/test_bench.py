"""The benchmark's pieces run on a tiny model and report sane figures (no timing goals here: those
belong to `python -m tinyllm bench`)."""
import numpy as np
import pytest

from tinyllm import bench
from tinyllm.memory import training_memory
from tinyllm.model import GPTConfig
from tinyllm.presets import MAIN_METHODS

TINY = GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=16)


def test_train_flops_counts_each_matmul():
    B, T, C, L, V = 2, TINY.block_size, TINY.n_embd, TINY.n_layer, TINY.vocab_size
    per_token_linear = 2 * (3 * C * C + C * C + 4 * C * C + 4 * C * C)   # c_attn, attn.c_proj, c_fc, mlp.c_proj
    forward = B * T * (per_token_linear * L + 2 * C * V) + 4 * B * T * T * C * L
    assert bench.train_flops(TINY, B, T) == 3 * forward


def test_time_model_and_generate_report_positive_rates():
    r = bench.time_model(TINY, 2, repeats=1)
    assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(2 * TINY.block_size / r["seconds"])
    assert r["gflops"] == pytest.approx(bench.train_flops(TINY, 2, TINY.block_size) / r["seconds"] / 1e9)
    g = bench.bench_generate(TINY, n_new=8, repeats=1)
    assert set(g) == {"base", "lora merged", *MAIN_METHODS}
    for r in g.values():
        assert r["kv_cache_tokens_per_s"] > 0 and r["no_cache_tokens_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["kv_cache_tokens_per_s"] / r["no_cache_tokens_per_s"])
    for r in g.values():                     # a ratio of times: tokens/s the other way round
        assert r["ratio_to_base"] == pytest.approx(g["base"]["kv_cache_tokens_per_s"] / r["kv_cache_tokens_per_s"])


def test_generation_models_generate_what_the_base_generates_at_init():
    """At initialisation every method is the identity (LoRA B = 0, adapters up = 0) except prefix and
    prompt tuning, whose virtual tokens change the context: so the other four give the base's tokens."""
    models = bench.generation_models(TINY)
    prompt = np.arange(6).reshape(1, 6) % TINY.vocab_size
    base = models["base"].generate(prompt, 8, temperature=0)
    for name in ("full", "lora", "lora merged", "adapter"):
        assert np.array_equal(models[name].generate(prompt, 8, temperature=0), base), name
    assert models["lora merged"].active_adapter in models["lora merged"]._merged


def test_profile_layers_times_every_layer():
    rows, total = bench.profile_layers(TINY, 2, repeats=1)
    rows = {r["layer"]: r for r in rows}
    assert set(rows) == {"embedding", "layernorm", "linear", "gelu", "attention", "cross_entropy"}
    assert all(r["forward"] > 0 and r["backward"] > 0 for r in rows.values())
    assert sum(r["forward"] + r["backward"] for r in rows.values()) <= total


def test_profile_layers_counts_the_matmul_flops_of_a_step():
    """Every block matmul is counted once (the tied head is not a layer call); elementwise layers do none."""
    B, T, C, V = 2, TINY.block_size, TINY.n_embd, TINY.vocab_size
    rows = {r["layer"]: r for r in bench.profile_layers(TINY, B, repeats=2)[0]}
    head = 3 * 2 * B * T * C * V
    assert rows["linear"]["flops"] + rows["attention"]["flops"] == bench.train_flops(TINY, B, T) - head
    assert rows["attention"]["flops"] == 3 * 4 * B * T * T * C * TINY.n_layer
    assert all(rows[n]["flops"] == 0 for n in ("layernorm", "gelu", "embedding", "cross_entropy"))


def test_bench_methods_ratios_and_memory_counts():
    rows = bench.bench_methods(TINY, 2, repeats=1)
    assert set(rows) == {"frozen", *MAIN_METHODS}
    configs = bench.method_configs()
    for name, r in rows.items():
        T = TINY.block_size - getattr(configs.get(name), "num_virtual_tokens", 0)   # virtual tokens take room
        assert r["ratio_to_full"] == pytest.approx(r["seconds"] / rows["full"]["seconds"])
        assert r["tokens_per_s"] == pytest.approx(2 * T / r["seconds"])
        assert r["adam_bytes"] == 2 * r["trainable"] * 4          # m and v in float32
        assert r["grad_bytes"] == r["trainable"] * 4
        assert r["activation_bytes"] > 0
        # at the end of the backward the weights, AdamW state, activations and gradients all exist at once
        assert r["peak_step_bytes"] >= r["counted_bytes"]
    for name, cfg in configs.items():                           # the counts are tinyllm.memory's
        assert rows[name]["counted_bytes"] == training_memory(TINY, cfg, batch_size=2)["bytes"]["total"], name
    assert rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert rows["frozen"]["trainable"] == rows["frozen"]["grad_bytes"] == rows["frozen"]["adam_bytes"] == 0
    assert rows["frozen"]["weights_bytes"] == rows["full"]["weights_bytes"]


def test_activation_bytes_match_the_memory_calculator():
    """The cache holds the calculator's float activations plus a few small int arrays (ids, targets,
    counted rows): within 2%. Counting the weights too would double the figure."""
    from tinyllm.memory import activation_count
    B = 2
    rows = bench.bench_methods(TINY, B, repeats=1)
    for name, cfg in bench.method_configs().items():
        T = TINY.block_size - getattr(cfg, "num_virtual_tokens", 0)
        floats = activation_count(TINY, cfg, B, T) * 4
        assert floats <= rows[name]["activation_bytes"] <= 1.02 * floats, name


def test_each_library_is_timed_in_a_process_of_its_own():
    rows = bench.bench_model("lesson", repeats=1, steps=1)
    libraries = {"tinyllm, 1 worker", f"tinyllm, {bench.default_workers(16)} workers"}
    assert libraries <= set(rows) and set(rows) - libraries <= {"torch eager"}
    for r in rows.values():
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(16 * 128 / r["seconds"])


def test_loading_a_gpt2_folder_grows_memory_by_about_one_copy(tmp_path):
    """Read straight into the model's arrays: the process grows by about the weights, not two copies."""
    big = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=256)
    from tinyllm.model import GPT
    GPT(big).save_pretrained(tmp_path)
    r = bench.in_own_process({"load": str(tmp_path)}, 1)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert r["seconds"] > 0 and r["peak_growth"] < 1.6 * size


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_torch_yardstick_steps_more_than_once(method):
    pytest.importorskip("torch")
    step = bench.torch_step(bench.CONFIGS["lesson"][0], 2, 16, method)
    step()
    step()      # a second backward through the first step's graph would raise
