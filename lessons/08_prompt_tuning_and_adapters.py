"""
Lesson 08: prompt tuning and adapter layers, and all the methods side by side.

Two more ways to leave the pretrained weights alone:

  prompt tuning   P learned input vectors in front of the token embeddings: "words" no tokenizer has.
                  Only P*C numbers train; they enter at the bottom of the model only (prefix tuning,
                  lesson 07, puts P keys and values into every block: 2*L*P*C).
  adapters        a small bottleneck with its own residual connection after the attention and after the
                  MLP of every block, a = a + up(gelu(down(a))): 2*(2Cm + m + C) numbers per block.

This lesson:

  1. prompt tuning: what trains (P*C), and a prompt initialised from text IS that text
  2. initialisation: RANDOM, SAMPLE_VOCAB and TEXT, each trained, with its loss curve
  3. adapters: what trains, and the identity at the start (up = 0: logits identical to the base)
  4. training the adapters; and (IA)^3, which rescales features instead of adding to them
  5. every method of lessons 05-08 on the same task for the same steps: a closing table

Run from the repository root (about 3 minutes on 2 CPU cores, plus ~3 minutes of pretraining the first
time if no pretrained checkpoint exists yet):

    python lessons/08_prompt_tuning_and_adapters.py

Figures go to runs/lessons/08_prompt_tuning_and_adapters/.

Legend: B batch, T time, P virtual tokens, C channels, L blocks, m the adapters' bottleneck size.
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
from tinyllm.finetune import VAL_EXAMPLES, finetune, full_copy_bytes, measure_base
from tinyllm.peft.saving import read_adapter
from tinyllm.peft import (AdapterConfig, FullFineTuningConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                          PromptTuningConfig, get_peft_model)
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, load_base, max_diff, same_length_prompts, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "08_prompt_tuning_and_adapters")
LR = LRS   # each method's learning rate, as tinyllm.compare measured them on the record task


# ----------------------------------------------------------------------------------------------------
# 1. prompt tuning, 3. adapters: what trains and where they start

def show_prompt(base, tok, x, P, init_text):
    section("1. prompt tuning: what trains")
    L, C = base.config.n_layer, base.config.n_embd
    cfg = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text=init_text)
    pm = get_peft_model(base, cfg, tokenizer=tok)
    print(f"pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens={P}, prompt_tuning_init='TEXT', ...))\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    n = sum(v.size for v in pm.trainable_parameters().values())
    print(f"Prefix tuning with the same P trains 2*L*P*C = {2 * L * P * C:,}: {2 * L}x more. A prompt enters at the "
          f"bottom, as token")
    print("embeddings do; the keys and values the blocks see for it are computed from it, not learned directly.")

    B = x.shape[0]
    text_ids = np.resize(tok.encode(init_text), P)                               # the text, cut (or repeated) to P
    logits_prompt, _ = pm.forward(x)
    logits_read, _ = base.forward(np.concatenate([np.broadcast_to(text_ids, (B, P)), x], axis=1))   # (B,P+T,V)
    d = max_diff(logits_prompt, logits_read[:, P:])
    print(f"\nprompt_tuning_init='TEXT' copies the embeddings of the text's first {P} characters, "
          f"{tok.decode(text_ids)!r}:")
    same = np.array_equal(pm.adapters["default"]["prompt_embeddings"], base.params["wte.weight"][text_ids])
    print(f"  prompt_embeddings equal wte[text ids]: {same}")
    print(f"  max |logits(prompt from text) - logits(base on text + prompt)[:, {P}:]| = {d:g}")
    print("A prompt initialised from text is that text, read before every input. Section 2 trains it.")
    return dict(prompt_trainable=n, prompt_vs_text_max_diff=d)


def nearest_token_distance(base, folder):
    """Medians over a saved prompt's vectors: the L2 distance to the nearest token embedding, and the lengths
    of the prompt's vectors and of the token embeddings."""
    prompt = read_adapter(base, folder, False)[1]["prompt_embeddings"]                            # (P,C)
    wte = base.params["wte.weight"]                                                                # (V,C)
    d = np.linalg.norm(prompt[:, None, :] - wte[None, :, :], axis=-1)                              # (P,V)
    return dict(nearest=float(np.median(d.min(axis=1))), norm=float(np.median(np.linalg.norm(prompt, axis=1))),
                wte_norm=float(np.median(np.linalg.norm(wte, axis=1))))


def show_adapter(base, x, m):
    section("3. adapters: what trains, and the identity at the start")
    cfg = AdapterConfig(bottleneck_size=m)
    pm = get_peft_model(base, cfg)
    C = base.config.n_embd
    print(f"pm = get_peft_model(model, AdapterConfig(bottleneck_size={m}))\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    print(f"  per adapter: down (C,m) = {C}x{m} and its bias (m), up (m,C) = {m}x{C} and its bias (C): 2Cm + m + C "
          f"= {2 * C * m + m + C:,}")
    adapter = pm.adapters["default"]
    up_zero = all(not np.any(v) for k, v in adapter.items() if ".up." in k)
    logits_pm, _ = pm.forward(x)
    logits_base, _ = base.forward(x)
    d = max_diff(logits_pm, logits_base)
    print(f"\nEvery up.weight and up.bias starts at zero: {up_zero}. Then up(gelu(down(a))) = 0 and a + 0 = a,")
    print(f"so each adapter is the identity: max |logits(pm) - logits(base)| = {d:g}.")
    print("(down starts random: were it zero too, gelu(down(a)) would be 0, and so would the gradients of both")
    print(" weight matrices, dW_up = gelu(h)^T dout and dW_down = a^T (dout W_up^T * gelu'(h)): they would never move.)")
    return dict(adapter_trainable=sum(v.size for v in pm.trainable_parameters().values()), adapter_noop_max_diff=d)


def show_ia3(base, x):
    section("4b. (IA)^3: rescaling instead of adding")
    pm = get_peft_model(base, IA3Config())
    C = base.config.n_embd
    print("(IA)^3 (Liu et al., 2022) learns one number per feature that rescales it. pm = get_peft_model(model,")
    print("IA3Config()), with PEFT's GPT-2 defaults: c_attn's output is rescaled, (x W + b) * l, feature by feature")
    print("of its queries, keys and values; mlp.c_proj is a feed-forward module, so its input, the MLP's 4C hidden")
    print("features, is rescaled instead, (x * l) W + b.\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    print(f"  per block 3C + 4C = {3 * C} + {4 * C} = {7 * C:,} numbers: fewer than any other method here (prompt's P*C aside).")
    d = max_diff(pm.forward(x)[0], base.forward(x)[0])
    print(f"\nEvery l starts at 1, so the model starts as the base: max |logits(pm) - logits(base)| = {d:g}.")
    for v in pm.adapters["default"].values():
        v *= np.random.default_rng(0).uniform(0.5, 1.5, v.shape).astype(v.dtype)      # as if trained
    before = pm.forward(x)[0]
    pm.merge_adapter()
    merged = max_diff(pm.forward(x)[0], before)
    pm.unmerge_adapter()
    print("A scaling folds into the weights (W's columns and b times l, or W's rows times l): with random l, the")
    print(f"merged model differs from the unmerged by {merged:.1e} (float rounding), like a merged LoRA: free at inference.")
    return dict(ia3_trainable=sum(v.size for v in pm.trainable_parameters().values()), ia3_noop_max_diff=d,
                ia3_merge_max_diff=merged)


# ----------------------------------------------------------------------------------------------------
# figures

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray")


def plot_curves(ax, runs, title):
    for (label, r), color in zip(runs.items(), COLORS):
        h = r["history"]
        ax.plot(h["step"], smooth(h["train_loss"], 10), color=color, lw=1.2, alpha=0.6)
        ax.plot(h["val_step"], h["val_loss"], "o-", color=color, lw=2, label=label)
    log_loss_axis(ax)
    ax.set_xlabel(f"step (batches of {r['batch_size']} examples)")
    ax.set_ylabel("loss per answer token (nats, log scale)")
    ax.set_title(title + "\n(dots: validation loss; thin line: train loss, mean of 10 steps)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)


def plot_losses(prompt_runs, all_runs, path):
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    plot_curves(axes[0], prompt_runs, "Prompt tuning: three initialisations")
    plot_curves(axes[1], all_runs, "Every method, same task, same steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_table(all_runs, path):
    labels = list(all_runs)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    y = np.arange(len(labels))
    colors = COLORS[:len(labels)]
    bars = axes[0].barh(y, [all_runs[k]["trainable_params"] for k in labels], color=colors)
    axes[0].bar_label(bars, labels=[f"{all_runs[k]['trainable_params']:,}" for k in labels], padding=3, fontsize=9)
    axes[0].set_xscale("log")
    counts = [all_runs[k]["trainable_params"] for k in labels]
    axes[0].set_xlim(min(counts) / 3, 5 * max(counts))                           # room for the labels
    axes[0].set_xlabel("trainable parameters (log scale)")
    axes[0].set_title("What trains")
    bars = axes[1].barh(y, [all_runs[k]["final_val_loss"] for k in labels], color=colors)
    texts = [f"{all_runs[k]['final_val_loss']:.3f} (accuracy {all_runs[k]['accuracy_after']:.0%})" for k in labels]
    axes[1].bar_label(bars, labels=texts, padding=3, fontsize=9)
    axes[1].set_xlabel("final validation loss (nats per answer token)")
    axes[1].set_title("What it reached in the same number of steps")
    axes[1].set_xlim(0, 1.5 * max(all_runs[k]["final_val_loss"] for k in labels))
    for ax in axes:
        ax.set_yticks(y)
        ax.set_yticklabels(labels)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=200, num_virtual_tokens=20, bottleneck_size=16, lora_r=8, batch_size=8, lr=None,
         task_name="record", checkpoint=CHECKPOINT, config=None, n_test=None, n_val=VAL_EXAMPLES, seed=0,
         out_dir=OUT_DIR):
    """Run the lesson.

    steps, batch_size: every training run's; lr: {method: learning rate} to override LR; num_virtual_tokens:
    P of prompt (and prefix) tuning; bottleneck_size: m of the adapters; lora_r: r of the LoRA row;
    task_name: 'record' or 'qa'; checkpoint: the pretrained model (made if missing); config: GPTConfig
    fields of a random model to use instead (for tests); n_test: score only the first n test examples;
    n_val: validation examples in the validation loss.
    Returns a dict of what it measured (and the paths of its figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    lr = {**LR, **(lr or {})}
    base, tok, data, source = load_base(checkpoint, config, seed)
    task = get_task(task_name, World(data["world_seed"], data["n_people"]))
    if n_test is not None:
        task = dataclasses.replace(task, test=task.test[:n_test])
    P, m = num_virtual_tokens, bottleneck_size
    init_text = "".join(task.train[1])             # a solved example of the task
    x = same_length_prompts(tok, task.val, 8)      # (B,T)
    print(f"The base: {source}; {base.config.n_layer} blocks, C = {base.config.n_embd}, "
          f"{base.num_parameters():,} parameters.")
    print(f"The task: {task.name}, e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}")
    m_prompt = show_prompt(base, tok, x, P, init_text)

    section("2. prompt tuning: three initialisations")
    before = measure_base(base, tok, task)
    run = dict(steps=steps, batch_size=batch_size, seed=seed, before=before, n_val=n_val,
               eval_interval=max(1, steps // 5), out=lambda line: None)
    print(f"tinyllm.finetune.finetune, {steps} steps of {batch_size}, AdamW at lr {lr['prompt']:g}, for each of:")
    print("  RANDOM        normal vectors with the spread of the token embeddings")
    print("  SAMPLE_VOCAB  the embeddings of randomly chosen tokens")
    print(f"  TEXT          the embeddings of the characters of a solved example, {init_text[:P]!r}...\n")
    prompt_runs = {}
    for init in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
        cfg = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init=init,
                                 prompt_tuning_init_text=init_text if init == "TEXT" else None)
        folder = os.path.join(out_dir, f"prompt_{init}")
        r = finetune(base, tok, cfg, task, lr=lr["prompt"], save_dir=folder, **run)
        prompt_runs[f"prompt tuning, {init}"] = r
        h = r["history"]
        print(f"  {init:<13} val loss {h['val_loss'][0]:7.3f} at the start, {r['final_val_loss']:.3f} after {steps} "
              f"steps; accuracy {r['accuracy_after']:.1%}")
    distance = nearest_token_distance(base, os.path.join(out_dir, "prompt_TEXT"))
    print(f"\nThe trained TEXT prompt, read back from its saved file: its vectors are {distance['norm']:.3f} "
          f"long (median),")
    print(f"the token embeddings {distance['wte_norm']:.3f}; the nearest token embedding is {distance['nearest']:.3f} "
          f"away (0 at the start).")
    print("Nothing forces a prompt to stay among the tokens: after training it is not text any more.")

    m_adapter = show_adapter(base, x, m)
    m_ia3 = show_ia3(base, x)

    section("4. training the adapters")
    adapter = finetune(base, tok, AdapterConfig(bottleneck_size=m), task, lr=lr["adapter"], **run)
    h = adapter["history"]
    print(f"{steps} steps at lr {lr['adapter']:g}: val loss {h['val_loss'][0]:.3f} -> {adapter['final_val_loss']:.3f}, "
          f"accuracy {adapter['accuracy_before']:.1%} -> {adapter['accuracy_after']:.1%}.")
    print(f"The adapters add compute at inference: 2 small matmuls per adapter, {2 * base.config.n_layer} adapters.")

    section("5. every method on the same task, for the same steps")
    print("The methods of lessons 05-07, with their learning rates, alongside this lesson's runs:\n")
    others = {"full fine-tuning": (FullFineTuningConfig(), lr["full"]),
              f"LoRA r={lora_r}, all linears": (LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                                                           target_modules=["c_attn", "c_proj", "c_fc"]), lr["lora"]),
              f"prefix tuning, P={P}, text": (PrefixTuningConfig(num_virtual_tokens=P, init="text",
                                                                 init_text=init_text), lr["prefix"]),
              "(IA)^3, GPT-2 defaults": (IA3Config(), lr["ia3"])}
    all_runs = {}
    for label, (cfg, method_lr) in others.items():
        all_runs[label] = finetune(base, tok, cfg, task, lr=method_lr, **run)
    all_runs[f"adapters, m={m}"] = adapter
    best_init = min(prompt_runs, key=lambda k: prompt_runs[k]["final_val_loss"])
    all_runs[best_init] = prompt_runs[best_init]
    full_bytes = full_copy_bytes(base)
    print(f"{'method':<30} {'lr':>6} {'trainable':>10} {'saved':>10} {'val loss':>9} {'accuracy':>9}")
    for label, r in all_runs.items():
        print(f"{label:<30} {r['lr']:>6g} {r['trainable_params']:>10,} {r['saved_bytes']:>10,} "
              f"{r['final_val_loss']:>9.3f} {r['accuracy_after']:>9.1%}")
    print(f"\n(before any training: val loss {before_val(all_runs):.3f}, accuracy {before['accuracy']:.1%}; "
          f"'saved' is bytes on disk, a full copy of the model is {full_bytes:,};")
    print(" accuracy is exact match of the whole answer, every character right: the loss moves long before it does.)")
    print("\nWhere the trainable counts come from (pm.formula()):")
    for label, r in all_runs.items():
        print(f"  {label:<30} {r['formula']}")

    section("figures")
    loss_path = os.path.join(out_dir, "loss_curves.png")
    table_path = os.path.join(out_dir, "methods.png")
    plot_losses(prompt_runs, all_runs, loss_path)
    plot_table(all_runs, table_path)
    print(f"saved {os.path.relpath(loss_path)}: loss curves of the prompt initialisations and of every method")
    print(f"saved {os.path.relpath(table_path)}: trainable parameters and final validation loss per method")
    table = [dict(method=label, lr=r["lr"], trainable_params=r["trainable_params"], formula=r["formula"],
                  saved_bytes=r["saved_bytes"], val_loss_before=r["history"]["val_loss"][0],
                  final_val_loss=r["final_val_loss"], accuracy=r["accuracy_after"]) for label, r in all_runs.items()]
    return dict(pretrained=config is None, **m_prompt, **m_adapter, **m_ia3, text_prompt_distance=distance["nearest"],
                prompt_val_loss={k: r["final_val_loss"] for k, r in prompt_runs.items()},
                prompt_val_loss_before={k: r["history"]["val_loss"][0] for k, r in prompt_runs.items()},
                adapter_val_loss_before=h["val_loss"][0], adapter_val_loss_after=adapter["final_val_loss"],
                full_copy_bytes=full_bytes, table=table, figures=[loss_path, table_path])


def before_val(runs):
    """The validation loss at step 0 of the runs whose method starts as the base (full, LoRA, adapters)."""
    return next(r["history"]["val_loss"][0] for r in runs.values()
                if r["method"] in ("FullFineTuningConfig", "LoraConfig", "AdapterConfig", "IA3Config"))


if __name__ == "__main__":
    main()
