"""
GPT-2, forward and backward, in NumPy.

The parameters live in one flat dict with GPT-2's own names (Hugging Face's, without `transformer.`),
weights stored (in, out), so a GPT-2 checkpoint converted to arrays loads as it is:

    wte.weight (V,C)  wpe.weight (block_size,C)
    h.{i}.ln_1.weight|bias (C,)       h.{i}.attn.c_attn.weight (C,3C) |bias   h.{i}.attn.c_proj.weight (C,C) |bias
    h.{i}.ln_2.weight|bias (C,)       h.{i}.mlp.c_fc.weight (C,4C) |bias      h.{i}.mlp.c_proj.weight (4C,C) |bias
    ln_f.weight|bias (C,)             (the LM head is wte itself: logits = x @ wte^T)

`gpt_forward` and `gpt_backward` work on any such dict, and take `trainable`, the names whose gradients
to compute. A fine-tuning method (tinyllm.peft) plugs in through Hooks, at the few places it changes the
computation (a linear layer, the keys and values before the tokens', input vectors before the tokens, a
branch before each residual add); this file does not know one method from another.

Legend: B batch, T time, P past positions, C channels, NH heads, hs head size, V vocabulary.
"""
from dataclasses import asdict, dataclass

import numpy as np

from .checks import as_array, check_targets, check_tokens, check_weights, is_int, is_number
from .parallel import check_workers, default_workers, forward_backward
from .layers import (attention_backward, attention_forward, cross_entropy_backward, cross_entropy_forward,
                     embedding_backward, embedding_forward, gelu_backward, gelu_forward, layernorm_backward,
                     layernorm_forward, linear_backward, linear_forward)


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
# where a fine-tuning method plugs in

class Hooks:
    """The places a fine-tuning method (tinyllm.peft) plugs into GPT-2. The forward calls each hook at a
    fixed point and the backward calls its pair, in reverse; these defaults do nothing, so GPT-2 itself runs
    with Hooks(). A method's hooks hold its own parameters (in .own) and write their gradients into `grads`.

        params(p)              the parameters the model runs on (e.g. rows of wte replaced)
        prompt(B)              (B,P,C) vectors before the tokens' embeddings, or None      prompt tuning
        past(i, B)             keys and values before block i's, (B,NH,P,hs) each         prefix tuning
        linear(name, x, w, b)  each of a block's four linear layers                       LoRA, (IA)^3
        branch(name, a)        a block's attention or MLP output, before the residual add  adapters
    """
    base_grads = frozenset()     # base parameters whose gradients the hooks turn into their own (params())

    def params(self, p):
        return p

    def params_backward(self, grads):
        """Turn the gradients of what params() made into gradients of the method's own parameters."""

    def prompt(self, B):
        return None

    def prompt_backward(self, dprompt, grads):
        """dprompt (B,P,C): the gradient of the prompt vectors."""

    def past(self, i, B):
        return None, None

    def past_backward(self, i, dpast_k, dpast_v, grads):
        """dpast_k, dpast_v (B,NH,P,hs): the gradients of block i's past keys and values."""

    def linear(self, name, x, w, b):
        return linear_forward(x, w, b)

    def linear_backward(self, dout, cache, need_dw, need_db, grads):
        return linear_backward(dout, cache, need_dw, need_db)

    def branch(self, name, a):
        return a, None

    def branch_backward(self, da, cache, grads):
        return da


NO_HOOKS = Hooks()


def projection_forward(x, p, name, hooks):
    """x @ W + b for the linear `name` (e.g. 'h.0.attn.c_attn'), through the method's hook."""
    return hooks.linear(name, x, p[name + ".weight"], p[name + ".bias"])


def projection_backward(dout, cache, name, trainable, grads, hooks):
    """Returns dx; writes the gradients of the linear's own weights into grads when they train."""
    w, b = name + ".weight", name + ".bias"
    dx, dw, db = hooks.linear_backward(dout, cache, w in trainable, b in trainable, grads)
    grads.update({k: g for k, g in ((w, dw), (b, db)) if g is not None})
    return dx


def layernorm_params_backward(dout, cache, name, trainable, grads):
    w, b = name + ".weight", name + ".bias"
    dx, dw, db = layernorm_backward(dout, cache, need_dparams=w in trainable or b in trainable)
    grads.update({k: g for k, g in ((w, dw), (b, db)) if k in trainable})
    return dx


# ----------------------------------------------------------------------------------------------------
# one transformer block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))

def block_forward(x, p, i, n_head, past, hooks):
    """Inputs: x (B,T,C); past (k, v) each (B,NH,P,hs), or (None, None). Returns: x (B,T,C), cache."""
    h = f"h.{i}."
    c = {}
    a, c["ln_1"] = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])          # (B,T,C)
    a, c["c_attn"] = projection_forward(a, p, h + "attn.c_attn", hooks)                    # (B,T,C) -> (B,T,3C)
    a, c["attn"] = attention_forward(a, n_head, *past)                                     # (B,T,3C) -> (B,T,C)
    a, c["attn_c_proj"] = projection_forward(a, p, h + "attn.c_proj", hooks)               # (B,T,C)
    a, c["attn_branch"] = hooks.branch(h + "attn", a)                                      # (B,T,C)
    x = x + a                                                                              # residual
    m, c["ln_2"] = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])          # (B,T,C)
    m, c["c_fc"] = projection_forward(m, p, h + "mlp.c_fc", hooks)                         # (B,T,C) -> (B,T,4C)
    m, c["gelu"] = gelu_forward(m)                                                         # (B,T,4C)
    m, c["mlp_c_proj"] = projection_forward(m, p, h + "mlp.c_proj", hooks)                 # (B,T,4C) -> (B,T,C)
    m, c["mlp_branch"] = hooks.branch(h + "mlp", m)                                        # (B,T,C)
    x = x + m                                                                              # residual
    c["present"] = c["attn"][1], c["attn"][2]      # this block's keys and values (B,NH,P+T,hs): the KV cache
    return x, c


def block_backward(dx, c, i, trainable, grads, hooks):
    """The forward in reverse. Returns dx (B,T,C) and the gradients of the past keys and values."""
    h = f"h.{i}."
    # x = x + m: the residual hands dx to both branches
    dm = hooks.branch_backward(dx, c["mlp_branch"], grads)
    dm = projection_backward(dm, c["mlp_c_proj"], h + "mlp.c_proj", trainable, grads, hooks)
    dm = gelu_backward(dm, c["gelu"])
    dm = projection_backward(dm, c["c_fc"], h + "mlp.c_fc", trainable, grads, hooks)
    dx = dx + layernorm_params_backward(dm, c["ln_2"], h + "ln_2", trainable, grads)
    # x = x + a
    da = hooks.branch_backward(dx, c["attn_branch"], grads)
    da = projection_backward(da, c["attn_c_proj"], h + "attn.c_proj", trainable, grads, hooks)
    da, dpast_k, dpast_v = attention_backward(da, c["attn"])
    da = projection_backward(da, c["c_attn"], h + "attn.c_attn", trainable, grads, hooks)
    dx = dx + layernorm_params_backward(da, c["ln_1"], h + "ln_1", trainable, grads)
    return dx, dpast_k, dpast_v


# ----------------------------------------------------------------------------------------------------
# the whole model

def gpt_forward(p, idx, config, targets=None, past=None, hooks=NO_HOOKS):
    """The forward pass of GPT-2 (and, through hooks, of every fine-tuning method).

    Inputs:
      p        parameter dict
      idx      (B,T) token ids
      targets  (B,T) the next token at each position, IGNORE_INDEX where nothing is to be predicted
      past     per layer (k, v) each (B,NH,P,hs): a KV cache from an earlier call, or None
      hooks    a fine-tuning method's Hooks (default: none)
    Returns: logits (B,T,V) for the T real tokens, loss (float or None), cache (for gpt_backward, and
    cache['present'], the KV cache to continue from).
    """
    idx = check_tokens(idx, config.vocab_size)
    if targets is not None:
        targets = check_targets(targets, idx, config.vocab_size)
    B, T = idx.shape
    p = hooks.params(p)
    first_call = past is None                     # a prefix or a prompt comes before the first token only
    if first_call:
        past = [hooks.past(i, B) for i in range(config.n_layer)]
    P = 0 if past[0][0] is None else past[0][0].shape[2]

    x, c_wte = embedding_forward(idx, p["wte.weight"])                          # (B,T,C)
    prompt = hooks.prompt(B) if first_call else None                            # (B,n_prompt,C) or None
    n_prompt = 0 if prompt is None else prompt.shape[1]
    if n_prompt:
        x = np.concatenate([prompt, x], axis=1)                                 # (B,n_prompt+T,C)
    T_all = x.shape[1]
    if P + T_all > config.block_size:
        raise ValueError(f"sequence too long: {P} past + {n_prompt} virtual + {T} real tokens = {P + T_all} "
                         f"positions, but block_size is {config.block_size}; shorten the input")
    x = x + p["wpe.weight"][P:P + T_all]                 # positions continue after the past, as in GPT-2
    blocks = []
    for i in range(config.n_layer):
        x, c = block_forward(x, p, i, config.n_head, past[i], hooks)
        blocks.append(c)
    x, c_lnf = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])          # (B,T_all,C)
    x = x[:, n_prompt:]                                  # only real tokens are read out
    logits = x @ p["wte.weight"].T                       # tied LM head: (B,T,C) @ (C,V) -> (B,T,V)

    loss, c_loss = None, None
    if targets is not None:
        loss, c_loss = cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1))
    cache = dict(config=config, p=p, hooks=hooks, x=x, P=P, n_prompt=n_prompt, first_call=first_call,
                 c_wte=c_wte, blocks=blocks, c_lnf=c_lnf, c_loss=c_loss, present=[c["present"] for c in blocks])
    return logits, loss, cache


def gpt_backward(cache, trainable):
    """Backward from the loss of the last gpt_forward to every trainable parameter.

    Frozen parameters get no gradient computed at all: the gradient still flows through them to what
    lies below, but their weight gradients are skipped.
    Inputs: cache from gpt_forward (called with targets); trainable, a set of the base's parameter names
    (a method's hooks add the gradients of its own parameters).
    Returns: grads, {name: gradient} for the trainable names that took part in the forward.
    """
    if cache is None or cache["c_loss"] is None:
        raise RuntimeError("backward() needs a forward pass with targets first: call forward(idx, targets)")
    p, hooks, config = cache["p"], cache["hooks"], cache["config"]
    B, T, C = cache["x"].shape
    n_prompt, P = cache["n_prompt"], cache["P"]
    grads = {}
    dlogits = cross_entropy_backward(1.0, cache["c_loss"]).reshape(B, T, -1)    # dloss/dloss = 1
    # forward was: logits = x @ wte^T
    dx = dlogits @ p["wte.weight"]                                              # (B,T,V) @ (V,C) -> (B,T,C)
    if "wte.weight" in trainable:
        grads["wte.weight"] = dlogits.reshape(-1, dlogits.shape[-1]).T @ cache["x"].reshape(-1, C)  # (V,C)
    if n_prompt:   # forward was: x = x[:, n_prompt:]
        dx = np.concatenate([np.zeros((B, n_prompt, C), dx.dtype), dx], axis=1)
    dx = layernorm_params_backward(dx, cache["c_lnf"], "ln_f", trainable, grads)
    for i in reversed(range(config.n_layer)):
        dx, dpast_k, dpast_v = block_backward(dx, cache["blocks"][i], i, trainable, grads, hooks)
        if cache["first_call"] and dpast_k is not None:      # the method's past, not an earlier call's
            hooks.past_backward(i, dpast_k, dpast_v, grads)
    # forward was: x = tokens + wpe[P:P+T_all]
    if "wpe.weight" in trainable:
        dwpe = np.zeros_like(p["wpe.weight"])
        dwpe[P:P + dx.shape[1]] = dx.sum(axis=0)
        grads["wpe.weight"] = dwpe
    if n_prompt:
        hooks.prompt_backward(dx[:, :n_prompt], grads)
    if "wte.weight" in trainable:   # wte is used twice, as the head and as the embedding: sum both
        grads["wte.weight"] += embedding_backward(dx[:, n_prompt:], cache["c_wte"])
    hooks.params_backward(grads)
    return grads


# ----------------------------------------------------------------------------------------------------
# generation with a KV cache

def sample_next(logits, temperature, top_k, rng):
    """Pick one token per row from logits (B,V): argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    # the max is subtracted before dividing, not after: every row then has a 0 and the rest <= 0, so a tiny
    # temperature sends the others to -inf (probability 0) and never makes inf - inf = nan; the limit of
    # sampling as the temperature goes to 0 is greedy decoding, and that is what comes out
    logits = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        logits = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs], dtype=np.int64)


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
    if out.dtype.kind in "iu" and out.dtype != np.int64 and (out.size == 0 or out.max() <= np.iinfo(np.int64).max):
        out = out.astype(np.int64)   # the ids come back as int64, the new tokens' type: uint64 + int64 is float64
    logits, past = forward(out[:, -window:], None)
    for step in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, rng).astype(np.int64)   # (B,)
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

    def __init__(self, config, seed=0, dtype=np.float32, init=True):
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
        self.params = init_params(config, seed, dtype) if init else \
            {k: np.zeros(shape, dtype) for k, shape in param_shapes(config).items()}   # to be loaded
        self.trainable = set(self.params)
        self._cache = None

    @property
    def dtype(self):
        return self.params["wte.weight"].dtype

    @classmethod
    def from_pretrained(cls, folder, dtype=np.float32):
        """GPT-2 from a Hugging Face folder (config.json + model.safetensors; tinyllm.hf), e.g. one you
        downloaded: any size, gpt2 to gpt2-xl or distilgpt2."""
        from .hf import load_gpt2
        return load_gpt2(folder, dtype)

    def save_pretrained(self, folder):
        """Write a Hugging Face GPT-2 folder (config.json + model.safetensors) that transformers loads."""
        from .hf import save_gpt2
        save_gpt2(self, folder)

    def forward(self, idx, targets=None):
        """idx, targets (B,T) ints; targets equal to -100 are ignored. Returns logits (B,T,V), loss or None."""
        logits, loss, self._cache = gpt_forward(self.params, idx, self.config, targets)
        return logits, loss

    def backward(self):
        """{name: gradient} for every trainable parameter, from the loss of the last forward."""
        return gpt_backward(self._cache, self.trainable)

    def forward_backward(self, idx, targets, workers=None):
        """One training step's (loss, grads), the batch split over `workers` threads (None: one per core,
        at most one per row); the same numbers as forward then backward, up to float rounding
        (tinyllm.parallel)."""
        def run(x, y, shard):
            _, loss, cache = gpt_forward(self.params, x, self.config, y)
            return loss, gpt_backward(cache, self.trainable)
        return forward_backward(run, idx, targets, check_workers(workers) or default_workers(len(as_array(idx, "idx"))))

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
        state = {k: check_weights(k, v, self.params[k].shape, f"the config differs ({self.config})",
                                  self.params[k].dtype)
                 for k, v in state.items()}   # check everything, as the model's dtype, before changing anything
        for k, v in state.items():
            self.params[k][...] = v
