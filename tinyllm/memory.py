"""
How much memory fine-tuning needs, counted rather than measured: for any GPTConfig and method config,

    weights      every number the model holds: the base and the method's own parameters
    gradients    one per trainable parameter (tinyllm computes no gradient for a frozen weight)
    adam         AdamW's m and v: two per trainable parameter
    activations  what one training step's forward keeps for the backward, for B sequences of T tokens

The first three depend on the method alone; the activations depend on the batch and hardly at all on the
method, since the backward must pass through every frozen layer too. That is where the methods part ways
at scale: full fine-tuning needs weights + 3 x weights, a PEFT method little more than the weights.

The trainable counts equal what get_peft_model(...).get_nb_trainable_parameters() counts (a test checks
every method). The activation count is what tinyllm's own forward caches (float arrays, each counted
once; token ids not counted; LoRA dropout off); other frameworks keep somewhat different sets.

    from tinyllm.memory import GPT2_SIZES, training_memory
    m = training_memory(GPT2_SIZES["gpt2-xl"], LoraConfig(r=8), batch_size=1, seq_len=1024)
    m["bytes"]["total"] / 2**30        # GiB

Legend: L layers, C channels, NH heads, V vocabulary, B batch, T tokens, P virtual tokens, H prefix MLP
width, r LoRA rank, m adapter width.
"""
import math

import numpy as np

from .model import GPT2_SMALL, GPTConfig, param_shapes
from .peft import (AdapterConfig, FullFineTuningConfig, LoraConfig, PrefixTuningConfig,
                   PromptTuningConfig)
from .peft.lora import find_targets, fused_module, module_shapes
from .peft.peft_model import reserved_positions

# the four released GPT-2 sizes (a shared token embedding and LM head, as in tinyllm)
GPT2_SIZES = {
    "gpt2":        GPTConfig(**GPT2_SMALL),                                                            # 124M
    "gpt2-medium": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),   # 355M
    "gpt2-large":  GPTConfig(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl":     GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),   # 1558M
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def base_count(mc):
    """Numbers in the plain GPT: 124,439,808 for GPT-2 small."""
    return sum(math.prod(shape) for shape in param_shapes(mc).values())


# ----------------------------------------------------------------------------------------------------
# parameters: what each method adds, and what trains

def added_count(method, mc):
    """Numbers the method adds to the model (0 for full fine-tuning, which trains the base itself)."""
    C, L = mc.n_embd, mc.n_layer
    if isinstance(method, LoraConfig):
        shapes = module_shapes(mc)
        return sum(method.r * (shapes[n][0] + shapes[n][1]) for n in find_targets(method, mc))   # r*(in+out)
    if isinstance(method, PrefixTuningConfig):
        P, H = method.num_virtual_tokens, method.encoder_hidden_size
        if method.prefix_projection:   # embedding (P,C), then C -> H -> 2LC
            return P * C + (C * H + H) + (H * 2 * L * C + 2 * L * C)
        return 2 * L * P * C           # a key and a value per virtual token, per layer
    if isinstance(method, PromptTuningConfig):
        return method.num_virtual_tokens * C
    if isinstance(method, AdapterConfig):
        blocks = L if method.layers_to_transform is None else len(method.layers_to_transform)
        m = method.bottleneck_size
        return blocks * 2 * (C * m + m + m * C + C)   # two adapters per block: down (C,m)+(m,), up (m,C)+(C,)
    if isinstance(method, FullFineTuningConfig):
        return 0
    raise TypeError(f"unknown method config {type(method).__name__}")


def trainable_count(method, mc):
    """Numbers that train (and so get a gradient and AdamW state)."""
    if isinstance(method, FullFineTuningConfig):
        shapes = param_shapes(mc)
        if method.last_k_blocks is None:
            return base_count(mc)
        first = mc.n_layer - method.last_k_blocks
        return sum(math.prod(s) for k, s in shapes.items()
                   if k.startswith("ln_f.") or (k.startswith("h.") and int(k.split(".")[1]) >= first))
    n = added_count(method, mc)
    if isinstance(method, LoraConfig) and method.bias != "none":   # base biases that train along with LoRA
        biases = {k[:-len(".bias")]: s[0] for k, s in param_shapes(mc).items() if k.endswith(".bias")}
        if method.bias == "lora_only":   # the targeted linears' own (a c_attn slice trains all of c_attn's)
            modules = {fused_module(t) for t in find_targets(method, mc)}
            biases = {k: v for k, v in biases.items() if k in modules}
        n += sum(biases.values())
    return n


# ----------------------------------------------------------------------------------------------------
# activations: what tinyllm's forward keeps for the backward

def activation_count(mc, method, batch_size, seq_len):
    """Numbers cached by one forward of B=batch_size sequences of T=seq_len real tokens.

    Per block and token (T_all = T + prompt tokens, K = keys each token sees = prefix P + T_all):
      ln_1 xhat C + rstd 1, its output C (c_attn's input), qkv 3C, attention weights NH*K, their output C,
      ln_2 xhat C + rstd 1, its output C, c_fc's output 4C, gelu's tanh 4C, its output 4C
      = 20C + 2 + NH*K.
    After the blocks: ln_f 2C + 1, and the softmax of the logits, V per real token.
    Methods add: LoRA x@A (r per token per targeted linear), adapters 2 x (C + 3m) per block (input,
    bottleneck, gelu's tanh, gelu output), a prefix its keys and values concatenated in front of
    the tokens' (2C per key), the prefix MLP its hidden layer (P*H).
    """
    C, NH, L, V = mc.n_embd, mc.n_head, mc.n_layer, mc.vocab_size
    B, T = batch_size, seq_len
    P = reserved_positions(method)
    prompt = P if isinstance(method, PromptTuningConfig) else 0
    prefix = P if isinstance(method, PrefixTuningConfig) else 0
    T_all = T + prompt                       # positions that run through the blocks
    K = prefix + T_all                       # keys every position attends over (masked ones stored too)
    per_block = B * T_all * (20 * C + 2 + NH * K)
    if prefix:   # np.concatenate([past_k, k]): new (B,NH,K,hs) keys and values; q still holds qkv
        per_block += 2 * B * K * C
    n = L * per_block + B * T_all * (2 * C + 1) + B * T * V
    if isinstance(method, LoraConfig):
        n += B * T_all * method.r * len(find_targets(method, mc))
    if isinstance(method, AdapterConfig):
        blocks = L if method.layers_to_transform is None else len(method.layers_to_transform)
        n += blocks * 2 * B * T_all * (C + 3 * method.bottleneck_size)
    if isinstance(method, PrefixTuningConfig) and method.prefix_projection:
        n += P * method.encoder_hidden_size
    return n


def activation_arrays(cache, weights):
    """The arrays a forward really keeps for its backward, to check activation_count against: every
    distinct array reachable from the cache (dicts, lists, tuples), each once however many views of it
    the cache holds. Parameters are not activations: the arrays in `weights` are left out, and so is a
    gpt_forward cache's own 'p', the parameter dict the forward ran on (with prefix_projection it also
    holds the prefixes the MLP computed)."""
    skip = {id(w) for w in weights}
    found = {}

    def walk(obj):
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):   # a view of a view...: the array that owns the memory
                base = base.base
            if id(base) not in skip:
                found[id(base)] = base
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if k != "p":
                    walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
    walk(cache)
    return list(found.values())


# ----------------------------------------------------------------------------------------------------

def training_memory(mc, method, batch_size=1, seq_len=None, dtype="float32"):
    """The memory of one training step of `method` on a model of config mc.

    Inputs: mc, a GPTConfig; method, a PEFT config (FullFineTuningConfig for full fine-tuning);
      batch_size, seq_len (default: the whole context less any virtual tokens); dtype of every array,
      a key of DTYPE_BYTES (tinyllm trains in float32; mixed precision keeps more in float32).
    Returns: dict with
      counts: weights, trainable, gradients, adam, activations (numbers), activations_per_token
      bytes:  weights, gradients, adam, activations and total (bytes at dtype)
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {list(DTYPE_BYTES)}, got {dtype!r}")
    P = reserved_positions(method)
    T = mc.block_size - P if seq_len is None else seq_len
    if not 1 <= T <= mc.block_size - P:
        raise ValueError(f"seq_len {T} plus {P} virtual tokens does not fit the context of {mc.block_size}")
    trainable = trainable_count(method, mc)
    counts = {"weights": base_count(mc) + added_count(method, mc), "trainable": trainable,
              "gradients": trainable, "adam": 2 * trainable,
              "activations": activation_count(mc, method, batch_size, T)}
    counts["activations_per_token"] = counts["activations"] / (batch_size * T)
    size = DTYPE_BYTES[dtype]
    nbytes = {k: counts[k] * size for k in ("weights", "gradients", "adam", "activations")}
    nbytes["total"] = sum(nbytes.values())
    return {"counts": counts, "bytes": nbytes, "dtype": dtype, "batch_size": batch_size, "seq_len": T}
