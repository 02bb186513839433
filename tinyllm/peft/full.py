"""
Full fine-tuning as one more method: every base weight trains (or only the last last_k_blocks blocks and
ln_f), nothing is added. PEFT leaves full fine-tuning to the plain model; here it shares the same loop,
PeftModel and measurements, so the methods can be compared on equal terms. Saving it saves a full copy
of the model: the cost of full fine-tuning, paid per task.
"""
import math
from dataclasses import dataclass
from typing import Optional

from ..checks import positive_int
from ..model import param_shapes
from .config import PeftConfig
from .method import Method, register_peft_method


@dataclass
class FullFineTuningConfig(PeftConfig):
    """Full fine-tuning: every weight trains, or only the last last_k_blocks blocks and the final layer norm."""
    peft_type = "FULL"
    last_k_blocks: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.last_k_blocks is not None:
            positive_int("FullFineTuningConfig", "last_k_blocks", self.last_k_blocks)


def trained_names(config, mc):
    """The base's parameter names that train: all, or the last k blocks' and the final layer norm's."""
    names = list(param_shapes(mc))
    if config.last_k_blocks is None:
        return names
    if config.last_k_blocks > mc.n_layer:
        raise ValueError(f"FullFineTuningConfig.last_k_blocks = {config.last_k_blocks} but the model has "
                         f"{mc.n_layer} blocks")
    blocks = tuple(f"h.{i}." for i in range(mc.n_layer - config.last_k_blocks, mc.n_layer))
    return [k for k in names if k.startswith(blocks) or k.startswith("ln_f.")]


class FullFineTuning(Method):
    config_class = FullFineTuningConfig
    trains_base = True

    def init(self, config, model, rng, tokenizer):
        trained_names(config, model.config)          # checks last_k_blocks against the model
        return {}

    def base_trainable(self, config, model, params):
        return trained_names(config, model.config)

    def added_count(self, config, mc):
        return 0

    def trainable_count(self, config, mc):
        shapes = param_shapes(mc)
        return sum(math.prod(shapes[k]) for k in trained_names(config, mc))

    def formula(self, config, mc):
        return f"full fine-tuning: every weight of the chosen blocks = {self.trainable_count(config, mc):,}"

    def saved_arrays(self, config, params, model):
        """A full copy of the weights it trained: what a task costs on disk with full fine-tuning."""
        return {k: model.params[k] for k in trained_names(config, model.config)}


register_peft_method(FullFineTuning())
