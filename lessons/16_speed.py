"""
Lesson 16: where the time goes.

NumPy hands every matrix multiply to BLAS, which runs it on all cores at close to the machine's peak.
Everything else (the softmax, GELU, layer norm, each `+` and `*`) is NumPy running one operator at a time,
one pass over the array each, on one core. So in one process a training step is fast exactly where it is a
matmul, and the rest is what remains to shave. (tinyllm's training loop also splits each batch over the
cores, data parallelism, so that the elementwise work runs on every core too: lesson 19. Here the parts
are timed in one worker, to see them.) This lesson

  1. measures the machine's float32 matmul peak, and a training step against it,
  2. profiles one training step layer by layer: forward, backward, and GFLOP/s of the matmuls,
  3. times GELU written as one expression and as a chain of in-place steps: the same numbers, fewer new
     arrays,
  4. times a training step of each method next to a model with nothing trainable: the most that freezing
     weights can save,
  5. times generation with and without the KV cache,
  6. draws the figure: time per layer, and each method's step against full fine-tuning's.

The machine's load changes from second to second, so every comparison here is timed in turns (one run of
each, round after round) and reported as medians. `python -m tinyllm bench` runs the same measurements on
larger models, next to PyTorch when it is installed.

Run from the repository root (no fine-tuning runs; README.md has the measured time):

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
from tinyllm.model import GPT, GPTConfig
from tinyllm.parallel import cores
from tinyllm.peft import method_of
from lessons.common import lesson_section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "16_speed")
LESSON_CONFIG, LESSON_BATCH, _ = bench.CONFIGS["lesson"]   # the model of lessons 04-18, and its batch


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. the matmul peak, and a training step against it")
def show_peak(config, B, repeats):
    """The ceiling: one 2048 x 2048 float32 matmul, its fastest run (a busy moment only ever slows a run
    down). Nothing here does more arithmetic per second. Then forward + backward of the model in one
    worker, and its matmul work per second as a share of that ceiling; and the same step split over one
    worker per core, as the training loop runs it (lesson 19). The two are timed in turns, medians."""
    peak = bench.matmul_peak(repeats=repeats)
    model = GPT(config, seed=0)
    x, y = bench.random_batch(config, B)
    n = cores()
    steps = {w: (lambda w=w: model.forward_backward(x, y, workers=w)) for w in sorted({1, n})}
    seconds = bench.interleaved_medians(steps, repeats)
    flops = bench.train_flops(config, B, config.block_size)
    one = {"seconds": seconds[1], "tokens_per_s": B * config.block_size / seconds[1], "gflops": flops / seconds[1] / 1e9}
    print(f"matmul peak: {peak:.1f} GFLOP/s")
    print(f"a training step's forward + backward, batch {B} x {config.block_size} tokens, one worker: "
          f"{1000 * one['seconds']:.1f} ms, {one['tokens_per_s']:,.0f} tokens/s, {one['gflops']:.1f} GFLOP/s of "
          f"matmul work = {100 * one['gflops'] / peak:.0f}% of the peak")
    if n > 1:
        one["seconds_all_cores"] = seconds[n]
        print(f"the same step over {n} workers (one BLAS thread each): {1000 * seconds[n]:.1f} ms "
              f"({seconds[1] / seconds[n]:.2f}x as fast)")
    return peak, one


@lesson_section("2. where a training step's time goes, layer by layer")
def show_profile(config, B, peak):
    """cProfile times every call of a function in tinyllm/layers.py (forward and backward, summed over the
    blocks); GFLOP/s is the rate of the layer's own matmuls. A linear layer is one big 2-D matmul. Attention's
    matmuls are NH heads x batch small ones, and its softmax, like GELU and layer norm, is elementwise work
    on one core. A linear layer's backward costs about twice its forward: two matmuls (dx and dW) for the
    forward's one. Freeze its weight and the dW matmul is skipped (part 4)."""
    rows, total = bench.profile_layers(config, B)
    print("\n".join(bench.layer_table(rows, total)))
    linear = next(r for r in rows if r["layer"] == "linear")
    print(f"\nThe linear layers run at {linear['flops'] / (linear['forward'] + linear['backward']) / 1e9 / peak:.0%} "
          f"of the peak.")
    return rows, total


def gelu_one_expression(x):
    """GELU as the formula reads: every operator makes a new array the size of x."""
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + 0.044715 * x * x * x)))


@lesson_section("3. the same GELU, as one expression and in place")
def show_in_place(shape, repeats):
    """gelu_one_expression: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x * x * x))).
    tinyllm.layers.gelu_forward: t = x * x; t *= ...; t += ...; t *= x; np.tanh(t, out=t); ...
    Both do the same arithmetic. The expression makes nine new arrays and the in-place chain two, and memory
    that is new to the process must be handed out by the system and written for the first time. Each gets a
    new input every time, as in a training step, where GELU's input is the c_fc layer's fresh output."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((shape[0], 256)).astype(np.float32)
    w = (rng.standard_normal((256, shape[1])) / 16).astype(np.float32)
    gelus = {"one expression": gelu_one_expression, "in place": lambda x: gelu_forward(x)[0]}
    times = {name: [] for name in gelus}
    for _ in range(repeats + 1):                     # in turns; the first round is a warm-up
        for name, gelu in gelus.items():
            x = a @ w                                # a new input each time
            t0 = time.perf_counter()
            gelu(x)
            times[name].append(time.perf_counter() - t0)
    t = {name: float(np.median(ts[1:])) for name, ts in times.items()}
    x = a @ w
    difference = float(np.max(np.abs(gelu_one_expression(x) - gelu_forward(x)[0])))
    print(f"on a {shape} float32 input: {1000 * t['one expression']:.2f} ms as one expression, "
          f"{1000 * t['in place']:.2f} ms in place ({t['one expression'] / t['in place']:.1f}x); the results differ "
          f"by at most {difference:.1e} (float32 rounding).")
    return {"seconds": t, "max_difference": difference}


@lesson_section("4. a training step of each method, and the floor")
def show_methods(config, B, repeats):
    """A whole training step (forward, backward, AdamW) of each method, timed in turns, as a fraction of full
    fine-tuning's. 'frozen' is the base model with nothing trainable: the gradient must still flow down
    through every block to reach the first block's LoRA matrices, adapters, (IA)^3 scalings, prefix or
    prompt, and a frozen weight saves only its own gradient matmul (and its AdamW update). That is the floor
    for a method that sees the same tokens. What PEFT saves for sure is memory and disk, not time."""
    rows = bench.bench_methods(config, B, repeats)
    print(f"{'method':8} {'ms/step':>8} {'x full':>7} {'trainable':>10}")
    for name, r in rows.items():
        print(f"{name:8} {1000 * r['seconds']:8.1f} {r['ratio_to_full']:7.2f} {r['trainable']:10,d}")
    virtual = {name: method_of(cfg).reserved_positions(cfg) for name, cfg in bench.method_configs().items()}
    fewer = ", ".join(f"{name} {config.block_size - P}" for name, P in virtual.items() if P)
    print(f"\n'frozen' costs {rows['frozen']['ratio_to_full']:.2f} of a full step. Every method sees {config.block_size} "
          f"real tokens per sequence except those whose virtual tokens take part of the context ({fewer}): they do "
          f"a little less work per step.")
    print("(Each figure is a median over rounds, yet a busy machine can still move one by 10%: if a method lands "
          "under the floor, run the lesson again.)")
    return rows


@lesson_section("5. generation with and without the KV cache")
def show_generation(config, repeats):
    """Greedy generation, 64 new tokens after 16, batch 1. Without the cache every new token recomputes the
    whole sequence; with it, only the new position. Then each method's model, generating with the cache,
    against the base: adapters add two small layers to every block, and at batch 1 each extra call counts.
    LoRA's extra matmuls can be merged into the weights, which leaves the base's cost."""
    g = bench.bench_generate(config, repeats=repeats)
    base = g["base"]
    print(f"base model: {base['kv_cache_tokens_per_s']:,.0f} tokens/s with the KV cache, "
          f"{base['no_cache_tokens_per_s']:,.0f} without ({base['speedup']:.1f}x).\n")
    print(f"{'model':12} {'time x base':>12}")
    for name, r in g.items():
        print(f"{name:12} {r['ratio_to_base']:12.2f}")
    return g


@lesson_section("6. the figure")
def save_figure(profile, total, methods, out_dir):
    """where_the_time_goes.png: left, a training step's milliseconds per layer, forward and backward; right,
    each method's step time as a fraction of full fine-tuning's, with the floor (nothing trainable)."""
    path = os.path.join(out_dir, "where_the_time_goes.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    rows = sorted(profile, key=lambda r: -(r["forward"] + r["backward"]))
    names = [r["layer"] for r in rows]
    forward = np.array([1000 * r["forward"] for r in rows])
    backward = np.array([1000 * r["backward"] for r in rows])
    ax1.bar(names, forward, color="tab:blue", label="forward")
    ax1.bar(names, backward, bottom=forward, color="tab:orange", label="backward")
    ax1.set_ylabel("ms per training step (one worker)")
    ax1.set_title(f"Where a training step's time goes ({1000 * total:.0f} ms in all)")
    ax1.tick_params(axis="x", rotation=30)
    ax1.legend()
    ax1.grid(alpha=0.3, axis="y")
    names = list(methods)
    ax2.bar(names, [methods[n]["ratio_to_full"] for n in names],
            color=["tab:gray" if n == "frozen" else "tab:green" for n in names])
    ax2.axhline(methods["frozen"]["ratio_to_full"], color="k", ls="--", lw=1, label="nothing trainable (the floor)")
    ax2.set_ylabel("step time / full fine-tuning's")
    ax2.set_title("A training step of each method (forward, backward, AdamW)")
    ax2.legend(loc="lower right")
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {os.path.relpath(path)}")
    return path


# ----------------------------------------------------------------------------------------------------

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
    methods = show_methods(config, batch_size, 2 * repeats)     # seven models in turns: more rounds
    generation = show_generation(config, repeats)
    path = save_figure(profile, total, methods, out_dir)
    return dict(peak_gflops=peak, model=model, profile=profile, step_seconds=total, gelu=in_place,
                methods=methods, generation=generation, figures=[path])


if __name__ == "__main__":
    main()
