"""
Lesson 07: prefix tuning.

When a GPT generates, it keeps the keys and values of every token it has read (the KV cache, lesson 02)
and each new token attends to them. Prefix tuning learns such a cache directly: every block gets P
"virtual tokens", keys and values that no text produced,

    h.{i}.attn.prefix_k, h.{i}.attn.prefix_v      each (P,C)

and every real token attends to them as if they had been read before it. Only these 2*L*P*C numbers
train.

Prefix tuning is often described as "trainable tokens at the beginning of every input". That sentence
describes prompt tuning (lesson 08), a different method: a prompt gives the FIRST block P learned input
vectors (P*C numbers), and every block computes its own keys and values from them with its frozen
weights; a prefix gives EVERY block its keys and values directly (2*L*P*C numbers). Section 3 shows the
difference, measured.

  1. get_peft_model(model, PrefixTuningConfig(...)): what trains, with the formula 2*L*P*C
  2. a prefix IS a KV cache: the prefix model's logits equal gpt_forward(base, idx, past=prefix), and a
     prefix initialised from text equals the base model reading that text first
  3. a prefix is not a prompt: what trains and where each enters; every prompt is a prefix, not the reverse
  4. training on the lab's task (extract), and generation with the trained prefix as the pre-filled cache
  5. does the length matter? P in {1, 5, 20}, trained alike
  6. does the initialisation matter? random keys and values against the real ones of a piece of text
  7. prefix_projection: an MLP that makes the prefixes while training (more parameters), of which only
     the prefixes are saved

Run from the repository root (a few minutes on 2 cores, plus a pretraining first if no pretrained model
exists yet; README.md has the times measured):

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
import matplotlib.ticker
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.data import World
from tinyllm.finetune import VAL_EXAMPLES, finetune, full_copy_bytes, measure_base, saved_bytes, val_loss_fn
from tinyllm.model import gpt_forward
from tinyllm.peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from tinyllm.peft.saving import read_adapter
from tinyllm.plots import log_loss_axis, smooth
from tinyllm.presets import DEFAULT_TASK, tuned_lrs
from tinyllm.tasks import get_task
from lessons.common import (CHECKPOINT, human_bytes, indented, lesson_section, load_base, lr_source, max_diff,
                            same_length_prompts)

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "07_prefix_tuning")
LR = tuned_lrs()["prefix"]    # the sweep's for prefix tuning on extract: few numbers, each wants a large step
LR_PROJECTION = 1e-2          # chosen by hand on extract, as no sweep covers the MLP: its weights are
                              # ordinary matrices, not raw keys and values, and want a smaller step


def prefix_as_cache(adapter, n_layer, n_head, B):
    """The prefixes of a prefix-tuning adapter as a KV cache: per block (k, v), each (B,NH,P,hs).

    A block's keys are (P,C), C = NH * hs: split the channels into heads, as attention does.
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


def quiet(line):
    """A progress printer that prints nothing: the runs after the first are summed up in a table."""


# ----------------------------------------------------------------------------------------------------
# the lesson's sections, in the order they run

@lesson_section("1. get_peft_model: what trains")
def show_trainable(pm, base, source):
    """PrefixTuningConfig(num_virtual_tokens=P) adds to every block's attention P keys and P values of C
    numbers each, and freezes everything else: 2 * L * P * C trainable numbers, exactly the size of a KV
    cache of P tokens. (pm.config is the base model's GPTConfig, as in PEFT; the prefix settings are
    pm.active_peft_config.)"""
    c, pc = base.config, pm.active_peft_config
    print(f"The base: {source}; {c.n_layer} blocks, {c.n_head} heads, C = {c.n_embd}.")
    print(f"pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens={pc.num_virtual_tokens}))\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    n = sum(v.size for v in pm.trainable_parameters().values())
    print(f"Counted: {n:,}, a KV cache of P = {pc.num_virtual_tokens} tokens in each of the L = {c.n_layer} blocks.")
    return n


@lesson_section("2. a prefix IS a KV cache")
def show_kv_cache(pm, base, tok, x, init_text):
    """Two exact identities. First, the prefix model is the plain base given the prefixes as its past
    keys and values (gpt_forward(..., past=...), the call lesson 02 used to generate with a cache): the
    real tokens take positions P, P+1, ... after the prefix, as they would after P cached tokens.
    Second, PrefixTuningConfig(init='text', init_text=...) starts from the keys and values the base
    computes for the first P characters of a text: the model with that prefix is the base reading the
    text before every prompt (the paper's initialisation from real words)."""
    config = base.config
    B, P = x.shape[0], pm.active_peft_config.num_virtual_tokens
    past = prefix_as_cache(pm.adapters[pm.active_adapter], config.n_layer, config.n_head, B)
    logits_cache, _, _ = gpt_forward(base.params, x, config, past=past)        # the plain base, a given past
    d_cache = max_diff(pm.forward(x)[0], logits_cache)
    print(f"past = [(prefix_k, prefix_v) of block i, each (P,C) -> (B,NH,P,hs)]: shapes {past[0][0].shape}")
    print(f"max |logits(pm) - logits(gpt_forward(base.params, idx, past=past))| on {B} prompts = {d_cache:g}")

    text_config = PrefixTuningConfig(num_virtual_tokens=P, init="text", init_text=init_text)
    pm_text = get_peft_model(base, text_config, tokenizer=tok)
    text_ids = np.resize(tok.encode(init_text), P)                               # the text, cut (or repeated) to P
    logits_read, _ = base.forward(np.concatenate([np.broadcast_to(text_ids, (B, P)), x], axis=1))   # (B,P+T,V)
    d_text = max_diff(pm_text.forward(x)[0], logits_read[:, P:])
    print(f"\nThe prefix from the text {tok.decode(text_ids)!r} against the base reading that text first:")
    print(f"max |logits(prefix from text) - logits(base on text + prompt)[:, {P}:]| = {d_text:.2e} "
          f"(float32: the same sums, in another order)")
    return dict(prefix_vs_kv_cache_max_diff=d_cache, text_prefix_vs_text_max_diff=d_text)


@lesson_section("3. a prefix is not a prompt")
def prefix_vs_prompt(base, tok, x, P, init_text):
    """'Trainable tokens at the beginning of every input' is prompt tuning (lesson 08), not prefix tuning.
    A prompt is P learned vectors put in front of the token embeddings: it enters at the bottom, as input
    to the first block, and each block computes keys and values for those P positions with its own frozen
    ln_1 and c_attn, as it does for real tokens. A prefix enters every block's attention directly, as
    keys and values no computation produced.

    So every prompt is a prefix: the keys and values the prompt model's blocks compute at the P virtual
    positions, handed to the plain base as its past, give the prompt model's logits, up to float32
    rounding (the virtual positions come first and attention is causal, so what the blocks compute there
    does not depend on the input).
    The reverse is false: a prompt's keys and values can only be what the frozen blocks make of P input
    vectors, P*C numbers; a prefix's 2*L*P*C are free in every block. Both start as the same model when
    initialised from the same text (the base reading it); training moves them differently. Both take P
    positions of the context; the prompt's P positions also run through every block's attention and MLP
    in every forward, the prefix's are only attended to."""
    L = base.config.n_layer
    prompt_cfg = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text=init_text)
    prompt = get_peft_model(base, prompt_cfg, tokenizer=tok)
    prefix = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=P, init="text", init_text=init_text),
                            tokenizer=tok)
    n_prompt = sum(v.size for v in prompt.trainable_parameters().values())
    n_prefix = sum(v.size for v in prefix.trainable_parameters().values())
    print(f"{'':8} {'what trains':<46} {'where it enters':<33} {'numbers':>20}")
    print(f"{'prefix':8} {'h.{i}.attn.prefix_k and prefix_v, (P,C) each':<46} "
          f"{'every block, as keys and values':<33} {f'2*L*P*C = {n_prefix:,}':>20}")
    print(f"{'prompt':8} {'prompt_embeddings, (P,C)':<46} {'block 0, as P input vectors':<33} "
          f"{f'P*C = {n_prompt:,}':>20}")
    print(f"With L = {L} blocks the prefix trains {n_prefix // n_prompt}x as many numbers (2L).\n")

    hooks = prompt.method.hooks(prompt_cfg, prompt.adapters["default"], base.config, train=False)
    _, _, cache = gpt_forward(base.params, x[:, :1], base.config, hooks=hooks)     # the prompt and one token
    past = [(k[:, :, :P], v[:, :, :P]) for k, v in cache["present"]]            # the P virtual positions: (B,NH,P,hs)
    d_as_prefix = max_diff(prompt.forward(x)[0], gpt_forward(base.params, x, base.config, past=past)[0])
    d_same = max_diff(prompt.forward(x)[0], prefix.forward(x)[0])
    print(f"past = the keys and values each block computes at the prompt's {P} positions:")
    print(f"  max |logits(prompt model) - logits(gpt_forward(base.params, idx, past=past))| = {d_as_prefix:.2e} "
          f"(float32 rounding)")
    print(f"Initialised from the same text {init_text[:P]!r}:")
    print(f"  max |logits(prompt from text) - logits(prefix from text)| = {d_same:.2e} (float32 rounding)")
    return dict(prompt_trainable=n_prompt, prompt_as_prefix_max_diff=d_as_prefix,
                prompt_vs_prefix_from_text_max_diff=d_same)


@lesson_section("4. training the prefix")
def train_prefix(base, tok, task, init_text, run, lr, out_dir):
    """tinyllm.finetune.finetune trains a copy with the loop of lesson 04, the prefix starting from the
    keys and values of a solved training example (init='text'). Every prompt must now fit in
    block_size - P positions: the prefix takes the first P. Afterwards the prefix is read back from the
    file finetune saved, and greedy decoding runs on the plain base with the trained prefix as the cache
    it starts from, against loaded.generate(...)."""
    P = run["P"]
    print(f"The task: {task.name}, e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}")
    print(f"{run['train']['steps']} steps of {run['train']['batch_size']}, AdamW at lr {lr:g} "
          f"({lr_source('prefix', lr, DEFAULT_TASK)}); "
          f"the context left for each prompt: {base.config.block_size - P} positions.\n")
    folder = os.path.join(out_dir, f"prefix_{task.name}")
    cfg = PrefixTuningConfig(num_virtual_tokens=P, init="text", init_text=init_text)
    r = finetune(base, tok, cfg, task, lr=lr, out=indented, save_dir=folder, **run["train"])
    h = r["history"]
    print(f"\nValidation loss per answer token: {h['val_loss'][0]:.3f} -> {h['val_loss'][-1]:.3f}; "
          f"test accuracy {r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%} (exact match).")

    loaded = PeftModel.from_pretrained(base, folder, tokenizer=tok)
    print(f"\nloaded = PeftModel.from_pretrained(base, {os.path.relpath(folder)!r}): the trained prefix, "
          f"{human_bytes(r['saved_bytes'])} on disk (a full copy of the model: {human_bytes(r['full_copy_bytes'])})")
    prompt, answer = task.test[0]
    idx = tok.encode(prompt)[None]                                              # (1,T)
    n_new = len(tok.encode(answer))
    by_hand = generate_from_cache(base, loaded.adapters[loaded.active_adapter], idx, n_new)
    same = bool(np.array_equal(by_hand, loaded.generate(idx, n_new, temperature=0.0)))
    print("Greedy decoding with the trained prefix as the pre-filled cache of the plain base:")
    print(f"  prompt {prompt!r}\n  truth  {answer!r}\n  wrote  {tok.decode(by_hand[0, idx.shape[1]:])!r}")
    print(f"The same tokens as loaded.generate(...): {same}")
    return r, same


@lesson_section("5. does the length matter?")
def sweep_lengths(base, tok, task, init_text, run, lr, lengths, main_run):
    """The same training for other P, each prefix starting from the first P characters of the same
    example. A longer prefix trains more numbers (2*L*P*C grows with P) and leaves less of the context."""
    runs = {}
    for n in lengths:
        cfg = PrefixTuningConfig(num_virtual_tokens=n, init="text", init_text=init_text)
        runs[n] = main_run if n == run["P"] else finetune(base, tok, cfg, task, lr=lr, out=quiet, **run["train"])
    print(f"{'P':>4} {'trainable 2*L*P*C':>18} {'val loss before':>16} {'after':>7} {'accuracy':>9}")
    for n, r in runs.items():
        print(f"{n:>4} {r['trainable_params']:>18,} {r['history']['val_loss'][0]:>16.3f} {r['final_val_loss']:>7.3f} "
              f"{r['accuracy_after']:>9.1%}")
    return runs


@lesson_section("6. does the initialisation matter?")
def compare_init(base, tok, task, run, lr, main_run):
    """The same P from random keys and values (normal, std 1) instead of those of the text. A random
    prefix starts as keys and values no text would give, and the real tokens attend to them from the
    first step on: the validation loss before training shows how much that disturbs the base."""
    P, steps = run["P"], run["train"]["steps"]
    random_run = finetune(base, tok, PrefixTuningConfig(num_virtual_tokens=P), task, lr=lr, out=quiet, **run["train"])
    runs = {"init='text'": main_run, "init='random'": random_run}
    for label, r in runs.items():
        print(f"  {label:<14} val loss {r['history']['val_loss'][0]:7.3f} before, {r['final_val_loss']:.3f} after "
              f"{steps} steps; accuracy {r['accuracy_after']:.1%}")
    gap = [random_run["history"]["val_loss"][i] - main_run["history"]["val_loss"][i] for i in (0, -1)]
    print(f"Random minus text: {gap[0]:+.3f} nats at the start, {gap[1]:+.3f} after {steps} steps.")
    return runs


@lesson_section("7. prefix_projection: train through an MLP, save only the prefixes")
def train_projection(base, tok, task, run, lr, random_run, out_dir):
    """PrefixTuningConfig(prefix_projection=True) is the paper's reparameterization: an embedding (P,C)
    and an MLP C -> H -> 2*L*C make every block's prefix, and the embedding and the MLP train instead of
    the prefixes: more numbers, which Li & Liang found steadier to train than the raw prefixes (compare
    the two below). After training only the MLP's output is needed: save_pretrained writes the
    prefixes, not the MLP."""
    P = run["P"]
    cfg = PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True)
    pm = get_peft_model(base, cfg, tokenizer=tok)
    pm.print_trainable_parameters()
    print(pm.formula())
    folder = os.path.join(out_dir, f"prefix_projection_{task.name}")
    r = finetune(base, tok, cfg, task, lr=lr, out=quiet, save_dir=folder, **run["train"])
    arrays = read_adapter(base, folder, False)[1]                    # what the file holds, in tinyllm's names
    shapes = sorted({a.shape for a in arrays.values()})
    print(f"\nTrained {r['trainable_params']:,} numbers from a random start at lr {lr:g} (chosen by hand: the "
          f"sweep does not cover it): val loss {r['history']['val_loss'][0]:.3f} -> {r['final_val_loss']:.3f}, "
          f"accuracy {r['accuracy_after']:.1%}")
    print(f"(the prefixes trained directly from a random start, section 6: {random_run['final_val_loss']:.3f}).")
    print(f"save_pretrained wrote {len(arrays)} arrays of shape {shapes} ({sum(a.size for a in arrays.values()):,} "
          f"numbers, {human_bytes(saved_bytes(folder))}): the MLP's output, not the MLP.")
    loaded = PeftModel.from_pretrained(base, folder, tokenizer=tok)
    reloaded = val_loss_fn(tok, task, base.config.block_size, n=run["train"]["n_val"], reserved=P)(loaded)
    print(f"Loaded back, the prefixes alone give val loss {reloaded:.6f} (the trained model: "
          f"{r['final_val_loss']:.6f}).")
    return r, reloaded, sum(a.size for a in arrays.values())


@lesson_section("figures")
def save_figures(init_runs, projection_runs, length_runs, out_dir):
    """loss_curves.png: train and validation loss against steps, random against text initialisation, and
    the prefixes trained directly against through the MLP.
    prefix_length.png: the validation loss before and after training against the prefix length P."""
    paths = [os.path.join(out_dir, "loss_curves.png"), os.path.join(out_dir, "prefix_length.png")]
    plot_losses(init_runs, projection_runs, paths[0])
    plot_lengths(length_runs, paths[1])
    for path in paths:
        print(f"saved {os.path.relpath(path)}")
    return paths


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


def plot_lengths(length_runs, path):
    lengths = list(length_runs)
    steps = length_runs[lengths[0]]["steps"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    first = [length_runs[P]["history"]["val_loss"][0] for P in lengths]
    final = [length_runs[P]["final_val_loss"] for P in lengths]
    ax.plot(lengths, first, "s:", color="gray", label="before training (the prefix from text)")
    ax.plot(lengths, final, "o-", color="tab:blue", lw=2, label=f"after {steps} training steps")
    for P, v in zip(lengths, final):
        ax.annotate(f"{v:.2f}", (P, v), textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log")
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(P) for P in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())      # only the lengths measured are labelled
    log_loss_axis(ax)
    ax.set_xlabel("prefix length P (virtual tokens per block, log scale)")
    ax.set_ylabel("validation loss per answer token (nats, log scale)")
    ax.set_title("Validation loss against the prefix length (init='text')")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=200, lr=LR, lr_projection=LR_PROJECTION, num_virtual_tokens=20, lengths=(1, 5, 20), batch_size=8,
         checkpoint=CHECKPOINT, config=None, n_test=None, n_val=VAL_EXAMPLES, seed=0, out_dir=OUT_DIR):
    """Run the lesson.

    steps, lr, batch_size: every training run's (lr_projection: the run with the MLP); num_virtual_tokens:
    P of the main runs; lengths: the P of the length sweep; checkpoint: the pretrained model (made if
    missing); config: GPTConfig fields of a random model to use instead (for tests); n_test: score only
    the first n test examples (None: all); n_val: validation examples in the validation loss.
    Returns a dict of what it measured (and the paths of its figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config, seed)
    task = get_task(DEFAULT_TASK, World(data["world_seed"], data["n_people"]))
    task = dataclasses.replace(task, test=task.test[:n_test])
    P, init_text = num_virtual_tokens, "".join(task.train[1])   # a solved example: its keys and values start the prefix
    x = same_length_prompts(tok, task.val, 8)                                   # (B,T)
    run = dict(P=P, train=dict(steps=steps, batch_size=batch_size, seed=seed, before=measure_base(base, tok, task),
                               n_val=n_val, eval_interval=max(1, steps // 5), log_interval=max(1, steps // 5)))
    pm = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=P), tokenizer=tok, seed=seed)
    n_trainable = show_trainable(pm, base, source)
    m_cache = show_kv_cache(pm, base, tok, x, init_text)
    m_prompt = prefix_vs_prompt(base, tok, x, P, init_text)
    main_run, same_tokens = train_prefix(base, tok, task, init_text, run, lr, out_dir)
    length_runs = sweep_lengths(base, tok, task, init_text, run, lr, lengths, main_run)
    init_runs = compare_init(base, tok, task, run, lr, main_run)
    proj_run, reloaded, proj_saved = train_projection(base, tok, task, run, lr_projection, init_runs["init='random'"],
                                                      out_dir)
    projection_runs = {"direct (init='random')": init_runs["init='random'"], "through the MLP": proj_run}
    figures = save_figures(init_runs, projection_runs, length_runs, out_dir)
    return dict(pretrained=config is None, trainable_params=n_trainable, **m_cache, **m_prompt,
                generation_matches_cache=same_tokens, val_loss_before=main_run["history"]["val_loss"][0],
                val_loss_after=main_run["final_val_loss"], accuracy_before=main_run["accuracy_before"],
                accuracy_after=main_run["accuracy_after"], saved_bytes=main_run["saved_bytes"],
                full_copy_bytes=full_copy_bytes(base),
                length_val_loss={n: r["final_val_loss"] for n, r in length_runs.items()},
                length_trainable={n: r["trainable_params"] for n, r in length_runs.items()},
                random_init_val_loss=init_runs["init='random'"]["final_val_loss"],
                text_init_val_loss=main_run["final_val_loss"], projection_trainable_params=proj_run["trainable_params"],
                projection_saved_numbers=proj_saved, projection_val_loss=proj_run["final_val_loss"],
                projection_reloaded_val_loss=reloaded, figures=figures)


if __name__ == "__main__":
    main()
