"""
AdamW, gradient clipping and the learning-rate schedule, as nanoGPT trains GPT-2.

The optimizer is handed the live parameter arrays, {name: array}, and changes them in place; a
fine-tuning method hands it only its trainable arrays, so the frozen weights get no optimizer state.
"""
import math

import numpy as np

from .model import check_weights, is_int, is_number


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW computes it:

        p = p - lr * wd * p                              only for matrices (ndim >= 2), as in nanoGPT
        m = b1 m + (1 - b1) g                            running mean of the gradient
        v = b2 v + (1 - b2) g^2                          running mean of its square
        p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Biases and layer-norm gains are not decayed: pulling a gain towards 0 would shrink the signal.
    m and v have the dtype of their parameter, so float32 training stays float32; a float16 parameter gets
    float32 m and v, and its update is computed in float32 and rounded into it once. In float16 itself the
    update could not be computed: eps = 1e-8 underflows to 0 (float16's smallest number is 6e-8), and so
    does g^2 for every |g| < 2e-4, which makes m / (sqrt(v) + eps) a 0/0 at the first step.

    Inputs: params, {name: array}, updated in place by step(); lr, betas, eps, weight_decay as above.
    """

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(is_number(b) and 0.0 <= b < 1.0
                                                                            for b in betas):
            raise ValueError(f"AdamW betas must be two numbers in [0, 1), got {betas!r}; the usual are (0.9, 0.95)")
        if not (is_number(eps) and eps > 0):
            raise ValueError(f"AdamW eps must be a finite number > 0 (it keeps the update finite when v is 0), "
                             f"got {eps!r}")
        if not (is_number(weight_decay) and weight_decay >= 0):
            raise ValueError(f"AdamW weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if not isinstance(params, dict):
            raise TypeError(f"AdamW takes params as a dict {{name: array}}, e.g. model.trainable_parameters(), "
                            f"got {type(params).__name__}")
        for name, p in params.items():
            if not (isinstance(p, np.ndarray) and np.issubdtype(p.dtype, np.floating)):
                raise ValueError(f"AdamW params[{name!r}] must be a floating-point numpy array, got {type(p).__name__}")
        self.params = params
        self.lr, self.betas = float(lr), tuple(map(float, betas))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.t = 0                                                   # steps taken, for the bias correction
        self.m = {k: np.zeros(p.shape, state_dtype(p)) for k, p in params.items()}
        self.v = {k: np.zeros(p.shape, state_dtype(p)) for k, p in params.items()}

    def step(self, grads, lr=None):
        """Update every parameter that has a gradient in grads, in place.

        A parameter with no gradient (it took no part in this forward) is left alone, as in PyTorch.
        Inputs: grads, {name: array} with the parameters' names and shapes; lr overrides self.lr (a schedule).
        """
        lr = self.lr if lr is None else check_lr(lr)
        if not isinstance(grads, dict):
            raise TypeError(f"grads must be a dict {{name: array}} as model.backward() returns, "
                            f"got {type(grads).__name__}")
        unknown = [k for k in grads if k not in self.params]
        if unknown:
            raise ValueError(f"gradients for parameters the optimizer does not hold: {unknown[:5]}; "
                             f"build AdamW from model.trainable_parameters() after choosing what trains")
        for name, g in grads.items():    # check every gradient before any parameter changes
            p = self.params[name]
            if not isinstance(g, np.ndarray) or g.shape != p.shape or g.dtype.kind not in "iuf":
                raise ValueError(f"gradient of {name} must be a real array of shape {p.shape}, got "
                                 f"{type(g).__name__} {getattr(g, 'shape', '')} {getattr(g, 'dtype', '')}")
            if not np.isfinite(g).all():
                raise ValueError(f"gradient of {name} holds nan or inf; the step would destroy the parameters "
                                 f"(train() stops on this; lower the learning rate or clip the gradients)")
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t            # bias corrections: m, v start at 0
        for name, g in grads.items():
            p, m, v = self.params[name], self.m[name], self.v[name]
            if g.dtype.itemsize < m.dtype.itemsize:
                g = g.astype(m.dtype)                                # a float16 gradient, in float32
            if p.ndim >= 2 and self.weight_decay:
                p *= 1.0 - lr * self.weight_decay                    # decoupled: not part of the gradient
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            update = (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + self.eps)
            p -= update.astype(p.dtype, copy=False)

    def state_dict(self):
        """{'t': array(t), 'm/<name>': m, 'v/<name>': v}: copies, enough to resume bit for bit."""
        state = {"t": np.array(self.t, dtype=np.int64)}
        for k in self.params:
            state["m/" + k], state["v/" + k] = self.m[k].copy(), self.v[k].copy()
        return state

    def load_state_dict(self, state):
        """Copy a state_dict() into this optimizer, whose parameters must have the same names and shapes."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict takes a dict as state_dict() returns, got {type(state).__name__}")
        expected = {"t"} | {f"{s}/{k}" for k in self.params for s in "mv"}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected, key=str)
            raise ValueError(f"optimizer state does not match these parameters: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}; was it saved for another model or method?")
        t = state["t"]
        if not (is_int(t) or (isinstance(t, np.ndarray) and t.shape == () and t.dtype.kind in "iu")) or t < 0:
            raise ValueError(f"optimizer state t (steps taken) must be an integer >= 0, got {t!r}")
        loaded = {}                      # check everything, as the state's dtype, before changing anything
        for k in self.params:
            for s in "mv":
                loaded[f"{s}/{k}"] = check_weights(f"optimizer state {s}/{k}", state[f"{s}/{k}"],
                                                   self.m[k].shape, "was it saved for another model?", self.m[k].dtype)
            if (loaded[f"v/{k}"] < 0).any():     # a mean of squares: negative is impossible, and sqrt(v) nan
                raise ValueError(f"optimizer state v/{k} holds negative values, but v is a running mean of squared "
                                 f"gradients; the file is corrupted or was edited")
        for k in self.params:
            self.m[k][...], self.v[k][...] = loaded[f"m/{k}"], loaded[f"v/{k}"]
        self.t = int(t)

    def state_bytes(self):
        """Bytes held by m and v: twice the trainable parameters' size, the reason to train fewer of them."""
        return sum(a.nbytes for a in self.m.values()) + sum(a.nbytes for a in self.v.values())


def state_dtype(p):
    """The dtype of AdamW's m and v for parameter p: its own, but at least float32."""
    return np.promote_types(p.dtype, np.float32)


def check_lr(lr):
    if not (is_number(lr) and lr >= 0):
        raise ValueError(f"AdamW lr must be a finite number >= 0, got {lr!r}")
    return float(lr)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm, in place.

    The norm is over every tensor at once, so the update keeps its direction; only its length shrinks.
    Returns: the norm before clipping (a float; inf or nan when a gradient is not finite).
    """
    if not (is_number(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    total = global_norm(grads)
    if math.isfinite(total) and total > max_norm:    # a non-finite norm is left for the caller to report
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total


def global_norm(grads):
    """sqrt of the sum of every squared gradient entry, over all tensors (summed in float64)."""
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))


def lr_schedule(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr, then cosine decay to min_lr_ratio * max_lr at total_steps.

    step counts from 0: step 0 gets max_lr / warmup_steps, step warmup_steps gets max_lr, and
    step total_steps (and after) gets the minimum. Warmup keeps the first updates, made while Adam's
    estimate of v is still poor, small.
    """
    if not (is_int(step) and step >= 0 and is_int(warmup_steps) and warmup_steps >= 0 and is_int(total_steps)
            and is_number(max_lr) and max_lr >= 0 and is_number(min_lr_ratio) and 0 <= min_lr_ratio <= 1):
        raise ValueError(f"lr_schedule needs integers step >= 0, warmup_steps >= 0 and total_steps, max_lr >= 0 "
                         f"and min_lr_ratio in [0, 1]; got step={step!r}, max_lr={max_lr!r}, warmup_steps="
                         f"{warmup_steps!r}, total_steps={total_steps!r}, min_lr_ratio={min_lr_ratio!r}")
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)       # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
