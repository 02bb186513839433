"""
The configurations of the fine-tuning methods, with the field names and defaults of Hugging Face PEFT
where PEFT has the method (LoRA, prefix tuning, prompt tuning), so a config carries over unchanged.

Each config checks its own fields when it is made; checks that need the model (does the prefix leave
room in the context? does the target module exist?) run in get_peft_model.
"""
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Union


def _positive_int(cls, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls}.{name} must be a positive integer, got {value!r}")


def _positive_number(cls, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{cls}.{name} must be a finite number > 0, got {value!r}")


def _flag(cls, name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{cls}.{name} must be True or False, got {value!r}")


def _choice(cls, name, value, allowed):
    if not any(type(value) is type(a) and value == a for a in allowed):   # 1 is not True, "x" is not ["x"]
        raise ValueError(f"{cls}.{name} must be one of {list(allowed)}, got {value!r}")


def _text(cls, name, value):
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{cls}.{name} must be a string (or None), got {value!r}")


def _layers(cls, value):
    """layers_to_transform as a list of block indices (an int alone is one block), or None."""
    if value is None:
        return None
    layers = [value] if isinstance(value, int) else value
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"{cls}.layers_to_transform must be None or a list of block indices (ints), got {value!r}")
    return list(layers)


def check_layers(config, n_layer):
    """Raise unless every block index in config.layers_to_transform exists in a model of n_layer blocks."""
    bad = [i for i in config.layers_to_transform or () if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"{type(config).__name__}.layers_to_transform {bad} out of range: the model has blocks "
                         f"0..{n_layer - 1}")


@dataclass
class PeftConfig:
    """What every method's config has: its type, and whether it is loaded only for inference."""
    inference_mode: bool = False

    def __post_init__(self):
        _flag(type(self).__name__, "inference_mode", self.inference_mode)

    def to_dict(self):
        return {"peft_type": self.peft_type, **asdict(self)}

    @staticmethod
    def from_dict(d):
        d = dict(d)
        kind = d.pop("peft_type", None)
        if kind not in CONFIGS:
            raise ValueError(f"unknown peft_type {kind!r} in adapter config; expected one of {list(CONFIGS)}")
        cls = CONFIGS[kind]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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

    def __post_init__(self):
        super().__post_init__()
        _positive_int("LoraConfig", "r", self.r)
        _positive_number("LoraConfig", "lora_alpha", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        _choice("LoraConfig", "bias", self.bias, ("none", "all", "lora_only"))
        _flag("LoraConfig", "use_rslora", self.use_rslora)
        _choice("LoraConfig", "init_lora_weights", self.init_lora_weights, (True, False, "gaussian"))
        if self.target_modules is None:
            self.target_modules = ["c_attn"]            # PEFT's default for GPT-2
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LoraConfig.target_modules {self.target_modules!r} is not a valid regular "
                                 f"expression ({e}); or give a list of names, e.g. ['c_attn']") from None
        elif isinstance(self.target_modules, (list, tuple)) \
                and all(isinstance(t, str) and t for t in self.target_modules):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("LoraConfig.target_modules is empty; name at least one module, e.g. ['c_attn']")
        else:
            raise ValueError(f"LoraConfig.target_modules must be a list of module names or one regular "
                             f"expression, got {self.target_modules!r}")
        self.layers_to_transform = _layers("LoraConfig", self.layers_to_transform)

    @property
    def scale(self):
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)


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
        _positive_int("PrefixTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        _flag("PrefixTuningConfig", "prefix_projection", self.prefix_projection)
        _positive_int("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)
        _choice("PrefixTuningConfig", "init", self.init, ("random", "text"))
        _text("PrefixTuningConfig", "init_text", self.init_text)
        if self.init == "text" and not self.init_text:
            raise ValueError("PrefixTuningConfig.init='text' needs init_text, the text whose keys and values "
                             "start the prefix")
        _positive_number("PrefixTuningConfig", "init_std", self.init_std)


@dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning: num_virtual_tokens learned input vectors in front of the token embeddings.

    prompt_tuning_init: "RANDOM" (normal with the std of the token embeddings, so the prompt lives at
        the scale of real tokens), "SAMPLE_VOCAB" (copies of randomly chosen token embeddings) or "TEXT"
        (the embeddings of prompt_tuning_init_text, repeated or cut to length), PEFT's three options.
    """
    peft_type = "PROMPT_TUNING"
    num_virtual_tokens: int = 10
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        _positive_int("PromptTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        _choice("PromptTuningConfig", "prompt_tuning_init", self.prompt_tuning_init,
                ("RANDOM", "SAMPLE_VOCAB", "TEXT"))
        _text("PromptTuningConfig", "prompt_tuning_init_text", self.prompt_tuning_init_text)
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text")


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
        _positive_int("AdapterConfig", "bottleneck_size", self.bottleneck_size)
        _positive_number("AdapterConfig", "init_std", self.init_std)
        self.layers_to_transform = _layers("AdapterConfig", self.layers_to_transform)


@dataclass
class FullFineTuningConfig(PeftConfig):
    """Full fine-tuning as one more method: every base weight trains (or only the last last_k_blocks
    blocks and ln_f). Not in PEFT, which leaves full fine-tuning to the plain model; here it shares the
    same loop, so the methods can be compared on equal terms. Saving it saves a full copy of the model."""
    peft_type = "FULL"
    last_k_blocks: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.last_k_blocks is not None:
            _positive_int("FullFineTuningConfig", "last_k_blocks", self.last_k_blocks)


CONFIGS = {c.peft_type: c for c in (LoraConfig, PrefixTuningConfig, PromptTuningConfig, AdapterConfig,
                                    FullFineTuningConfig)}
