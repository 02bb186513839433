"""
GPT-2 as Hugging Face stores it, read and written with NumPy: a folder with

    config.json          GPT2Config's fields: vocab_size, n_positions, n_embd, n_layer, n_head, ...
    model.safetensors    the weights under GPT-2's names, 'transformer.h.0.attn.c_attn.weight' (in, out), ...
    vocab.json, merges.txt   the tokenizer, if it is there (tinyllm.tokenizer.BPETokenizer reads them)

    model = GPT.from_pretrained("gpt2")          # a folder you downloaded yourself; tinyllm downloads nothing
    model.save_pretrained("out")                 # transformers.GPT2LMHeadModel.from_pretrained("out") loads it

tinyllm's parameter names are GPT-2's without 'transformer.', and its Conv1D weights are stored (in, out)
as tinyllm's are, so reading is renaming. The LM head is the token embedding (tied), as in GPT-2; the
causal-mask buffers 'attn.bias' / 'attn.masked_bias' of older files are not weights. A config option that
would change what the model computes and that tinyllm does not implement is refused by name; dropout is
not one of them (tinyllm trains without it, which changes nothing at inference). A pytorch_model.bin is a
pickle, which can run code when it is loaded: it is refused, with how to get a model.safetensors.
"""
import json
import os

import numpy as np

from .checkpoint import CheckpointError, atomic_open, read_json_object
from .model import GPT, GPTConfig, param_shapes
from .safetensors import load_into, read_header, save_file

CONFIG, WEIGHTS = "config.json", "model.safetensors"
BUFFERS = (".attn.bias", ".attn.masked_bias")      # the causal mask GPT-2 once stored: not weights

# GPT2Config's options that change the computation, and the one value tinyllm computes
REQUIRED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),   # both: GELU's tanh approximation
            "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
            "reorder_and_upcast_attn": (False,), "add_cross_attention": (False,), "layer_norm_epsilon": (1e-5,),
            "tie_word_embeddings": (True,)}


def read_config(folder):
    """The GPTConfig of a Hugging Face GPT-2 folder's config.json; unsupported options refused by name."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {CONFIG} in {folder!r}: a Hugging Face GPT-2 folder holds config.json and "
                              f"model.safetensors")
    c = read_json_object(path, "JSON config")
    if c.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{path}: model_type {c.get('model_type')!r}; tinyllm reads GPT-2 (model_type 'gpt2')")
    for field, allowed in REQUIRED.items():
        if field in c and c[field] not in allowed:
            raise CheckpointError(f"{path}: {field} = {c[field]!r} is not implemented by tinyllm (it computes "
                                  f"{field} = {allowed[0]!r})")
    try:
        config = GPTConfig(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"],
                           n_head=c["n_head"], n_embd=c["n_embd"])
    except KeyError as e:
        raise CheckpointError(f"{path} lacks the field {e.args[0]!r} that a GPT-2 config has") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if c.get("n_inner") not in (None, 4 * config.n_embd):      # after the sizes are known to be integers
        raise CheckpointError(f"{path}: n_inner = {c['n_inner']!r:.60} is not implemented by tinyllm (its MLP is "
                              f"4 * n_embd wide)")
    return config


def weights_path(folder):
    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path):
        if os.path.exists(os.path.join(folder, WEIGHTS + ".index.json")):
            raise CheckpointError(f"{folder!r} holds {WEIGHTS} in shards ({WEIGHTS}.index.json): tinyllm reads one "
                                  f"file; join them with transformers: GPT2LMHeadModel.from_pretrained(folder)"
                                  f".save_pretrained(folder, max_shard_size='100GB')")
        others = {"pytorch_model.bin": "a pickle that can run code when loaded: tinyllm never opens one",
                  "tf_model.h5": "TensorFlow's format", "flax_model.msgpack": "Flax's format"}
        found = [n for n in others if os.path.exists(os.path.join(folder, n))]
        raise CheckpointError(
            f"no {WEIGHTS} in {folder!r}" + (f" (only {found[0]}, {others[found[0]]})" if found else "") +
            "; download the repository's model.safetensors (Hugging Face's GPT-2 repositories have one), or convert "
            "with transformers: GPT2LMHeadModel.from_pretrained(folder).save_pretrained(folder)")
    return path


def file_names(path, config):
    """{tinyllm name: the file's name for it} from the header alone, and the name of an lm_head.weight (or
    None). Raises CheckpointError when the file's weights are not GPT-2's for this config."""
    info, _ = read_header(path)
    names, head = {}, None
    for key in info:
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(BUFFERS):
            continue
        if info[key]["dtype"] == "BOOL":       # as load_state_dict: a weight is a number, not True or False
            raise CheckpointError(f"{path}: {key!r} is a BOOL tensor; GPT-2's weights are numbers")
        if name == "lm_head.weight":
            head = key
        else:
            names[name] = key
    expected = param_shapes(config)
    missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not hold GPT-2's weights for its config.json: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    return names, head


def load_gpt2(folder, dtype=np.float32):
    """A GPT with the weights of a Hugging Face GPT-2 folder, in dtype. The weights are read from the file
    straight into the model's arrays (safetensors.load_into), each then checked to be finite."""
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        raise CheckpointError(f"{folder!r} is not a folder; give the folder holding config.json and model.safetensors")
    config = read_config(folder)
    path = weights_path(folder)
    names, head = file_names(path, config)
    model = GPT(config, dtype=dtype, init=False)          # zeros, to be read into
    load_into(path, {names[k]: v for k, v in model.params.items()})
    for k, v in model.params.items():
        if not np.isfinite(v).all():
            raise CheckpointError(f"{path}: {names[k]} holds nan or inf values (or values too large for "
                                  f"{np.dtype(dtype)}); was it saved from a run that diverged?")
    if head is not None:
        wte = np.empty_like(model.params["wte.weight"])
        load_into(path, {head: wte})
        if not np.array_equal(wte, model.params["wte.weight"]):
            raise CheckpointError(f"{path}: lm_head.weight differs from the token embedding; tinyllm's head is tied "
                                  f"to wte, as GPT-2's is")
    return model


def hf_config(config):
    """The config.json transformers writes for a GPT2LMHeadModel of this GPTConfig (no dropout: tinyllm has none)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
            "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None, "use_cache": True}


def save_gpt2(model, folder):
    """Write model as a Hugging Face GPT-2 folder: config.json and model.safetensors (float32 or float64 as
    the model is; GPT-2's names with 'transformer.', the head tied)."""
    os.makedirs(folder, exist_ok=True)
    save_file({"transformer." + k: v for k, v in model.params.items()}, os.path.join(folder, WEIGHTS),
              metadata={"format": "pt"})            # transformers wants to know the tensors are PyTorch's layout
    with atomic_open(os.path.join(folder, CONFIG)) as f:
        f.write(json.dumps(hf_config(model.config), indent=2).encode())
