"""
Lesson 08: prompt tuning, adapter layers and (IA)^3, and all the methods side by side.

Three more ways to leave the pretrained weights alone:

  prompt tuning   P learned input vectors in front of the token embeddings: "words" no tokenizer has.
                  Only P*C numbers train, and they enter at the bottom of the model only. This is what
                  "trainable tokens at the beginning of every input" describes; prefix tuning (lesson 07)
                  is often described that way, but a prefix gives EVERY block learned keys and values
                  (a trained KV cache), 2*L*P*C numbers, rather than the first block learned inputs.
  adapters        a small bottleneck with its own residual connection after the attention and after the
                  MLP of every block, a = a + up(gelu(down(a))): 2*(2Cm + m + C) numbers per block.
  (IA)^3          one learned scale per feature of chosen activations: it multiplies instead of adding.

This lesson:

  1. prompt tuning: what trains (P*C) and where it enters, against a prefix; a prompt from text IS that text
  2. initialisation: RANDOM, SAMPLE_VOCAB and TEXT, each trained, with its loss curve
  3. adapters: what trains, and the identity at the start (up = 0: logits identical to the base)
  4. training the adapters
  5. (IA)^3: what trains, the identity at the start (every scale 1), and merging
  6. every method of lessons 05-08 on the lab's task (extract) for the same steps: a closing table

Run from the repository root (a few minutes on 2 cores, plus a pretraining first if no pretrained model
exists yet; README.md has the times measured):

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

from tinyllm.data import World
from tinyllm.finetune import VAL_EXAMPLES, finetune, full_copy_bytes, measure_base
from tinyllm.peft import (AdapterConfig, FullFineTuningConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                          PromptTuningConfig, get_peft_model)
from tinyllm.peft.saving import read_adapter
from tinyllm.plots import log_loss_axis, smooth
from tinyllm.presets import DEFAULT_TASK, tuned_lrs
from tinyllm.tasks import get_task
from lessons.common import CHECKPOINT, lesson_section, load_base, lr_source, max_diff, same_length_prompts

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "08_prompt_tuning_and_adapters")
LR = tuned_lrs()   # {method: learning rate}, as `python -m tinyllm sweep` chose them for extract (or presets')


def quiet(line):
    """A progress printer that prints nothing: the runs are summed up in tables instead."""


def nearest_token_distance(base, folder):
    """Medians over a saved prompt's vectors: the L2 distance to the nearest token embedding, and the lengths
    of the prompt's vectors and of the token embeddings."""
    prompt = read_adapter(base, folder, False)[1]["prompt_embeddings"]                            # (P,C)
    wte = base.params["wte.weight"]                                                                # (V,C)
    d = np.linalg.norm(prompt[:, None, :] - wte[None, :, :], axis=-1)                              # (P,V)
    return dict(nearest=float(np.median(d.min(axis=1))), norm=float(np.median(np.linalg.norm(prompt, axis=1))),
                wte_norm=float(np.median(np.linalg.norm(wte, axis=1))))


# ----------------------------------------------------------------------------------------------------
# the lesson's sections, in the order they run

@lesson_section("1. prompt tuning: what trains, and where it enters")
def show_prompt(base, tok, x, P, init_text, source):
    """PromptTuningConfig(num_virtual_tokens=P) learns prompt_embeddings, a (P,C) array: P vectors put in
    front of the token embeddings of every input, so the first block reads P + T vectors, the P learned
    ones first. From there on they are treated like tokens: each block computes their keys and values
    with its own frozen weights. Prefix tuning (lesson 07) instead learns every block's keys and values
    for P positions directly, 2*L*P*C numbers: a prompt is one particular prefix, the one the frozen
    blocks compute from P input vectors (lesson 07, section 3, measures it).

    prompt_tuning_init='TEXT' copies the embeddings of a text's first P characters: the model with that
    prompt is the base reading the text before every input. Section 2 trains it."""
    L, C = base.config.n_layer, base.config.n_embd
    print(f"The base: {source}; {L} blocks, C = {C}, {base.num_parameters():,} parameters.")
    cfg = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text=init_text)
    pm = get_peft_model(base, cfg, tokenizer=tok)
    print(f"pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens={P}, prompt_tuning_init='TEXT', ...))\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    n = sum(v.size for v in pm.trainable_parameters().values())
    print(f"\n{'':15} {'where it enters':<36} {'what trains':>22}")
    print(f"{'prompt tuning':15} {'block 0, as P input vectors':<36} {f'P*C = {n:,}':>22}")
    print(f"{'prefix tuning':15} {'every block, as keys and values':<36} {f'2*L*P*C = {2 * L * P * C:,}':>22}")

    B = x.shape[0]
    text_ids = np.resize(tok.encode(init_text), P)                               # the text, cut (or repeated) to P
    logits_read, _ = base.forward(np.concatenate([np.broadcast_to(text_ids, (B, P)), x], axis=1))   # (B,P+T,V)
    d = max_diff(pm.forward(x)[0], logits_read[:, P:])
    same = np.array_equal(pm.adapters["default"]["prompt_embeddings"], base.params["wte.weight"][text_ids])
    print(f"\nThe prompt from the text {tok.decode(text_ids)!r}:")
    print(f"  prompt_embeddings equal wte[text ids]: {same}")
    print(f"  max |logits(prompt from text) - logits(base on text + prompt)[:, {P}:]| = {d:g}")
    return dict(prompt_trainable=n, prompt_vs_text_max_diff=d)


@lesson_section("2. prompt tuning: three initialisations")
def train_prompts(base, tok, task, P, init_text, run, lr, out_dir):
    """PEFT's three ways to start a prompt, each trained alike:
      RANDOM        normal vectors with the spread of the token embeddings
      SAMPLE_VOCAB  the embeddings of randomly chosen tokens
      TEXT          the embeddings of the characters of a solved example
    Then the trained TEXT prompt, read back from its saved file, against the token embeddings: nothing
    keeps a prompt among the tokens, and after training it is not text any more."""
    print(f"tinyllm.finetune.finetune, {run['steps']} steps of {run['batch_size']}, AdamW at lr {lr:g} "
          f"({lr_source('prompt', lr, task.name)}); TEXT starts from {init_text[:P]!r}\n")
    runs = {}
    for init in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
        cfg = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init=init,
                                 prompt_tuning_init_text=init_text if init == "TEXT" else None)
        r = finetune(base, tok, cfg, task, lr=lr, save_dir=os.path.join(out_dir, f"prompt_{init}"), **run)
        runs[f"prompt tuning, {init}"] = r
        print(f"  {init:<13} val loss {r['history']['val_loss'][0]:7.3f} at the start, {r['final_val_loss']:.3f} "
              f"after {run['steps']} steps; accuracy {r['accuracy_after']:.1%}")
    distance = nearest_token_distance(base, os.path.join(out_dir, "prompt_TEXT"))
    print(f"\nThe trained TEXT prompt's vectors are {distance['norm']:.3f} long (median), the token embeddings "
          f"{distance['wte_norm']:.3f};")
    print(f"the nearest token embedding is {distance['nearest']:.3f} away (median; 0 at the start).")
    return runs, distance


@lesson_section("3. adapters: what trains, and the identity at the start")
def show_adapter(base, x, m):
    """AdapterConfig(bottleneck_size=m) puts two adapters in every block, after the attention and after
    the MLP: a = a + up(gelu(down(a))), down (C,m) with its bias, up (m,C) with its bias. Every up.weight
    and up.bias starts at zero, so up(...) = 0 and each adapter is the identity: the model starts as the
    base. down starts random: were it zero too, gelu(down(a)) would be 0, and so would the gradients of
    both weight matrices, dW_up = gelu(h)^T dout and dW_down = a^T (dout W_up^T * gelu'(h)): they would
    never move."""
    pm = get_peft_model(base, AdapterConfig(bottleneck_size=m))
    C = base.config.n_embd
    print(f"pm = get_peft_model(model, AdapterConfig(bottleneck_size={m}))\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    print(f"  per adapter: down {C}x{m} and its bias ({m}), up {m}x{C} and its bias ({C}): 2Cm + m + C "
          f"= {2 * C * m + m + C:,}")
    up_zero = all(not np.any(v) for k, v in pm.adapters["default"].items() if ".up." in k)
    d = max_diff(pm.forward(x)[0], base.forward(x)[0])
    print(f"\nEvery up.weight and up.bias is zero: {up_zero}; max |logits(pm) - logits(base)| = {d:g}.")
    return dict(adapter_trainable=sum(v.size for v in pm.trainable_parameters().values()), adapter_noop_max_diff=d)


@lesson_section("4. training the adapters")
def train_adapters(base, tok, task, m, run, lr):
    """The same loop. The adapters stay in the model after training, and unlike LoRA they cannot be
    folded into the weights (gelu sits between down and up): every adapter adds two small matmuls to
    every forward, at inference too."""
    r = finetune(base, tok, AdapterConfig(bottleneck_size=m), task, lr=lr, **run)
    h = r["history"]
    print(f"{run['steps']} steps at lr {lr:g} ({lr_source('adapter', lr, task.name)}): val loss "
          f"{h['val_loss'][0]:.3f} -> {r['final_val_loss']:.3f}, accuracy {r['accuracy_before']:.1%} -> "
          f"{r['accuracy_after']:.1%}.")
    print(f"At inference: {2 * base.config.n_layer} adapters, each two extra matmuls.")
    return r


@lesson_section("5. (IA)^3: rescaling instead of adding")
def show_ia3(base, x):
    """(IA)^3 (Liu et al., 2022) learns one number per feature that rescales it. pm = get_peft_model(model,
    IA3Config()), with PEFT's GPT-2 defaults: c_attn's output is rescaled, (x W + b) * l, feature by
    feature of its queries, keys and values; mlp.c_proj is a feed-forward module, so its input, the
    MLP's 4C hidden features, is rescaled instead, (x * l) W + b. Every l starts at 1, so the model starts
    as the base. A scaling folds into the weights (W's columns and b times l, or W's rows times l), so a
    trained (IA)^3 merges like LoRA and costs nothing at inference; here the merge is checked with random
    l, as if trained. It trains in the table of section 6."""
    pm = get_peft_model(base, IA3Config())
    C = base.config.n_embd
    pm.print_trainable_parameters()
    print(pm.formula())
    print(f"  per block 3C + 4C = {3 * C} + {4 * C} = {7 * C:,} numbers")
    d = max_diff(pm.forward(x)[0], base.forward(x)[0])
    print(f"\nEvery l is 1: max |logits(pm) - logits(base)| = {d:g}.")
    for v in pm.adapters["default"].values():
        v *= np.random.default_rng(0).uniform(0.5, 1.5, v.shape).astype(v.dtype)      # as if trained
    before = pm.forward(x)[0]
    pm.merge_adapter()
    merged = max_diff(pm.forward(x)[0], before)
    pm.unmerge_adapter()
    print(f"With random l, max |logits(merged) - logits(unmerged)| = {merged:.1e} (float rounding).")
    return dict(ia3_trainable=sum(v.size for v in pm.trainable_parameters().values()), ia3_noop_max_diff=d,
                ia3_merge_max_diff=merged)


@lesson_section("6. every method on the same task, for the same steps")
def compare_methods(base, tok, task, settings, lrs, run, adapter, prompt_runs, before):
    """The methods of lessons 05-07, each at its learning rate, beside this lesson's adapters and its best
    prompt. Accuracy is exact match of the whole answer, every character right: the loss moves long
    before it does. 'saved' is the bytes save_pretrained wrote. The same steps for all is a fair budget
    only in steps: lesson 09 compares them with the budgets the sweep measured."""
    P, r, init_text = settings["P"], settings["lora_r"], settings["init_text"]
    others = {"full fine-tuning": (FullFineTuningConfig(), "full"),
              f"LoRA r={r}, all linears": (LoraConfig(r=r, lora_alpha=2 * r,
                                                      target_modules=["c_attn", "c_proj", "c_fc"]), "lora"),
              f"prefix tuning, P={P}, text": (PrefixTuningConfig(num_virtual_tokens=P, init="text",
                                                                 init_text=init_text), "prefix"),
              "(IA)^3, GPT-2 defaults": (IA3Config(), "ia3")}
    runs = {label: finetune(base, tok, cfg, task, lr=lrs[method], **run) for label, (cfg, method) in others.items()}
    runs[f"adapters, m={settings['m']}"] = adapter
    best = min(prompt_runs, key=lambda k: prompt_runs[k]["final_val_loss"])
    runs[best] = prompt_runs[best]
    print(f"{'method':<30} {'lr':>6} {'trainable':>10} {'saved':>11} {'val loss':>9} {'accuracy':>9}")
    for label, r in runs.items():
        print(f"{label:<30} {r['lr']:>6g} {r['trainable_params']:>10,} {r['saved_bytes'] / 2 ** 10:>7,.1f} KiB "
              f"{r['final_val_loss']:>9.3f} {r['accuracy_after']:>9.1%}")
    start = runs["full fine-tuning"]["history"]["val_loss"][0]                 # full starts as the base
    print(f"{'(before any training)':<30} {'':>6} {'':>10} {'':>11} {start:>9.3f} {before['accuracy']:>9.1%}")
    print(f"(a full copy of the model is {full_copy_bytes(base) / 2 ** 10:,.1f} KiB)")
    print("\nWhere the trainable counts come from (pm.formula()):")
    for label, r in runs.items():
        print(f"  {label:<30} {r['formula']}")
    return runs


@lesson_section("figures")
def save_figures(prompt_runs, all_runs, out_dir):
    """loss_curves.png: the validation loss (dots) and train loss (thin lines) against steps, of the three
    prompt initialisations and of every method.
    methods.png: what each method trains, and the validation loss and accuracy it reached."""
    paths = [os.path.join(out_dir, "loss_curves.png"), os.path.join(out_dir, "methods.png")]
    plot_losses(prompt_runs, all_runs, paths[0])
    plot_table(all_runs, paths[1])
    for path in paths:
        print(f"saved {os.path.relpath(path)}")
    return paths


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
    steps = next(iter(all_runs.values()))["steps"]
    plot_curves(axes[1], all_runs, f"Every method, the same task, {steps} steps each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_table(all_runs, path):
    labels = list(all_runs)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    y = np.arange(len(labels))
    colors = COLORS[:len(labels)]
    counts = [all_runs[k]["trainable_params"] for k in labels]
    bars = axes[0].barh(y, counts, color=colors)
    axes[0].bar_label(bars, labels=[f"{n:,}" for n in counts], padding=3, fontsize=9)
    axes[0].set_xscale("log")
    axes[0].set_xlim(min(counts) / 3, 5 * max(counts))                           # room for the labels
    axes[0].set_xlabel("trainable parameters (log scale)")
    axes[0].set_title("What trains")
    bars = axes[1].barh(y, [all_runs[k]["final_val_loss"] for k in labels], color=colors)
    texts = [f"{all_runs[k]['final_val_loss']:.3f} (accuracy {all_runs[k]['accuracy_after']:.0%})" for k in labels]
    axes[1].bar_label(bars, labels=texts, padding=3, fontsize=9)
    axes[1].set_xlabel("final validation loss (nats per answer token)")
    axes[1].set_title(f"What it reached in {all_runs[labels[0]]['steps']} steps")
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

def main(steps=150, num_virtual_tokens=20, bottleneck_size=16, lora_r=8, batch_size=8, lr=None,
         checkpoint=CHECKPOINT, config=None, n_test=None, n_val=VAL_EXAMPLES, seed=0, out_dir=OUT_DIR):
    """Run the lesson.

    steps, batch_size: every training run's; lr: {method: learning rate} to override LR; num_virtual_tokens:
    P of prompt (and prefix) tuning; bottleneck_size: m of the adapters; lora_r: r of the LoRA row;
    checkpoint: the pretrained model (made if missing); config: GPTConfig fields of a random model to use
    instead (for tests); n_test: score only the first n test examples; n_val: validation examples in the
    validation loss.
    Returns a dict of what it measured (and the paths of its figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    lrs = {**LR, **(lr or {})}
    base, tok, data, source = load_base(checkpoint, config, seed)
    task = get_task(DEFAULT_TASK, World(data["world_seed"], data["n_people"]))
    task = dataclasses.replace(task, test=task.test[:n_test])
    P, m, init_text = num_virtual_tokens, bottleneck_size, "".join(task.train[1])   # a solved example
    x, before = same_length_prompts(tok, task.val, 8), measure_base(base, tok, task)  # x: (B,T)
    run = dict(steps=steps, batch_size=batch_size, seed=seed, before=before, n_val=n_val,
               eval_interval=max(1, steps // 5), out=quiet)
    m_prompt = show_prompt(base, tok, x, P, init_text, source)
    prompt_runs, distance = train_prompts(base, tok, task, P, init_text, run, lrs["prompt"], out_dir)
    m_adapter = show_adapter(base, x, m)
    adapter = train_adapters(base, tok, task, m, run, lrs["adapter"])
    m_ia3 = show_ia3(base, x)
    all_runs = compare_methods(base, tok, task, dict(P=P, m=m, lora_r=lora_r, init_text=init_text), lrs, run,
                               adapter, prompt_runs, before)
    figures = save_figures(prompt_runs, all_runs, out_dir)
    table = [dict(method=label, lr=r["lr"], trainable_params=r["trainable_params"], formula=r["formula"],
                  saved_bytes=r["saved_bytes"], val_loss_before=r["history"]["val_loss"][0],
                  final_val_loss=r["final_val_loss"], accuracy=r["accuracy_after"]) for label, r in all_runs.items()]
    return dict(pretrained=config is None, **m_prompt, **m_adapter, **m_ia3, text_prompt_distance=distance["nearest"],
                prompt_val_loss={k: r["final_val_loss"] for k, r in prompt_runs.items()},
                prompt_val_loss_before={k: r["history"]["val_loss"][0] for k, r in prompt_runs.items()},
                adapter_val_loss_before=adapter["history"]["val_loss"][0],
                adapter_val_loss_after=adapter["final_val_loss"], full_copy_bytes=full_copy_bytes(base), table=table,
                figures=figures)


if __name__ == "__main__":
    main()
