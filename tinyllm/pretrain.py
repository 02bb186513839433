"""
The pretraining recipe behind `python -m tinyllm pretrain`: the default GPT on the synthetic corpus, with
the shared training loop (tinyllm.train.train). Every lesson and the comparison start from its checkpoint,
whose meta records the corpus settings (so the tasks and the forgetting probe can rebuild its world).
"""
import math
import os
import time

import numpy as np

from .checkpoint import CheckpointError, check_meta, load_checkpoint, load_pretrained
from .data import corpus_splits, fact_recall_examples, unigram_loss
from .model import GPT, GPTConfig
from .tokenizer import CharTokenizer, default_tokenizer
from .train import TrainConfig, corpus_batches, default_out, duration, train

# The corpus every lesson shares: fine-tuning tasks ask about this world's facts, so it is fixed here
# and recorded in the checkpoint (meta['data']) for them to rebuild.
PRETRAIN_DATA = dict(world_seed=0, n_people=24, n_chars=300_000, corpus_seed=0, val_fraction=0.1)
# Chosen for a few minutes on 2 cores (lesson 04 shows what it gives); 1200 steps of 8 sequences learned more
# than 600 of 16 on the same tokens, and lr 3e-3 more than 2e-3.
PRETRAIN = TrainConfig(max_steps=1200, batch_size=8, lr=3e-3, warmup_steps=50, eval_interval=100,
                       eval_iters=8, log_interval=50, checkpoint_interval=200)
QUICK = dict(n_chars=20_000, max_steps=30, batch_size=4, warmup_steps=5, eval_interval=10, eval_iters=2,
             log_interval=10, checkpoint_interval=10)


PRETRAIN_OUT = "runs/pretrain/ckpt.npz"
RESUMED = ("data", "train_config", "config", "tokenizer_chars", "step", "rng_state", "history")   # what resume reads


def check_memory(model_config, batch_size):
    """Refuse, before any work, a batch whose one training step needs more memory than this machine has
    (tinyllm.memory counts it): it would end, after minutes, in a MemoryError or the kernel killing the run."""
    from .memory import training_memory
    from .peft import FullFineTuningConfig
    need = training_memory(model_config, FullFineTuningConfig(), batch_size=batch_size)["bytes"]["total"]
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):    # not on Linux or macOS: cannot tell
        return
    if need > have:
        raise ValueError(f"TrainConfig.batch_size = {batch_size:,} needs about {need / 2**30:,.1f} GiB for one "
                         f"training step, but this machine has {have / 2**30:,.1f} GiB; use a smaller batch")


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
            raise CheckpointError(f"{resume!r} is not a pretraining checkpoint (kind {saved.get('kind')!r:.60})")
        missing = [k for k in RESUMED if k not in saved]
        if missing:
            raise CheckpointError(f"{resume!r} lacks the meta field(s) {missing} that a pretraining checkpoint has; "
                                  f"the file was not written by tinyllm, or was edited")
        check_meta(resume, saved, RESUMED)
        data, settings = saved["data"], saved["train_config"]
        try:                                            # the saved settings alone, before any flag changes them
            TrainConfig(**settings)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{resume!r}: meta field train_config is not a TrainConfig ({e})") from None
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
    check_memory(model_config, cfg.batch_size)


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
             f"(tinyllm.pretrain.pretrain, a few minutes; later lessons reuse it).")
        pretrain(out=checkpoint, echo=echo)
    model, tok, meta = load_pretrained(checkpoint, need_data=True)
    return model, tok, meta["data"], f"pretrained, from {os.path.relpath(checkpoint)} (step {meta.get('step')})"
