"""
What a fine-tuning method is to the rest of tinyllm: one object, defined and registered by the method's own
module (tinyllm/peft/lora.py, prefix.py, ...), as PEFT registers its methods with register_peft_method.
PeftModel, memory, compare, report and bench ask it; none of them names a method.

    method = method_of(config)                  # the registered Method for a LoraConfig, a PrefixTuningConfig, ...
    params = method.init(config, model, rng, tokenizer)
    logits, loss, cache = gpt_forward(p, idx, model.config, targets, hooks=method.hooks(config, params, model.config))

A method adds parameters of its own and plugs into the base model through tinyllm.model.Hooks; the base
model's weights stay frozen unless the method says otherwise (base_trainable).
"""
import re

import numpy as np

from ..checks import blocks_exist
from ..model import NO_HOOKS

METHODS = {}      # peft_type -> Method


def register_peft_method(method):
    """Make a Method known by its config's peft_type (a config's to_dict() names it; from_dict reads it)."""
    METHODS[method.config_class.peft_type] = method
    return method


def method_of(config):
    """The registered Method of a config object, or a TypeError naming what is registered."""
    method = METHODS.get(getattr(config, "peft_type", None))
    if method is None or not isinstance(config, method.config_class):
        names = ", ".join(m.config_class.__name__ for m in METHODS.values())
        raise TypeError(f"expected a fine-tuning config ({names}), got {type(config).__name__}")
    return method


class Method:
    """Everything tinyllm asks of a fine-tuning method. The defaults suit a method that only adds
    parameters of its own; a method overrides what it does differently."""
    config_class = None          # its config dataclass; config_class.peft_type is the registry's key
    trains_base = False          # True: the base's own weights train (full fine-tuning), nothing is added

    # ---- parameters -------------------------------------------------------------------------------

    def init(self, config, model, rng, tokenizer):
        """{key: array} of freshly initialised parameters for model (a GPT), in the model's dtype; raises
        ValueError when the config does not fit the model (a target that does not exist, ...)."""
        raise NotImplementedError

    def base_trainable(self, config, model, params):
        """Names of the base's own parameters that train along with the method's (none by default)."""
        return []

    def added_count(self, config, mc):
        """Numbers the method adds to a model of GPTConfig mc."""
        raise NotImplementedError

    def trainable_count(self, config, mc):
        """Numbers that train: its own, plus any base parameters it trains."""
        return self.added_count(config, mc)

    def formula(self, config, mc):
        """How the trainable count comes about, as arithmetic a learner can redo."""
        raise NotImplementedError

    # ---- context positions ------------------------------------------------------------------------

    def prompt_positions(self, config):
        """Input vectors the method puts before the real tokens (they run through every block)."""
        return 0

    def past_positions(self, config):
        """Keys and values the method puts before the real tokens' in every block."""
        return 0

    def reserved_positions(self, config):
        """Context positions the method takes before the real tokens."""
        return self.prompt_positions(config) + self.past_positions(config)

    # ---- forward and backward ---------------------------------------------------------------------

    def hooks(self, config, params, mc, rng=None, train=True):
        """The Hooks one forward (and its backward) runs with, on a model of GPTConfig mc. rng: the generator
        for randomness while training (LoRA dropout), None in eval mode; train: compute the gradients of the
        method's parameters (False: only pass the gradient through)."""
        return NO_HOOKS

    def activations(self, config, mc, B, T):
        """Numbers one training step's forward caches for the method's own layers, for B sequences of T
        real tokens (what every model caches is tinyllm.memory's)."""
        return 0

    # ---- merging ----------------------------------------------------------------------------------

    def merged_weights(self, config, params):
        """Names of the base weights merge() changes; empty: the method cannot be merged."""
        return []

    def merge(self, config, params, model):
        """Fold the method into model's weights, in place (after which it computes nothing extra)."""
        raise ValueError(f"{type(config).__name__} cannot be merged into the base weights")

    # ---- saving -----------------------------------------------------------------------------------

    def saved_arrays(self, config, params, model):
        """{key: array} that save_pretrained writes (by default the parameters themselves)."""
        return dict(params)

    def expected_arrays(self, config, params, model):
        """{key: shape} a saved file of this config must hold."""
        return {k: v.shape for k, v in self.saved_arrays(config, params, model).items()}

    def loaded_params(self, config, arrays, params, model):
        """The parameters to use from a saved file's arrays (checked against expected_arrays already)."""
        return {k: np.array(arrays[k], dtype=model.dtype) for k in params}

    # ---- Hugging Face PEFT's format -----------------------------------------------------------------

    def to_peft(self, config, arrays, model):
        """(adapter_config.json's fields, {PEFT key: array}) as PEFT writes this method, from saved_arrays();
        raises PeftFormatError when PEFT has no way to express it."""
        raise PeftFormatError(f"PEFT has no {type(config).__name__} for GPT-2; it is saved in tinyllm's format")

    def from_peft(self, fields, arrays, model):
        """(config, {tinyllm key: array} as saved_arrays() makes them) from a PEFT folder's config fields and
        weights; raises CheckpointError for what tinyllm cannot compute."""
        raise PeftFormatError(f"tinyllm cannot read PEFT's {fields.get('peft_type')!r} adapters")


class PeftFormatError(ValueError):
    """A method or an option that Hugging Face PEFT's adapter format cannot express (or tinyllm cannot read)."""


# PEFT's names: 'base_model.model.' + transformers' name of the parameter ('transformer.' + tinyllm's)
PEFT_PREFIX = "base_model.model.transformer."
# what every PEFT adapter_config.json may hold without changing what the adapter computes
COMMON_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                 "auto_mapping", "modules_to_save"}


def peft_key(name):
    return PEFT_PREFIX + name


def our_key(key):
    """'base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight' -> 'h.0.attn.c_attn.lora_A.weight'."""
    for prefix in ("base_model.model.", "transformer."):
        key = key[len(prefix):] if key.startswith(prefix) else key
    return key.replace(".default", "")


def check_peft_fields(path, fields, understood, defaults=None):
    """Refuse, by name, a field of a PEFT adapter_config.json that would change what the adapter computes and
    that tinyllm does not implement: any field outside COMMON_FIELDS and understood whose value is not empty
    (None, False, {}, [], '') or PEFT's own default (defaults)."""
    if fields.get("task_type") not in (None, "CAUSAL_LM"):
        raise PeftFormatError(f"{path}: task_type {fields['task_type']!r}; tinyllm's adapters are CAUSAL_LM")
    for k, v in fields.items():
        if k in COMMON_FIELDS - {"modules_to_save"} or k in understood:
            continue
        if v in (None, False, {}, [], "") or (defaults or {}).get(k, object()) == v:
            continue
        raise PeftFormatError(f"{path}: {k} = {v!r} is a PEFT option tinyllm does not implement")


# ----------------------------------------------------------------------------------------------------
# which linear layers a config targets (LoRA's and (IA)^3's target_modules)

LINEARS = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}   # (in, out) / C


def linear_shapes(mc, linears=LINEARS):
    """{module name: (in, out)} of every linear of a model of GPTConfig mc, e.g. 'h.0.attn.c_attn': (C, 3C)."""
    C = mc.n_embd
    return {f"h.{i}.{name}": (a * C, b * C) for i in range(mc.n_layer) for name, (a, b) in linears.items()}


def regex_picks(pattern, name):
    """A target_modules regex picks a module when it matches the whole name, tinyllm's (h.0.attn.c_attn) or
    transformers' (transformer.h.0.attn.c_attn), so patterns written for either work."""
    return bool(re.fullmatch(pattern, name) or re.fullmatch(pattern, "transformer." + name))


def peft_pattern(patterns, names):
    """target_modules as PEFT must read it (it matches transformers' names): a list as it is; a regex as it is
    when it picks the same modules there, else widened to allow the 'transformer.' in front."""
    if not isinstance(patterns, str) or all(regex_picks(patterns, n) == bool(re.fullmatch(patterns, "transformer." + n))
                                            for n in names):
        return patterns
    return rf"(?:transformer\.)?(?:{patterns})"


def match_modules(owner, field, patterns, names, layers=None, n_layer=None):
    """The names a target_modules-like field picks, as PEFT matches them: a list by exact name or '.'-suffix
    ('c_proj' is attn.c_proj and mlp.c_proj), a string as a regular expression over the whole name; then
    only the blocks in layers (layers_to_transform). Names may carry transformers' 'transformer.' in front.
    In the model's order. Raises ValueError naming the valid names for a pattern that matches nothing."""
    if isinstance(patterns, str):
        picked = [n for n in names if regex_picks(patterns, n)]
        if not picked:
            raise ValueError(f"{owner}.{field} regex {patterns!r} matches no module; module names look like "
                             f"{names[:4]}")
    else:
        picked = set()
        for t in patterns:
            hits = [n for n in names if n == t or ("transformer." + n).endswith("." + t) or "transformer." + n == t]
            if not hits:
                short = sorted({n.split(".", 2)[2] for n in names} | {n.split(".", 3)[3] for n in names})
                raise ValueError(f"{owner}.{field}: {t!r} is not a module of this GPT; valid names: {short} "
                                 f"(or full names such as {names[0]!r})")
            picked.update(hits)
        picked = [n for n in names if n in picked]
    if layers is not None:
        blocks_exist(owner, layers, n_layer)
        picked = [n for n in picked if int(n.split(".")[1]) in layers]
        if not picked:
            raise ValueError(f"{owner}.layers_to_transform leaves no target module")
    return picked
