"""
LoRA (Hu et al., 2021): a frozen linear y = x @ W + b learns only a low-rank update,

    y = x @ W + b + scale * (x @ A) @ B        A (in,r), B (r,out), scale = lora_alpha / r

so a layer with in*out weights trains r*(in+out) numbers. B starts at zero: the model starts exactly
equal to the base. The forward/backward pair is in tinyllm/layers.py (lora_forward, lora_backward);
the model adds it to every linear that has `<name>.lora_A` and `<name>.lora_B` keys. This file finds
the targets, makes the keys, and merges them into W.
"""
import re

import numpy as np

from .config import check_layers

# the linears of block i that LoRA can attach to, and their (in, out) sizes in units of C
LINEARS = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1),
           "attn.c_attn.q": (1, 1), "attn.c_attn.k": (1, 1), "attn.c_attn.v": (1, 1)}


def module_shapes(model_config):
    """{module name: (in, out)} for every linear LoRA can target, e.g. 'h.0.attn.c_attn': (C, 3C)."""
    C = model_config.n_embd
    return {f"h.{i}.{name}": (a * C, b * C)
            for i in range(model_config.n_layer) for name, (a, b) in LINEARS.items()}


def fused_module(name):
    """The linear a LoRA module sits on: a c_attn slice ('h.0.attn.c_attn.q') is part of 'h.0.attn.c_attn'."""
    return name[:-2] if name[-2:] in (".q", ".k", ".v") else name


def find_targets(config, model_config):
    """The module names the config targets, matched as PEFT does: a list by exact name or '.'-suffix,
    a string as a regular expression over the whole name. Raises ValueError for a name that matches
    nothing, listing the valid names."""
    shapes = module_shapes(model_config)
    names = list(shapes)
    if isinstance(config.target_modules, str):
        targets = [n for n in names if re.fullmatch(config.target_modules, n)]
        if not targets:
            raise ValueError(f"LoraConfig.target_modules regex {config.target_modules!r} matches no module; "
                             f"module names look like {names[:7]}")
    else:
        targets = []
        for t in config.target_modules:
            hits = [n for n in names if n == t or n.endswith("." + t)]
            if not hits:
                valid = sorted(set(LINEARS) | {n.split(".", 1)[1] for n in LINEARS})   # 'c_fc', 'c_attn.q'...
                raise ValueError(f"LoraConfig.target_modules: {t!r} is not a module of this GPT; valid names: "
                                 f"{valid} (or full names such as 'h.0.attn.c_attn')")
            targets += [n for n in hits if n not in targets]
    if config.layers_to_transform is not None:
        check_layers(config, model_config.n_layer)
        targets = [n for n in targets if int(n.split(".")[1]) in config.layers_to_transform]
        if not targets:
            raise ValueError("LoraConfig.layers_to_transform leaves no target module")
    targets = sorted(targets, key=names.index)          # the model's order, whatever the config's
    if any(n.endswith("c_attn") for n in targets) and any(".c_attn." in n for n in targets):
        raise ValueError("LoraConfig.target_modules: choose either 'c_attn' or its slices 'c_attn.q|k|v', not both")
    for n in targets:
        if config.r > min(shapes[n]):
            raise ValueError(f"LoraConfig.r = {config.r} is larger than the layer {n} {shapes[n]}: a rank-r update "
                             f"needs r <= min(in, out) = {min(shapes[n])}")
    return targets


def init_lora(config, model_config, rng, dtype):
    """{'<module>.lora_A': (in,r), '<module>.lora_B': (r,out)} for every target.

    A is Kaiming-uniform as in PEFT (torch's kaiming_uniform_ with a=sqrt(5), i.e. uniform within
    +-1/sqrt(in)), B is zero, so that A @ B = 0 and the model starts as the base model.
    """
    shapes = module_shapes(model_config)
    params = {}
    for name in find_targets(config, model_config):
        n_in, n_out = shapes[name]
        if config.init_lora_weights == "gaussian":
            A = rng.normal(0.0, 1.0 / config.r, (n_in, config.r))
        else:
            A = rng.uniform(-1.0, 1.0, (n_in, config.r)) / np.sqrt(n_in)
        B = np.zeros((config.r, n_out))
        if config.init_lora_weights is False:   # a non-zero start, for tests of the update itself
            B = rng.uniform(-1.0, 1.0, (config.r, n_out)) / np.sqrt(config.r)
        params[name + ".lora_A"], params[name + ".lora_B"] = A.astype(dtype), B.astype(dtype)
    return params


def bias_names(config, adapter, base_params):
    """The base biases that train along with LoRA: none, all of them, or those of the targeted layers."""
    if config.bias == "all":
        return [k for k in base_params if k.endswith(".bias")]
    if config.bias == "lora_only":
        linears = {fused_module(k[:-len(".lora_A")]) for k in adapter if k.endswith(".lora_A")}
        return [k for k in base_params if k.endswith(".bias") and k[:-len(".bias")] in linears]
    return []


def merged_weights(adapter):
    """The base weight names a merge of this adapter changes (a sliced c_attn's once)."""
    modules = [k[:-len(".lora_A")] for k in adapter if k.endswith(".lora_A")]
    return sorted({fused_module(m) + ".weight" for m in modules})


def merge(base_params, adapter, scale, sign=1.0):
    """W += sign * scale * A @ B for every LoRA pair in adapter, in place; sign -1 undoes a merge
    (up to float rounding)."""
    for key in adapter:
        if not key.endswith(".lora_A"):
            continue
        module = key[:-len(".lora_A")]
        delta = sign * scale * (adapter[key] @ adapter[module + ".lora_B"])    # (in,r) @ (r,out) -> (in,out)
        part = module.rsplit(".", 1)[-1]
        if part in ("q", "k", "v"):     # a slice of the fused c_attn
            W = base_params[fused_module(module) + ".weight"]
            C = W.shape[0]
            j = "qkv".index(part)
            W[:, j * C:(j + 1) * C] += delta.astype(W.dtype)
        else:
            W = base_params[module + ".weight"]
            W += delta.astype(W.dtype)


def formula(config, model_config):
    """How the trainable count comes about, e.g. 'r*(in+out) per module: 8*(128+384) x 4 modules = 16,384'."""
    shapes = module_shapes(model_config)
    targets = find_targets(config, model_config)
    kinds = {}
    for n in targets:
        kinds.setdefault(n.split(".", 2)[2], []).append(n)
    parts = [f"{config.r}*({shapes[ns[0]][0]}+{shapes[ns[0]][1]}) x {len(ns)} {k}" for k, ns in kinds.items()]
    total = sum(config.r * sum(shapes[n]) for n in targets)
    C, L = model_config.n_embd, model_config.n_layer
    if config.bias == "all":            # per block: ln_1, c_attn (3C), attn.c_proj, ln_2, c_fc (4C), mlp.c_proj; and ln_f
        parts.append(f"biases 11*C*L + C = {11 * C * L + C}")
        total += 11 * C * L + C
    elif config.bias == "lora_only":    # the targeted linears' own biases (a sliced c_attn has one bias)
        modules = {fused_module(n) for n in targets}
        n_bias = sum(shapes[m][1] for m in modules)
        parts.append(f"their biases {n_bias}")
        total += n_bias
    return "LoRA r*(in+out) per module: " + " + ".join(parts) + f" = {total:,}"
