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

from .model import GPT2_SMALL, GPTConfig, Hooks, param_shapes
from .peft import method_of

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
# parameters: what each method adds, and what trains (each method's module counts its own)

def added_count(method, mc):
    """Numbers the method adds to the model (0 for full fine-tuning, which trains the base itself)."""
    return method_of(method).added_count(method, mc)


def trainable_count(method, mc):
    """Numbers that train (and so get a gradient and AdamW state)."""
    return method_of(method).trainable_count(method, mc)


# ----------------------------------------------------------------------------------------------------
# activations: what tinyllm's forward keeps for the backward

def activation_count(mc, method, batch_size, seq_len):
    """Numbers cached by one forward of B=batch_size sequences of T=seq_len real tokens.

    Per block and token (T_all = T + prompt tokens, K = keys each token sees = prefix P + T_all):
      ln_1 xhat C + rstd 1, its output C (c_attn's input), qkv 3C, attention weights NH*K, their output C,
      ln_2 xhat C + rstd 1, its output C, c_fc's output 4C, gelu's tanh 4C, its output 4C
      = 20C + 2 + NH*K.
    After the blocks: ln_f 2C + 1, and the softmax of the logits, V per real token. A prefix's keys and
    values are concatenated in front of the tokens' (2C per key); the method's own layers add what
    its module counts (Method.activations: LoRA's x @ A, an adapter's bottleneck, ...).
    """
    C, NH, L, V = mc.n_embd, mc.n_head, mc.n_layer, mc.vocab_size
    B, T = batch_size, seq_len
    m = method_of(method)
    prompt, prefix = m.prompt_positions(method), m.past_positions(method)
    T_all = T + prompt                       # positions that run through the blocks
    K = prefix + T_all                       # keys every position attends over (masked ones stored too)
    per_block = B * T_all * (20 * C + 2 + NH * K)
    if prefix:   # np.concatenate([past_k, k]): new (B,NH,K,hs) keys and values; q still holds qkv
        per_block += 2 * B * K * C
    return L * per_block + B * T_all * (2 * C + 1) + B * T * V + m.activations(method, mc, B, T_all)


def activation_arrays(cache, weights):
    """The arrays a forward really keeps for its backward, to check activation_count against: every
    distinct array reachable from the cache (dicts, lists, tuples), each once however many views of it
    the cache holds. Parameters are not activations: the arrays in `weights` are left out, and so are a
    gpt_forward cache's own 'p', the parameter dict the forward ran on, and its hooks' 'own', the method's
    parameters."""
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
                if k not in ("p", "own"):
                    walk(v)
        elif isinstance(obj, Hooks):
            walk(vars(obj))
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
    P = method_of(method).reserved_positions(method)
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
