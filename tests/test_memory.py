"""
tinyllm.memory counts what a real PeftModel holds: its trainable and total parameters for every method
(get_nb_trainable_parameters), the gradients backward() returns, AdamW's state, and the float arrays a
forward caches for the backward. And the GPT-2 sizes are the released ones.
"""
import numpy as np
import pytest

from tinyllm.memory import (DTYPE_BYTES, GPT2_SIZES, activation_arrays, activation_count, added_count, base_count,
                            trainable_count, training_memory)
from tinyllm.model import GPT, GPTConfig
from tinyllm.optim import AdamW
from tinyllm.peft import (AdapterConfig, FullFineTuningConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                          PromptTuningConfig, get_peft_model)

SMALL = [GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16),
         GPTConfig(vocab_size=64, block_size=24, n_layer=3, n_head=4, n_embd=24)]
METHODS = {
    "full": lambda: FullFineTuningConfig(),
    "full last 1": lambda: FullFineTuningConfig(last_k_blocks=1),
    "lora c_attn": lambda: LoraConfig(r=4),
    "lora q,v": lambda: LoraConfig(r=2, target_modules=["c_attn.q", "c_attn.v"]),
    "lora k": lambda: LoraConfig(r=3, target_modules=["c_attn.k"]),
    "lora mlp": lambda: LoraConfig(r=2, target_modules=["mlp.c_fc", "mlp.c_proj"]),
    "lora regex": lambda: LoraConfig(r=2, target_modules=r"h\.1\.attn\.c_proj"),
    "lora bias=all": lambda: LoraConfig(r=2, target_modules=["c_proj"], bias="all"),
    "lora bias=lora_only": lambda: LoraConfig(r=2, target_modules=["c_attn.v", "mlp.c_fc"], bias="lora_only"),
    "lora layers": lambda: LoraConfig(r=2, target_modules=["c_attn"], layers_to_transform=[0]),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "prefix projection": lambda: PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True,
                                                    encoder_hidden_size=5),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4),
    "adapter": lambda: AdapterConfig(bottleneck_size=3),
    "adapter layers": lambda: AdapterConfig(bottleneck_size=2, layers_to_transform=[1]),
    "ia3": lambda: IA3Config(),
    "ia3 every linear": lambda: IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                                          feedforward_modules=["mlp.c_fc", "mlp.c_proj"]),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mc", SMALL, ids=["L2C16", "L3C24"])
def test_counts_match_the_peft_model(method, mc):
    cfg = METHODS[method]()
    pm = get_peft_model(GPT(mc), cfg)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable_count(cfg, mc) == trainable
    assert base_count(mc) + added_count(cfg, mc) == total
    m = training_memory(mc, cfg, batch_size=2, seq_len=5)
    assert m["counts"]["weights"] == total and m["counts"]["gradients"] == trainable
    assert m["bytes"]["adam"] == 2 * trainable * 4


@pytest.mark.parametrize("method", METHODS)
def test_one_training_step_holds_what_is_counted(method):
    mc, B, T = SMALL[1], 3, 7
    cfg = METHODS[method]()
    pm = get_peft_model(GPT(mc), cfg)
    x = np.random.default_rng(0).integers(0, mc.vocab_size, (B, T))
    pm.forward(x, x)
    weights = [*pm.base_model.params.values(), *pm.adapters["default"].values()]
    assert sum(a.size for a in activation_arrays(pm._cache, weights) if a.dtype.kind == "f") == activation_count(mc, cfg, B, T)
    grads = pm.backward()
    assert sum(g.size for g in grads.values()) == trainable_count(cfg, mc)
    opt = AdamW(pm.trainable_parameters())
    opt.step(grads)
    assert opt.state_bytes() == training_memory(mc, cfg, B, T)["bytes"]["adam"]


def test_activation_arrays_counts_each_array_once_and_no_weights():
    a, w, prefix_out = np.zeros((4, 8), np.float32), np.ones(3, np.float32), np.ones((2, 6), np.float32)
    cache = [a, a[:2], a.T[1:], {"x": a, "w": w, "p": {"prefix": prefix_out[:, :3]}}]
    found = activation_arrays(cache, weights=[w])
    assert len(found) == 1 and found[0] is a                 # views of a: a once; w and the 'p' dict left out
    assert len(activation_arrays(cache, weights=[])) == 2    # w counts once it is not named a weight


def test_gpt2_sizes():
    assert {k: base_count(mc) for k, mc in GPT2_SIZES.items()} == {
        "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    small = GPT2_SIZES["gpt2"]
    assert trainable_count(LoraConfig(r=8, target_modules=["c_attn"]), small) == 294_912
    assert trainable_count(PromptTuningConfig(num_virtual_tokens=10), small) == 7_680
    assert trainable_count(PrefixTuningConfig(num_virtual_tokens=10), small) == 2 * 12 * 10 * 768


def test_full_fine_tuning_needs_four_copies_and_dtypes_scale():
    mc = GPT2_SIZES["gpt2"]
    m = training_memory(mc, FullFineTuningConfig(), batch_size=1, seq_len=8)
    b = m["bytes"]
    assert b["weights"] == b["gradients"] == b["adam"] / 2 == 124_439_808 * 4
    half = training_memory(mc, FullFineTuningConfig(), batch_size=1, seq_len=8, dtype="bfloat16")["bytes"]
    assert all(half[k] * DTYPE_BYTES["float32"] == b[k] * DTYPE_BYTES["bfloat16"] for k in b)
    # activations grow linearly with the batch
    a1 = activation_count(mc, LoraConfig(), 1, 16)
    assert activation_count(mc, LoraConfig(), 4, 16) == 4 * a1


def test_bad_inputs():
    mc = SMALL[0]
    with pytest.raises(ValueError, match="dtype"):
        training_memory(mc, LoraConfig(), dtype="int8")
    with pytest.raises(ValueError, match="does not fit"):
        training_memory(mc, PromptTuningConfig(num_virtual_tokens=4), seq_len=mc.block_size)
    with pytest.raises(TypeError):
        trainable_count("lora", mc)
