"""
LoRA (Hu et al., 2021): a frozen linear y = x @ W + b learns only a low-rank update,

    y = x @ W + b + scale * (x @ A) @ B        A (in,r), B (r,out), scale = lora_alpha / r

so a layer with in*out weights trains r*(in+out) numbers. B starts at zero: the model starts exactly equal
to the base. Keys: <linear>.lora_A, <linear>.lora_B (h.0.attn.c_attn.q.lora_A: on the q third of the fused
c_attn only, as the paper put LoRA on Wq and Wv). The pair itself is in tinyllm/layers.py (lora_forward,
lora_backward); LoraHooks adds it to every linear that has keys.

trainable_token_indices (PEFT's option of the same name) also trains those rows of the token embedding,
which GPT-2's tied head shares: a token pretraining never showed can then be learned without training the
whole embedding. The key wte.trainable_tokens_delta holds the rows' new values, as PEFT's does.

Legend: r rank, N = B*T rows, n indices.
"""
import re
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np

from ..checks import block_list, choice, flag, is_int, positive_int, positive_number
from ..layers import lora_backward, lora_forward
from ..model import Hooks, param_shapes
from .config import PeftConfig
from .method import (LINEARS, Method, PeftFormatError, check_peft_fields, linear_shapes, match_modules, our_key,
                     peft_key, peft_pattern, register_peft_method)


@dataclass
class LoraConfig(PeftConfig):
    """LoRA: W x + b  ->  W x + b + scale * B(A(x)), with only A and B trained.

    target_modules: names matched by suffix ("c_proj" means attn.c_proj and mlp.c_proj), or one regular
        expression matched against the whole module name. tinyllm adds "c_attn.q", "c_attn.k", "c_attn.v":
        LoRA on one third of the fused q|k|v projection, as the LoRA paper put it on Wq and Wv.
    scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
    bias: "none", "all" (every bias of the model trains too) or "lora_only" (the targeted layers' biases).
    init_lora_weights: True (A Kaiming-uniform, B zero: the model starts unchanged), "gaussian"
        (A normal with std 1/r, B zero) or False (B random too: for tests, not a no-op).
    layers_to_transform: block indices to put LoRA in (all blocks when None).
    trainable_token_indices: token ids whose embedding rows train too (shared with the tied LM head).
    """
    peft_type = "LORA"
    r: int = 8
    lora_alpha: float = 8
    target_modules: Optional[Union[List[str], str]] = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[List[int]] = None
    trainable_token_indices: Optional[List[int]] = None

    def __post_init__(self):
        super().__post_init__()
        positive_int("LoraConfig", "r", self.r)
        positive_number("LoraConfig", "lora_alpha", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        choice("LoraConfig", "bias", self.bias, ("none", "all", "lora_only"))
        flag("LoraConfig", "use_rslora", self.use_rslora)
        choice("LoraConfig", "init_lora_weights", self.init_lora_weights, (True, False, "gaussian"))
        if self.target_modules is None:
            self.target_modules = ["c_attn"]            # PEFT's default for GPT-2
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LoraConfig.target_modules {self.target_modules!r} is not a valid regular "
                                 f"expression ({e}); or give a list of names, e.g. ['c_attn']") from None
        elif isinstance(self.target_modules, (list, tuple)) and self.target_modules \
                and all(isinstance(t, str) and t for t in self.target_modules):
            self.target_modules = list(self.target_modules)
        else:
            raise ValueError(f"LoraConfig.target_modules must be a non-empty list of module names or one regular "
                             f"expression, got {self.target_modules!r}; e.g. ['c_attn']")
        self.layers_to_transform = block_list("LoraConfig", self.layers_to_transform)
        tokens = self.trainable_token_indices
        if tokens is not None:
            if not isinstance(tokens, (list, tuple)) or not tokens or not all(is_int(t) and t >= 0 for t in tokens) \
                    or len(set(tokens)) != len(tokens):
                raise ValueError(f"LoraConfig.trainable_token_indices must be None or a list of distinct token ids "
                                 f"(ints >= 0), got {tokens!r}")
            self.trainable_token_indices = [int(t) for t in tokens]

    @property
    def scale(self):
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)


# ----------------------------------------------------------------------------------------------------
# which linears, and their sizes

# the linears of block i that LoRA can attach to, the thirds of the fused c_attn included
LORA_LINEARS = {**LINEARS, "attn.c_attn.q": (1, 1), "attn.c_attn.k": (1, 1), "attn.c_attn.v": (1, 1)}
TOKENS = "wte.trainable_tokens_delta"


def module_shapes(model_config):
    """{module name: (in, out)} for every linear LoRA can target, e.g. 'h.0.attn.c_attn': (C, 3C)."""
    return linear_shapes(model_config, LORA_LINEARS)


def fused_module(name):
    """The linear a LoRA module sits on: a c_attn slice ('h.0.attn.c_attn.q') is part of 'h.0.attn.c_attn'."""
    return name[:-2] if name[-2:] in (".q", ".k", ".v") else name


def lora_parts(name, n_out):
    """The LoRA key prefixes a linear can carry and the output columns each one updates: the whole linear,
    and for the fused c_attn each of its q, k, v thirds."""
    parts = [(name, slice(None))]
    if name.endswith("c_attn"):
        C = n_out // 3
        parts += [(f"{name}.{s}", slice(j * C, (j + 1) * C)) for j, s in enumerate("qkv")]
    return parts


def find_targets(config, model_config):
    """The module names the config targets (method.match_modules: as PEFT matches them), checked: not
    c_attn and its slices both, a rank no larger than the layer, token ids inside the vocabulary."""
    shapes = module_shapes(model_config)
    targets = match_modules("LoraConfig", "target_modules", config.target_modules, list(shapes),
                            config.layers_to_transform, model_config.n_layer)
    if any(n.endswith("c_attn") for n in targets) and any(".c_attn." in n for n in targets):
        raise ValueError("LoraConfig.target_modules: choose either 'c_attn' or its slices 'c_attn.q|k|v', not both")
    for n in targets:
        if config.r > min(shapes[n]):
            raise ValueError(f"LoraConfig.r = {config.r} is larger than the layer {n} {shapes[n]}: a rank-r update "
                             f"needs r <= min(in, out) = {min(shapes[n])}")
    if config.trainable_token_indices and max(config.trainable_token_indices) >= model_config.vocab_size:
        raise ValueError(f"LoraConfig.trainable_token_indices {config.trainable_token_indices} holds an id outside "
                         f"the vocabulary [0, {model_config.vocab_size})")
    return targets


def bias_names(config, mc):
    """The base biases that train along with LoRA: none, all of them, or those of the targeted layers."""
    biases = [k for k in param_shapes(mc) if k.endswith(".bias")]
    if config.bias == "all":
        return biases
    if config.bias == "lora_only":
        linears = {fused_module(t) for t in find_targets(config, mc)}
        return [k for k in biases if k[:-len(".bias")] in linears]
    return []

# ----------------------------------------------------------------------------------------------------
# the forward and backward


class LoraHooks(Hooks):
    """A linear with LoRA keys adds scale * (x A) B to its output (to a third of it for a c_attn slice);
    with trainable tokens, the model runs on wte with those rows replaced."""

    def __init__(self, own, scale, dropout, rng, train, tokens):
        self.own, self.scale, self.dropout, self.rng, self.train = own, scale, dropout, rng, train
        self.tokens = tokens                      # trainable token ids, or None
        self.base_grads = frozenset({"wte.weight"} if tokens and train else ())

    def params(self, p):
        if not self.tokens:
            return p
        wte = p["wte.weight"].copy()
        wte[self.tokens] = self.own[TOKENS]                     # (n,C) rows replaced, as PEFT's index_copy
        return {**p, "wte.weight": wte}

    def params_backward(self, grads):
        if self.tokens and self.train:       # the replaced rows' gradient is the delta's (head + embedding)
            grads[TOKENS] = grads.pop("wte.weight")[self.tokens]

    def linear(self, name, x, w, b):
        out, c_lin = super().linear(name, x, w, b)                 # x @ W + b, the frozen part
        caches = []
        for key, cols in lora_parts(name, out.shape[-1]):
            if key + ".lora_A" not in self.own:
                continue
            keep = None
            if self.dropout > 0 and self.rng is not None:          # dropout on the LoRA path's input only
                keep = (self.rng.random(x.shape) >= self.dropout).astype(x.dtype) / (1.0 - self.dropout)
            delta, c = lora_forward(x, self.own[key + ".lora_A"], self.own[key + ".lora_B"], self.scale, keep)
            out[..., cols] += delta
            caches.append((key, cols, c))
        return out, (c_lin, caches)

    def linear_backward(self, dout, cache, need_dw, need_db, grads):
        c_lin, caches = cache
        dx, dw, db = super().linear_backward(dout, c_lin, need_dw, need_db, grads)
        for key, cols, c in caches:
            dx_lora, dA, dB = lora_backward(dout[..., cols], c)
            dx += dx_lora                                          # x feeds both the frozen W and the LoRA path
            if self.train:
                grads[key + ".lora_A"], grads[key + ".lora_B"] = dA, dB
        return dx, dw, db


class Lora(Method):
    config_class = LoraConfig

    def init(self, config, model, rng, tokenizer):
        """A is Kaiming-uniform as in PEFT (torch's kaiming_uniform_ with a=sqrt(5): uniform within
        +-1/sqrt(in)), B is zero, so that A @ B = 0 and the model starts as the base model."""
        shapes = module_shapes(model.config)
        params = {}
        for name in find_targets(config, model.config):
            n_in, n_out = shapes[name]
            if config.init_lora_weights == "gaussian":
                A = rng.normal(0.0, 1.0 / config.r, (n_in, config.r))
            else:
                A = rng.uniform(-1.0, 1.0, (n_in, config.r)) / np.sqrt(n_in)
            B = np.zeros((config.r, n_out))
            if config.init_lora_weights is False:   # a non-zero start, for tests of the update itself
                B = rng.uniform(-1.0, 1.0, (config.r, n_out)) / np.sqrt(config.r)
            params[name + ".lora_A"], params[name + ".lora_B"] = A.astype(model.dtype), B.astype(model.dtype)
        if config.trainable_token_indices:          # the rows as they are: the model starts unchanged
            params[TOKENS] = model.params["wte.weight"][config.trainable_token_indices].copy()
        return params

    def base_trainable(self, config, model, params):
        return bias_names(config, model.config)

    def added_count(self, config, mc):
        shapes = module_shapes(mc)
        tokens = len(config.trainable_token_indices or ()) * mc.n_embd
        return sum(config.r * sum(shapes[n]) for n in find_targets(config, mc)) + tokens

    def trainable_count(self, config, mc):
        shapes = param_shapes(mc)
        return self.added_count(config, mc) + sum(shapes[k][0] for k in bias_names(config, mc))

    def formula(self, config, mc):
        """e.g. 'LoRA r*(in+out) per module: 8*(128+384) x 4 attn.c_attn = 16,384'."""
        shapes = module_shapes(mc)
        kinds = {}
        for n in find_targets(config, mc):
            kinds.setdefault(n.split(".", 2)[2], []).append(n)
        parts = [f"{config.r}*({shapes[ns[0]][0]}+{shapes[ns[0]][1]}) x {len(ns)} {k}" for k, ns in kinds.items()]
        n_bias = self.trainable_count(config, mc) - self.added_count(config, mc)
        if config.bias != "none":
            parts.append(f"{'every bias' if config.bias == 'all' else 'their biases'} {n_bias:,}")
        if config.trainable_token_indices:
            n = len(config.trainable_token_indices)
            parts.append(f"token rows n*C = {n}*{mc.n_embd}")
        return "LoRA r*(in+out) per module: " + " + ".join(parts) + f" = {self.trainable_count(config, mc):,}"

    def hooks(self, config, params, mc, rng=None, train=True):
        return LoraHooks(params, config.scale, config.lora_dropout, rng, train, config.trainable_token_indices)

    def activations(self, config, mc, B, T):
        """x @ A, r numbers per token per targeted linear (the linear's input is cached by the base)."""
        return B * T * config.r * len(find_targets(config, mc))

    def merged_weights(self, config, params):
        modules = {fused_module(k[:-len(".lora_A")]) + ".weight" for k in params if k.endswith(".lora_A")}
        return sorted(modules | ({"wte.weight"} if TOKENS in params else set()))

    def saved_arrays(self, config, params, model):
        """Its parameters, and the base biases it trained (bias='all' or 'lora_only')."""
        return {**params, **{k: model.params[k] for k in bias_names(config, model.config)}}

    def merge(self, config, params, model):
        """W += scale * A @ B for every LoRA pair (on its third for a c_attn slice); token rows written in."""
        base_params = model.params
        for key in params:
            if not key.endswith(".lora_A"):
                continue
            module = key[:-len(".lora_A")]
            delta = config.scale * (params[key] @ params[module + ".lora_B"])    # (in,r) @ (r,out) -> (in,out)
            W = base_params[fused_module(module) + ".weight"]
            part = module.rsplit(".", 1)[-1]
            cols = slice(None) if part not in ("q", "k", "v") else slice("qkv".index(part) * W.shape[0],
                                                                         ("qkv".index(part) + 1) * W.shape[0])
            W[:, cols] += delta.astype(W.dtype)
        if TOKENS in params:
            base_params["wte.weight"][config.trainable_token_indices] = params[TOKENS]

    # PEFT's format: lora_A.weight (r, in) and lora_B.weight (out, r), torch's nn.Linear layout, the transposes
    # of tinyllm's; a targeted linear's own bias under .base_layer.bias; the token rows under the embedding's
    # token_adapter

    def to_peft(self, config, arrays, model):
        if any(k.endswith((".q.lora_A", ".k.lora_A", ".v.lora_A")) for k in arrays):
            raise PeftFormatError("LoRA on a third of c_attn (c_attn.q, .k or .v) has no PEFT equivalent: in "
                                  "transformers GPT-2's c_attn is one fused linear; it is saved in tinyllm's format")
        fields = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.lora_alpha,
                  "target_modules": peft_pattern(config.target_modules, list(linear_shapes(model.config))),
                  "fan_in_fan_out": True, "lora_dropout": config.lora_dropout,
                  "bias": config.bias, "use_rslora": config.use_rslora, "init_lora_weights": config.init_lora_weights,
                  "layers_to_transform": config.layers_to_transform,
                  "trainable_token_indices": config.trainable_token_indices, "modules_to_save": None,
                  "inference_mode": True, "base_model_name_or_path": None}
        targeted = {k[:-len(".lora_A")] for k in arrays if k.endswith(".lora_A")}
        out = {}
        for k, a in arrays.items():
            if k.endswith((".lora_A", ".lora_B")):
                out[peft_key(k + ".weight")] = a.T
            elif k == TOKENS:
                out[peft_key("wte.token_adapter.trainable_tokens_delta")] = a
            else:                                                         # a bias it trained
                module = k[:-len(".bias")]
                out[peft_key(module + (".base_layer.bias" if module in targeted else ".bias"))] = a
        return fields, out

    def from_peft(self, fields, arrays, model, where="adapter_config.json"):
        check_peft_fields(where, fields, {"r", "lora_alpha", "target_modules", "fan_in_fan_out", "lora_dropout", "bias",
                                          "use_rslora", "init_lora_weights", "layers_to_transform",
                                          "trainable_token_indices"},
                          defaults={"megatron_core": "megatron.core", "qalora_group_size": 16})
        tokens = fields.get("trainable_token_indices")
        if isinstance(tokens, dict):          # PEFT's {layer: ids} form: tinyllm's only embedding is wte
            if set(tokens) - {"wte", "transformer.wte"}:
                raise PeftFormatError(f"{where}: trainable_token_indices for {sorted(tokens)}; tinyllm has only wte")
            tokens = next(iter(tokens.values()))
        if fields.get("init_lora_weights", True) not in (True, False, "gaussian"):
            raise PeftFormatError(f"{where}: init_lora_weights = {fields['init_lora_weights']!r} is not implemented by "
                                  f"tinyllm (True, False or 'gaussian')")
        config = LoraConfig(r=fields["r"], lora_alpha=fields["lora_alpha"], target_modules=fields["target_modules"],
                            lora_dropout=fields.get("lora_dropout", 0.0), bias=fields.get("bias", "none"),
                            use_rslora=fields.get("use_rslora", False),
                            init_lora_weights=fields.get("init_lora_weights", True),
                            layers_to_transform=fields.get("layers_to_transform"), trainable_token_indices=tokens)
        ours = {}
        for k, a in arrays.items():
            name = our_key(k)
            if name.endswith((".lora_A.weight", ".lora_B.weight")):
                ours[name[:-len(".weight")]] = a.T
            elif name == "wte.token_adapter.trainable_tokens_delta":
                ours[TOKENS] = a
            elif name.endswith(".bias"):
                ours[name.replace(".base_layer", "")] = a
            else:
                raise PeftFormatError(f"{where}: the weights hold {k!r}, which is not part of a LoRA adapter")
        return config, ours


register_peft_method(Lora())
