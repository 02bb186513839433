"""
Adapter layers (Houlsby et al., 2019): a small bottleneck with its own residual connection after the
attention and after the MLP of each block,

    a = a + up(gelu(down(a)))       down (C,m), up (m,C)

h.{i}.adapter_attn.down|up.weight|bias and h.{i}.adapter_mlp.down|up.weight|bias. `up` starts at zero, so
each adapter starts as the identity and the model as the base model. The pair is in tinyllm/layers.py.

Legend: C channels, m bottleneck width.
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..checks import block_list, blocks_exist, positive_int, positive_number
from ..layers import adapter_backward, adapter_forward
from ..model import Hooks
from .config import PeftConfig
from .method import Method, register_peft_method


@dataclass
class AdapterConfig(PeftConfig):
    """Houlsby adapters: x + up(gelu(down(x))), a bottleneck C -> bottleneck_size -> C after the attention
    and after the MLP of every block (or of layers_to_transform). up starts at zero: the identity."""
    peft_type = "ADAPTER"
    bottleneck_size: int = 16
    init_std: float = 1e-2
    layers_to_transform: Optional[List[int]] = None

    def __post_init__(self):
        super().__post_init__()
        positive_int("AdapterConfig", "bottleneck_size", self.bottleneck_size)
        positive_number("AdapterConfig", "init_std", self.init_std)
        self.layers_to_transform = block_list("AdapterConfig", self.layers_to_transform)


def adapter_name(branch):
    """'h.0.attn' (the branch the model hands to the hook) -> 'h.0.adapter_attn' (the adapter's keys)."""
    block, part = branch.rsplit(".", 1)
    return f"{block}.adapter_{part}"


class AdapterHooks(Hooks):
    def __init__(self, own, train):
        self.own, self.train = own, train

    def branch(self, name, a):
        key = adapter_name(name)
        if key + ".down.weight" not in self.own:
            return a, None
        w = lambda s: self.own[f"{key}.{s}"]
        out, cache = adapter_forward(a, w("down.weight"), w("down.bias"), w("up.weight"), w("up.bias"))
        return out, (key, cache)

    def branch_backward(self, da, cache, grads):
        if cache is None:
            return da
        key, c = cache
        dx, dwd, dbd, dwu, dbu = adapter_backward(da, c)
        if self.train:
            grads.update({f"{key}.down.weight": dwd, f"{key}.down.bias": dbd,
                          f"{key}.up.weight": dwu, f"{key}.up.bias": dbu})
        return dx


class Adapters(Method):
    config_class = AdapterConfig

    def blocks(self, config, mc):
        return range(mc.n_layer) if config.layers_to_transform is None else config.layers_to_transform

    def init(self, config, model, rng, tokenizer):
        C, m = model.config.n_embd, config.bottleneck_size
        blocks_exist("AdapterConfig", config.layers_to_transform, model.config.n_layer)
        params = {}
        for i in self.blocks(config, model.config):
            for part in ("attn", "mlp"):
                key = adapter_name(f"h.{i}.{part}")
                params[key + ".down.weight"] = rng.normal(0.0, config.init_std, (C, m))
                params[key + ".down.bias"] = np.zeros(m)
                params[key + ".up.weight"] = np.zeros((m, C))
                params[key + ".up.bias"] = np.zeros(C)
        return {k: v.astype(model.dtype) for k, v in params.items()}

    def added_count(self, config, mc):
        C, m = mc.n_embd, config.bottleneck_size
        return len(self.blocks(config, mc)) * 2 * (C * m + m + m * C + C)   # down (C,m)+(m,), up (m,C)+(C,)

    def formula(self, config, mc):
        C, m, n = mc.n_embd, config.bottleneck_size, len(self.blocks(config, mc))
        return (f"adapters 2 per block * (2*C*m + m + C) * blocks = 2*(2*{C}*{m} + {m} + {C})*{n} = "
                f"{self.added_count(config, mc):,}")

    def hooks(self, config, params, mc, rng=None, train=True):
        return AdapterHooks(params, train)

    def activations(self, config, mc, B, T):
        """Per adapter: its input C, the bottleneck, gelu's tanh and output (3m)."""
        return len(self.blocks(config, mc)) * 2 * B * T * (mc.n_embd + 3 * config.bottleneck_size)


register_peft_method(Adapters())
