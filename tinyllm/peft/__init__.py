"""Fine-tuning methods with Hugging Face PEFT's API: LoRA, (IA)^3, prefix tuning, prompt tuning, adapters, full.

One module per method (lora.py, ia3.py, prefix.py, prompt.py, adapter.py, full.py): its config, its hooks into the
model, and one registered Method object (method.py) that the rest of tinyllm asks. Importing a module
registers its method.
"""
from .adapter import AdapterConfig
from .config import PeftConfig
from .full import FullFineTuningConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .method import METHODS, method_of, register_peft_method
from .peft_model import PeftModel, get_peft_model
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig

__all__ = ["AdapterConfig", "FullFineTuningConfig", "IA3Config", "LoraConfig", "PeftConfig", "PrefixTuningConfig",
           "PromptTuningConfig", "PeftModel", "get_peft_model", "METHODS", "method_of", "register_peft_method"]
