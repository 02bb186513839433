"""
The training loop, shared by pretraining (tinyllm/pretrain.py) and every fine-tuning method.

One step is nanoGPT's: draw a batch, forward and backward (split over the cores: tinyllm.parallel), clip the
global gradient norm, AdamW step with the scheduled learning rate. `train` works with any model that follows
tinyllm's protocol:

    loss, grads = model.forward_backward(idx, targets, workers)     (or forward, then backward)
    model.trainable_parameters()      model.state_dict() / load_state_dict(d)      model.config.to_dict()

Exactness: a run stopped at step k and resumed from its checkpoint ends bit-identical to one that never
stopped, because the checkpoint holds everything the next step reads: parameters, AdamW's m, v and t,
the state of the batch RNG (and of model.rng, LoRA dropout's), the step and the history. Ctrl-C is held
back while the parameters are being updated, so an interrupt never leaves half a step behind.
"""
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .checkpoint import check_writable, load_training_state, restore_rng, save_training_state
from .checks import is_int, is_number
from .data import get_batch as corpus_windows
from .optim import AdamW, clip_grad_norm, global_norm, lr_schedule


@dataclass
class TrainConfig:
    max_steps: int = 1000            # optimizer steps in the whole run
    batch_size: int = 16             # sequences per step; get_batch must draw this many
    lr: float = 1e-3                 # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1        # the cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 50           # linear warmup from lr / warmup_steps
    weight_decay: float = 0.1        # AdamW's, on matrices only
    grad_clip: float | None = 1.0    # largest global gradient norm; None: no clipping
    eval_interval: int = 100         # steps between validation losses (also at step 0 and at the end)
    eval_iters: int = 10             # validation batches, the same ones every time; 0: no validation
    log_interval: int = 10           # steps between progress lines
    checkpoint: str | None = None    # where to write the .npz checkpoint (a path); None: never
    checkpoint_interval: int = 0     # steps between checkpoints; 0: only at the end (and on Ctrl-C)
    seed: int = 0                    # seed of the batch RNG (and of the fixed validation batches)
    workers: int | None = None       # threads a step's batch is split over (None: one per core)

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("max_steps", "batch_size", "eval_interval", "log_interval"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "eval_iters", "checkpoint_interval", "seed"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(is_number(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        need(is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(self.grad_clip is None or (is_number(self.grad_clip) and self.grad_clip > 0), "grad_clip",
             "a number > 0, or None for no clipping")
        need(self.workers is None or (is_int(self.workers) and self.workers >= 1), "workers",
             "None (one per core) or an integer >= 1")
        if isinstance(self.checkpoint, os.PathLike):
            self.checkpoint = os.fspath(self.checkpoint)
        need(self.checkpoint is None or (isinstance(self.checkpoint, str) and self.checkpoint), "checkpoint",
             "a file path or None")
        for f in fields(self):                           # numpy scalars as Python numbers: they go into JSON
            value = getattr(self, f.name)
            if isinstance(value, np.integer):
                setattr(self, f.name, int(value))
            elif isinstance(value, np.floating):
                setattr(self, f.name, float(value))

    def to_dict(self):
        return asdict(self)


class TrainingError(RuntimeError):
    """The loss or the gradient stopped being finite. Training stops; the last checkpoint written
    before it is kept as it was. .step, .loss and .history say where and what."""

    def __init__(self, message, step, loss, history):
        super().__init__(message)
        self.step, self.loss, self.history = step, loss, history


# ----------------------------------------------------------------------------------------------------
# helpers

def new_history():
    """One entry per step in step/train_loss/lr/grad_norm/elapsed/tokens; one per evaluation in
    val_step/val_loss. status: 'running', then 'completed', 'interrupted' or 'diverged'."""
    return dict(step=[], train_loss=[], lr=[], grad_norm=[], elapsed=[], tokens=[], val_step=[], val_loss=[],
                status="running")


def corpus_batches(splits, batch_size, block_size):
    """A get_batch(split, rng) for train(): random windows of the token ids in splits[split].

    Inputs: splits, {'train': (N,) ids, 'val': (M,) ids}; batch_size B; block_size T.
    """
    def get_batch(split, rng):
        return corpus_windows(splits[split], batch_size, block_size, rng)          # x, y (B,T)
    return get_batch


@contextmanager
def interrupts_held():
    """Hold Ctrl-C until the block ends, then raise it: the block runs whole or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield                                            # signals reach the main thread only
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and previous is signal.default_int_handler:
        raise KeyboardInterrupt
    if caught and callable(previous):                    # someone else's handler: hand it the signal
        previous(signal.SIGINT, None)


def duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def default_out(line):
    print(line, flush=True)


def forward_backward(model, x, y, workers):
    """One step's loss and gradients: the model's data-parallel forward_backward, or forward then backward."""
    if hasattr(model, "forward_backward"):
        return model.forward_backward(x, y, workers=workers)
    _, loss = model.forward(x, y)
    return loss, model.backward()

# ----------------------------------------------------------------------------------------------------
# the loop: a Run holds what a checkpoint records, and each part of a step is a short function


@dataclass
class Run:
    model: object
    get_batch: object
    cfg: TrainConfig
    optimizer: AdamW
    rng: np.random.Generator                 # the batch RNG
    meta: dict                               # what every checkpoint carries besides the state
    step: int = 0
    history: dict = field(default_factory=new_history)
    committed: dict = field(default_factory=dict)   # RNG states as of the last whole step: what a save records
    saved_step: int | None = None            # the step of the checkpoint file on disk
    started: float = 0.0                     # perf_counter at the start, and the history's seconds before it
    elapsed_before: float = 0.0
    window: list = field(default_factory=lambda: [0.0, 0, 0])   # progress line: its start, tokens, steps

    @property
    def model_rng(self):
        return getattr(self.model, "rng", None)

    def commit(self):
        """The RNG states a checkpoint written now would record (they change only between steps)."""
        self.committed = {"rng": self.rng.bit_generator.state,
                          "model_rng": self.model_rng.bit_generator.state if self.model_rng is not None else None}


def check_model(model):
    """Raise a TypeError naming what model lacks of the protocol train() uses (module docstring)."""
    missing = [f"{name}()" for name in ("trainable_parameters", "state_dict", "load_state_dict")
               if not callable(getattr(model, name, None))]
    if not callable(getattr(model, "forward_backward", None)) and not (
            callable(getattr(model, "forward", None)) and callable(getattr(model, "backward", None))):
        missing.append("forward_backward() (or forward() and backward())")
    if not callable(getattr(getattr(model, "config", None), "to_dict", None)):
        missing.append("config.to_dict()")
    if missing:
        raise TypeError(f"model must be a tinyllm GPT or PeftModel (or have what train() uses of them), got "
                        f"{type(model).__name__}, which has no {', '.join(missing)}")


def start_run(model, get_batch, cfg, resume_from, meta, out):
    """Check the inputs and build the Run: fresh, or the state a checkpoint saved."""
    check_model(model)
    if not callable(get_batch):
        raise TypeError(f"get_batch must be a function get_batch(split, rng) -> (x, y), got {type(get_batch).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be None or a dict of JSON-able facts, got {type(meta).__name__}")
    if not callable(out):
        raise TypeError(f"out must be a function that takes one line of text (e.g. print), got {type(out).__name__}")
    params = model.trainable_parameters()
    if not params:
        raise ValueError("the model has no trainable parameters; unfreeze some or add a fine-tuning method")
    extra = {**(meta or {}), "train_config": cfg.to_dict()}
    try:                                                 # found out now, not at the first save
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-able, since it goes into every checkpoint: {e}") from None
    if cfg.checkpoint:
        check_writable(cfg.checkpoint)
    run = Run(model, get_batch, cfg, AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
              np.random.default_rng(cfg.seed), extra)
    if resume_from is not None:
        run.rng, run.step, run.history, saved = load_training_state(resume_from, model, run.optimizer,
                                                                    history_fields=tuple(new_history()))
        if run.model_rng is not None and saved.get("model_rng_state") is not None:
            restore_rng(resume_from, saved["model_rng_state"], run.model_rng)
        changed = [f.name for f in fields(cfg) if f.name not in ("checkpoint", "workers")
                   and saved.get("train_config", {}).get(f.name) != getattr(cfg, f.name)]
        out(f"resuming {resume_from} at step {run.step}" + (f" (settings changed since: {', '.join(changed)})" if changed else ""))
        run.history["status"] = "running"
        if cfg.checkpoint is not None and os.path.abspath(resume_from) == os.path.abspath(cfg.checkpoint):
            run.saved_step = run.step
    run.commit()
    run.elapsed_before = run.history["elapsed"][-1] if run.history["elapsed"] else 0.0
    run.started = run.window[0] = time.perf_counter()
    return run


def draw(get_batch, split, rng):
    """get_batch(split, rng), checked to be a pair (x, y); the model checks the token ids themselves."""
    batch = get_batch(split, rng)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"{len(batch)} things" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise TypeError(f"get_batch({split!r}, rng) must return a pair (x, y) of (B,T) token-id arrays, got {got}")
    return batch


def validation_fn(run):
    """The mean loss over cfg.eval_iters 'val' batches, drawn once from their own stream of cfg.seed, so
    every evaluation sees the same ones (and the batch RNG is not touched)."""
    val_rng = np.random.default_rng([run.cfg.seed, 1])
    batches = [draw(run.get_batch, "val", val_rng) for _ in range(run.cfg.eval_iters)]
    return lambda m: float(np.mean([m.forward(x, y)[1] for x, y in batches]))


def evaluate(run, eval_fn, out):
    with quiet_floats():
        val_loss = eval_fn(run.model)
    if not is_real(val_loss):
        raise TypeError(f"eval_fn(model) must return the validation loss as a number, got {val_loss!r:.80}")
    if not math.isfinite(val_loss):
        diverged(run, "the validation loss", val_loss, before_step=False)
    with interrupts_held():
        run.history["val_step"].append(run.step)
        run.history["val_loss"].append(float(val_loss))
        run.commit()                                     # the evaluation may have drawn from model.rng
    out(f"step {run.step:>5}/{run.cfg.max_steps} | val loss {val_loss:.4f}")


def diverged(run, what, value, before_step=True):
    run.history["status"] = "diverged"
    kept = (f"the last good checkpoint, {run.cfg.checkpoint} (step {run.saved_step}), was kept"
            if run.saved_step is not None else "no checkpoint had been written yet")
    step = run.step + 1 if before_step else run.step
    raise TrainingError(f"step {step}: {what} is {value}, not a finite number; training stopped and "
                        f"{kept}. Try a lower learning rate or a smaller grad_clip.", step, value, run.history)


def is_real(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@contextmanager
def quiet_floats():
    """NumPy's overflow and invalid-value warnings off: the loop checks the loss and the gradient norm itself
    and stops with one clear TrainingError, so a diverging run prints that instead of a page of warnings.
    (The workers of a data-parallel step compute under these settings too: tinyllm.parallel hands them on.)"""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        yield


def train_step(run):
    """Batch, forward and backward, clip, AdamW: one step, committed whole or not at all."""
    cfg = run.cfg
    x, y = draw(run.get_batch, "train", run.rng)
    with quiet_floats():
        loss, grads = forward_backward(run.model, x, y, cfg.workers)  # which checks x and y
    if np.asarray(x).shape[0] != cfg.batch_size:
        raise ValueError(f"get_batch gave {np.asarray(x).shape[0]} sequences but TrainConfig.batch_size is "
                         f"{cfg.batch_size}; build get_batch with the config's batch size")
    if not math.isfinite(loss):
        diverged(run, "the loss", loss)
    norm = clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip is not None else global_norm(grads)
    if not math.isfinite(norm):
        diverged(run, "the gradient norm", norm)
    lr = lr_schedule(run.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    h = run.history
    with interrupts_held(), quiet_floats():              # the update and its bookkeeping, whole
        run.optimizer.step(grads, lr)
        run.step += 1
        run.commit()
        tokens = (h["tokens"][-1] if h["tokens"] else 0) + np.asarray(x).size
        for key, value in (("step", run.step), ("train_loss", float(loss)), ("lr", lr), ("grad_norm", norm),
                           ("tokens", tokens), ("elapsed", run.elapsed_before + time.perf_counter() - run.started)):
            h[key].append(value)
    run.window[1] += np.asarray(x).size
    run.window[2] += 1


def log_progress(run, out):
    if run.step % run.cfg.log_interval and run.step != run.cfg.max_steps:
        return
    h, now = run.history, time.perf_counter()
    start, tokens, steps = run.window
    per_step = (now - start) / steps
    out(f"step {run.step:>5}/{run.cfg.max_steps} | loss {h['train_loss'][-1]:.4f} | lr {h['lr'][-1]:.2e} | "
        f"{tokens / (now - start):,.0f} tok/s | elapsed {duration(h['elapsed'][-1])} | "
        f"eta {duration(per_step * (run.cfg.max_steps - run.step))}")
    run.window[:] = [now, 0, 0]


def save(run):
    save_training_state(run.cfg.checkpoint, run.model, run.optimizer, run.committed["rng"], run.step, run.history,
                        {**run.meta, "model_rng_state": run.committed["model_rng"]})
    run.saved_step = run.step


def train(model, get_batch, cfg, eval_fn=None, out=default_out, resume_from=None, meta=None,
          resume_command=None):
    """Train model's trainable parameters with AdamW on batches from get_batch.

    Inputs:
      model           follows the protocol in the module docstring; a model that draws random numbers
                      while training (LoRA dropout) exposes its generator as model.rng, checkpointed too
      get_batch       get_batch(split, rng) -> x, y (B,T) ints; split is 'train' or 'val'; use only rng
                      for randomness, so that a resumed run draws the same batches
      cfg             TrainConfig
      eval_fn         eval_fn(model) -> validation loss; default: the mean loss over cfg.eval_iters
                      'val' batches, drawn once from cfg.seed so every evaluation sees the same ones
      out             called with each progress line (plain lines, no '\\r'); default print
      resume_from     a checkpoint written by train(): continue that run exactly where it stopped
      meta            extra JSON-able facts for every checkpoint (tokenizer chars, data settings, kind...)
      resume_command  the command to print after Ctrl-C; default: a train(..., resume_from=...) call
    Returns: history (see new_history). Ctrl-C saves a checkpoint (when cfg.checkpoint is set), prints how
    to resume and returns with history['status'] == 'interrupted'.
    Raises: TrainingError when the loss, the gradient or the validation loss is not finite; no checkpoint is
    written over the last good one. TypeError, before the first step, for arguments that are not what they
    should be (a model without the protocol, a get_batch or eval_fn that is not a function, a meta that is
    not a dict), and at the first call of a get_batch or eval_fn that returns the wrong kind of thing.
    """
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be None or a function eval_fn(model) -> validation loss, got "
                        f"{type(eval_fn).__name__}")
    if resume_command is not None and not isinstance(resume_command, str):
        raise TypeError(f"resume_command must be None or a string, got {type(resume_command).__name__}")
    run = start_run(model, get_batch, cfg, resume_from, meta, out)
    if eval_fn is None and cfg.eval_iters:
        eval_fn = validation_fn(run)
    try:
        while True:
            h = run.history
            if eval_fn is not None and (run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps) \
                    and (not h["val_step"] or h["val_step"][-1] != run.step):
                evaluate(run, eval_fn, out)
            if run.step >= cfg.max_steps:
                break
            train_step(run)
            log_progress(run, out)
            if cfg.checkpoint and cfg.checkpoint_interval and run.step % cfg.checkpoint_interval == 0 \
                    and run.step < cfg.max_steps:
                save(run)
    except KeyboardInterrupt:
        run.history["status"] = "interrupted"
        if not cfg.checkpoint:
            out(f"interrupted at step {run.step}; no checkpoint path was set, so nothing was saved")
            return run.history
        save(run)
        command = resume_command or f"train(model, get_batch, cfg, resume_from={cfg.checkpoint!r})"
        out(f"interrupted at step {run.step}; saved {cfg.checkpoint}. Resume with:\n  {command}")
        return run.history
    run.history["status"] = "completed"
    if cfg.checkpoint:
        save(run)
        out(f"saved {cfg.checkpoint} (step {run.step})")
    return run.history
