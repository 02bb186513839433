"""
Prefix tuning (Li & Liang, 2021): every layer gets num_virtual_tokens learned keys and values,

    h.{i}.attn.prefix_k, h.{i}.attn.prefix_v      each (P,C)

that sit in front of the real tokens' keys and values. Every real token attends to all of them: a prefix
is a KV cache that was trained instead of computed (tinyllm.layers.attention_forward takes it as past_k,
past_v; GPT-2 with these as past_key_values computes the same). The real tokens' positions start at P.

With prefix_projection, a (P,C) embedding goes through an MLP C -> H -> 2*L*C that produces every layer's
prefix (the paper's reparameterization). Its output is laid out as PEFT lays out past_key_values:
columns [(2i)C, (2i+1)C) are layer i's keys, [(2i+1)C, (2i+2)C) its values.

Legend: P virtual tokens, C channels, L layers, H encoder hidden size.
"""
import numpy as np

from ..layers import linear_backward, linear_forward
from ..model import gpt_forward

ENCODER = "prefix_encoder."


def prefix_keys(n_layer):
    return [f"h.{i}.attn.prefix_{kv}" for i in range(n_layer) for kv in "kv"]   # the order of the MLP's columns


def init_prefix(config, model, rng, tokenizer=None):
    """The method's parameters: the prefixes themselves, or the embedding and MLP that make them."""
    mc, dtype = model.config, model.dtype
    P, C, L = config.num_virtual_tokens, mc.n_embd, mc.n_layer
    if config.prefix_projection:
        if config.init == "text":
            raise ValueError("PrefixTuningConfig: init='text' sets the prefixes directly, so it needs "
                             "prefix_projection=False")
        H = config.encoder_hidden_size
        bound = lambda n_in: 1.0 / np.sqrt(n_in)          # torch's default for nn.Linear weights
        params = {ENCODER + "embedding.weight": rng.normal(0.0, 1.0, (P, C)),
                  ENCODER + "transform.0.weight": rng.uniform(-bound(C), bound(C), (C, H)),
                  ENCODER + "transform.0.bias": np.zeros(H),
                  ENCODER + "transform.2.weight": rng.uniform(-bound(H), bound(H), (H, 2 * L * C)),
                  ENCODER + "transform.2.bias": np.zeros(2 * L * C)}
    elif config.init == "text":
        params = prefix_from_text(model, tokenizer.encode(config.init_text), P)
    else:
        params = {k: rng.normal(0.0, config.init_std, (P, C)) for k in prefix_keys(L)}
    return {k: v.astype(dtype) for k, v in params.items()}


def prefix_from_text(model, ids, P):
    """The keys and values the base model computes for P tokens of real text (repeated if too short)."""
    if len(ids) == 0:
        raise ValueError("PrefixTuningConfig.init_text is empty after tokenizing; give some text")
    ids = np.resize(np.asarray(ids), P)[None, :]                                 # (1,P)
    _, _, cache = gpt_forward(model.params, ids, model.config)
    to_rows = lambda a: a[0].transpose(1, 0, 2).reshape(P, -1)                  # (1,NH,P,hs) -> (P,C)
    params = {}
    for i, (k, v) in enumerate(cache["present"]):
        params[f"h.{i}.attn.prefix_k"], params[f"h.{i}.attn.prefix_v"] = to_rows(k), to_rows(v)
    return params


def prefix_mlp_forward(params, n_layer):
    """The reparameterization: embedding (P,C) -> tanh(E W0 + b0) W2 + b2 (P,2LC) -> each layer's prefix.
    Returns {prefix key: (P,C)}, cache."""
    E = params[ENCODER + "embedding.weight"]
    h, c0 = linear_forward(E, params[ENCODER + "transform.0.weight"], params[ENCODER + "transform.0.bias"])   # (P,H)
    t = np.tanh(h)                                                                                            # (P,H)
    out, c2 = linear_forward(t, params[ENCODER + "transform.2.weight"], params[ENCODER + "transform.2.bias"]) # (P,2LC)
    prefixes = dict(zip(prefix_keys(n_layer), np.split(out, 2 * n_layer, axis=1)))                          # 2L x (P,C)
    return prefixes, (c0, t, c2)


def prefix_mlp_backward(dprefixes, cache, n_layer):
    """Returns the gradients of the encoder's parameters from the gradients of the prefixes."""
    c0, t, c2 = cache
    dout = np.concatenate([dprefixes[k] for k in prefix_keys(n_layer)], axis=1)  # (P,2LC)
    dt, dW2, db2 = linear_backward(dout, c2)
    dh = dt * (1.0 - t * t)                                                      # forward was: t = tanh(h)
    dE, dW0, db0 = linear_backward(dh, c0)
    return {ENCODER + "embedding.weight": dE,
            ENCODER + "transform.0.weight": dW0, ENCODER + "transform.0.bias": db0,
            ENCODER + "transform.2.weight": dW2, ENCODER + "transform.2.bias": db2}


def formula(config, model_config):
    P, C, L = config.num_virtual_tokens, model_config.n_embd, model_config.n_layer
    if config.prefix_projection:
        H = config.encoder_hidden_size
        total = P * C + C * H + H + H * 2 * L * C + 2 * L * C
        return (f"prefix MLP P*C + C*H + H + H*2LC + 2LC = {P}*{C} + {C}*{H} + {H} + {H}*{2 * L * C} + {2 * L * C}"
                f" = {total:,} (saved: only the prefixes, 2*L*P*C = {2 * L * P * C:,})")
    return f"prefix 2 (keys, values) * L * P * C = 2*{L}*{P}*{C} = {2 * L * P * C:,}"
