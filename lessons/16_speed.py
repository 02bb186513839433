"""
Lesson 16: where the time goes.

NumPy hands every matrix multiply to BLAS, which runs it on all cores at close to the machine's peak.
Everything else (the softmax, GELU, layer norm, each `+` and `*`) is NumPy running one operator at a time,
one pass over the array each, on one core. So a training step is fast exactly where it is a matmul, and
the rest is what remains to shave. This lesson

  1. measures the machine's float32 matmul peak, and the model's training throughput against it,
  2. profiles one training step layer by layer: forward, backward, and GFLOP/s of the matmuls,
  3. times GELU written as one expression and as a chain of in-place steps: the same numbers, fewer new
     arrays,
  4. times a training step of each method next to a model with nothing trainable: the most that
     freezing weights can save,
  5. times generation with and without the KV cache.

The machine's load changes from second to second, so every comparison here is timed in turns (one run of
each, round after round) and reported as medians. `python -m tinyllm bench` runs the same measurements
on two model sizes, next to PyTorch when it is installed.

Run from the repository root (about half a minute, no training):

    python lessons/16_speed.py

Figures go to runs/lessons/16_speed/.

Legend: B batch, T tokens, C channels, NH heads.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm import bench
from tinyllm.layers import GELU_SCALE, gelu_forward
from tinyllm.model import GPTConfig
from lessons.common import section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "16_speed")
LESSON_CONFIG, LESSON_BATCH, _ = bench.CONFIGS["lesson"]   # the model of lessons 04-15


# ----------------------------------------------------------------------------------------------------
# 1. the ceiling, and how close a training step gets to it

def show_peak(config, B, repeats):
    section("1. the matmul peak, and a training step against it")
    peak = bench.matmul_peak(repeats=repeats)
    model = bench.time_model(config, B, repeats=repeats)
    print(f"one 2048 x 2048 float32 matmul, its fastest run: {peak:.1f} GFLOP/s. That is the ceiling: nothing "
          f"here does more arithmetic per second.")
    print(f"forward + backward of the model (batch {B} x {config.block_size} tokens): "
          f"{1000 * model['seconds']:.1f} ms, {model['tokens_per_s']:,.0f} tokens/s, {model['gflops']:.1f} GFLOP/s of "
          f"matmul work = {100 * model['gflops'] / peak:.0f}% of the peak.")
    return peak, model


# ----------------------------------------------------------------------------------------------------
# 2. layer by layer

def show_profile(config, B, peak):
    section("2. where a training step's time goes, layer by layer")
    rows, total = bench.profile_layers(config, B)
    print("\n".join(bench.layer_table(rows, total)))        # GFLOP/s: of the layer's matmuls
    linear = next(r for r in rows if r["layer"] == "linear")
    print(f"\nThe linear layers run at {linear['flops'] / (linear['forward'] + linear['backward']) / 1e9 / peak:.0%} "
          f"of the peak: they are one big 2-D matmul each. Attention's matmuls are {config.n_head} heads x "
          f"batch small ones, and its softmax, like GELU and layer norm, is elementwise work on one core.")
    print("A linear layer's backward costs about twice its forward: two matmuls (dx and dW) for the forward's "
          "one. Freeze its weight and the dW matmul is skipped (part 4).")
    return rows, total


# ----------------------------------------------------------------------------------------------------
# 3. in-place NumPy

def gelu_one_expression(x):
    """GELU as the formula reads: every operator makes a new array the size of x."""
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + 0.044715 * x * x * x)))


def show_in_place(shape, repeats):
    section("3. the same GELU, as one expression and in place")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((shape[0], 256)).astype(np.float32)
    w = (rng.standard_normal((256, shape[1])) / 16).astype(np.float32)
    gelus = {"one expression": gelu_one_expression, "in place": lambda x: gelu_forward(x)[0]}
    times = {name: [] for name in gelus}
    for _ in range(repeats + 1):                     # in turns; the first round is a warm-up
        for name, gelu in gelus.items():
            x = a @ w                                # a new input each time, as in a training step, where
            t0 = time.perf_counter()                 # GELU's input is the c_fc layer's fresh output
            gelu(x)
            times[name].append(time.perf_counter() - t0)
    t = {name: float(np.median(ts[1:])) for name, ts in times.items()}
    x = a @ w
    difference = float(np.max(np.abs(gelu_one_expression(x) - gelu_forward(x)[0])))
    print("gelu_one_expression:  0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x * x * x)))")
    print("tinyllm.layers.gelu_forward: t = x * x; t *= ...; t += ...; t *= x; np.tanh(t, out=t); ...\n")
    print(f"on a new {shape} float32 input each time: {1000 * t['one expression']:.2f} ms as one expression, "
          f"{1000 * t['in place']:.2f} ms in place ({t['one expression'] / t['in place']:.1f}x); the results differ "
          f"by at most {difference:.1e} (float32 rounding).")
    print("Both do the same arithmetic. The expression makes nine new arrays and the in-place chain two, and\n"
          "memory that is new to the process must be handed out by the system and written for the first time.")
    return {"seconds": t, "max_difference": difference}


# ----------------------------------------------------------------------------------------------------
# 4. what freezing saves

def show_methods(config, B, repeats):
    section("4. a training step of each method, and the floor")
    rows = bench.bench_methods(config, B, repeats)
    print(f"{'method':8} {'ms/step':>8} {'x full':>7} {'trainable':>10}")
    for name, r in rows.items():
        print(f"{name:8} {1000 * r['seconds']:8.1f} {r['ratio_to_full']:7.2f} {r['trainable']:10,d}")
    floor = rows["frozen"]["ratio_to_full"]
    print(f"\n'frozen' trains nothing, yet costs {floor:.2f} of a full step: the gradient must still flow down "
          f"through every block to reach the first block's LoRA matrices, adapters, prefix or prompt, and a "
          f"frozen weight saves only its own gradient matmul (and its AdamW update). That is the floor for "
          f"LoRA and adapters, which see the same {config.block_size} tokens. Prefix and prompt tuning see "
          f"{config.block_size - 10} real tokens here (their 10 virtual ones take the rest of the context), so "
          f"they do a little less work per step. What PEFT saves for sure is memory and disk, not time.")
    print("(Each figure is a median over rounds, yet a busy machine can still move one by 10%: if a method lands "
          "under the floor, run the lesson again.)")
    return rows


# ----------------------------------------------------------------------------------------------------
# 5. generation

def show_generation(config, repeats):
    section("5. generation with and without the KV cache")
    g = bench.bench_generate(config, repeats=repeats)
    base = g["base"]
    print(f"greedy, 64 new tokens after 16, batch 1: {base['kv_cache_tokens_per_s']:,.0f} tokens/s with the KV cache, "
          f"{base['no_cache_tokens_per_s']:,.0f} without ({base['speedup']:.1f}x).")
    print("Without the cache every new token recomputes the whole sequence; with it, only the new position.\n")
    print(f"{'model':12} {'time x base':>12}")
    for name, r in g.items():
        print(f"{name:12} {r['ratio_to_base']:12.2f}")
    print("\nAdapters add two small layers to every block, and at batch 1 each extra call counts. LoRA's extra "
          "matmuls can be merged into the weights, which leaves the base's cost.")
    return g


# ----------------------------------------------------------------------------------------------------

def plot(profile, total, methods, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    rows = sorted(profile, key=lambda r: -(r["forward"] + r["backward"]))
    names = [r["layer"] for r in rows]
    forward = np.array([1000 * r["forward"] for r in rows])
    backward = np.array([1000 * r["backward"] for r in rows])
    ax1.bar(names, forward, color="tab:blue", label="forward")
    ax1.bar(names, backward, bottom=forward, color="tab:orange", label="backward")
    ax1.set_ylabel("ms per training step")
    ax1.set_title(f"Where a training step's time goes ({1000 * total:.0f} ms in all)")
    ax1.tick_params(axis="x", rotation=30)
    ax1.legend()
    ax1.grid(alpha=0.3, axis="y")
    names = list(methods)
    ratios = [methods[n]["ratio_to_full"] for n in names]
    ax2.bar(names, ratios, color=["tab:gray" if n == "frozen" else "tab:green" for n in names])
    ax2.axhline(methods["frozen"]["ratio_to_full"], color="k", ls="--", lw=1, label="nothing trainable (the floor)")
    ax2.set_ylabel("step time / full fine-tuning's")
    ax2.set_title("A training step of each method")
    ax2.legend(loc="lower right")
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(config=None, batch_size=LESSON_BATCH, repeats=5, gelu_shape=(2048, 512), out_dir=OUT_DIR):
    """Run the lesson.

    config: GPTConfig fields of the model to time (default: the lesson model, bench's "lesson" config);
    batch_size: sequences per step; repeats: timed runs per figure (medians); gelu_shape: GELU's input in
    part 3 (default: the lesson model's c_fc output, B*T rows of 4C).
    Returns a dict of the measurements (and the figure's path). Timings are this machine's, at this moment.
    """
    os.makedirs(out_dir, exist_ok=True)
    config = LESSON_CONFIG if config is None else GPTConfig(**config)
    peak, model = show_peak(config, batch_size, repeats)
    profile, total = show_profile(config, batch_size, peak)
    in_place = show_in_place(gelu_shape, repeats)
    methods = show_methods(config, batch_size, 2 * repeats)     # six models in turns: more rounds
    generation = show_generation(config, repeats)

    section("figure")
    path = os.path.join(out_dir, "where_the_time_goes.png")
    plot(profile, total, methods, path)
    print(f"saved {os.path.relpath(path)}: the step's time per layer, and each method's step against full")
    return dict(peak_gflops=peak, model=model, profile=profile, step_seconds=total, gelu=in_place,
                methods=methods, generation=generation, figures=[path])


if __name__ == "__main__":
    main()
