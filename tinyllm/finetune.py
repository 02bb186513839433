"""
Fine-tune one method on one task, and measure everything the comparison (tinyllm/compare.py) reports.

    base, tok, meta = load_pretrained("runs/pretrain/ckpt.npz")
    probe = knowledge_probe(meta["data"], tok, base.config.block_size)
    task = get_task("extract", World(meta["data"]["world_seed"], meta["data"]["n_people"]))
    r = finetune(base, tok, LoraConfig(r=8, lora_alpha=16), task, steps=100, lr=1e-2, probe=probe)
    r["accuracy_after"], r["seconds_per_step"], r["knowledge_after"]["fact_recall"]

Every method trains on its own deep copy of the base: full fine-tuning changes the weights it is given,
and the next method must start from the same pretrained model. After training, every base weight the
method did not train is checked to be bit-identical to the pretrained one: for a PEFT method, all of them.

The loop is tinyllm.train.train, the one pretraining uses: the same warmup and cosine schedule, gradient
clipping, AdamW and progress lines. The loss is on the answer tokens only (tasks.encode_examples).

What "knowledge" means here (the forgetting measurements):
  corpus_loss   mean next-token loss on fixed windows of the pretraining corpus's validation split
  fact_recall   accuracy of greedy cloze completions of every fact ("mia lives in" -> " oslo")
Both are measured with the method active (the adapter on), since that is the model one would deploy.
"""
import copy
import os
import statistics
import tempfile
import time

import numpy as np

from .checkpoint import save_checkpoint
from .data import corpus_splits, fact_recall_examples
from .data import get_batch as corpus_windows
from .optim import AdamW
from .parallel import cores, parallel_map
from .peft import get_peft_model
from .peft.peft_model import reserved_positions
from .tasks import IGNORE_INDEX, encode_examples, evaluate, sample_batch
from .train import TrainConfig, train

VAL_EXAMPLES = 64        # task validation loss: this many val examples, the same ones at every evaluation
PROBE_WINDOWS = 16       # corpus windows for the knowledge probe
PROBE_WINDOW = 64        # their length: short enough that prefix or prompt tokens fit in front of them


# ----------------------------------------------------------------------------------------------------
# what the model knows from pretraining

def knowledge_probe(data, tokenizer, block_size, n_windows=PROBE_WINDOWS, window=PROBE_WINDOW, seed=0):
    """The fixed inputs of the forgetting measurements, rebuilt from a pretraining checkpoint's meta['data'].

    Inputs: data, dict with world_seed, n_people, n_chars, corpus_seed, val_fraction (tinyllm.pretrain's
    PRETRAIN_DATA); the tokenizer; block_size (a window must fit in it).
    Returns: dict with windows (x, y), each (n_windows, window) ids of the corpus's val split, and recall,
    the fact_recall_examples of the world as [(prompt, value)]: the answer without its final "." (" oslo"),
    so a model fine-tuned to end its answers with a newline is judged on the fact, not on the punctuation.
    No value is the start of another value of its attribute, so a match is that value.
    """
    window = min(window, block_size)
    world, _, val_text = corpus_splits(data)
    x, y = corpus_windows(tokenizer.encode(val_text), n_windows, window, np.random.default_rng(seed))
    recall = [(prompt, answer.rstrip(".")) for prompt, answer in fact_recall_examples(world)]
    return {"windows": (x, y), "recall": recall}


def window_losses(model, x, y):
    """The mean next-token loss of each row of x (B,T) against y (B,T): (B,) floats."""
    logits, _ = model.forward(x)                                                 # (B,T,V)
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))                     # log-softmax
    return -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0].mean(axis=1, dtype=np.float64)


def measure_knowledge(model, tokenizer, probe):
    """What the model knows from pretraining, two ways:
    corpus_loss      mean loss on the probe's corpus windows; window_losses, each window's
    fact_recall      accuracy of greedy cloze completions of every fact; recall_correct, each fact's"""
    losses = window_losses(model, *probe["windows"])
    recall = evaluate(model, tokenizer, probe["recall"])
    return {"corpus_loss": float(losses.mean()), "window_losses": [float(x) for x in losses],
            "fact_recall": recall["accuracy"], "recall_correct": recall["correct"]}


def measure_base(model, tokenizer, task, probe=None):
    """The pretrained model before any fine-tuning: test accuracy, predictions and knowledge."""
    ev = evaluate(model, tokenizer, task, "test")
    return {"accuracy": ev["accuracy"], "predictions": ev["predictions"], "correct": ev["correct"],
            "knowledge": measure_knowledge(model, tokenizer, probe) if probe is not None else None}


# ----------------------------------------------------------------------------------------------------
# small measurements

def task_batches(tokenizer, task, block_size, batch_size, reserved=0):
    """get_batch(split, rng) for train(): random training examples, answer tokens as the only targets.

    reserved: context positions a prefix or prompt takes, so examples must fit in block_size - reserved.
    """
    splits = {s: encode_examples(tokenizer, getattr(task, s), block_size - reserved) for s in ("train", "val")}

    def get_batch(split, rng):
        return sample_batch(*splits[split], batch_size, rng)                   # x, y (B,T')
    return get_batch


def val_loss_fn(tokenizer, task, block_size, n=VAL_EXAMPLES, batch_size=32, reserved=0):
    """eval_fn(model) -> the mean loss per answer token over the first n val examples (always the same)."""
    idx, targets = encode_examples(tokenizer, task.val[:n], block_size - reserved)
    chunks = [(idx[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(idx), batch_size)]

    def eval_fn(model):
        def chunk_loss(chunk):
            x, y = chunk
            return model.forward(x, y)[1] * int((y != IGNORE_INDEX).sum())    # weight each chunk by its tokens
        n = sum(int((y != IGNORE_INDEX).sum()) for _, y in chunks)
        return sum(parallel_map(chunk_loss, chunks, cores())) / n
    return eval_fn


def example_losses(model, tokenizer, examples, block_size, reserved=0):
    """Each example's mean loss per answer token (a list, one per example), for comparisons paired example by
    example. One forward per example: the loss the model returns is already the mean over its answer."""
    idx, targets = encode_examples(tokenizer, examples, block_size - reserved)
    one = lambda i: float(model.forward(idx[i:i + 1], targets[i:i + 1])[1])
    return parallel_map(one, range(len(idx)), cores())


def saved_bytes(folder):
    """Bytes of the files save_pretrained wrote into folder: adapter_config.json and the weights."""
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, name)))


def full_copy_bytes(model):
    """Bytes of the .npz file that holds a full copy of the model's weights (what full fine-tuning
    must store for every task)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.npz")
        save_checkpoint(path, model.params, {"config": model.config.to_dict()})
        return os.path.getsize(path)


def same_weights(a, b):
    """True when two parameter dicts have the same keys and bit-identical arrays."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# the fine-tuning run

REL_TOL, ABS_TOL = 0.05, 0.02   # "flattened": a loss fell by less than 5% of itself, or by less than 0.02 nats
                                # (a loss near zero); the sweep's doubling of budgets and a run's last fifth


def flattened_in_run(val_steps, val_losses):
    """Whether a run's val loss had stopped falling: over its last fifth it fell by less than REL_TOL of
    itself (or less than ABS_TOL nats). Returns (flattened, the drop)."""
    at = max(val_steps) * 0.8
    i = max(j for j, s in enumerate(val_steps) if s <= at)
    drop = val_losses[i] - val_losses[-1]
    return bool(drop < max(REL_TOL * val_losses[i], ABS_TOL)), float(drop)


def finetune(base_model, tokenizer, method_config, task, steps=100, batch_size=16, lr=1e-3, seed=0,
             eval_interval=20, out=print, save_dir=None, probe=None, before=None, warmup_steps=None,
             weight_decay=0.0, log_interval=20, evaluate_test=True, n_val=VAL_EXAMPLES, return_model=False):
    """Fine-tune one method on one task from base_model (left untouched) and measure it.

    Inputs:
      base_model     a pretrained GPT; it is deep-copied, never changed
      tokenizer      the tokenizer it was trained with
      method_config  a LoraConfig, PrefixTuningConfig, PromptTuningConfig, AdapterConfig or FullFineTuningConfig
      task           a tasks.Task; trains on task.train, val loss on task.val, accuracy on task.test
      steps, batch_size, lr, seed   the run (seed: the method's initialisation and the batch order)
      eval_interval  steps between validation losses (also at step 0 and at the end)
      out            called with each progress line
      save_dir       where save_pretrained writes the method's files (a temporary folder when None)
      probe          knowledge_probe(...) for the forgetting measurements; None: not measured
      before         measure_base(...) of base_model, if already computed (it is the same for every method)
      evaluate_test  False: skip the test accuracy and the knowledge probe (accuracies come back None)
      n_val          validation examples in the val loss (the first n_val of task.val)
      warmup_steps   default steps // 10; weight_decay: AdamW's (0: fine-tuning runs are short, and decay
                     would pull full fine-tuning's pretrained weights, and the prompts, towards zero)
      return_model   also return the trained PeftModel: (result, model)
    Returns: dict, every number JSON-able:
      method, config, task, steps, batch_size, lr, seed
      trainable_params, total_params, formula           how many numbers train, and the arithmetic
      history        step, train_loss, train_seconds (per step) and val_step, val_loss, val_seconds;
                     the seconds count training only, not the evaluations in between
      seconds_per_step   median over the steps; train_seconds, their total
      optimizer_state_bytes   AdamW's m and v for the trainable parameters
      saved_bytes, full_copy_bytes   the files save_pretrained writes, and a full copy of the model
      accuracy_before, accuracy_after, predictions_after, correct_after   on task.test
      test_losses    each test example's loss per answer token (None when evaluate_test is False)
      knowledge_before, knowledge_after   measure_knowledge with the method active (None without probe)
      base_unchanged           the base weights under the method are bit-identical to the pretrained ones
                               (always checked: the weights it does not train; raises AssertionError if not)
      disabled_max_diff        inside disable_adapter(), the largest |logit - the base's logit| (0: exact)
      virtual_tokens           context positions the method takes in front of every input
      flattened, val_drop      the val loss had stopped falling over the run's last fifth (flattened_in_run)
    """
    block_size = base_model.config.block_size
    pretrained = {k: v.copy() for k, v in base_model.params.items()}
    if not evaluate_test:
        probe, before = None, {"accuracy": None, "predictions": None, "correct": None, "knowledge": None}
    elif before is None:
        before = measure_base(base_model, tokenizer, task, probe)

    model = copy.deepcopy(base_model)         # full fine-tuning writes into its base: give it its own
    pm = get_peft_model(model, method_config, tokenizer=tokenizer, seed=seed)
    name = type(method_config).__name__
    reserved = reserved_positions(method_config)
    trainable = pm.trainable_parameters()
    n_trainable, n_total = pm.get_nb_trainable_parameters()
    out(f"{name}: {n_trainable:,} trainable of {n_total:,} ({100 * n_trainable / n_total:.2f}%), "
        f"lr {lr:g}, {steps} steps of {batch_size}")

    # batches, and the validation loss, timed so that the curves against seconds count training only
    get_task_batch = task_batches(tokenizer, task, block_size, batch_size, reserved)
    batches_drawn = []                         # one entry per training batch: the step an evaluation runs at
    val_loss = val_loss_fn(tokenizer, task, block_size, n=n_val, reserved=reserved)
    eval_seconds = []                          # (step it ran at, seconds it took)

    def get_batch(split, rng):
        if split == "train":
            batches_drawn.append(1)
        return get_task_batch(split, rng)

    def eval_fn(m):
        start = time.perf_counter()
        m.eval()
        loss = val_loss(m)
        m.train()
        eval_seconds.append((len(batches_drawn), time.perf_counter() - start))
        return loss

    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_interval=eval_interval,
                      warmup_steps=max(1, steps // 10) if warmup_steps is None else warmup_steps,
                      weight_decay=weight_decay, log_interval=log_interval, eval_iters=0)
    history = train(pm, get_batch, cfg, eval_fn=eval_fn, out=out)
    if history["status"] == "interrupted":     # Ctrl-C: train() stopped early; stop the caller too
        raise KeyboardInterrupt

    # seconds of training alone: take out the evaluations that ran before each step
    evals = np.array(eval_seconds) if eval_seconds else np.zeros((0, 2))
    train_seconds = [e - evals[evals[:, 0] < s, 1].sum() for s, e in zip(history["step"], history["elapsed"])]
    step_seconds = np.diff([0.0] + train_seconds)
    at_step = lambda s: 0.0 if s == 0 else train_seconds[s - 1]

    pm.eval()
    after = evaluate(pm, tokenizer, task, "test") if evaluate_test else {"accuracy": None, "predictions": None,
                                                                        "correct": None}
    knowledge_after = measure_knowledge(pm, tokenizer, probe) if probe is not None else None

    # Every base weight the method does not train must be bit-identical to the pretrained one: for a PEFT
    # method that is all of them (unless it trains biases, as LoraConfig(bias='all') does). The base_model
    # we were given must not have changed at all. Disabling the method must give back the base exactly.
    moved = [k for k in pretrained if not np.array_equal(pm.base_model.params[k], pretrained[k])]
    frozen_moved = [k for k in moved if k not in trainable]
    if frozen_moved:
        raise AssertionError(f"{name} changed frozen base weights {frozen_moved[:3]}; only trained keys may change")
    if not same_weights(base_model.params, pretrained):
        raise AssertionError("finetune changed the base_model it was given; every method must train a copy")
    base_unchanged = not moved
    x = np.stack([tokenizer.encode(task.test[0][0])])
    with pm.disable_adapter():
        disabled_logits, _ = pm.forward(x)
    base_logits, _ = base_model.forward(x)
    disabled_max_diff = float(np.max(np.abs(disabled_logits - base_logits)))
    flattened, val_drop = flattened_in_run(history["val_step"], history["val_loss"]) if history["val_loss"] \
        else (None, None)

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_dir or tmp
        pm.save_pretrained(folder)
        saved = saved_bytes(folder)

    result = {
        "method": name, "config": method_config.to_dict(), "task": task.name,
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "trainable_params": int(n_trainable), "total_params": int(n_total), "formula": pm.formula(),
        "history": {"step": history["step"], "train_loss": history["train_loss"],
                    "train_seconds": [float(s) for s in train_seconds],
                    "val_step": history["val_step"], "val_loss": history["val_loss"],
                    "val_seconds": [float(at_step(s)) for s in history["val_step"]]},
        "seconds_per_step": float(statistics.median(step_seconds)), "train_seconds": float(train_seconds[-1]),
        "optimizer_state_bytes": int(AdamW(trainable).state_bytes()),   # the optimizer train() built: m, v
        "saved_bytes": int(saved), "full_copy_bytes": int(full_copy_bytes(base_model)),
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "predictions_after": after["predictions"], "correct_after": after["correct"],
        "test_losses": example_losses(pm, tokenizer, task.test, block_size, reserved) if evaluate_test else None,
        "knowledge_before": before["knowledge"], "knowledge_after": knowledge_after,
        "base_unchanged": bool(base_unchanged), "disabled_max_diff": disabled_max_diff,
        "virtual_tokens": int(reserved), "final_val_loss": history["val_loss"][-1] if history["val_loss"] else None,
        "flattened": flattened, "val_drop": val_drop,
    }
    return (result, pm) if return_model else result
