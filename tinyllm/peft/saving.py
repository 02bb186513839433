"""
Adapter folders: what PeftModel.save_pretrained writes and PeftModel.from_pretrained reads.

Hugging Face PEFT's format, for the methods PEFT has (LoRA, prefix tuning, prompt tuning, (IA)^3):

    adapter_config.json          PEFT's fields and values (peft_type, task_type, r, lora_alpha, ...)
    adapter_model.safetensors    PEFT's keys and layouts (each method's module says which: to_peft);
                                 in its __metadata__, which PEFT and transformers ignore, tinyllm's own
                                 facts: the base's fingerprint and config, and the method's full config

so `peft.PeftModel.from_pretrained(hf_gpt2, folder)` loads it, and tinyllm reads folders PEFT wrote. What
PEFT cannot express (Houlsby adapters, LoRA on a third of c_attn, a full fine-tuning) is written in
tinyllm's format: adapter_config.json with tinyllm's fields and adapter_model.npz. Both formats load.

The fingerprint is a hash of the base's weights: an adapter only works on the base it was trained on, and
loading it onto another is refused. A folder PEFT wrote has none; its shapes are checked, not its base.
"""
import hashlib
import json
import os

import numpy as np

from ..checkpoint import CheckpointError, atomic_open, load_checkpoint, parse_json, read_json_object, save_checkpoint
from ..safetensors import load_file, save_file
from .config import PeftConfig
from .method import METHODS, Method, PeftFormatError, method_of

CONFIG_NAME, NPZ_NAME, SAFETENSORS_NAME = "adapter_config.json", "adapter_model.npz", "adapter_model.safetensors"
FORMATS = ("peft", "tinyllm")


def base_fingerprint(model):
    """A short hash of the base model's config and weights (as float32), stored with every adapter, so
    an adapter is never silently loaded onto a base it was not trained on."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, value in model.params.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(value, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def write_json(path, fields):
    with atomic_open(path) as f:
        f.write(json.dumps(fields, indent=2).encode())


def write_adapter(folder, config, params, model, fingerprint, format=None):
    """Write one adapter into folder: PEFT's format where the method has one (format None or 'peft'; 'peft'
    insists), else tinyllm's ('tinyllm' insists). The other format's weights file, if any, is removed, so a
    folder holds one adapter. Returns the format written."""
    if format not in (None, *FORMATS):
        raise ValueError(f"format must be None (PEFT's where it can), 'peft' or 'tinyllm', got {format!r}")
    method = method_of(config)
    arrays = method.saved_arrays(config, params, model)
    ours = {**config.to_dict(), "inference_mode": False, "base_fingerprint": fingerprint,
            "base_config": model.config.to_dict()}
    peft_form = None
    if format != "tinyllm":
        try:
            peft_form = method.to_peft(config, arrays, model)
        except PeftFormatError:
            if format == "peft":                # refused before anything is written
                raise
    os.makedirs(folder, exist_ok=True)
    if peft_form is not None:
        fields, peft_arrays = peft_form
        save_file(peft_arrays, os.path.join(folder, SAFETENSORS_NAME),
                  metadata={"format": "pt", "tinyllm": json.dumps(ours)})
        write_json(os.path.join(folder, CONFIG_NAME), fields)
        written = "peft"
    else:
        meta = {**ours, "format": "tinyllm-adapter-1"}
        save_checkpoint(os.path.join(folder, NPZ_NAME), arrays, {"adapter": meta})
        write_json(os.path.join(folder, CONFIG_NAME), meta)
        written = "tinyllm"
    stale = os.path.join(folder, NPZ_NAME if written == "peft" else SAFETENSORS_NAME)
    if os.path.exists(stale):
        os.remove(stale)
    return written


def read_json(path):
    return read_json_object(path, "adapter config")


def our_facts(weights_path, metadata):
    """tinyllm's own facts from a PEFT-format file's __metadata__ (None when PEFT wrote it), checked to be
    a JSON object with the fields save_pretrained writes."""
    if "tinyllm" not in metadata:
        return None
    try:
        info = parse_json(metadata["tinyllm"])
    except ValueError as e:
        raise CheckpointError(f"{weights_path}: the 'tinyllm' entry of its __metadata__ is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{weights_path}: the 'tinyllm' entry of its __metadata__ holds {type(info).__name__}, "
                              f"not a JSON object")
    return info


def check_base(folder, info, model, fingerprint):
    """Refuse an adapter trained on another base (its config, then its weights' fingerprint)."""
    missing = [k for k in ("peft_type", "base_config", "base_fingerprint") if k not in info]
    if missing:
        raise CheckpointError(f"adapter in {folder!r} lacks the field(s) {missing} that save_pretrained writes; the "
                              f"files were not written by tinyllm, or were edited")
    if info.get("base_config") != model.config.to_dict():
        raise CheckpointError(f"adapter in {folder!r} was trained on a base with config {info.get('base_config')}, "
                              f"but this model has {model.config.to_dict()}; load it onto the base it was trained on")
    config = PeftConfig.from_dict({k: v for k, v in info.items()     # unknown fields are refused by name
                                   if k not in ("base_fingerprint", "base_config", "format")})
    if not method_of(config).trains_base and info.get("base_fingerprint") != fingerprint:
        raise CheckpointError(f"adapter in {folder!r} was trained on different base weights (fingerprint "
                              f"{info.get('base_fingerprint')}, this base {fingerprint}); load the base checkpoint it "
                              f"was trained from")
    return config


def read_adapter(model, folder, is_trainable, fingerprint=None):
    """Read and check a saved adapter of either format: (config, {tinyllm key: array}, as saved_arrays() has
    them). Raises CheckpointError (a ValueError) saying what went wrong."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"model_id must be the path of a folder written by save_pretrained(), got {folder!r}")
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"no {CONFIG_NAME} in {folder!r}: is this a folder written by save_pretrained()?")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in (SAFETENSORS_NAME, NPZ_NAME)):
        raise CheckpointError(f"no {SAFETENSORS_NAME} (PEFT's format) or {NPZ_NAME} (tinyllm's) in {folder!r}: the "
                              f"adapter's weights are missing; save it again")
    fields = read_json(cfg_path)
    fingerprint = fingerprint or base_fingerprint(model)
    try:
        if os.path.isfile(os.path.join(folder, SAFETENSORS_NAME)):
            config, arrays = read_peft_folder(folder, fields, model, fingerprint)
        else:
            config, arrays = read_tinyllm_folder(folder, fields, model, fingerprint)
    except KeyError as e:
        raise CheckpointError(f"{cfg_path} lacks the field {e.args[0]!r}, which this kind of adapter needs") from None
    except (PeftFormatError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is not a valid adapter config ({e})") from None
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not a valid adapter config ({e})") from None
    config.inference_mode = not is_trainable
    return config, arrays


def read_peft_folder(folder, fields, model, fingerprint):
    weights_path = os.path.join(folder, SAFETENSORS_NAME)
    peft_arrays, metadata = load_file(weights_path, mmap=False)
    method = METHODS.get(fields.get("peft_type"))
    readable = [k for k, m in METHODS.items() if type(m).from_peft is not Method.from_peft]
    if method is None or fields["peft_type"] not in readable:
        raise PeftFormatError(f"peft_type {fields.get('peft_type')!r}: tinyllm reads PEFT's {', '.join(readable)} adapters")
    read_config, arrays = method.from_peft(fields, peft_arrays, model, where=os.path.join(folder, CONFIG_NAME))
    info = our_facts(weights_path, metadata)
    if info is None:                                    # written by PEFT itself: no fingerprint to check
        return read_config, arrays
    config = check_base(folder, info, model, fingerprint)
    expected, _ = method.to_peft(config, arrays, model)
    changed = sorted(k for k in set(expected) | set(fields) if expected.get(k) != fields.get(k))
    if changed:
        raise CheckpointError(f"{os.path.join(folder, CONFIG_NAME)} and {weights_path} disagree on {changed}: they come "
                              f"from different saves (a save interrupted between the two files, or an edited config?); "
                              f"save again")
    return config, arrays


def read_tinyllm_folder(folder, fields, model, fingerprint):
    weights_path = os.path.join(folder, NPZ_NAME)
    if fields.get("format") != "tinyllm-adapter-1":
        raise CheckpointError(f"{os.path.join(folder, CONFIG_NAME)} has format {fields.get('format')!r:.60}, not "
                              f"'tinyllm-adapter-1' (an {NPZ_NAME} adapter's config says so); was it edited?")
    config = check_base(folder, fields, model, fingerprint)
    arrays, weights_meta = load_checkpoint(weights_path)
    if "adapter" in weights_meta and weights_meta["adapter"] != fields:   # save_pretrained writes both the same
        changed = sorted(k for k in set(fields) | set(weights_meta["adapter"])
                         if fields.get(k) != weights_meta["adapter"].get(k))
        raise CheckpointError(f"{os.path.join(folder, CONFIG_NAME)} and {weights_path} disagree on {changed}: they come "
                              f"from different saves (a save interrupted between the two files, or an edited config?); "
                              f"save again")
    return config, arrays


def weights_file(folder):
    """The path of a saved adapter's weights, in whichever format it was written."""
    for name in (SAFETENSORS_NAME, NPZ_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointError(f"no adapter weights in {folder!r}")
