"""
Prompt tuning (Lester et al., 2021): num_virtual_tokens learned input vectors,

    prompt_embeddings (P,C)

put in front of the token embeddings, so the model reads P "words" that no tokenizer has. They take the
first P positions; the real tokens follow at positions P, P+1, ... Only P*C numbers train.

Not to be confused with prefix tuning (prefix.py): a prompt is input to the first block only, and every
block computes its own keys and values from it; a prefix gives every block keys and values directly.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..checks import choice, optional_text, positive_int
from ..model import Hooks
from .config import PeftConfig
from .method import Method, PeftFormatError, check_peft_fields, register_peft_method


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
        positive_int("PromptTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        choice("PromptTuningConfig", "prompt_tuning_init", self.prompt_tuning_init, ("RANDOM", "SAMPLE_VOCAB", "TEXT"))
        optional_text("PromptTuningConfig", "prompt_tuning_init_text", self.prompt_tuning_init_text)
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text")


class PromptHooks(Hooks):
    def __init__(self, own, train):
        self.own, self.train = own, train

    def prompt(self, B):
        prompt = self.own["prompt_embeddings"]                                  # (P,C)
        return np.broadcast_to(prompt, (B,) + prompt.shape)                     # the same for every row: (B,P,C)

    def prompt_backward(self, dprompt, grads):
        if self.train:
            grads["prompt_embeddings"] = dprompt.sum(axis=0)                    # shared by the batch: sum


class PromptTuning(Method):
    config_class = PromptTuningConfig

    def init(self, config, model, rng, tokenizer):
        wte = model.params["wte.weight"]
        P = config.num_virtual_tokens
        if config.prompt_tuning_init == "TEXT":
            ids = tokenizer.encode(config.prompt_tuning_init_text)
            if len(ids) == 0:
                raise ValueError("PromptTuningConfig.prompt_tuning_init_text is empty after tokenizing")
            prompt = wte[np.resize(ids, P)]                                  # the text's embeddings, repeated or cut
        elif config.prompt_tuning_init == "SAMPLE_VOCAB":
            prompt = wte[rng.integers(0, wte.shape[0], P)]                   # embeddings of random tokens
        else:
            prompt = rng.normal(0.0, float(wte.std()), (P, wte.shape[1]))   # at the scale of real embeddings
        return {"prompt_embeddings": np.array(prompt, dtype=model.dtype)}

    def added_count(self, config, mc):
        return config.num_virtual_tokens * mc.n_embd

    def formula(self, config, mc):
        P, C = config.num_virtual_tokens, mc.n_embd
        return f"prompt P * C = {P}*{C} = {P * C:,}"

    def prompt_positions(self, config):
        return config.num_virtual_tokens

    def hooks(self, config, params, mc, rng=None, train=True):
        return PromptHooks(params, train)

    # PEFT's format: the (P, C) 'prompt_embeddings' themselves

    def to_peft(self, config, arrays, model):
        mc = model.config
        fields = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": config.num_virtual_tokens,
                  "token_dim": mc.n_embd, "num_layers": mc.n_layer, "num_attention_heads": mc.n_head,
                  "num_transformer_submodules": 1,
                  # how it started does not matter once trained; TEXT would make PEFT look for a tokenizer
                  "prompt_tuning_init": "RANDOM" if config.prompt_tuning_init == "TEXT" else config.prompt_tuning_init,
                  "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "inference_mode": True,
                  "base_model_name_or_path": None, "modules_to_save": None}
        return fields, {"prompt_embeddings": arrays["prompt_embeddings"]}

    def from_peft(self, fields, arrays, model, where="adapter_config.json"):
        mc = model.config
        check_peft_fields(where, fields, {"num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                                          "num_transformer_submodules", "prompt_tuning_init", "prompt_tuning_init_text",
                                          "tokenizer_name_or_path", "tokenizer_kwargs"})
        if fields.get("token_dim", mc.n_embd) != mc.n_embd or fields.get("num_transformer_submodules", 1) != 1:
            raise PeftFormatError(f"{where}: token_dim {fields.get('token_dim')} does not fit this GPT (n_embd "
                                  f"{mc.n_embd}); load it onto the base it was trained on")
        if set(arrays) != {"prompt_embeddings"}:
            raise PeftFormatError(f"{where}: a prompt-tuning file holds 'prompt_embeddings' only, got {sorted(arrays)[:3]}")
        return PromptTuningConfig(num_virtual_tokens=fields["num_virtual_tokens"]), dict(arrays)


register_peft_method(PromptTuning())
