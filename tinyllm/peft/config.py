"""
What every method's config has in common. Each method's own config lives in its module (LoraConfig in
lora.py, ...), with the field names and defaults of Hugging Face PEFT where PEFT has the method, so a config
carries over unchanged. A config checks its own fields when it is made; checks that need the model (does
the prefix leave room in the context? does the target module exist?) run in get_peft_model.
"""
from dataclasses import asdict, dataclass, fields

from ..checks import flag


@dataclass
class PeftConfig:
    """What every method's config has: its type, and whether it is loaded only for inference."""
    peft_type = None
    inference_mode: bool = False

    def __post_init__(self):
        flag(type(self).__name__, "inference_mode", self.inference_mode)

    def to_dict(self):
        return {"peft_type": self.peft_type, **asdict(self)}

    @staticmethod
    def from_dict(d):
        """The config a to_dict() wrote: {'peft_type': 'LORA', 'r': 8, ...}. Unknown fields are refused by
        name (a misspelled field would otherwise be dropped without a word)."""
        from .method import METHODS
        d = dict(d)
        kind = d.pop("peft_type", None)
        if not isinstance(kind, str) or kind not in METHODS:
            raise ValueError(f"unknown peft_type {kind!r} in adapter config; expected one of {list(METHODS)}")
        cls = METHODS[kind].config_class
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(known)}")
        return cls(**d)
