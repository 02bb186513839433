"""
The training loop, shared by pretraining and every fine-tuning method.

One step is nanoGPT's: draw a batch, forward, backward, clip the global gradient norm, AdamW step with
the scheduled learning rate. `train` works with any model that follows tinyllm's protocol:

    logits, loss = model.forward(idx, targets)    grads = model.backward()
    model.trainable_parameters()                  model.state_dict() / load_state_dict(d)
    model.config (with .to_dict())

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
from dataclasses import asdict, dataclass, fields

import numpy as np

from .checkpoint import (CheckpointError, check_writable, load_checkpoint, load_pretrained, load_training_state,
                         restore_rng, save_training_state)
from .data import corpus_splits, fact_recall_examples, unigram_loss
from .data import get_batch as corpus_windows
from .model import GPT, GPTConfig, is_int, is_number
from .optim import AdamW, clip_grad_norm, global_norm, lr_schedule
from .tokenizer import CharTokenizer, default_tokenizer


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


# ----------------------------------------------------------------------------------------------------
# the loop

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
    Raises: TrainingError when the loss or gradient is not finite; no checkpoint is written over the
    last good one.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    params = model.trainable_parameters()
    if not params:
        raise ValueError("the model has no trainable parameters; unfreeze some or add a fine-tuning method")
    optimizer = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    extra = {**(meta or {}), "train_config": cfg.to_dict()}
    try:                                                 # found out now, not at the first save
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-able, since it goes into every checkpoint: {e}") from None
    if cfg.checkpoint:
        check_writable(cfg.checkpoint)
    model_rng = getattr(model, "rng", None)

    if resume_from is not None:
        rng, step, history, saved = load_training_state(resume_from, model, optimizer)
        if model_rng is not None and saved.get("model_rng_state") is not None:
            restore_rng(resume_from, saved["model_rng_state"], model_rng)
        changed = [f.name for f in fields(cfg) if f.name != "checkpoint"
                   and saved.get("train_config", {}).get(f.name) != getattr(cfg, f.name)]
        out(f"resuming {resume_from} at step {step}"
            + (f" (settings changed since: {', '.join(changed)})" if changed else ""))
        history["status"] = "running"
    else:
        rng, step, history = np.random.default_rng(cfg.seed), 0, new_history()

    if eval_fn is None and cfg.eval_iters:
        val_rng = np.random.default_rng([cfg.seed, 1])      # its own stream: the batch RNG is not touched
        val_batches = [get_batch("val", val_rng) for _ in range(cfg.eval_iters)]

        def eval_fn(m):
            return float(np.mean([m.forward(x, y)[1] for x, y in val_batches]))

    # The committed state: what a checkpoint records. It changes only between steps, all at once.
    committed_rng = rng.bit_generator.state
    committed_model_rng = model_rng.bit_generator.state if model_rng is not None else None
    resumed_in_place = resume_from is not None and cfg.checkpoint is not None \
        and os.path.abspath(resume_from) == os.path.abspath(cfg.checkpoint)
    saved_step = step if resumed_in_place else None      # the step of the checkpoint file on disk
    elapsed_before = history["elapsed"][-1] if history["elapsed"] else 0.0
    tokens = history["tokens"][-1] if history["tokens"] else 0
    start = window_start = time.perf_counter()
    window_tokens, window_steps = 0, 0

    def save():
        nonlocal saved_step
        save_training_state(cfg.checkpoint, model, optimizer, committed_rng, step, history,
                            {**extra, "model_rng_state": committed_model_rng})
        saved_step = step

    def stop(what, value):
        history["status"] = "diverged"
        kept = (f"the last good checkpoint, {cfg.checkpoint} (step {saved_step}), was kept"
                if saved_step is not None else "no checkpoint had been written yet")
        raise TrainingError(f"step {step + 1}: {what} is {value}, not a finite number; training stopped and "
                            f"{kept}. Try a lower learning rate or a smaller grad_clip.", step + 1, value, history)

    try:
        while True:
            if eval_fn is not None and (step % cfg.eval_interval == 0 or step == cfg.max_steps) \
                    and (not history["val_step"] or history["val_step"][-1] != step):
                val_loss = eval_fn(model)
                with interrupts_held():
                    history["val_step"].append(step)
                    history["val_loss"].append(float(val_loss))
                    if model_rng is not None:                # the evaluation may have drawn from it
                        committed_model_rng = model_rng.bit_generator.state
                out(f"step {step:>5}/{cfg.max_steps} | val loss {val_loss:.4f}")
            if step >= cfg.max_steps:
                break

            x, y = get_batch("train", rng)
            _, loss = model.forward(x, y)                    # which checks x and y
            x = np.asarray(x)
            if x.shape[0] != cfg.batch_size:
                raise ValueError(f"get_batch gave {x.shape[0]} sequences but TrainConfig.batch_size is "
                                 f"{cfg.batch_size}; build get_batch with the config's batch size")
            if not math.isfinite(loss):
                stop("the loss", loss)
            grads = model.backward()
            norm = clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip is not None else global_norm(grads)
            if not math.isfinite(norm):
                stop("the gradient norm", norm)
            lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)

            with interrupts_held():                          # the update and its bookkeeping, whole
                optimizer.step(grads, lr)
                step += 1
                tokens += x.size
                committed_rng = rng.bit_generator.state
                if model_rng is not None:
                    committed_model_rng = model_rng.bit_generator.state
                for key, value in (("step", step), ("train_loss", float(loss)), ("lr", lr),
                                   ("grad_norm", norm), ("tokens", tokens),
                                   ("elapsed", elapsed_before + time.perf_counter() - start)):
                    history[key].append(value)

            window_tokens += x.size
            window_steps += 1
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                per_step = (now - window_start) / window_steps
                out(f"step {step:>5}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"{window_tokens / (now - window_start):,.0f} tok/s | "
                    f"elapsed {duration(history['elapsed'][-1])} | eta {duration(per_step * (cfg.max_steps - step))}")
                window_start, window_tokens, window_steps = now, 0, 0
            if cfg.checkpoint and cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 \
                    and step < cfg.max_steps:
                save()
    except KeyboardInterrupt:
        history["status"] = "interrupted"
        if not cfg.checkpoint:
            out(f"interrupted at step {step}; no checkpoint path was set, so nothing was saved")
            return history
        save()
        command = resume_command or f"train(model, get_batch, cfg, resume_from={cfg.checkpoint!r})"
        out(f"interrupted at step {step}; saved {cfg.checkpoint}. Resume with:\n  {command}")
        return history

    history["status"] = "completed"
    if cfg.checkpoint:
        save()
        out(f"saved {cfg.checkpoint} (step {step})")
    return history


# ----------------------------------------------------------------------------------------------------
# the pretraining recipe behind `python -m tinyllm pretrain`

# The corpus every lesson shares: fine-tuning tasks ask about this world's facts, so it is fixed here
# and recorded in the checkpoint (meta['data']) for them to rebuild.
PRETRAIN_DATA = dict(world_seed=0, n_people=24, n_chars=300_000, corpus_seed=0, val_fraction=0.1)
# Tuned for ~2-3 minutes on 2 CPU cores (~10k tokens/s; measured 2m06s, val loss 0.32 against a unigram
# baseline of 2.98). 1200 steps of 8 sequences beat 600 of 16 (the same tokens): val 0.34 against 0.50;
# lr 3e-3 beat 2e-3.
PRETRAIN = TrainConfig(max_steps=1200, batch_size=8, lr=3e-3, warmup_steps=50, eval_interval=100,
                       eval_iters=8, log_interval=50, checkpoint_interval=200)
QUICK = dict(n_chars=20_000, max_steps=30, batch_size=4, warmup_steps=5, eval_interval=10, eval_iters=2,
             log_interval=10, checkpoint_interval=10)


PRETRAIN_OUT = "runs/pretrain/ckpt.npz"


def pretrain(out=PRETRAIN_OUT, steps=None, batch_size=None, lr=None, seed=None, resume=None,
             quick=False, echo=default_out, resume_command=None):
    """Pretrain the default GPT on the synthetic corpus; the settings are PRETRAIN (QUICK with quick).

    Flags left None keep the default, or with `resume` (a checkpoint path) the resumed run's own setting.
    Returns: dict with model, tokenizer, history, train_loss (mean of the last 20 steps), val_loss,
    unigram_loss (the loss of predicting characters by their frequency alone), samples, seconds.
    """
    if resume is not None:
        _, saved = load_checkpoint(resume)
        if saved.get("kind") != "pretrain":
            raise CheckpointError(f"{resume!r} is not a pretraining checkpoint (kind {saved.get('kind')!r})")
        data, settings = saved["data"], saved["train_config"]
        model_config, tokenizer = GPTConfig(**saved["config"]), CharTokenizer(saved["tokenizer_chars"])
    else:
        data, model_config, tokenizer = dict(PRETRAIN_DATA), GPTConfig(), default_tokenizer()
        settings = PRETRAIN.to_dict()
        if quick:
            data["n_chars"] = QUICK["n_chars"]
            settings.update({k: v for k, v in QUICK.items() if k in settings})
    for name, value in (("max_steps", steps), ("batch_size", batch_size), ("lr", lr), ("seed", seed)):
        if value is not None:
            settings[name] = value
    settings["checkpoint"] = out
    cfg = TrainConfig(**settings)

    world, train_text, val_text = corpus_splits(data)
    splits = {"train": tokenizer.encode(train_text), "val": tokenizer.encode(val_text)}
    baseline = unigram_loss(splits["val"], tokenizer.vocab_size)
    model = GPT(model_config, seed=cfg.seed)
    echo(f"pretraining a {model.num_parameters():,}-parameter GPT ({model_config.n_layer} layers, "
         f"{model_config.n_embd} wide) on {len(splits['train']):,} characters for {cfg.max_steps} steps of "
         f"{cfg.batch_size}x{model_config.block_size} tokens; unigram baseline {baseline:.3f}, "
         f"uniform {math.log(tokenizer.vocab_size):.3f}")

    start = time.perf_counter()
    meta = {"kind": "pretrain", "tokenizer_chars": tokenizer.chars, "data": data}
    history = train(model, corpus_batches(splits, cfg.batch_size, model_config.block_size), cfg,
                    out=echo, resume_from=resume, meta=meta, resume_command=resume_command)
    seconds = time.perf_counter() - start
    result = dict(model=model, tokenizer=tokenizer, history=history, unigram_loss=baseline, seconds=seconds,
                  train_loss=float(np.mean(history["train_loss"][-20:])) if history["train_loss"] else None,
                  val_loss=history["val_loss"][-1] if history["val_loss"] else None, samples=[])
    if history["status"] != "completed":
        return result

    for prompt, answer in fact_recall_examples(world)[::7][:3]:     # three facts of three people
        ids = model.generate(tokenizer.encode(prompt)[None], 20, temperature=0)[0]
        completion = tokenizer.decode(ids[len(prompt):]).split("\n")[0]
        completion = completion[:completion.index(".") + 1] if "." in completion else completion
        result["samples"].append(f"{prompt}{completion}   (the world says:{answer})")
    ids = model.generate(tokenizer.encode("\n")[None], 150, temperature=0.8, seed=cfg.seed)[0]
    result["samples"].append(tokenizer.decode(ids[1:]).split("\n")[0])
    echo(f"done in {duration(seconds)}: train loss {result['train_loss']:.3f} (mean of the last 20 steps), "
         f"val loss {result['val_loss']:.3f}, unigram baseline {baseline:.3f}")
    echo("samples (greedy completions of facts, then one document sampled at temperature 0.8):")
    for s in result["samples"]:
        echo(f"  {s}")
    return result


def load_base(checkpoint, config=None, seed=0, fallback=None, echo=default_out):
    """The model a lesson fine-tunes, its tokenizer, its pretraining corpus settings, and where it came from.

    config: GPTConfig fields of a new, randomly initialised model instead (tests use a tiny one).
    Otherwise the checkpoint, or `fallback` when only that one exists (lesson 04 writes its own); when
    neither exists, pretrain() makes the checkpoint first.
    Returns: model, tokenizer, data settings (dict), a one-line description of the model's origin.
    """
    if config is not None:
        tok = default_tokenizer()
        model = GPT(GPTConfig(**{"vocab_size": tok.vocab_size, **config}), seed=seed)
        return model, tok, dict(PRETRAIN_DATA), "a new, RANDOMLY INITIALISED GPT (not pretrained)"
    if not os.path.exists(checkpoint) and fallback and os.path.exists(fallback):
        checkpoint = fallback
    if not os.path.exists(checkpoint):
        echo(f"No pretrained model at {os.path.relpath(checkpoint)} yet: pretraining one first "
             f"(tinyllm.train.pretrain, a few minutes; later lessons reuse it).")
        pretrain(out=checkpoint, echo=echo)
    model, tok, meta = load_pretrained(checkpoint)
    return model, tok, meta["data"], f"pretrained, from {os.path.relpath(checkpoint)} (step {meta.get('step')})"
