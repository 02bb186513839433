"""
Lesson 19: training on many cores is training on many machines. The way training spreads over a rack of
GPUs, data parallelism, works the same on the cores of one laptop, and tinyllm's training loop uses it
(tinyllm/parallel.py):

  1. what each worker holds and does: the weights (shared), its rows of the batch, its own caches
  2. what crosses between them: the gradients, summed (an all-reduce); how big that is for each method
  3. why the result is one big batch's: each shard weighted by its target tokens; the gradients compared
  4. what it costs: step time against the number of workers, and why BLAS must get one thread per worker
  5. the same picture at scale: PyTorch's DistributedDataParallel, and what is built on it

Run from the repository root (README.md has the measured time):

    python lessons/19_many_cores.py

Figures go to runs/lessons/19_many_cores/.
"""
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm import GPT, GPTConfig
from tinyllm.layers import IGNORE_INDEX
from tinyllm.model import gpt_backward, gpt_forward
from tinyllm.parallel import blas_threads, cores, find_openblas, shards
from tinyllm.presets import MAIN_METHODS, method_config
from tinyllm.peft import get_peft_model
from lessons.common import section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "19_many_cores")
LESSON = dict(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=128)    # the model of lessons 04-18


def batch(config, B, seed=0):
    """B rows of random tokens, some rows with many target tokens and some with few, as a fine-tuning batch
    (answers of different lengths) has them."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (B, config.block_size))
    y = rng.integers(0, config.vocab_size, (B, config.block_size))
    for b in range(B):
        y[b, : rng.integers(0, config.block_size - 1)] = IGNORE_INDEX      # a prompt of random length
    return x, y


def what_workers_hold(config, x, y, workers):
    """1. tinyllm splits a batch into shards of rows with about the same number of target tokens. Each worker
    (a thread) runs forward and backward of its shard with its own caches: a layer's cache belongs to the
    call, not to the model, so the same weights serve every worker at once, read-only. On GPUs every worker
    holds its own copy of the weights instead, and the optimizer keeps the copies equal."""
    section("1. what each worker holds and does")
    parts = shards(y, workers)
    for k, (rows, n) in enumerate(parts):
        print(f"  worker {k}: rows {rows.start}..{rows.stop - 1} of the batch, {n:,} target tokens")
    print("(a shard without a target token would add nothing to the loss, and gets no worker)")
    return parts


def what_crosses(config):
    """2. After the backward the workers hold different gradients of the same parameters; before the update
    they must agree, so the gradients are summed across workers: an all-reduce. Its size is the number of
    trainable parameters: a PEFT method sends a fraction of what full fine-tuning sends, which matters more
    on a network than inside one machine."""
    section("2. what crosses between workers: the gradients (an all-reduce)")
    sizes = {}
    for m in MAIN_METHODS:
        pm = get_peft_model(GPT(config), method_config(m))
        sizes[m] = sum(v.size for v in pm.trainable_parameters().values())
        print(f"  {m:8} {sizes[m]:>9,} numbers = {4 * sizes[m] / 2 ** 10:8.1f} KiB of float32 per step")
    return sizes


def one_big_batch(model, x, y, workers):
    """3. The loss is a mean over the batch's N target tokens, so shard s, with n_s of them, enters with weight
    n_s / N: loss = sum_s (n_s/N) loss_s and the same weights for the gradients. That is exactly one worker's
    result; only the order of float32 additions differs."""
    section("3. why it equals one big batch")
    loss1, grads1 = model.forward_backward(x, y, workers=1)
    lossN, gradsN = model.forward_backward(x, y, workers=workers)
    worst = max(float(np.max(np.abs(gradsN[k] - grads1[k])) / (np.max(np.abs(grads1[k])) + 1e-30)) for k in grads1)
    print(f"loss with 1 worker {loss1:.6f}, with {workers}: {lossN:.6f}")
    print(f"largest gradient difference, relative to each tensor's largest entry: {worst:.1e} (float32 rounding)")
    unweighted = np.mean([loss for loss, _ in (run_shard(model, x[r], y[r]) for r, _ in shards(y, workers))])
    print(f"a plain mean of the shards' losses instead: {unweighted:.6f}: wrong whenever shards hold different "
          f"numbers of target tokens")
    return {"loss_1": loss1, "loss_n": lossN, "grad_rel_diff": worst, "unweighted_loss": float(unweighted)}


def run_shard(model, x, y):
    _, loss, cache = gpt_forward(model.params, x, model.config, y)
    return loss, gpt_backward(cache, model.trainable)


def oversubscribed(model, x, y, workers):
    """Two workers whose BLAS calls each use every core: more busy threads than cores."""
    parts = shards(y, workers)
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(lambda p: run_shard(model, x[p[0]], y[p[0]]), parts))


def what_it_costs(model, x, y, repeats):
    """4. Each worker needs a core; a BLAS library that also starts a thread per core inside every worker puts
    workers x cores busy threads on the cores, and they take turns. tinyllm therefore sets BLAS to one thread
    while its workers run (parallel.blas_threads, through OpenBLAS's own call) and back afterwards."""
    section("4. what it costs: step time against workers")
    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
    counts = sorted({1, 2, cores(), 2 * cores()})
    seconds = {w: timed(lambda w=w: model.forward_backward(x, y, workers=w)) for w in counts}
    for w, s in seconds.items():
        print(f"  {w} worker{'s' if w > 1 else ' '} (BLAS {'its default' if w == 1 else '1 thread each'}): "
              f"{1000 * s:7.1f} ms per step, {seconds[1] / s:.2f}x one worker")
    wrong = None
    if find_openblas() is not None:
        wrong = timed(lambda: oversubscribed(model, x, y, cores()))
        print(f"  {cores()} workers, BLAS left at every core: {1000 * wrong:7.1f} ms, {seconds[1] / wrong:.2f}x one worker")
    with blas_threads(1):
        one_thread = timed(lambda: model.forward_backward(x, y, workers=1))
    print(f"  1 worker, BLAS 1 thread: {1000 * one_thread:7.1f} ms (the elementwise work runs on one core anyway)")
    print(f"({cores()} cores here; more workers than cores only take turns)")
    return {"seconds": seconds, "oversubscribed": wrong, "one_thread": one_thread}


def at_scale():
    """5. The same picture with GPUs and machines."""
    section("5. the same picture at scale")
    print("PyTorch's DistributedDataParallel runs one process per GPU, each with its own copy of the model. Each")
    print("takes its shard of the batch, and during the backward the gradients are all-reduced in buckets")
    print("(NCCL on GPUs), overlapping the communication with the rest of the backward; every process then takes")
    print("the same optimizer step. FSDP and DeepSpeed's ZeRO go further and shard the optimizer state, the")
    print("gradients and the weights themselves across workers, so a model too big for one GPU still trains.")
    print("Hugging Face's accelerate and transformers' Trainer set all of this up from a script that looks like")
    print("one worker's. The files lesson 18 exports (a GPT-2 folder and a PEFT adapter) are what they load.")


def plot(seconds, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    w = sorted(seconds)
    ax.plot(w, [1000 * seconds[k] for k in w], marker="o")
    ax.set_xticks(w)
    ax.set_xlabel("workers (threads, BLAS one thread each)")
    ax.set_ylabel("ms per training step")
    ax.set_title(f"Forward + backward against workers ({cores()} cores)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(config=None, batch_size=16, repeats=5, out_dir=OUT_DIR):
    """Run the lesson. config: GPTConfig fields (default: the lessons' model); batch_size: rows per step.
    Returns a dict of what it measured."""
    os.makedirs(out_dir, exist_ok=True)
    config = GPTConfig(**(config or LESSON))
    model = GPT(config, seed=0)
    x, y = batch(config, batch_size)
    workers = max(2, cores())
    parts = what_workers_hold(config, x, y, workers)
    sizes = what_crosses(config)
    m = one_big_batch(model, x, y, workers)
    cost = what_it_costs(model, x, y, repeats)
    at_scale()
    path = os.path.join(out_dir, "workers.png")
    plot(cost["seconds"], path)
    print(f"\nsaved {os.path.relpath(path)}")
    return {**m, "shards": [n for _, n in parts], "allreduce_numbers": sizes, **cost, "figures": [path]}


if __name__ == "__main__":
    main()
