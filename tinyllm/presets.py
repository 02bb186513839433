"""
The methods the lab compares, in one place: each one's config (the sizes the comparison uses), the
learning rates the sweep tries, and its label and colour in tables and plots. compare, sweep, bench,
report and the lessons all read them here.

What each method's learning rate and step budget should be is not written here: it is measured, by
`python -m tinyllm sweep`, which keeps its results in tinyllm/sweeps/<task>/ (see tinyllm/sweep.py).
tuned(task) reads them. Numbers typed into code go stale; a results file names the command that remakes it.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable

from .peft import AdapterConfig, FullFineTuningConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

SWEEPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweeps")
DEFAULT_TASK = "extract"          # the lab's task (tinyllm.tasks): read one field off a sentence


@dataclass(frozen=True)
class Preset:
    label: str                  # in tables and plots
    color: str                  # in plots
    make: Callable              # make() -> a fresh config with the comparison's sizes
    lrs: tuple                  # the sweep's learning-rate grid, about 3x apart
    fallback_lr: float          # used only when no sweep was run for a task (the run then says so)


PRESETS = {
    "full": Preset("full", "#d62728", lambda: FullFineTuningConfig(), (3e-4, 1e-3, 3e-3), 1e-3),
    "lora": Preset("LoRA", "#1f77b4", lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]),
                   (3e-3, 1e-2, 3e-2), 1e-2),
    "prefix": Preset("prefix", "#2ca02c", lambda: PrefixTuningConfig(num_virtual_tokens=10),
                     (1e-2, 3e-2, 1e-1, 3e-1), 1e-1),
    "prompt": Preset("prompt", "#9467bd", lambda: PromptTuningConfig(num_virtual_tokens=10),
                     (3e-2, 1e-1, 3e-1, 1.0), 3e-1),
    "adapter": Preset("adapter", "#ff7f0e", lambda: AdapterConfig(bottleneck_size=16),
                      (3e-3, 1e-2, 3e-2, 1e-1), 3e-2),
    "ia3": Preset("(IA)³", "#8c564b", lambda: IA3Config(), (1e-2, 3e-2, 1e-1, 3e-1), 1e-1),
}
MAIN_METHODS = tuple(PRESETS)


def method_config(name):
    """A fresh config for one of MAIN_METHODS, with the sizes the comparison uses."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; the lab's methods are {list(PRESETS)}")
    return PRESETS[name].make()


# The variations the tuning claims need: {group: (method, {label: make(task) -> config, or None for the
# method's own preset})}. LoRA keeps lora_alpha = 2r, so only the rank changes, not the scale of its update.
VARIANTS = {
    "lora_rank": ("lora", {"r=2": lambda task: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]),
                           "r=8": None,
                           "r=32": lambda task: LoraConfig(r=32, lora_alpha=64, target_modules=["c_attn"])}),
    "lora_place": ("lora", {"c_attn": None,
                            "q,v": lambda task: LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn.q", "c_attn.v"]),
                            "mlp": lambda task: LoraConfig(r=8, lora_alpha=16, target_modules=["c_fc", "mlp.c_proj"])}),
    # P=25 is about the most that leaves room for the longest examples (100 tokens) in a context of 128
    "prefix_length": ("prefix", {"P=3": lambda task: PrefixTuningConfig(num_virtual_tokens=3), "P=10": None,
                                 "P=25": lambda task: PrefixTuningConfig(num_virtual_tokens=25)}),
    # text: the keys and values of a real training example (its first 10 tokens), as the paper initialises
    "prefix_init": ("prefix", {"random": None, "text": lambda task: PrefixTuningConfig(
        num_virtual_tokens=10, init="text", init_text="".join(task.train[0]))}),
}


def variant_config(group, label, task):
    method, configs = VARIANTS[group]
    make = configs[label]
    return method_config(method) if make is None else make(task)


def sweep_folder(task_name):
    return os.path.join(SWEEPS, task_name)


def tuned(task_name, folder=None):
    """{method: {lr, steps, flattened, source, base_fingerprint}} from the sweep's files for this task (in
    folder, default tinyllm/sweeps/<task>); base_fingerprint: the base model the sweep tuned on. Methods the
    sweep has not covered get {lr: fallback_lr, steps: None, flattened: None, source: 'fallback'}."""
    out = {}
    for m, preset in PRESETS.items():
        path = os.path.join(folder or sweep_folder(task_name), f"{m}.json")
        if os.path.isfile(path):
            with open(path) as f:
                stored = json.load(f)
            chosen = stored["chosen"]
            out[m] = {"lr": chosen["lr"], "steps": chosen["steps"], "flattened": chosen["flattened"],
                      "source": os.path.relpath(path, os.path.dirname(os.path.dirname(SWEEPS))),
                      "base_fingerprint": stored.get("base", {}).get("fingerprint")}
        else:
            out[m] = {"lr": preset.fallback_lr, "steps": None, "flattened": None, "source": "fallback"}
    return out


def sweep_variants(task_name, folder=None):
    """{group: result} of the variant runs the sweep made for this task (empty when it made none)."""
    out = {}
    for group in VARIANTS:
        path = os.path.join(folder or sweep_folder(task_name), f"variants_{group}.json")
        if os.path.isfile(path):
            with open(path) as f:
                out[group] = json.load(f)
    return out


def tuned_lrs(task_name=DEFAULT_TASK):
    """{method: learning rate} as the sweep chose them for the task (or the presets' fallbacks)."""
    return {m: t["lr"] for m, t in tuned(task_name).items()}
