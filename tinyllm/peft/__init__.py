"""Fine-tuning methods with Hugging Face PEFT's API: LoRA, prefix tuning, prompt tuning, adapters, full."""
from .config import (AdapterConfig, FullFineTuningConfig, LoraConfig, PeftConfig, PrefixTuningConfig,
                     PromptTuningConfig)
from .peft_model import PeftModel, get_peft_model

__all__ = ["AdapterConfig", "FullFineTuningConfig", "LoraConfig", "PeftConfig", "PrefixTuningConfig",
           "PromptTuningConfig", "PeftModel", "get_peft_model"]
