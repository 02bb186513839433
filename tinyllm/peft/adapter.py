"""
Adapter layers (Houlsby et al., 2019): a small bottleneck with its own residual connection after the
attention and after the MLP of each block,

    a = a + up(gelu(down(a)))       down (C,m), up (m,C)

h.{i}.adapter_attn.down|up.weight|bias and h.{i}.adapter_mlp.down|up.weight|bias. `up` starts at zero, so
each adapter starts as the identity and the model as the base model. The pair is in tinyllm/layers.py.
"""
import numpy as np

from .config import check_layers


def init_adapters(config, model, rng, tokenizer=None):
    mc = model.config
    C, m = mc.n_embd, config.bottleneck_size
    check_layers(config, mc.n_layer)
    layers = range(mc.n_layer) if config.layers_to_transform is None else config.layers_to_transform
    params = {}
    for i in layers:
        for where in ("adapter_attn", "adapter_mlp"):
            name = f"h.{i}.{where}."
            params[name + "down.weight"] = rng.normal(0.0, config.init_std, (C, m))
            params[name + "down.bias"] = np.zeros(m)
            params[name + "up.weight"] = np.zeros((m, C))
            params[name + "up.bias"] = np.zeros(C)
    return {k: v.astype(model.dtype) for k, v in params.items()}


def formula(config, model_config):
    C, m = model_config.n_embd, config.bottleneck_size
    n = model_config.n_layer if config.layers_to_transform is None else len(config.layers_to_transform)
    per = 2 * C * m + m + C
    return f"adapters 2 per block * (2*C*m + m + C) * blocks = 2*(2*{C}*{m} + {m} + {C})*{n} = {2 * per * n:,}"
