"""
Prefix tuning (Li & Liang, 2021): every layer gets num_virtual_tokens learned keys and values,

    h.{i}.attn.prefix_k, h.{i}.attn.prefix_v      each (P,C)

that sit in front of the real tokens' keys and values. Every real token attends to all of them: a prefix
is a KV cache that was trained instead of computed (tinyllm.layers.attention_forward takes it as past_k,
past_v; GPT-2 with these as past_key_values computes the same). The real tokens' positions start at P.

With prefix_projection, a (P,C) embedding goes through an MLP C -> H -> 2*L*C that produces every layer's
prefix (the paper's reparameterization). Its output is laid out as PEFT lays out past_key_values:
columns [(2i)C, (2i+1)C) are layer i's keys, [(2i+1)C, (2i+2)C) its values.

Legend: P virtual tokens, C channels, L layers, H encoder hidden size, NH heads, hs head size.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..checks import choice, flag, optional_text, positive_int, positive_number
from ..layers import linear_backward, linear_forward
from ..model import Hooks, gpt_forward
from .config import PeftConfig
from .method import Method, PeftFormatError, check_peft_fields, register_peft_method

ENCODER = "prefix_encoder."


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning: num_virtual_tokens learned keys and values in front of every layer's attention.

    prefix_projection: learn a (P, C) embedding and produce all layers' prefixes from it through an MLP
        C -> encoder_hidden_size -> 2 * n_layer * C (the paper's reparameterization, steadier to train);
        after training only the resulting prefixes are needed.
    init: "random" (normal, std init_std) or "text": the keys and values the base model computes for
        the tokens of init_text (the paper's initialisation from real words).
    """
    peft_type = "PREFIX_TUNING"
    num_virtual_tokens: int = 10
    prefix_projection: bool = False
    encoder_hidden_size: int = 64
    init: str = "random"
    init_text: Optional[str] = None
    init_std: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        positive_int("PrefixTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        flag("PrefixTuningConfig", "prefix_projection", self.prefix_projection)
        positive_int("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)
        choice("PrefixTuningConfig", "init", self.init, ("random", "text"))
        optional_text("PrefixTuningConfig", "init_text", self.init_text)
        if self.init == "text" and not self.init_text:
            raise ValueError("PrefixTuningConfig.init='text' needs init_text, the text whose keys and values "
                             "start the prefix")
        positive_number("PrefixTuningConfig", "init_std", self.init_std)
        if self.init == "text" and self.prefix_projection:
            raise ValueError("PrefixTuningConfig: init='text' sets the prefixes directly, so it needs "
                             "prefix_projection=False")


def prefix_keys(n_layer):
    return [f"h.{i}.attn.prefix_{kv}" for i in range(n_layer) for kv in "kv"]   # the order of the MLP's columns


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


class PrefixHooks(Hooks):
    """Each block's prefix as its past keys and values; with the MLP, the prefixes are made first."""

    def __init__(self, own, n_layer, n_head, train):
        self.own, self.n_layer, self.n_head, self.train = own, n_layer, n_head, train
        self.mlp_cache, self.prefixes, self.dprefixes = None, own, {}

    def params(self, p):
        if ENCODER + "embedding.weight" in self.own:            # the reparameterization: prefixes from the MLP
            self.prefixes, self.mlp_cache = prefix_mlp_forward(self.own, self.n_layer)
        return p

    def past(self, i, B):
        to_heads = lambda a: np.broadcast_to(a.reshape(a.shape[0], self.n_head, -1).transpose(1, 0, 2)[None],
                                             (B, self.n_head, a.shape[0], a.shape[1] // self.n_head))
        return (to_heads(self.prefixes[f"h.{i}.attn.prefix_k"]),          # (P,C) -> (B,NH,P,hs), no copy
                to_heads(self.prefixes[f"h.{i}.attn.prefix_v"]))

    def past_backward(self, i, dpast_k, dpast_v, grads):
        if not self.train:
            return
        to_rows = lambda d: d.sum(axis=0).transpose(1, 0, 2).reshape(d.shape[2], -1)   # (B,NH,P,hs) -> (P,C)
        self.dprefixes[f"h.{i}.attn.prefix_k"] = to_rows(dpast_k)       # the prefix was shared by the batch
        self.dprefixes[f"h.{i}.attn.prefix_v"] = to_rows(dpast_v)

    def params_backward(self, grads):
        if not self.train:
            return
        if self.mlp_cache is None:
            grads.update(self.dprefixes)
        else:                                                 # the prefixes are outputs of the MLP
            grads.update(prefix_mlp_backward(self.dprefixes, self.mlp_cache, self.n_layer))


class PrefixTuning(Method):
    config_class = PrefixTuningConfig

    def init(self, config, model, rng, tokenizer):
        """The prefixes themselves (random, or a real text's keys and values), or the embedding and MLP
        that make them (normal embedding; torch's default uniform init for the linears)."""
        mc, dtype = model.config, model.dtype
        P, C, L = config.num_virtual_tokens, mc.n_embd, mc.n_layer
        if config.prefix_projection:
            H = config.encoder_hidden_size
            bound = lambda n_in: 1.0 / np.sqrt(n_in)
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

    def added_count(self, config, mc):
        P, C, L, H = config.num_virtual_tokens, mc.n_embd, mc.n_layer, config.encoder_hidden_size
        if config.prefix_projection:   # embedding (P,C), then C -> H -> 2LC
            return P * C + (C * H + H) + (H * 2 * L * C + 2 * L * C)
        return 2 * L * P * C           # a key and a value per virtual token, per layer

    def formula(self, config, mc):
        P, C, L = config.num_virtual_tokens, mc.n_embd, mc.n_layer
        if config.prefix_projection:
            H = config.encoder_hidden_size
            return (f"prefix MLP P*C + C*H + H + H*2LC + 2LC = {P}*{C} + {C}*{H} + {H} + {H}*{2 * L * C} + {2 * L * C}"
                    f" = {self.added_count(config, mc):,} (saved: only the prefixes, 2*L*P*C = {2 * L * P * C:,})")
        return f"prefix 2 (keys, values) * L * P * C = 2*{L}*{P}*{C} = {2 * L * P * C:,}"

    def past_positions(self, config):
        return config.num_virtual_tokens

    def hooks(self, config, params, mc, rng=None, train=True):
        return PrefixHooks(params, mc.n_layer, mc.n_head, train)

    def activations(self, config, mc, B, T):
        """With the MLP: its hidden layer (P*H) and its output, every layer's prefix (2*L*P*C), held until the
        backward. (The prefix's keys and values inside each block's attention are tinyllm.memory's.)"""
        if not config.prefix_projection:
            return 0
        P = config.num_virtual_tokens
        return P * config.encoder_hidden_size + 2 * mc.n_layer * P * mc.n_embd

    def saved_arrays(self, config, params, model):
        """Only the prefixes: the MLP that made them is not needed after training."""
        if config.prefix_projection:
            return prefix_mlp_forward(params, model.config.n_layer)[0]
        return dict(params)

    def loaded_params(self, config, arrays, params, model):
        """Saved prefixes load as plain prefixes: a trained MLP is not saved (as PEFT does)."""
        return {k: np.array(arrays[k], dtype=model.dtype) for k in prefix_keys(model.config.n_layer)}

    # PEFT's format: one (P, 2LC) 'prompt_embeddings', layer i's keys in columns [2iC, (2i+1)C) and its values
    # in [(2i+1)C, (2i+2)C), each C-wide block head-major, as past_key_values are laid out

    def to_peft(self, config, arrays, model):
        mc = model.config
        fields = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": config.num_virtual_tokens,
                  "token_dim": mc.n_embd, "num_layers": mc.n_layer, "num_attention_heads": mc.n_head,
                  "num_transformer_submodules": 1, "prefix_projection": False,     # the file holds the prefixes
                  "encoder_hidden_size": config.encoder_hidden_size, "inference_mode": True,
                  "base_model_name_or_path": None, "modules_to_save": None}
        return fields, {"prompt_embeddings": np.concatenate([arrays[k] for k in prefix_keys(mc.n_layer)], axis=1)}

    def from_peft(self, fields, arrays, model, where="adapter_config.json"):
        mc = model.config
        check_peft_fields(where, fields, {"num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                                          "num_transformer_submodules", "prefix_projection", "encoder_hidden_size"})
        sizes = {"token_dim": mc.n_embd, "num_layers": mc.n_layer, "num_attention_heads": mc.n_head,
                 "num_transformer_submodules": 1}
        wrong = {k: fields.get(k) for k, v in sizes.items() if fields.get(k, v) != v}
        if wrong:
            raise PeftFormatError(f"{where}: {wrong} do not fit this GPT {sizes}; load it onto the base it was trained on")
        config = PrefixTuningConfig(num_virtual_tokens=fields["num_virtual_tokens"])
        if set(arrays) != {"prompt_embeddings"}:
            raise PeftFormatError(f"{where}: a prefix-tuning file holds 'prompt_embeddings' only, got {sorted(arrays)[:3]}")
        emb = arrays["prompt_embeddings"]                                        # (P, 2LC)
        if emb.shape != (config.num_virtual_tokens, 2 * mc.n_layer * mc.n_embd):
            raise PeftFormatError(f"{where}: prompt_embeddings has shape {emb.shape}, not (P, 2LC) = "
                                  f"{(config.num_virtual_tokens, 2 * mc.n_layer * mc.n_embd)}")
        return config, dict(zip(prefix_keys(mc.n_layer), np.split(emb, 2 * mc.n_layer, axis=1)))


register_peft_method(PrefixTuning())
