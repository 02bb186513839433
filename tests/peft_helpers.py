"""What the PEFT tests share: a small float64 base whose weights are all moved off their init, one config
factory per method, and a batch with some targets ignored."""
import numpy as np

from tinyllm.layers import IGNORE_INDEX
from tinyllm.model import GPT, GPTConfig
from tinyllm.peft import (AdapterConfig, FullFineTuningConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                          PromptTuningConfig, get_peft_model)

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)

# one factory per method (configs are mutable dataclasses: a fresh one per test)
METHODS = {
    "lora c_attn": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False),
    "lora all linears bias=all": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                    bias="all", init_lora_weights=False),
    "lora all linears bias=lora_only": lambda: LoraConfig(r=2, lora_alpha=4, bias="lora_only",
                                                          target_modules=["c_attn", "c_proj", "c_fc"],
                                                          init_lora_weights=False),
    "lora q,v slices": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn.q", "c_attn.v"],
                                          init_lora_weights=False),
    "lora rslora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_rslora=True,
                                      init_lora_weights=False),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "prefix projection": lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                    encoder_hidden_size=8),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "adapters": lambda: AdapterConfig(bottleneck_size=4),
    "ia3": lambda: IA3Config(init_ia3_weights=False),
    "ia3 every linear": lambda: IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                                          feedforward_modules=["mlp.c_fc", "mlp.c_proj"], init_ia3_weights=False),
    "full": lambda: FullFineTuningConfig(),
    "full last_k_blocks=1": lambda: FullFineTuningConfig(last_k_blocks=1),
}


def make_base(seed=0, config=CFG):
    """A float64 GPT whose every weight, bias and layer-norm gain is moved off its initial value."""
    model = GPT(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(1000 + seed)
    for v in model.params.values():
        v += rng.normal(0.0, 0.1, v.shape)
    return model


def perturb(pm, seed=0):
    """Move the active adapter's own parameters off their (often zero) init."""
    rng = np.random.default_rng(2000 + seed)
    for v in pm.adapters[pm.active_adapter].values():
        v += rng.normal(0.0, 0.1, v.shape)
    return pm


def make_peft(method, base=None, seed=0):
    """The method on a perturbed base, its own parameters perturbed too."""
    return perturb(get_peft_model(make_base() if base is None else base, METHODS[method]()), seed)


def make_batch(B=2, T=6, seed=0):
    """Random token ids and targets, two of the targets IGNORE_INDEX."""
    rng = np.random.default_rng(100 + seed)
    idx = rng.integers(0, CFG.vocab_size, (B, T))
    targets = rng.integers(0, CFG.vocab_size, (B, T))
    targets[0, 1] = targets[1, 4] = IGNORE_INDEX
    return idx, targets
