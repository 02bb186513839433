"""
GPT-2, forward and backward, in NumPy.

The parameters live in one flat dict with GPT-2's own names (Hugging Face's, without `transformer.`),
weights stored (in, out), so a GPT-2 checkpoint converted to arrays loads as it is:

    wte.weight (V,C)  wpe.weight (block_size,C)
    h.{i}.ln_1.weight|bias (C,)       h.{i}.attn.c_attn.weight (C,3C) |bias   h.{i}.attn.c_proj.weight (C,C) |bias
    h.{i}.ln_2.weight|bias (C,)       h.{i}.mlp.c_fc.weight (C,4C) |bias      h.{i}.mlp.c_proj.weight (4C,C) |bias
    ln_f.weight|bias (C,)             (the LM head is wte itself: logits = x @ wte^T)

`gpt_forward` and `gpt_backward` work on any such dict. The fine-tuning methods (tinyllm.peft) add keys
to it and choose which keys train; the forward picks the extra keys up where they belong:

    h.{i}.<linear>.lora_A|lora_B           LoRA on that linear (h.{i}.attn.c_attn.q.lora_A: on the q slice only)
    h.{i}.attn.prefix_k|prefix_v (P,C)     prefix tuning: keys and values before the real tokens
    prompt_embeddings (P,C)                prompt tuning: input vectors before the real tokens
    h.{i}.adapter_attn|adapter_mlp.down|up.weight|bias   Houlsby adapters after attention and MLP

Legend: B batch, T time, P past positions, C channels, NH heads, hs head size, V vocabulary.
"""
from dataclasses import asdict, dataclass

import numpy as np

from .layers import (IGNORE_INDEX, adapter_backward, adapter_forward, attention_backward,
                     attention_forward, cross_entropy_backward, cross_entropy_forward,
                     embedding_backward, embedding_forward, gelu_backward, gelu_forward,
                     layernorm_backward, layernorm_forward, linear_backward, linear_forward,
                     lora_backward, lora_forward)


@dataclass
class GPTConfig:
    vocab_size: int = 64     # number of token ids (our character tokenizer has 64)
    block_size: int = 128    # longest sequence the model can see (rows of wpe)
    n_layer: int = 4         # transformer blocks
    n_head: int = 4          # attention heads per block
    n_embd: int = 128        # channels C; each head gets C // n_head

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                             f"so every head gets the same size; try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")

    def to_dict(self):
        return asdict(self)


# GPT-2 small, as released: 124,439,808 parameters
GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def param_shapes(config):
    """Every parameter name and shape, in GPT-2's state-dict order."""
    V, T, C = config.vocab_size, config.block_size, config.n_embd
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for i in range(config.n_layer):
        shapes.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
            f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def init_params(config, seed=0, dtype=np.float32):
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases, unit layer-norm gains, and the two
    projections that write into the residual stream scaled down by 1/sqrt(2 n_layer), so the stream's
    variance does not grow with depth."""
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / np.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.startswith("ln") or ".ln_" in name:
            value = np.ones(shape) if name.endswith("weight") else np.zeros(shape)
        elif name.endswith("bias"):
            value = np.zeros(shape)
        elif name.endswith("c_proj.weight"):
            value = rng.normal(0.0, residual_std, shape)
        else:
            value = rng.normal(0.0, 0.02, shape)
        params[name] = value.astype(dtype)
    return params


# ----------------------------------------------------------------------------------------------------
# a linear layer with whatever LoRA updates are attached to it

def lora_parts(name, n_out):
    """The LoRA key prefixes a linear can carry and the output columns each one updates. The fused
    c_attn can also take LoRA on its q, k or v third alone (as the LoRA paper did, on q and v)."""
    parts = [(name, slice(None))]
    if name.endswith("c_attn"):
        C = n_out // 3
        parts += [(f"{name}.{s}", slice(j * C, (j + 1) * C)) for j, s in enumerate("qkv")]
    return parts


def projection_forward(x, p, name, lora):
    """x @ W + b for the linear `name` (e.g. 'h.0.attn.c_attn'), plus any LoRA updates on it.

    lora: dict with 'scale', 'dropout' (a probability) and 'rng' (None: no dropout, as in eval mode).
    Returns: out (...,out), cache.
    """
    out, lin_cache = linear_forward(x, p[name + ".weight"], p[name + ".bias"])
    lora_caches = []
    for key, cols in lora_parts(name, out.shape[-1]):
        if key + ".lora_A" not in p:
            continue
        keep = None
        if lora["dropout"] > 0 and lora["rng"] is not None:
            keep = (lora["rng"].random(x.shape) >= lora["dropout"]).astype(x.dtype) / (1.0 - lora["dropout"])
        delta, c = lora_forward(x, p[key + ".lora_A"], p[key + ".lora_B"], lora["scale"], keep)
        out[..., cols] += delta
        lora_caches.append((key, cols, c))
    return out, (name, lin_cache, lora_caches)


def projection_backward(dout, cache, trainable, grads):
    """Returns dx; writes the gradients of trainable weights into grads."""
    name, lin_cache, lora_caches = cache
    w, b = name + ".weight", name + ".bias"
    dx, dw, db = linear_backward(dout, lin_cache, need_dw=w in trainable, need_db=b in trainable)
    if dw is not None:
        grads[w] = dw
    if db is not None:
        grads[b] = db
    for key, cols, c in lora_caches:
        dx_lora, dA, dB = lora_backward(dout[..., cols], c)
        dx += dx_lora                                  # x feeds both the frozen W and the LoRA path
        keep_trainable(grads, trainable, {key + ".lora_A": dA, key + ".lora_B": dB})
    return dx


def maybe_adapter_forward(x, p, name):
    """A Houlsby adapter if the keys `name`.down/up exist, else the identity."""
    if name + ".down.weight" not in p:
        return x, None
    out, cache = adapter_forward(x, p[name + ".down.weight"], p[name + ".down.bias"],
                                 p[name + ".up.weight"], p[name + ".up.bias"])
    return out, (name, cache)


def maybe_adapter_backward(dout, cache, trainable, grads):
    if cache is None:
        return dout
    name, c = cache
    dx, dwd, dbd, dwu, dbu = adapter_backward(dout, c)
    keep_trainable(grads, trainable, {name + ".down.weight": dwd, name + ".down.bias": dbd,
                                      name + ".up.weight": dwu, name + ".up.bias": dbu})
    return dx


def layernorm_params_backward(dout, cache, name, trainable, grads):
    w, b = name + ".weight", name + ".bias"
    dx, dw, db = layernorm_backward(dout, cache, need_dparams=w in trainable or b in trainable)
    keep_trainable(grads, trainable, {w: dw, b: db})
    return dx


def keep_trainable(grads, trainable, new):
    """Add to grads those of the new gradients whose parameter is trainable."""
    grads.update({k: g for k, g in new.items() if k in trainable})


# ----------------------------------------------------------------------------------------------------
# one transformer block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))

def block_forward(x, p, i, n_head, past, lora):
    """Inputs: x (B,T,C); past (k, v) each (B,NH,P,hs), or (None, None). Returns: x (B,T,C), cache."""
    h = f"h.{i}."
    a, c_ln1 = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])   # (B,T,C)
    a, c_attn = projection_forward(a, p, h + "attn.c_attn", lora)               # (B,T,C) -> (B,T,3C)
    a, c_att = attention_forward(a, n_head, *past)                              # (B,T,3C) -> (B,T,C)
    a, c_aproj = projection_forward(a, p, h + "attn.c_proj", lora)              # (B,T,C)
    a, c_ad1 = maybe_adapter_forward(a, p, h + "adapter_attn")                  # (B,T,C)
    x = x + a                                                                   # residual
    m, c_ln2 = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])   # (B,T,C)
    m, c_fc = projection_forward(m, p, h + "mlp.c_fc", lora)                    # (B,T,C) -> (B,T,4C)
    m, c_gelu = gelu_forward(m)                                                 # (B,T,4C)
    m, c_mproj = projection_forward(m, p, h + "mlp.c_proj", lora)               # (B,T,4C) -> (B,T,C)
    m, c_ad2 = maybe_adapter_forward(m, p, h + "adapter_mlp")                   # (B,T,C)
    x = x + m                                                                   # residual
    return x, (c_ln1, c_attn, c_att, c_aproj, c_ad1, c_ln2, c_fc, c_gelu, c_mproj, c_ad2)


def block_backward(dx, cache, i, trainable, grads):
    """The forward in reverse. Returns dx (B,T,C) and the gradients of the past keys and values."""
    c_ln1, c_attn, c_att, c_aproj, c_ad1, c_ln2, c_fc, c_gelu, c_mproj, c_ad2 = cache
    h = f"h.{i}."
    # x = x + m: the residual hands dx to both branches
    dm = maybe_adapter_backward(dx, c_ad2, trainable, grads)
    dm = projection_backward(dm, c_mproj, trainable, grads)
    dm = gelu_backward(dm, c_gelu)
    dm = projection_backward(dm, c_fc, trainable, grads)
    dx = dx + layernorm_params_backward(dm, c_ln2, h + "ln_2", trainable, grads)
    # x = x + a
    da = maybe_adapter_backward(dx, c_ad1, trainable, grads)
    da = projection_backward(da, c_aproj, trainable, grads)
    da, dpast_k, dpast_v = attention_backward(da, c_att)
    da = projection_backward(da, c_attn, trainable, grads)
    dx = dx + layernorm_params_backward(da, c_ln1, h + "ln_1", trainable, grads)
    return dx, dpast_k, dpast_v


# ----------------------------------------------------------------------------------------------------
# the whole model

def prefix_as_past(p, i, B, n_head):
    """Layer i's learned prefix (P,C) as keys and values (B,NH,P,hs), or (None, None)."""
    key = f"h.{i}.attn.prefix_k"
    if key not in p:
        return None, None
    heads = lambda a: np.broadcast_to(a.reshape(a.shape[0], n_head, -1).transpose(1, 0, 2)[None],
                                      (B, n_head, a.shape[0], a.shape[1] // n_head))
    return heads(p[key]), heads(p[f"h.{i}.attn.prefix_v"])   # (P,C) -> (B,NH,P,hs)


def is_int(v):
    """An integer, and not a bool (True would silently mean 1)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v):
    """A finite real number, and not a bool."""
    if is_int(v):
        return True
    return isinstance(v, (float, np.floating)) and bool(np.isfinite(v))


def as_array(x, what, hint="every row needs the same length"):
    """np.asarray(x), with a clear error for what numpy cannot make an array of (ragged nested lists)."""
    try:
        return np.asarray(x)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not an array: nested lists of different lengths? ({hint})") from None


def check_weights(name, value, shape, hint):
    """value as an array that can be loaded into the parameter `name` of this shape, or a ValueError
    saying what is wrong with it (hint: the likely cause of a shape mismatch)."""
    a = as_array(value, f"{name} in the state dict")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} in the state dict but {shape} in this model; {hint}")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} in the state dict has dtype {a.dtype}; parameters are real numbers")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} in the state dict holds nan or inf values; was it saved from a run that diverged?")
    return a


def check_tokens(idx, vocab_size, what="idx"):
    """Raise a clear error for token ids that are not a (B,T) integer array inside the vocabulary."""
    idx = as_array(idx, what, "pad the sequences of a batch to one length")
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{what} must be a 2-D integer array of token ids (batch, time), got shape "
                         f"{idx.shape} and dtype {idx.dtype}; wrap a single sequence as idx[None, :]")
    if idx.size == 0:
        raise ValueError(f"{what} is empty (shape {idx.shape}); give at least one sequence of at least one token")
    bad = np.argwhere((idx < 0) | (idx >= vocab_size))
    if len(bad):
        b, t = bad[0]
        raise ValueError(f"{what}[{b}, {t}] = {idx[b, t]} is not a token id: ids must lie in [0, {vocab_size}) "
                         f"(vocab_size); encode text with the model's tokenizer")
    return idx


def gpt_forward(p, idx, config, targets=None, past=None, lora=None):
    """The forward pass of GPT-2 (and of every fine-tuning method: see the module docstring).

    Inputs:
      p        parameter dict
      idx      (B,T) token ids
      targets  (B,T) the next token at each position, IGNORE_INDEX where nothing is to be predicted
      past     per layer (k, v) each (B,NH,P,hs): a KV cache from an earlier call, or None
      lora     {'scale', 'dropout', 'rng'} for LoRA keys (defaults: scale 1, no dropout)
    Returns: logits (B,T,V) for the T real tokens, loss (float or None), cache (for gpt_backward, and
    cache['present'], the KV cache to continue from).
    """
    idx = check_tokens(idx, config.vocab_size)
    B, T = idx.shape
    NH, L = config.n_head, config.n_layer
    lora = {"scale": 1.0, "dropout": 0.0, "rng": None, **(lora or {})}
    first_call = past is None
    if first_call:   # a learned prefix is a KV cache that is there before the first token
        past = [prefix_as_past(p, i, B, NH) for i in range(L)]
    P = 0 if past[0][0] is None else past[0][0].shape[2]

    x, c_wte = embedding_forward(idx, p["wte.weight"])                          # (B,T,C)
    n_prompt = 0
    if first_call and "prompt_embeddings" in p:   # prompt tuning: learned vectors before the tokens
        prompt = p["prompt_embeddings"]                                         # (n_prompt,C)
        n_prompt = prompt.shape[0]
        x = np.concatenate([np.broadcast_to(prompt, (B,) + prompt.shape), x], axis=1)   # (B,n_prompt+T,C)
    T_all = x.shape[1]
    if P + T_all > config.block_size:
        raise ValueError(f"sequence too long: {P} past + {n_prompt} virtual + {T} real tokens = {P + T_all} "
                         f"positions, but block_size is {config.block_size}; shorten the input")
    x = x + p["wpe.weight"][P:P + T_all]                 # positions continue after the past, as in GPT-2
    blocks = []
    for i in range(L):
        x, c = block_forward(x, p, i, NH, past[i], lora)
        blocks.append(c)
    x, c_lnf = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])          # (B,T_all,C)
    x = x[:, n_prompt:]                                  # only real tokens are read out
    logits = x @ p["wte.weight"].T                       # tied LM head: (B,T,C) @ (C,V) -> (B,T,V)

    loss, c_loss = None, None
    if targets is not None:
        targets = as_array(targets, "targets", "targets need the shape of idx")
        if targets.shape != idx.shape:
            raise ValueError(f"targets has shape {targets.shape} but idx has shape {idx.shape}; they must match")
        if not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
        bad = np.argwhere((targets != IGNORE_INDEX) & ((targets < 0) | (targets >= config.vocab_size)))
        if len(bad):
            b, t = bad[0]
            raise ValueError(f"targets[{b}, {t}] = {targets[b, t]} is not a token id: targets must lie in "
                             f"[0, {config.vocab_size}) or be {IGNORE_INDEX} (ignored)")
        loss, c_loss = cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1))
    cache = dict(config=config, p=p, x=x, n_prompt=n_prompt, first_call=first_call, c_wte=c_wte,
                 blocks=blocks, c_lnf=c_lnf, c_loss=c_loss,
                 present=[(c[2][1], c[2][2]) for c in blocks])   # each block's attention keys and values
    return logits, loss, cache


def gpt_backward(cache, trainable):
    """Backward from the loss of the last gpt_forward to every trainable parameter.

    Frozen parameters get no gradient computed at all: the gradient still flows through them to what
    lies below, but their weight gradients are skipped.
    Inputs: cache from gpt_forward (called with targets); trainable, a set of parameter names.
    Returns: grads, {name: gradient} for the trainable names that took part in the forward.
    """
    if cache is None or cache["c_loss"] is None:
        raise RuntimeError("backward() needs a forward pass with targets first: call forward(idx, targets)")
    p, config = cache["p"], cache["config"]
    B, T, C = cache["x"].shape
    grads = {}
    dlogits = cross_entropy_backward(1.0, cache["c_loss"]).reshape(B, T, -1)    # dloss/dloss = 1
    # forward was: logits = x @ wte^T
    dx = dlogits @ p["wte.weight"]                                              # (B,T,V) @ (V,C) -> (B,T,C)
    if "wte.weight" in trainable:
        grads["wte.weight"] = dlogits.reshape(-1, dlogits.shape[-1]).T @ cache["x"].reshape(-1, C)  # (V,C)
    n_prompt = cache["n_prompt"]
    if n_prompt:   # forward was: x = x[:, n_prompt:]
        dx = np.concatenate([np.zeros((B, n_prompt, C), dx.dtype), dx], axis=1)
    dx = layernorm_params_backward(dx, cache["c_lnf"], "ln_f", trainable, grads)
    for i in reversed(range(config.n_layer)):
        dx, dpast_k, dpast_v = block_backward(dx, cache["blocks"][i], i, trainable, grads)
        key = f"h.{i}.attn.prefix_k"
        if cache["first_call"] and key in trainable:   # the prefix was shared by the whole batch
            to_prefix = lambda d: d.sum(axis=0).transpose(1, 0, 2).reshape(d.shape[2], C)   # (B,NH,P,hs) -> (P,C)
            grads[key], grads[f"h.{i}.attn.prefix_v"] = to_prefix(dpast_k), to_prefix(dpast_v)
    # forward was: x = tokens + wpe[P:P+T_all]
    P = cache["present"][0][0].shape[2] - dx.shape[1]
    if "wpe.weight" in trainable:
        dwpe = np.zeros_like(p["wpe.weight"])
        dwpe[P:P + dx.shape[1]] = dx.sum(axis=0)
        grads["wpe.weight"] = dwpe
    if n_prompt and "prompt_embeddings" in trainable:
        grads["prompt_embeddings"] = dx[:, :n_prompt].sum(axis=0)
    if "wte.weight" in trainable:   # wte is used twice, as the head and as the embedding: sum both
        grads["wte.weight"] += embedding_backward(dx[:, n_prompt:], cache["c_wte"])
    return grads


# ----------------------------------------------------------------------------------------------------
# generation with a KV cache

def sample_next(logits, temperature, top_k, rng):
    """Pick one token per row from logits (B,V): argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64) / temperature
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs])


def generate(forward, idx, max_new_tokens, block_size, temperature=1.0, top_k=None, seed=None, reserved=0):
    """Extend idx (B,T) by max_new_tokens tokens, feeding each new token alone through the model and
    reusing the keys and values of all earlier ones (the KV cache).

    forward(idx, past) -> (logits, present) runs the model. `reserved` positions of the context are taken
    by a prefix or prompt. When the context is full, the window slides: the last tokens are recomputed
    from scratch, since GPT-2's positions are absolute and a cache cannot be shifted.
    Returns: (B, T + max_new_tokens) token ids.
    """
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not is_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}") from None
    window = block_size - reserved
    out = as_array(idx, "idx", "pad the sequences of a batch to one length")
    if out.ndim != 2:   # the other checks of idx are gpt_forward's
        raise ValueError(f"idx must be a 2-D array of token ids (batch, time), got shape {out.shape}; "
                         f"wrap a single sequence as idx[None, :]")
    logits, past = forward(out[:, -window:], None)
    for step in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, rng)                # (B,)
        out = np.concatenate([out, nxt[:, None]], axis=1)
        if step == max_new_tokens - 1:
            break
        if past[0][0].shape[2] + 1 <= block_size:
            logits, past = forward(nxt[:, None], past)                          # one new token, cached past
        else:
            logits, past = forward(out[:, -window:], None)                      # window full: recompute
    return out


# ----------------------------------------------------------------------------------------------------

class GPT:
    """GPT-2 with its parameters in `params` and a set of `trainable` names (all of them by default)."""

    def __init__(self, config, seed=0, dtype=np.float32):
        if isinstance(config, dict):
            unknown = sorted(set(config) - set(GPTConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown GPTConfig fields {unknown}; the fields are "
                                 f"{list(GPTConfig.__dataclass_fields__)}")
            config = GPTConfig(**config)
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig or a dict of its fields, got {type(config).__name__}")
        try:
            floating = np.issubdtype(np.dtype(dtype), np.floating)
        except TypeError:
            floating = False
        if not floating:
            raise TypeError(f"dtype must be a numpy float type such as np.float32 or np.float64, got {dtype!r}")
        self.config = config
        self.params = init_params(config, seed, dtype)
        self.trainable = set(self.params)
        self._cache = None

    @property
    def dtype(self):
        return self.params["wte.weight"].dtype

    def forward(self, idx, targets=None):
        """idx, targets (B,T) ints; targets equal to -100 are ignored. Returns logits (B,T,V), loss or None."""
        logits, loss, self._cache = gpt_forward(self.params, idx, self.config, targets)
        return logits, loss

    def backward(self):
        """{name: gradient} for every trainable parameter, from the loss of the last forward."""
        return gpt_backward(self._cache, self.trainable)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
        """Append max_new_tokens tokens to idx (B,T); temperature 0 is greedy. Uses a KV cache."""
        def forward(tokens, past):
            logits, _, cache = gpt_forward(self.params, tokens, self.config, past=past)
            return logits, cache["present"]
        return generate(forward, idx, max_new_tokens, self.config.block_size, temperature, top_k, seed)

    def trainable_parameters(self):
        """{name: array} of the parameters an optimizer should update (the live arrays, not copies)."""
        return {k: v for k, v in self.params.items() if k in self.trainable}

    def freeze(self, names=None):
        """Stop training the given parameter names (all when None)."""
        self.trainable -= set(self.params if names is None else names)

    def unfreeze(self, names=None):
        self.trainable |= set(self.params if names is None else names)

    def num_parameters(self, trainable_only=False):
        return sum(v.size for k, v in self.params.items() if not trainable_only or k in self.trainable)

    def state_dict(self):
        """A copy of every parameter, keyed by its GPT-2 name."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state):
        """Copy arrays into the parameters. Keys and shapes must match exactly; values must be finite
        real numbers. Nothing changes unless everything fits."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict takes a dict {{name: array}}, got {type(state).__name__}")
        missing = [k for k in self.params if k not in state]
        unexpected = [k for k in state if k not in self.params]
        if missing or unexpected:
            raise ValueError(f"state dict does not match this model: missing keys {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}; was it saved from a model with "
                             f"another config ({self.config})?")
        state = {k: check_weights(k, v, self.params[k].shape, f"the config differs ({self.config})")
                 for k, v in state.items()}   # check everything before changing anything
        for k, v in state.items():
            self.params[k][...] = v
