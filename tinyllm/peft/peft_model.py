"""
PeftModel: a frozen GPT plus the small set of parameters one fine-tuning method trains.

    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    pm.print_trainable_parameters()
    logits, loss = pm.forward(idx, targets); grads = pm.backward()     # grads: the method's keys only

The forward is tinyllm.model.gpt_forward on the base's parameters with the method's hooks (method.py: each
method's module says what it does); the backward is gpt_backward with `trainable` the base names that
train (none for a PEFT method), so the base weights get no gradient computed at all. One base model can
carry several named adapters (one per task); one of them is active at a time.
"""
import contextlib
import os
import unicodedata

import numpy as np

from ..checkpoint import CheckpointError
from ..checks import as_array, check_weights
from ..parallel import check_workers, default_workers, forward_backward
from ..model import GPT, NO_HOOKS, generate, gpt_backward, gpt_forward
from .method import method_of
from .saving import CONFIG_NAME, NPZ_NAME, SAFETENSORS_NAME, base_fingerprint, read_adapter, write_adapter



def reserved_positions(config):
    """Context positions a method's config takes before the real tokens."""
    return method_of(config).reserved_positions(config)


def check_base_model(model, what="model"):
    """Raise a TypeError unless model is a plain tinyllm GPT (not None, not a PeftModel already)."""
    if isinstance(model, PeftModel):
        raise TypeError(f"{what} is a PeftModel already; add another adapter to it with "
                        f"pm.add_adapter(name, config), or wrap its base model, pm.base_model")
    if not isinstance(model, GPT):
        raise TypeError(f"{what} must be a tinyllm GPT (e.g. GPT(GPTConfig()), or load_pretrained(path)[0]), "
                        f"got {type(model).__name__}")


def check_adapter_name(name):
    """save_pretrained makes every adapter's name a folder name (save_directory/<name>/, beside the default
    adapter's files): a name no folder can have, or the name of one of those files, is refused now, when the
    adapter is added, rather than half-way through a save."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise ValueError(f"adapter_name must be a non-empty string that can be a folder name (save_pretrained "
                         f"makes it one), got {name!r}")
    bad = [c for c in name if c in "/\\" or unicodedata.category(c) in ("Cc", "Cs")]   # \0, \n, ..., lone surrogates
    if bad:
        raise ValueError(f"adapter_name {name!r} holds {bad[0]!r}, which a folder name cannot (save_pretrained "
                         f"makes the name a folder name); use letters, digits, '-' or '_'")
    if name.lower() in (CONFIG_NAME, NPZ_NAME, SAFETENSORS_NAME):
        raise ValueError(f"adapter_name {name!r} is the name of a file save_pretrained writes beside it; pick "
                         f"another name")
    if len(name.encode("utf-8")) > 255:
        raise ValueError(f"adapter_name is {len(name.encode('utf-8'))} bytes long, but a folder name can have at "
                         f"most 255; pick a shorter name")


class PeftModel:
    """A base GPT with named adapters. Create it with get_peft_model or PeftModel.from_pretrained."""

    def __init__(self, model, peft_config, adapter_name="default", tokenizer=None, seed=0):
        check_base_model(model)
        self.base_model = model
        self.peft_config = {}                 # adapter name -> config
        self.adapters = {}                    # adapter name -> {key: array}
        self.active_adapter = None
        self.training = True                  # LoRA dropout is on only while training, as in torch
        self._disabled = False
        self._merged = set()                  # adapters currently folded into the base weights
        self._premerge = {}                   # their base weights from before the merge, for unmerge
        self._cache = None
        try:
            self._rng = np.random.default_rng(seed)   # initialisation, then LoRA dropout masks
        except (TypeError, ValueError):
            raise ValueError(f"seed must be an integer >= 0 (or None), got {seed!r}") from None
        self._tokenizer = tokenizer
        self._base_trainable = set(model.trainable)
        self.fingerprint = base_fingerprint(model)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    # ---- adapters ------------------------------------------------------------------------------------

    def add_adapter(self, adapter_name, peft_config):
        """Create a new adapter with freshly initialised parameters (it does not become active)."""
        method = method_of(peft_config)
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; pick another name")
        mc = self.base_model.config
        room = method.reserved_positions(peft_config)
        if room >= mc.block_size:
            raise ValueError(f"{type(peft_config).__name__}.num_virtual_tokens = {room} leaves no room in the "
                             f"context (block_size {mc.block_size}); use fewer than {mc.block_size} virtual tokens")
        tokenizer = self._tokenizer
        if tokenizer is None:
            from ..tokenizer import default_tokenizer
            tokenizer = default_tokenizer()
        params = method.init(peft_config, self.base_model, self._rng, tokenizer)
        self.peft_config[adapter_name] = peft_config
        self.adapters[adapter_name] = params

    def set_adapter(self, adapter_name):
        """Make adapter_name the one used by forward, backward and generate, and the one that trains."""
        if not isinstance(adapter_name, str) or adapter_name not in self.adapters:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(self.adapters)}")
        if self._merged - {adapter_name}:
            raise RuntimeError(f"adapter(s) {sorted(self._merged)} are merged into the base weights; "
                               f"unmerge_adapter() first")
        self.active_adapter = adapter_name
        self.base_model.trainable = set(self.method.base_trainable(self.active_peft_config, self.base_model,
                                                                   self.adapters[adapter_name]))

    def delete_adapter(self, adapter_name):
        if not isinstance(adapter_name, str) or adapter_name not in self.adapters:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(self.adapters)}")
        if adapter_name == self.active_adapter:
            raise ValueError(f"{adapter_name!r} is the active adapter; set_adapter() to another one first")
        del self.adapters[adapter_name], self.peft_config[adapter_name]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside this block the model is the plain base model."""
        if self._merged:
            raise RuntimeError("the adapter is merged into the base weights; unmerge_adapter() first")
        self._disabled = True
        try:
            yield self
        finally:
            self._disabled = False

    @property
    def config(self):
        """The base model's GPTConfig, as in PEFT, where the wrapped model's config shows through."""
        return self.base_model.config

    @property
    def active_peft_config(self):
        """The config of the active adapter's method (peft_config[active_adapter])."""
        return self.peft_config[self.active_adapter]

    @property
    def method(self):
        """The active adapter's Method (tinyllm.peft.method): what the rest of tinyllm asks of it."""
        return method_of(self.active_peft_config)

    @property
    def reserved_positions(self):
        """Context positions the active method takes before the real tokens (prefix or prompt length)."""
        return 0 if self._disabled else self.method.reserved_positions(self.active_peft_config)

    @property
    def rng(self):
        """The generator LoRA dropout draws from: train() checkpoints its state, so a resumed run draws the
        same masks."""
        return self._rng

    @property
    def is_full(self):
        return self.method.trains_base

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    # ---- which numbers train -------------------------------------------------------------------------

    def trainable_parameters(self):
        """{name: live array} that an optimizer updates: the active adapter's own, and the base's that its
        method trains (every weight for full fine-tuning, biases for LoraConfig(bias='all'|'lora_only'))."""
        if self.active_peft_config.inference_mode:
            return {}
        base = self.base_model.params
        return {**self.adapters[self.active_adapter], **{k: base[k] for k in self.base_model.trainable}}

    def get_nb_trainable_parameters(self):
        """(trainable, all): all counts the base and every adapter, as PEFT counts all modules."""
        trainable = sum(v.size for v in self.trainable_parameters().values())
        total = self.base_model.num_parameters() + sum(v.size for a in self.adapters.values() for v in a.values())
        return trainable, total

    def print_trainable_parameters(self):
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def formula(self):
        """How the number of trainable parameters comes about, as arithmetic a learner can redo."""
        return self.method.formula(self.active_peft_config, self.base_model.config)

    # ---- forward, backward, generate -----------------------------------------------------------------

    def _hooks(self, training, rng=None):
        """The active method's hooks for one forward; none when it is disabled or merged into the base.
        rng: the generator its randomness draws from while training (default: the model's)."""
        if self._disabled or self.active_adapter in self._merged:
            return NO_HOOKS
        cfg = self.active_peft_config
        return self.method.hooks(cfg, self.adapters[self.active_adapter], self.base_model.config,
                                 rng=(rng or self._rng) if training else None, train=not cfg.inference_mode)

    def forward(self, idx, targets=None):
        """idx, targets (B,T) ints, targets -100 ignored. Returns logits (B,T,V) of the real tokens, loss."""
        hooks = self._hooks(self.training)
        logits, loss, self._cache = gpt_forward(self.base_model.params, idx, self.base_model.config, targets,
                                                hooks=hooks)
        return logits, loss

    __call__ = forward

    def backward(self):
        """{name: gradient} for exactly the keys of trainable_parameters()."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward pass with targets first: call forward(idx, targets)")
        if self._disabled or self.active_adapter in self._merged:
            raise RuntimeError("the adapter is disabled or merged, so it has nothing to train")
        return gpt_backward(self._cache, self.base_model.trainable | self._cache["hooks"].base_grads)

    def forward_backward(self, idx, targets, workers=None):
        """One training step's (loss, grads), the batch split over `workers` threads (None: one per core, at
        most one per row); the same numbers as forward then backward, up to float rounding. With several
        workers, each shard draws its random numbers (LoRA dropout) from its own generator, seeded from the
        model's: the same for a given seed and number of workers."""
        if self._disabled or self.active_adapter in self._merged:
            raise RuntimeError("the adapter is disabled or merged, so it has nothing to train")
        workers = check_workers(workers) or default_workers(len(as_array(idx, "idx")))
        rngs = [np.random.default_rng(s) for s in self._rng.integers(0, 2 ** 63, size=workers)] if workers > 1 else None

        def run(x, y, shard):
            hooks = self._hooks(self.training, rngs[shard] if rngs else None)
            _, loss, cache = gpt_forward(self.base_model.params, x, self.base_model.config, y, hooks=hooks)
            return loss, gpt_backward(cache, self.base_model.trainable | hooks.base_grads)
        return forward_backward(run, idx, targets, workers)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
        """As GPT.generate. For prefix tuning the prefix is the KV cache the first token already finds."""
        hooks = self._hooks(False)

        def forward(tokens, past):
            logits, _, cache = gpt_forward(self.base_model.params, tokens, self.base_model.config, past=past,
                                           hooks=hooks)
            return logits, cache["present"]
        return generate(forward, idx, max_new_tokens, self.base_model.config.block_size,
                        temperature, top_k, seed, reserved=self.reserved_positions)

    # ---- state, merging ------------------------------------------------------------------------------

    def state_dict(self):
        """Copies of the base parameters and the active adapter's keys."""
        return {**self.base_model.state_dict(), **{k: v.copy() for k, v in self.adapters[self.active_adapter].items()}}

    def load_state_dict(self, state):
        """Copy a state_dict() into the base and the active adapter. Nothing changes unless everything fits."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict takes a dict {{name: array}}, got {type(state).__name__}")
        adapter = self.adapters[self.active_adapter]
        missing = [k for k in adapter if k not in state]
        if missing:
            raise ValueError(f"state dict lacks the adapter keys {missing[:5]}; was it saved with another "
                             f"method or config ({self.active_peft_config})?")
        hint = f"the method's config differs ({self.active_peft_config})"
        loaded = {k: check_weights(k, state[k], adapter[k].shape, hint, adapter[k].dtype) for k in adapter}
        self.base_model.load_state_dict({k: v for k, v in state.items() if k not in adapter})   # checks, then copies
        for k, v in loaded.items():
            adapter[k][...] = v

    def merge_adapter(self):
        """Fold the active adapter into the base weights (LoRA: W <- W + scale * A @ B): no extra cost at
        inference. The weights it changes are kept, so unmerge_adapter restores them bit for bit."""
        cfg, adapter = self.active_peft_config, self.adapters[self.active_adapter]
        changed = self.method.merged_weights(cfg, adapter)
        if not changed:
            raise ValueError(f"merge_adapter applies to LoRA adapters; the active adapter is {type(cfg).__name__}")
        if self.active_adapter not in self._merged:
            base = self.base_model.params
            self._premerge[self.active_adapter] = {k: base[k].copy() for k in changed}
            self.method.merge(cfg, adapter, self.base_model)
            self._merged.add(self.active_adapter)

    def unmerge_adapter(self):
        """Undo merge_adapter exactly: the base weights get back their values from before the merge."""
        if not self.method.merged_weights(self.active_peft_config, self.adapters[self.active_adapter]):
            raise ValueError(f"unmerge_adapter applies to LoRA adapters; the active adapter is "
                             f"{type(self.active_peft_config).__name__}")
        if self.active_adapter in self._merged:
            for k, w in self._premerge.pop(self.active_adapter).items():
                self.base_model.params[k][...] = w
            self._merged.discard(self.active_adapter)

    def merge_and_unload(self):
        """Merge the active adapter into the base weights and return the base GPT (changed in place, as in PEFT)."""
        self.merge_adapter()
        self.base_model.trainable = set(self._base_trainable)
        return self.base_model

    # ---- saving and loading --------------------------------------------------------------------------

    def save_pretrained(self, save_directory, format=None):
        """Write each adapter ('default' in save_directory, others in save_directory/<name>/): in Hugging Face
        PEFT's format where the method has one, else in tinyllm's (tinyllm.peft.saving); format='peft' or
        'tinyllm' insists on one. Only the method's arrays are written, not the base model."""
        for name, cfg in self.peft_config.items():
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            write_adapter(folder, cfg, self.adapters[name], self.base_model, self.fingerprint, format)

    @classmethod
    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False, tokenizer=None):
        """Load an adapter saved by save_pretrained (or by PEFT) onto `model`, the base it was trained on. As
        in PEFT, it is loaded for inference (nothing trains) unless is_trainable=True."""
        check_base_model(model)
        check_adapter_name(adapter_name)                 # before any file is read
        config, arrays = read_adapter(model, model_id, is_trainable)
        trainable = set(model.trainable)
        pm = cls(model, config, adapter_name, tokenizer)
        try:
            pm._install(adapter_name, arrays, where=os.fspath(model_id))
        except BaseException:                            # the caller's model as it was: nothing was written
            model.trainable = trainable
            raise
        if not is_trainable:                             # for inference, as PEFT does: no dropout
            pm.eval()
        return pm

    def load_adapter(self, model_id, adapter_name, is_trainable=False):
        """Load another saved adapter onto the same base, under a new name (then set_adapter to use it).

        An adapter that carries base weights is refused unless they equal the base's: a full fine-tuning, and
        a LoRA saved with bias='all' or 'lora_only', whose biases would overwrite the ones the other adapters
        (and the base itself, with the adapters disabled) share. Refused rather than kept per adapter, because
        the biases are the base's own arrays, as in PEFT, where bias='all' trains them for every adapter at
        once: keeping one copy per adapter would mean swapping base arrays on every set_adapter, merge and
        disable_adapter. Load such an adapter on a base of its own, with PeftModel.from_pretrained."""
        check_adapter_name(adapter_name)                 # before any file is read
        if adapter_name in self.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; pick another name")
        config, arrays = read_adapter(self.base_model, model_id, is_trainable, self.fingerprint)
        if method_of(config).trains_base:
            raise ValueError(f"{model_id!r} holds a full fine-tuning, a whole copy of the model, which would overwrite "
                             f"the base the other adapters share; load it with PeftModel.from_pretrained(fresh_base, path)")
        self.add_adapter(adapter_name, config)
        try:
            self._install(adapter_name, arrays, shared_base=True, where=os.fspath(model_id))
        except BaseException:                  # leave no half-loaded adapter behind
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:                   # for inference, as PEFT does: no dropout
            self.eval()

    def _install(self, adapter_name, arrays, shared_base=False, where="the adapter file"):
        """Put loaded arrays in place of the freshly initialised ones. Every array is checked first (its key,
        shape, dtype kind, and its values as the model's dtype), so nothing is written, to the adapter or to
        the base, unless all of them fit: a NaN in a saved bias never reaches the base. shared_base: other
        adapters use this base, so base weights in the file must equal the base's (load_adapter says why)."""
        cfg, base = self.peft_config[adapter_name], self.base_model.params
        method = method_of(cfg)
        expected = method.expected_arrays(cfg, self.adapters[adapter_name], self.base_model)
        if set(arrays) != set(expected):
            raise CheckpointError(f"the adapter file holds keys {sorted(arrays)[:4]}... but its config describes "
                                  f"{sorted(expected)[:4]}...; the file and its adapter_config.json do not belong together")
        for k, shape in expected.items():
            if arrays[k].shape != shape:
                raise CheckpointError(f"{k} has shape {arrays[k].shape} in the adapter file but its config needs "
                                      f"{shape}; the file and its adapter_config.json do not belong together")
        try:
            checked = {k: check_weights(k, arrays[k], shape, "", self.base_model.dtype, where="the adapter file")
                       for k, shape in expected.items()}
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        base_arrays = {k: a for k, a in checked.items() if k in base}   # base weights it trained: LoRA's biases, ...
        if shared_base:
            changed = sorted(k for k, a in base_arrays.items() if not np.array_equal(a, base[k]))
            if changed:
                raise ValueError(f"{where!r} holds base weights its adapter trained ({', '.join(changed[:3])}"
                                 f"{', ...' if len(changed) > 3 else ''}; e.g. LoraConfig(bias='all')): loaded as a "
                                 f"second adapter, they would overwrite the base the other adapters share. Load it on "
                                 f"a base of its own: PeftModel.from_pretrained(fresh_base, {where!r})")
        own = method.loaded_params(cfg, {k: a for k, a in checked.items() if k not in base},
                                   self.adapters[adapter_name], self.base_model)     # new arrays: nothing written yet
        if base_arrays:
            self.base_model.load_state_dict({**base, **base_arrays})
        self.adapters[adapter_name] = own


def get_peft_model(model, peft_config, adapter_name="default", tokenizer=None, seed=0):
    """Wrap a GPT for fine-tuning with the method peft_config describes. The base weights are frozen
    (except for full fine-tuning); only the method's parameters train."""
    check_base_model(model)
    return PeftModel(model, peft_config, adapter_name, tokenizer=tokenizer, seed=seed)
