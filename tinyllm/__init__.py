"""tinyllm: GPT-2 and its fine-tuning methods in NumPy, every gradient written by hand."""
from .model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
