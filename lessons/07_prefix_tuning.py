"""
Lesson 07: prefix tuning.

When a GPT generates, it keeps the keys and values of every token it has read (the KV cache, lesson 02)
and each new token attends to them. Prefix tuning learns such a cache directly: every block gets P
"virtual tokens", keys and values that no text produced,

    h.{i}.attn.prefix_k, h.{i}.attn.prefix_v      each (P,C)

and every real token attends to them as if they had been read before it. Only these 2*L*P*C numbers
train. This lesson:

  1. get_peft_model(model, PrefixTuningConfig(...)): what trains, with the formula 2*L*P*C
  2. a prefix IS a KV cache: the prefix model's logits equal gpt_forward(base, idx, past=prefix), and a
     prefix initialised from text equals the base model reading that text first
  3. training on the record task, and generation with the trained prefix as the pre-filled cache
  4. does the length matter? P in {1, 5, 20}, trained alike
  5. does the initialisation matter? random keys and values against the real ones of a piece of text
  6. prefix_projection: an MLP that makes the prefixes while training (more parameters), of which only
     the prefixes are saved

Run from the repository root (1-2 minutes on 2 CPU cores, plus ~3 minutes of pretraining the first
time if no pretrained checkpoint exists yet):

    python lessons/07_prefix_tuning.py

Figures go to runs/lessons/07_prefix_tuning/.

Legend: B batch, T time, P virtual tokens (prefix length), C channels, NH heads, hs head size (C // NH),
L blocks, H the projection MLP's hidden size.
"""
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.plots import log_loss_axis, smooth
from tinyllm.presets import tuned_lrs

LRS = tuned_lrs()
from tinyllm.data import World
from tinyllm.finetune import VAL_EXAMPLES, finetune, full_copy_bytes, measure_base, saved_bytes, val_loss_fn
from tinyllm.model import gpt_forward
from tinyllm.peft.saving import read_adapter
from tinyllm.peft import PeftModel, PrefixTuningConfig, get_peft_model
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, indented, load_base, max_diff, same_length_prompts, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "07_prefix_tuning")
LR = LRS["prefix"]    # tinyllm.compare's, measured: the prefixes are few numbers and want a large step
LR_PROJECTION = 1e-2  # measured for the MLP on this task: 3e-3, 3e-2 and 1e-1 all ended higher


def prefix_as_cache(adapter, n_layer, n_head, B):
    """The prefixes of a prefix-tuning adapter as a KV cache: per block (k, v), each (B,NH,P,hs).

    A layer's keys are (P,C), C = NH * hs: split the channels into heads, as attention does.
    """
    past = []
    for i in range(n_layer):
        kv = []
        for name in ("prefix_k", "prefix_v"):
            a = adapter[f"h.{i}.attn.{name}"]                                   # (P,C)
            P, C = a.shape
            heads = a.reshape(P, n_head, C // n_head).transpose(1, 0, 2)        # (NH,P,hs)
            kv.append(np.broadcast_to(heads[None], (B, n_head, P, C // n_head)))  # (B,NH,P,hs), shared by the batch
        past.append(tuple(kv))
    return past


# ----------------------------------------------------------------------------------------------------
# 1. what trains, 2. a prefix is a KV cache

def show_trainable(pm, config):
    section("1. get_peft_model: what trains")
    pc = pm.active_peft_config                          # pm.config is the base model's GPTConfig, as in PEFT
    print(f"pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens={pc.num_virtual_tokens}))\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    L, P, C = config.n_layer, pc.num_virtual_tokens, config.n_embd
    n = sum(v.size for v in pm.trainable_parameters().values())
    print(f"That is exactly the size of a KV cache of P = {P} tokens: in each of the L = {L} blocks, P keys and "
          f"P values of C = {C} numbers ({n:,} counted).")
    return n


def show_kv_cache(pm, base, tok, x, init_text):
    section("2. a prefix IS a KV cache")
    config = base.config
    B, P = x.shape[0], pm.active_peft_config.num_virtual_tokens
    past = prefix_as_cache(pm.adapters[pm.active_adapter], config.n_layer, config.n_head, B)
    logits_prefix, _ = pm.forward(x)
    logits_cache, _, _ = gpt_forward(base.params, x, config, past=past)        # the plain base, a given past
    d_cache = max_diff(logits_prefix, logits_cache)
    print(f"The prefix model on {B} prompts, against the plain base given the prefixes as its past keys and values:")
    print(f"  past = [(prefix_k, prefix_v) of block i, each (P,C) -> (B,NH,P,hs)]   shapes {past[0][0].shape}")
    print(f"  max |logits(pm) - logits(gpt_forward(base.params, idx, past=past))| = {d_cache:g}")
    print(f"The real tokens take positions {P}, {P + 1}, ... after the prefix, as they would after {P} cached tokens.")

    text_config = PrefixTuningConfig(num_virtual_tokens=P, init="text", init_text=init_text)
    pm_text = get_peft_model(base, text_config, tokenizer=tok)
    text_ids = np.resize(tok.encode(init_text), P)                               # the text, cut (or repeated) to P
    logits_text, _ = pm_text.forward(x)
    logits_read, _ = base.forward(np.concatenate([np.broadcast_to(text_ids, (B, P)), x], axis=1))   # (B,P+T,V)
    d_text = max_diff(logits_text, logits_read[:, P:])
    print("\nPrefixTuningConfig(init='text', init_text=...) starts from the keys and values the base computes for")
    print(f"the first {P} characters of the text, {tok.decode(text_ids)!r}. The model with that prefix is the base")
    print("model reading the text before each prompt:")
    print(f"  max |logits(prefix from text) - logits(base on text + prompt)[:, {P}:]| = {d_text:.2e} "
          f"(float32: the same sums, in another order)")
    return dict(prefix_vs_kv_cache_max_diff=d_cache, text_prefix_vs_text_max_diff=d_text)


# ----------------------------------------------------------------------------------------------------
# 3. generation with the prefix as the pre-filled cache

def generate_from_cache(base, adapter, idx, n_new):
    """Greedy decoding with the plain base: the prefix is the cache the first real token finds."""
    config = base.config
    past = prefix_as_cache(adapter, config.n_layer, config.n_head, idx.shape[0])
    logits, _, cache = gpt_forward(base.params, idx, config, past=past)         # read the prompt after the prefix
    out = idx
    for _ in range(n_new):
        nxt = logits[:, -1].argmax(axis=-1)                                    # (B,)
        out = np.concatenate([out, nxt[:, None]], axis=1)
        logits, _, cache = gpt_forward(base.params, nxt[:, None], config, past=cache["present"])
    return out


def show_generation(loaded, base, tok, task):
    prompt, answer = task.test[0]
    idx = tok.encode(prompt)[None]                                              # (1,T)
    n_new = len(tok.encode(answer))
    by_hand = generate_from_cache(base, loaded.adapters[loaded.active_adapter], idx, n_new)
    by_library = loaded.generate(idx, n_new, temperature=0.0)
    same = bool(np.array_equal(by_hand, by_library))
    print("Greedy generation with the trained prefix as the pre-filled cache of the plain base:")
    print(f"  prompt {prompt!r}\n  truth  {answer!r}\n  wrote  {tok.decode(by_hand[0, idx.shape[1]:])!r}")
    print(f"The same tokens as loaded.generate(...): {same}")
    return same


# ----------------------------------------------------------------------------------------------------
# figures

def plot_curves(ax, runs, title):
    for (label, r), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green")):
        h = r["history"]
        ax.plot(h["step"], smooth(h["train_loss"], 10), color=color, lw=1.5, label=f"{label}: train (mean of 10 steps)")
        ax.plot(h["val_step"], h["val_loss"], "o--", color=color, lw=1.5, label=f"{label}: validation")
    log_loss_axis(ax)
    ax.set_xlabel(f"step (batches of {r['batch_size']} examples)")
    ax.set_ylabel("loss per answer token (nats, log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)


def plot_losses(init_runs, projection_runs, path):
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    plot_curves(axes[0], init_runs, "Initialisation: random prefixes vs the keys and values of text")
    plot_curves(axes[1], projection_runs, "Training the prefixes directly vs through an MLP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lengths(length_runs, init, path):
    lengths = list(length_runs)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    first = [length_runs[P]["history"]["val_loss"][0] for P in lengths]
    final = [length_runs[P]["final_val_loss"] for P in lengths]
    ax.plot(lengths, first, "s:", color="gray", label="before training (the initial prefix)")
    ax.plot(lengths, final, "o-", color="tab:blue", lw=2, label="after training")
    for P, v in zip(lengths, final):
        ax.annotate(f"{v:.2f}", (P, v), textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log")
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(P) for P in lengths])
    log_loss_axis(ax)
    ax.set_xlabel("prefix length P (virtual tokens per block, log scale)")
    ax.set_ylabel("validation loss per answer token (nats, log scale)")
    ax.set_title(f"Validation loss against the prefix length (init={init!r}, the same steps for every P)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=200, lr=LR, lr_projection=LR_PROJECTION, num_virtual_tokens=20, lengths=(1, 5, 20), batch_size=8,
         task_name="record", checkpoint=CHECKPOINT, config=None, n_test=None, n_val=VAL_EXAMPLES, seed=0,
         out_dir=OUT_DIR):
    """Run the lesson.

    steps, lr, batch_size: every training run's (lr_projection: the run with the MLP); num_virtual_tokens:
    P of the main runs; lengths: the P of the length sweep; task_name: 'record' or 'qa'; checkpoint: the
    pretrained model (made if missing); config: GPTConfig fields of a random model to use instead (for
    tests); n_test: score only the first n test examples (None: all); n_val: validation examples in the
    validation loss.
    Returns a dict of what it measured (and the paths of its figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config, seed)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    if n_test is not None:
        task = dataclasses.replace(task, test=task.test[:n_test])
    P = num_virtual_tokens
    init_text = "".join(task.train[1])             # a solved example: its keys and values start the prefix
    x = same_length_prompts(tok, task.val, 8)                                   # (B,T)
    c = base.config
    print(f"The base: {source}; {c.n_layer} blocks, {c.n_head} heads, C = {c.n_embd}.")

    pm = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=P), tokenizer=tok, seed=seed)
    n_trainable = show_trainable(pm, base.config)
    m_cache = show_kv_cache(pm, base, tok, x, init_text)

    section(f"3. training on the {task.name} task")
    print(f"e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}")
    print(f"tinyllm.finetune.finetune trains a copy with the loop of lesson 04: {steps} steps of {batch_size}, "
          f"AdamW at lr {lr:g}.")
    print(f"Every prompt must now fit in block_size - P = {c.block_size - P} positions.\n")
    before = measure_base(base, tok, task)
    run = dict(steps=steps, batch_size=batch_size, seed=seed, before=before, n_val=n_val,
               eval_interval=max(1, steps // 5), log_interval=max(1, steps // 5))
    text_cfg = PrefixTuningConfig(num_virtual_tokens=P, init="text", init_text=init_text)
    text_dir = os.path.join(out_dir, f"prefix_{task.name}")
    main_run = finetune(base, tok, text_cfg, task, lr=lr, out=indented, save_dir=text_dir, **run)
    h = main_run["history"]
    print(f"\nValidation loss per answer token: {h['val_loss'][0]:.3f} -> {h['val_loss'][-1]:.3f}; "
          f"test accuracy {main_run['accuracy_before']:.1%} -> {main_run['accuracy_after']:.1%} (exact match).")
    loaded = PeftModel.from_pretrained(base, text_dir, tokenizer=tok)
    print(f"\nloaded = PeftModel.from_pretrained(base, {os.path.relpath(text_dir)!r}): the trained prefix, read back "
          f"from the {main_run['saved_bytes']:,} bytes finetune saved.")
    same_tokens = show_generation(loaded, base, tok, task)

    section("4. does the length matter?")
    print(f"The same training for P in {list(lengths)}, init='text' (the first P characters of the example):\n")
    lengths_runs = {}
    for n in lengths:
        if n == P:
            lengths_runs[n] = main_run
            continue
        cfg = PrefixTuningConfig(num_virtual_tokens=n, init="text", init_text=init_text)
        lengths_runs[n] = finetune(base, tok, cfg, task, lr=lr, out=lambda line: None, **run)
    print(f"{'P':>4} {'trainable 2*L*P*C':>18} {'val loss before':>16} {'after':>7} {'accuracy':>9}")
    for n, r in lengths_runs.items():
        print(f"{n:>4} {r['trainable_params']:>18,} {r['history']['val_loss'][0]:>16.3f} {r['final_val_loss']:>7.3f} "
              f"{r['accuracy_after']:>9.1%}")

    section("5. does the initialisation matter?")
    print(f"P = {P} again, from random keys and values (normal, std 1) instead of those of the text:\n")
    random_run = finetune(base, tok, PrefixTuningConfig(num_virtual_tokens=P), task, lr=lr, out=lambda line: None,
                          **run)
    init_runs = {"init='text'": main_run, "init='random'": random_run}
    for label, r in init_runs.items():
        print(f"  {label:<14} val loss {r['history']['val_loss'][0]:7.3f} before, {r['final_val_loss']:.3f} after "
              f"{steps} steps; accuracy {r['accuracy_after']:.1%}")
    gap = [random_run["history"]["val_loss"][i] - main_run["history"]["val_loss"][i] for i in (0, -1)]
    print(f"Random minus text: {gap[0]:+.3f} nats at the start, {gap[1]:+.3f} after {steps} steps.")

    section("6. prefix_projection: train through an MLP, save only the prefixes")
    proj_cfg = PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True)
    pm_proj = get_peft_model(base, proj_cfg, tokenizer=tok)
    print(f"pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens={P}, prefix_projection=True)): an "
          f"embedding (P,C) and an MLP C -> H -> 2*L*C make every block's prefix.\n")
    pm_proj.print_trainable_parameters()
    print(pm_proj.formula())
    proj_dir = os.path.join(out_dir, f"prefix_projection_{task.name}")
    proj_run = finetune(base, tok, proj_cfg, task, lr=lr_projection, out=lambda line: None, save_dir=proj_dir, **run)
    arrays = read_adapter(base, proj_dir, False)[1]                  # what the file holds, in tinyllm's names
    shapes = sorted({a.shape for a in arrays.values()})
    print(f"\nTrained {proj_run['trainable_params']:,} numbers at lr {lr_projection:g}: val loss "
          f"{proj_run['history']['val_loss'][0]:.3f} -> {proj_run['final_val_loss']:.3f}, accuracy "
          f"{proj_run['accuracy_after']:.1%}")
    print(f"(the prefixes trained directly from a random start, at lr {lr:g}: {random_run['final_val_loss']:.3f}).")
    print(f"save_pretrained wrote {len(arrays)} arrays of shape {shapes} ({sum(a.size for a in arrays.values()):,} "
          f"numbers, {saved_bytes(proj_dir):,} bytes): the MLP's output, not the MLP.")
    loaded_proj = PeftModel.from_pretrained(base, proj_dir, tokenizer=tok)
    reloaded_val = val_loss_fn(tok, task, base.config.block_size, n=n_val, reserved=P)(loaded_proj)
    print(f"Loaded back, the prefixes alone give val loss {reloaded_val:.6f} (the trained model: "
          f"{proj_run['final_val_loss']:.6f}).")
    full_bytes = full_copy_bytes(base)
    print(f"\nOn disk per task: the prefix {saved_bytes(text_dir):,} bytes, a full copy of the model {full_bytes:,} "
          f"bytes.")
    projection_runs = {"direct (init='random')": random_run, "through the MLP": proj_run}

    section("figures")
    loss_path = os.path.join(out_dir, "loss_curves.png")
    length_path = os.path.join(out_dir, "prefix_length.png")
    plot_losses(init_runs, projection_runs, loss_path)
    plot_lengths(lengths_runs, "text", length_path)
    print(f"saved {os.path.relpath(loss_path)}: loss curves, random vs text init, direct vs through the MLP")
    print(f"saved {os.path.relpath(length_path)}: validation loss against the prefix length P")
    return dict(pretrained=config is None, trainable_params=n_trainable, **m_cache,
                generation_matches_cache=same_tokens, val_loss_before=h["val_loss"][0],
                val_loss_after=main_run["final_val_loss"], accuracy_before=main_run["accuracy_before"],
                accuracy_after=main_run["accuracy_after"], saved_bytes=main_run["saved_bytes"],
                full_copy_bytes=full_bytes,
                length_val_loss={n: r["final_val_loss"] for n, r in lengths_runs.items()},
                length_trainable={n: r["trainable_params"] for n, r in lengths_runs.items()},
                random_init_val_loss=random_run["final_val_loss"], text_init_val_loss=main_run["final_val_loss"],
                projection_trainable_params=proj_run["trainable_params"], projection_saved_numbers=sum(
                    a.size for a in arrays.values()), projection_val_loss=proj_run["final_val_loss"],
                projection_reloaded_val_loss=reloaded_val, figures=[loss_path, length_path])


if __name__ == "__main__":
    main()
