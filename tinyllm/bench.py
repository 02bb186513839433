"""
`python -m tinyllm bench`: how fast tinyllm trains and generates, and how close it runs to the machine.

Medians of several repeats, after a warm-up; what is compared is timed in turns, so that a shared,
noisy machine slows both sides alike.

  peak      float32 GFLOP/s of one large np.matmul: the ceiling for everything else
  model     forward+backward tokens/s and achieved GFLOP/s on the "lesson", "wide" and GPT-2 small configs,
            with one worker and with one per core (tinyllm.parallel), next to PyTorch eager on the same
            model when torch happens to be installed: each library in a process of its own, taking turns
  load      GPT.from_pretrained of a GPT-2 small safetensors file: seconds and peak memory
  layers    where a step's time goes, per layer, forward and backward, and its matmuls' GFLOP/s
  methods   each fine-tuning method's training-step time as a ratio to a full fine-tuning step (and
            the floor: a model with nothing trainable), and its peak memory next to the count of
            weights, gradients, AdamW state and activations
  generate  tokens/s with and without the KV cache

The README's Speed section keeps one run's figures, what made them faster (before/after), and why the
wide config still trails PyTorch.
"""
import cProfile
import importlib.util
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from .model import GPT, GPT2_SMALL, GPTConfig
from .optim import AdamW
from .parallel import cores, default_workers
from .tasks import context_room

CONFIGS = {  # name: (config, batch size, sequence length)
    "lesson": (GPTConfig(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=128), 16, 128),
    "wide": (GPTConfig(vocab_size=256, block_size=256, n_layer=6, n_head=8, n_embd=256), 8, 256),
    "gpt2-128": (GPTConfig(**GPT2_SMALL), 4, 128),        # GPT-2 small's sizes, random weights: no download
    "gpt2-512": (GPTConfig(**GPT2_SMALL), 1, 512),
}


def random_batch(config, B, T=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (B, T or config.block_size)
    return rng.integers(0, config.vocab_size, shape), rng.integers(0, config.vocab_size, shape)

# ----------------------------------------------------------------------------------------------------
# forward+backward, each library in a process of its own: two numerical libraries in one process slow
# each other down (both want every core), so a ratio measured that way is not either library's speed


def tinyllm_step(config, B, T, method, workers):
    """One training step's forward and backward (tinyllm.parallel: `workers` threads), as a function to time."""
    from .peft import LoraConfig, get_peft_model
    model = GPT(config, seed=0)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    x, y = random_batch(config, B, T)
    return lambda: model.forward_backward(x, y, workers=workers)


def torch_step(config, B, T, method):
    """The same model's forward+backward in PyTorch eager (float32), as a function to time; None without
    torch (it is not a requirement: only a yardstick when it happens to be installed). LoRA: the base
    frozen, scale * (x A) B added to c_attn."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.manual_seed(0)
    lora = method == "lora"
    params = {k: torch.tensor(v, requires_grad=not lora) for k, v in GPT(config, seed=0).params.items()}
    C, NH = config.n_embd, config.n_head
    extra = {f"{i}{ab}": (0.01 * torch.randn(*shape)).requires_grad_() for i in range(config.n_layer)
             for ab, shape in (("A", (C, 8)), ("B", (8, 3 * C)))} if lora else {}
    x, y = (torch.tensor(a) for a in random_batch(config, B, T))

    def forward():
        h = params["wte.weight"][x] + params["wpe.weight"][:T]
        for i in range(config.n_layer):
            p = lambda n: params[f"h.{i}.{n}"]
            a = F.layer_norm(h, (C,), p("ln_1.weight"), p("ln_1.bias"), 1e-5)
            qkv = a @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
            if lora:
                qkv = qkv + 2.0 * (a @ extra[f"{i}A"]) @ extra[f"{i}B"]
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in qkv.split(C, dim=2))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            h = h + a @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
            m = F.layer_norm(h, (C,), p("ln_2.weight"), p("ln_2.bias"), 1e-5)
            m = F.gelu(m @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"), approximate="tanh")
            h = h + m @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
        h = F.layer_norm(h, (C,), params["ln_f.weight"], params["ln_f.bias"], 1e-5)
        return F.cross_entropy((h @ params["wte.weight"].T).view(-1, config.vocab_size), y.view(-1))

    def step():
        for t in (*params.values(), *extra.values()):
            t.grad = None
        forward().backward()
    return step


def time_step(spec, steps):
    """In this process: build the step spec describes, warm it up, and time `steps` of it. Returns the median
    seconds. spec: {config, method, library 'tinyllm' or 'torch', workers}."""
    config, B, T = CONFIGS[spec["config"]]
    if spec["library"] == "torch":
        import torch
        torch.set_num_threads(cores())
        step = torch_step(config, B, T, spec["method"])
    else:
        step = tinyllm_step(config, B, T, spec["method"], spec["workers"])
    step()                                                       # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def in_own_process(spec, steps):
    """time_step(spec, steps) in a fresh Python process (`python -m tinyllm.bench SPEC`)."""
    done = subprocess.run([sys.executable, "-m", "tinyllm.bench", json.dumps({**spec, "steps": steps})],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"the timed process for {spec} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_model(config, B, T=None, workers=1, repeats=5):
    """In this process: seconds per forward+backward step (median of repeats), tokens/s and the matmul GFLOP/s
    it achieves, of a GPT of this config on B sequences of T tokens, split over `workers` threads."""
    T = T or config.block_size
    model = GPT(config, seed=0)
    x, y = random_batch(config, B, T)
    model.forward_backward(x, y, workers=workers)                 # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward_backward(x, y, workers=workers)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    return {"seconds": seconds, "tokens_per_s": B * T / seconds, "gflops": train_flops(config, B, T) / seconds / 1e9}


def bench_model(name, method="full", repeats=3, torch_ref=True, steps=None):
    """Seconds per forward+backward step and tokens/s of tinyllm with 1 worker and with one per core, and of
    PyTorch eager when installed: each in its own process, the processes taking turns, medians of repeats."""
    config, B, T = CONFIGS[name]
    steps = steps or (2 if config.n_embd >= 768 else 10)
    libraries = {"tinyllm, 1 worker": dict(library="tinyllm", workers=1)}
    if default_workers(B) > 1:                  # a batch of 1 has nothing to split
        libraries[f"tinyllm, {default_workers(B)} workers"] = dict(library="tinyllm", workers=default_workers(B))
    if torch_ref and importlib.util.find_spec("torch") is not None:
        libraries["torch eager"] = dict(library="torch", workers=None)
    seconds = {k: [] for k in libraries}
    for _ in range(repeats):
        for k, lib in libraries.items():
            seconds[k].append(in_own_process({"config": name, "method": method, **lib}, steps))
    rows = {k: {"seconds": float(np.median(v)), "tokens_per_s": B * T / float(np.median(v))} for k, v in seconds.items()}
    flops = train_flops(config, B, T)
    for r in rows.values():
        r["gflops"] = flops / r["seconds"] / 1e9
    return rows


def bench_load(folder_bytes=None, repeats=3):
    """Reading GPT-2 small's weights (random, written here: about 500 MB) with GPT.from_pretrained, in a process
    of its own: seconds, and how much its peak memory grew, against the file's size."""
    with tempfile.TemporaryDirectory() as tmp:
        GPT(GPTConfig(**GPT2_SMALL), seed=0).save_pretrained(tmp)
        size = os.path.getsize(os.path.join(tmp, "model.safetensors"))
        runs = [in_own_process({"load": tmp}, 1) for _ in range(repeats)]
    return {"file_bytes": size, "seconds": float(np.median([r["seconds"] for r in runs])),
            "peak_growth_bytes": float(np.median([r["peak_growth"] for r in runs]))}


def peak_memory():
    """This process's peak resident memory in bytes: Linux's VmHWM, which a new program starts afresh
    (getrusage's ru_maxrss would carry over the peak of the process that started it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def time_load(folder):
    """In this process: seconds to load a GPT-2 folder, and the growth of the process's peak resident memory."""
    before = peak_memory()
    t0 = time.perf_counter()
    GPT.from_pretrained(folder)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_growth": peak_memory() - before}


def matmul_peak(n=2048, repeats=5):
    """float32 GFLOP/s of an n x n x n matmul (2 n^3 flops), from its fastest run: a ceiling is what the
    machine can do, and a busy moment only ever slows a run down (every other figure is a median)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a                                                        # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def train_flops(config, B, T):
    """Matmul flops of one forward+backward (backward = 2x forward): the linears, attention's two
    batched matmuls (the full T x T, as computed), and the tied head."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    linear = 2 * B * T * (C * 3 * C + C * C + C * 4 * C + 4 * C * C) * L
    attention = 2 * 2 * B * T * T * C * L
    head = 2 * B * T * C * V
    return 3 * (linear + attention + head)


# ----------------------------------------------------------------------------------------------------
# where the time goes: Python's profiler times every layer function the model calls

LAYER_FUNCS = ["embedding", "layernorm", "linear", "gelu", "attention", "cross_entropy"]


def layer_flops(config, B, T):
    """Matmul flops of a step's layer calls (the elementwise layers do none): the linears' x @ W forward,
    and dx = dout @ W^T and dW = x^T @ dout backward; attention's two batched matmuls forward (the full
    T x T, as computed) and four backward."""
    C, L = config.n_embd, config.n_layer
    linear = 2 * B * T * (C * 3 * C + C * C + C * 4 * C + 4 * C * C) * L
    attention = 2 * 2 * B * T * T * C * L
    return {"linear": 3 * linear, "attention": 3 * attention}


def profile_layers(config, B, repeats=3):
    """Per layer (summed over the blocks): seconds per step in its forward and backward, and the matmul
    flops it does per step (to show how close to the matmul peak each part runs). cProfile times every
    call of a function in tinyllm/layers.py, inclusive of what it calls; nothing in the model changes."""
    model = GPT(config, seed=0)
    x, y = random_batch(config, B)
    model.forward(x, y)                                          # warm-up
    model.backward()
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for _ in range(repeats):
        model.forward(x, y)
        model.backward()
    profiler.disable()
    total = (time.perf_counter() - t0) / repeats
    seconds = {name: cumulative / repeats for (file, _, name), (_, _, _, cumulative, _) in
               pstats.Stats(profiler).stats.items() if os.path.basename(file) == "layers.py"}
    flops = layer_flops(config, B, config.block_size)
    rows = [{"layer": name, "forward": seconds[f"{name}_forward"], "backward": seconds.get(f"{name}_backward", 0.0),
             "flops": flops.get(name, 0)} for name in LAYER_FUNCS if f"{name}_forward" in seconds]
    return rows, total


def layer_table(rows, total):
    """profile_layers' rows as lines of a table, slowest layer first, and the time outside the layers."""
    lines = [f"{'layer':14} {'forward ms':>10} {'backward ms':>11} {'share':>6} {'GFLOP/s':>8}"]
    for r in sorted(rows, key=lambda r: -(r["forward"] + r["backward"])):
        seconds = r["forward"] + r["backward"]
        rate = f"{r['flops'] / seconds / 1e9:8.1f}" if r["flops"] else f"{'-':>8}"
        lines.append(f"{r['layer']:14} {1000 * r['forward']:10.1f} {1000 * r['backward']:11.1f} "
                     f"{100 * seconds / total:5.1f}% {rate}")
    rest = total - sum(r["forward"] + r["backward"] for r in rows)
    lines.append(f"{'the rest':14} {'':22} {100 * rest / total:5.1f}%   ({1000 * rest:.1f} ms: residual adds, "
                 f"the tied head's matmul, Python)")
    return lines


# ----------------------------------------------------------------------------------------------------
# the fine-tuning methods side by side

def method_configs():
    """{name: a fresh config} of each method, sized as `python -m tinyllm compare` sizes them."""
    from .presets import MAIN_METHODS, method_config
    return {name: method_config(name) for name in MAIN_METHODS}


def interleaved_medians(steps, repeats):
    """Median seconds of each function in steps ({name: fn}), timed in turns (one call of each per
    round), so that a change in the machine's load hits every method alike."""
    for fn in steps.values():
        fn()                                                   # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_methods(config, B, repeats=5):
    """Per method: step seconds (forward+backward+AdamW, timed in turns with the other methods), ratio to
    full fine-tuning, trainable parameters, and memory: weights, gradients, AdamW state, the activations
    the forward caches for the backward, and the peak of a whole step (tracemalloc).

    The extra row "frozen" is the base model with nothing trainable. Its backward still carries the
    gradient down through every block, as every method here must (each trains something in or below the
    first block), so its ratio is the floor for a method on the same tokens (prefix and prompt tuning see
    10 fewer real ones: their virtual tokens take that room)."""
    from .memory import activation_arrays, activation_count
    from .peft import FullFineTuningConfig, get_peft_model
    x, y = random_batch(config, B)
    runs, configs = {}, method_configs()   # runs: name -> (model, its cache after a forward, optimizer, T)
    for name, cfg in configs.items():
        pm = get_peft_model(GPT(config, seed=0), cfg)
        T = context_room(pm)                                        # leave room for virtual tokens
        runs[name] = (pm, lambda pm=pm: pm._cache, AdamW(pm.trainable_parameters(), lr=1e-4), T)
    frozen = GPT(config, seed=0)
    frozen.freeze()
    runs["frozen"] = (frozen, lambda: frozen._cache, AdamW({}, lr=1e-4), config.block_size)
    configs["frozen"] = FullFineTuningConfig()                       # the same activations as full

    def step(model, opt, T):
        model.forward(x[:, :T], y[:, :T])
        opt.step(model.backward())
    seconds = interleaved_medians({name: lambda r=r: step(r[0], r[2], r[3]) for name, r in runs.items()}, repeats)
    rows = {}
    for name, (model, cache, opt, T) in runs.items():
        weights = model.base_model.params if name != "frozen" else model.params
        adapters = [a for ad in model.adapters.values() for a in ad.values()] if name != "frozen" else []
        tracemalloc.start()
        model.forward(x[:, :T], y[:, :T])
        activations = sum(a.nbytes for a in activation_arrays(cache(), [*weights.values(), *adapters]))
        opt.step(model.backward())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        trainable = sum(v.size for v in model.trainable_parameters().values())
        itemsize = frozen.dtype.itemsize
        n_weights = sum(a.size for a in [*weights.values(), *adapters])
        r = rows[name] = {"seconds": seconds[name], "tokens_per_s": B * T / seconds[name], "trainable": trainable,
                          "weights_bytes": n_weights * itemsize, "grad_bytes": trainable * itemsize,
                          "adam_bytes": opt.state_bytes(), "activation_bytes": activations,
                          "counted_activation_bytes": activation_count(config, configs[name], B, T) * itemsize,
                          "ratio_to_full": seconds[name] / seconds["full"]}
        # tracemalloc sees what the step allocates; the weights and AdamW's state were there before it
        r["peak_step_bytes"] = peak + r["weights_bytes"] + r["adam_bytes"]
        r["counted_bytes"] = r["weights_bytes"] + r["grad_bytes"] + r["adam_bytes"] + r["counted_activation_bytes"]
    return rows


def generation_models(config):
    """The base model, and each method's model as it generates (LoRA both unmerged and merged)."""
    from .peft import get_peft_model
    models = {"base": GPT(config, seed=0)}
    for name, cfg in method_configs().items():
        models[name] = get_peft_model(GPT(config, seed=0), cfg)
        models[name].eval()
    models["lora merged"] = get_peft_model(GPT(config, seed=0), method_configs()["lora"])   # its own config
    models["lora merged"].merge_adapter()                       # W + scale * A @ B: no extra matmuls left
    return models


def bench_generate(config, n_new=64, B=1, repeats=3):
    """Greedy generation tokens/s of each model (generation_models), with the KV cache (model.generate)
    and without it (the whole sequence recomputed for every new token), all timed in turns."""
    prompt = random_batch(config, B)[0][:, :16]
    steps, generation = {}, generation_models(config)
    for name, model in generation.items():
        room = context_room(model)

        def no_cache(model=model, room=room):
            out = prompt
            for _ in range(n_new):
                logits, _ = model.forward(out[:, -room:])
                out = np.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
            return out
        steps[name, "cache"] = lambda model=model: model.generate(prompt, n_new, temperature=0)
        steps[name, "none"] = no_cache
    t = interleaved_medians(steps, repeats)
    rows = {}
    for name in generation:
        with_cache, without = t[name, "cache"], t[name, "none"]
        rows[name] = {"kv_cache_tokens_per_s": B * n_new / with_cache, "no_cache_tokens_per_s": B * n_new / without,
                      "speedup": without / with_cache, "ratio_to_base": with_cache / t["base", "cache"]}
    return rows


# ----------------------------------------------------------------------------------------------------

def mib(n):
    return f"{n / 2 ** 20:.2f}"


def run(configs=("lesson", "wide", "gpt2-128", "gpt2-512"), repeats=3, torch_ref=True, out=print):
    """Run every benchmark, print the tables, and return the figures as a dict."""
    results = {"peak_gflops": matmul_peak(repeats=max(3, repeats)), "cores": cores()}
    out(f"float32 matmul peak (2048^3 np.matmul, fastest of {max(3, repeats)} runs): {results['peak_gflops']:.1f} "
        f"GFLOP/s on {cores()} cores; every other figure is a median of {repeats} runs")
    out("\nforward+backward, float32: each library in a process of its own, the processes taking turns")
    out(f"{'config':10} {'method':6} {'batch x T':>10} {'library':22} {'ms/step':>9} {'tokens/s':>9} {'GFLOP/s':>8} "
        f"{'x torch':>8}")
    results["model"] = {}
    for name in configs:
        config, B, T = CONFIGS[name]
        for method in (("full", "lora") if name.startswith("gpt2") else ("full",)):
            rows = results["model"][f"{name} {method}"] = bench_model(name, method, repeats, torch_ref)
            torch_s = rows.get("torch eager", {}).get("seconds")
            for lib, r in rows.items():
                ratio = f"{torch_s / r['seconds']:8.2f}" if torch_s else f"{'-':>8}"
                out(f"{name:10} {method:6} {f'{B}x{T}':>10} {lib:22} {1e3 * r['seconds']:9.1f} {r['tokens_per_s']:9.0f} "
                    f"{r['gflops']:8.1f} {ratio}")
    out("(x torch: tinyllm's speed as a multiple of PyTorch eager's on the same model; above 1 is faster)")

    if any(n.startswith("gpt2") for n in configs):
        load = results["load"] = bench_load(repeats=repeats)
        out(f"\nGPT.from_pretrained of GPT-2 small ({load['file_bytes'] / 2 ** 20:.0f} MiB model.safetensors), in a "
            f"process of its own: {load['seconds']:.2f} s; peak memory grew by {load['peak_growth_bytes'] / 2 ** 20:.0f} MiB, "
            f"{load['peak_growth_bytes'] / load['file_bytes']:.2f} x the file (read straight into the model's arrays)")

    config, B, _ = CONFIGS["lesson"]
    rows, total = profile_layers(config, B)
    results["layers"] = {r["layer"]: r for r in rows}
    out(f"\nwhere a step's time goes (lesson config, one worker, {1000 * total:.1f} ms per step; GFLOP/s of the "
        f"layers' matmuls, against the {results['peak_gflops']:.0f} peak)")
    for line in layer_table(rows, total):
        out(line)

    methods = bench_methods(config, B, repeats)
    results["methods"] = methods
    out(f"\ntraining step per method (lesson config, batch {B}, timed in turns; prefix/prompt use 10 of "
        f"the positions)")
    out(f"{'method':8} {'ms/step':>8} {'x full':>7} {'trainable':>10} | MiB counted: {'weights':>7} {'grads':>7} "
        f"{'AdamW':>7} {'activ.':>7} {'sum':>7} | MiB measured: {'peak':>7}")
    for name, r in methods.items():
        counted = [r[k] for k in ("weights_bytes", "grad_bytes", "adam_bytes", "counted_activation_bytes",
                                  "counted_bytes")]
        out(f"{name:8} {1000 * r['seconds']:8.1f} {r['ratio_to_full']:7.2f} {r['trainable']:10,d} | "
            f"{'':12} {' '.join(f'{mib(n):>7}' for n in counted)} | {'':13} {mib(r['peak_step_bytes']):>7}")
    out("(activ.: what tinyllm.memory counts the forward keeps for the backward. peak: the step's own "
        "allocations at their highest (tracemalloc), plus the weights and AdamW state held before it)")
    out(f"(frozen: nothing trained, but the gradient still flows down through every block, as it must for each "
        f"method here: the floor for LoRA and adapters at {methods['frozen']['ratio_to_full']:.2f}x; prefix and "
        f"prompt see 10 fewer real tokens)")

    g = bench_generate(config)
    results["generate"] = g
    out("\ngreedy generation (lesson config, 64 new tokens after 16, batch 1, timed in turns)")
    out(f"{'model':12} {'KV cache tok/s':>14} {'no cache tok/s':>14} {'speedup':>8} {'time x base':>12}")
    for name, r in g.items():
        out(f"{name:12} {r['kv_cache_tokens_per_s']:14.0f} {r['no_cache_tokens_per_s']:14.0f} "
            f"{r['speedup']:7.1f}x {r['ratio_to_base']:12.2f}")
    return results


if __name__ == "__main__":      # a timed process of bench_model or bench_load: one JSON line out
    spec = json.loads(sys.argv[1])
    result = time_load(spec["load"]) if "load" in spec else time_step(spec, spec["steps"])
    print(json.dumps(result))
