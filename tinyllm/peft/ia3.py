"""
(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): Infused Adapter by Inhibiting and Amplifying Inner Activations. Chosen linear layers get one
learned number per feature that rescales it:

    y = (x @ W + b) * l       a target module: its output, bias included (GPT-2's c_attn: queries, keys, values)
    y = (x * l) @ W + b       a feed-forward module: its input (GPT-2's mlp.c_proj: the MLP's 4C hidden features)

l starts at one, so the model starts as the base, and it is all that trains: with PEFT's defaults for
GPT-2, 3C + 4C numbers per block, h.{i}.attn.c_attn.ia3_l (3C,) and h.{i}.mlp.c_proj.ia3_l (4C,). A scaling
merges into the weights exactly: W's columns (and b) times l, or W's rows times l.

Legend: n the features a vector scales (out for a target, in for a feed-forward module), C channels.
"""
import re
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np

from ..checks import flag
from ..model import Hooks
from .config import PeftConfig
from .method import (Method, PeftFormatError, check_peft_fields, linear_shapes, match_modules, our_key, peft_key,
                     peft_pattern, register_peft_method)

KEY = ".ia3_l"


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: learned vectors that rescale the targeted linears' outputs, or for feedforward_modules their
    inputs. target_modules matches as LoRA's does (names or '.'-suffixes, or one regular expression); a
    target is feed-forward when its name ends with an entry of feedforward_modules (or matches it, a
    regular expression). Given as two lists, feedforward_modules must be a subset of target_modules, name
    for name, as PEFT requires. Defaults: PEFT's for GPT-2 (feedforward_modules None: 'mlp.c_proj', the
    default PEFT fills in for a GPT-2). init_ia3_weights: True (ones: the model starts as the base) or
    False (random, for tests)."""
    peft_type = "IA3"
    target_modules: Optional[Union[List[str], str]] = None
    feedforward_modules: Optional[Union[List[str], str]] = None
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is None:
            self.target_modules = ["c_attn", "mlp.c_proj"]              # PEFT's default for GPT-2
        for field in ("target_modules", "feedforward_modules"):
            value = getattr(self, field)
            if value is None:
                continue
            if not (isinstance(value, str) or isinstance(value, (list, tuple)) and
                    all(isinstance(t, str) and t for t in value)):
                raise ValueError(f"IA3Config.{field} must be a list of module names or one regular expression, "
                                 f"got {value!r}")
            if not isinstance(value, str):
                setattr(self, field, list(value))
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list) \
                and not set(self.feedforward_modules) <= set(self.target_modules):
            raise ValueError(f"IA3Config.feedforward_modules {self.feedforward_modules} must be a subset of "
                             f"target_modules {self.target_modules}, name for name (as PEFT requires)")
        flag("IA3Config", "init_ia3_weights", self.init_ia3_weights)


GPT2_FEEDFORWARD = ["mlp.c_proj"]      # what PEFT fills in for a GPT-2 when feedforward_modules is None


def is_feedforward(patterns, name):
    """As PEFT decides it, on transformers' name of the module: a regex matches it whole; a list entry ends it."""
    key = "transformer." + name
    if isinstance(patterns, str):
        return bool(re.fullmatch(patterns, key) or re.fullmatch(patterns, name))
    return any(key.endswith(t) for t in patterns)


def targets(config, mc):
    """{module name: True if it is a feed-forward module (its input is scaled), False (its output)}."""
    shapes = linear_shapes(mc)
    names = match_modules("IA3Config", "target_modules", config.target_modules, list(shapes))
    feedforward = GPT2_FEEDFORWARD if config.feedforward_modules is None else config.feedforward_modules
    return {n: is_feedforward(feedforward, n) for n in names}


def vector_size(name, feedforward, mc):
    n_in, n_out = linear_shapes(mc)[name]
    return n_in if feedforward else n_out

# ----------------------------------------------------------------------------------------------------
# the layer and its hooks


def scale_forward(x, l):
    """Every feature scaled by its own learned number. Inputs: x (...,n); l (n,). Returns: out (...,n), cache."""
    return x * l, (x, l)


def scale_backward(dout, cache):
    """Returns dx (...,n), dl (n,). forward was: out = x * l, feature by feature."""
    x, l = cache
    return dout * l, (dout * x).reshape(-1, l.shape[0]).sum(axis=0)


class IA3Hooks(Hooks):
    def __init__(self, own, feedforward, train):
        self.own, self.feedforward, self.train = own, feedforward, train

    def linear(self, name, x, w, b):
        l = self.own.get(name + KEY)
        if l is None:
            return super().linear(name, x, w, b)
        if self.feedforward[name]:                                  # (x * l) @ W + b
            xs, c_scale = scale_forward(x, l)                       # (...,in)
            out, c_lin = super().linear(name, xs, w, b)
        else:                                                       # (x @ W + b) * l
            z, c_lin = super().linear(name, x, w, b)                # (...,out)
            out, c_scale = scale_forward(z, l)
        return out, (name, c_scale, c_lin)

    def linear_backward(self, dout, cache, need_dw, need_db, grads):
        if len(cache) != 3 or not isinstance(cache[0], str):        # a linear without a vector
            return super().linear_backward(dout, cache, need_dw, need_db, grads)
        name, c_scale, c_lin = cache
        if self.feedforward[name]:
            dxs, dw, db = super().linear_backward(dout, c_lin, need_dw, need_db, grads)
            dx, dl = scale_backward(dxs, c_scale)
        else:
            dz, dl = scale_backward(dout, c_scale)
            dx, dw, db = super().linear_backward(dz, c_lin, need_dw, need_db, grads)
        if self.train:
            grads[name + KEY] = dl
        return dx, dw, db


class IA3(Method):
    config_class = IA3Config

    def init(self, config, model, rng, tokenizer):
        params = {}
        for name, ff in targets(config, model.config).items():
            n = vector_size(name, ff, model.config)
            params[name + KEY] = np.ones(n) if config.init_ia3_weights else rng.normal(1.0, 0.1, n)
        return {k: v.astype(model.dtype) for k, v in params.items()}

    def added_count(self, config, mc):
        return sum(vector_size(n, ff, mc) for n, ff in targets(config, mc).items())

    def formula(self, config, mc):
        kinds = {}
        for n, ff in targets(config, mc).items():
            kinds.setdefault((n.split(".", 2)[2], ff), []).append(vector_size(n, ff, mc))
        parts = [f"{sizes[0]} ({'input' if ff else 'output'} of {k}) x {len(sizes)}" for (k, ff), sizes in kinds.items()]
        return "(IA)^3 one number per scaled feature: " + " + ".join(parts) + f" = {self.added_count(config, mc):,}"

    def hooks(self, config, params, mc, rng=None, train=True):
        return IA3Hooks(params, targets(config, mc), train)

    def activations(self, config, mc, B, T):
        """The scaling caches what it scales: a target's output before scaling (the next layer keeps only the
        scaled one), a feed-forward module's input (its linear keeps the scaled one)."""
        return B * T * self.added_count(config, mc)

    def merged_weights(self, config, params):
        modules = [k[:-len(KEY)] for k in params]
        return sorted([m + ".weight" for m in modules] + [m + ".bias" for m in modules])

    def merge(self, config, params, model):
        """W's rows times l for a feed-forward module; W's columns and b times l for a target."""
        for name, ff in targets(config, model.config).items():
            l, W, b = params[name + KEY], model.params[name + ".weight"], model.params[name + ".bias"]
            if ff:                                                   # (x * l) @ W = x @ (l[:, None] * W)
                W *= l[:, None].astype(W.dtype)
            else:                                                    # (x @ W + b) * l = x @ (W * l) + b * l
                W *= l.astype(W.dtype)
                b *= l.astype(b.dtype)

    # PEFT's format: a target's vector as (out, 1), a feed-forward module's as (1, in), under the linear's name

    def to_peft(self, config, arrays, model):
        names = list(linear_shapes(model.config))
        fields = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": peft_pattern(config.target_modules, names),
                  "feedforward_modules": peft_pattern(config.feedforward_modules, names), "fan_in_fan_out": True,
                  "init_ia3_weights": config.init_ia3_weights, "inference_mode": True, "base_model_name_or_path": None,
                  "modules_to_save": None}
        ff = targets(config, model.config)
        return fields, {peft_key(k): a.reshape((1, -1) if ff[k[:-len(KEY)]] else (-1, 1)) for k, a in arrays.items()}

    def from_peft(self, fields, arrays, model, where="adapter_config.json"):
        check_peft_fields(where, fields, {"target_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights"})
        targets_, feedforward = fields["target_modules"], fields.get("feedforward_modules")
        if isinstance(targets_, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets_):
            feedforward = None    # PEFT saved the GPT-2 default it filled in (not a subset): it means the same
        config = IA3Config(target_modules=targets_, feedforward_modules=feedforward,
                           init_ia3_weights=fields.get("init_ia3_weights", True))
        ours = {our_key(k): a.reshape(-1) for k, a in arrays.items()}
        if not all(k.endswith(KEY) for k in ours):
            raise PeftFormatError(f"{where}: the weights hold {sorted(k for k in ours if not k.endswith(KEY))[:2]}, "
                                  f"which are not (IA)^3 vectors")
        return config, ours


register_peft_method(IA3())
