"""
Lesson 05: full fine-tuning, and what it costs.

Fine-tuning is pretraining continued on other data: the same loop (lesson 04), the same AdamW, but on
(prompt, answer) examples of one task, with the loss on the answer tokens only. The simplest way is to
let every weight train. This lesson does that on the lab's task, extract (tinyllm/tasks.py): read one
field off a sentence about an invented person,

    "kim is a baker, owns a cat and loves pink.\\njob"  ->  " baker\\n"

and then measures what it costs:

  1. the base model and the task: how the pretrained model does before any fine-tuning
  2. trainable = everything: the parameter count, with its formula
  3. training: the loss curve, and the accuracy before and after
  4. the costs: AdamW's state (two numbers per weight), a saved file that is a full copy of the model
     for every task, and forgetting (the corpus loss and the facts the model recalls, before and after)
  5. a cheaper variant: train only the last k blocks (FullFineTuningConfig(last_k_blocks=k))

The methods of lessons 06-08 (LoRA, prefix and prompt tuning, adapters) exist to cut these costs.

Run from the repository root (a few minutes on 2 cores, plus a pretraining first if no pretrained model
exists yet; README.md has the times measured):

    python lessons/05_full_finetuning.py

Figures go to runs/lessons/05_full_finetuning/.

Legend: V vocabulary, T block size (context), C channels, L blocks, k blocks trained.
"""
import copy
import dataclasses
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.data import World
from tinyllm.finetune import VAL_EXAMPLES, finetune, knowledge_probe, measure_base
from tinyllm.optim import AdamW
from tinyllm.peft import FullFineTuningConfig, get_peft_model
from tinyllm.plots import log_loss_axis, smooth
from tinyllm.presets import DEFAULT_TASK, tuned_lrs
from tinyllm.tasks import format_ok, get_task
from lessons.common import CHECKPOINT, indented, lesson_section, load_base, lr_source

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "05_full_finetuning")
LR = tuned_lrs()["full"]   # the learning rate `python -m tinyllm sweep` chose for full fine-tuning on extract


def mib(n_bytes):
    """Bytes in mebibytes (MiB, 2**20 bytes), as a string."""
    return f"{n_bytes / 2 ** 20:.2f} MiB"


def gpt2_count(config, k=None):
    """GPT-2's parameter count as a formula, and its value: all of it, or the last k blocks and ln_f.

    A block has ln_1 (2C), c_attn (C*3C + 3C), attn.c_proj (C*C + C), ln_2 (2C), mlp.c_fc (C*4C + 4C)
    and mlp.c_proj (4C*C + C): 12C^2 + 13C in all.
    """
    V, T, C, L = config.vocab_size, config.block_size, config.n_embd, config.n_layer
    block = 12 * C * C + 13 * C
    if k is None:
        return (f"V*C + T*C + L*(12C^2 + 13C) + 2C = {V}*{C} + {T}*{C} + {L}*(12*{C}^2 + 13*{C}) + 2*{C}",
                V * C + T * C + L * block + 2 * C)
    return f"k*(12C^2 + 13C) + 2C = {k}*(12*{C}^2 + 13*{C}) + 2*{C}", k * block + 2 * C


def count_trainable(base, method_config):
    """Wrap a copy of the base with the method, as finetune() does; print and return what trains."""
    pm = get_peft_model(copy.deepcopy(base), method_config)
    pm.print_trainable_parameters()
    print(pm.formula())
    trainable = pm.trainable_parameters()
    text, n = gpt2_count(base.config, method_config.last_k_blocks)
    counted = sum(v.size for v in trainable.values())
    print(f"  by hand: {text} = {n:,} ({'equal to' if n == counted else 'NOT equal to'} the {counted:,} counted)")
    weight_bytes = sum(v.nbytes for v in trainable.values())
    state_bytes = AdamW(trainable).state_bytes()
    print(f"  training memory: the trained weights {mib(weight_bytes)}, their gradients {mib(weight_bytes)}, "
          f"AdamW's m and v {mib(state_bytes)} ({state_bytes / weight_bytes:.0f}x the weights)")
    return dict(trainable=counted, formula_count=n, weight_bytes=weight_bytes, adamw_state_bytes=state_bytes)


def scores(predictions, task):
    """How a model's test answers score: the share in the task's format (one word and a newline, right or
    wrong), the share exactly right, and the share right for each field asked (the prompt's last line)."""
    answers = [a for _, a in task.test]
    fields = [p.rsplit("\n", 1)[1] for p, _ in task.test]
    right = [p == a for p, a in zip(predictions, answers)]
    by_field = {f: float(np.mean([r for r, g in zip(right, fields) if g == f])) for f in sorted(set(fields))}
    return dict(format_rate=float(np.mean(format_ok(predictions, task))), accuracy=float(np.mean(right)),
                by_field=by_field)


# ----------------------------------------------------------------------------------------------------
# the lesson's sections, in the order they run

@lesson_section("1. the base model and the task")
def show_task(base, task, before, source):
    """The people in the sentences are invented (their names come from a list, their facts are drawn at
    random), so the answer is never something the model remembers: it must find, in the sentence, the
    field the last line names, and copy its value. Pretraining showed it text that asks for the same skill
    (recaps of invented people's facts, restated in other words), but never this format. The loss counts
    the answer tokens only; the prompt is given, not predicted."""
    c = base.config
    print(f"The base: {source}; {c.n_layer} blocks, C = {c.n_embd}, {base.num_parameters():,} parameters.")
    print(f"The task: {task.name}, {len(task.train)} training, {len(task.val)} validation and {len(task.test)} "
          f"test examples. One of them:")
    prompt, answer = task.train[0]
    print(f"  prompt {prompt!r}\n  answer {answer!r}")
    print(f"\nBefore fine-tuning, greedy decoding gets {before['accuracy']:.1%} of the test answers exactly right.")
    print("What the base writes after the first test prompts:")
    for (prompt, answer), pred in list(zip(task.test, before["predictions"]))[:2]:
        print(f"  {prompt!r}\n    truth {answer!r}\n    base  {pred!r}")
    k = before["knowledge"]
    print(f"What it knows from pretraining: corpus loss {k['corpus_loss']:.3f} nats per character, "
          f"fact recall {k['fact_recall']:.1%} (lesson 04).")


@lesson_section("2. trainable = everything")
def show_trainable(base):
    """model = copy.deepcopy(base); pm = get_peft_model(model, FullFineTuningConfig()): every weight of the
    base trains: the embeddings, every block, the final layer norm (the LM head is wte itself, tied).
    AdamW keeps two numbers per trained weight (m, the running mean of its gradient, and v, of its
    square), so training holds the weights, their gradients and m and v: four copies."""
    return count_trainable(base, FullFineTuningConfig())


@lesson_section("3. training")
def train_full(base, tok, task, before, run, out_dir):
    """tinyllm.finetune.finetune makes the same PeftModel on its own copy of the base and trains it with
    the loop of lesson 04 (tinyllm.train.train): warmup, then cosine decay, and no weight decay (it would
    pull the pretrained weights towards zero)."""
    print(f"{run['steps']} steps of {run['batch_size']} examples, AdamW at lr {run['lr']:g} "
          f"({lr_source('full', run['lr'], task.name)}).\n")
    r = finetune(base, tok, FullFineTuningConfig(), task, save_dir=os.path.join(out_dir, f"full_{task.name}"),
                 out=indented, **run)
    h = r["history"]
    print(f"\nValidation loss per answer token: {h['val_loss'][0]:.3f} before, {h['val_loss'][-1]:.3f} after "
          f"{r['steps']} steps ({r['train_seconds']:.0f} s of training, {1000 * r['seconds_per_step']:.0f} ms a step).")
    print("A few test prompts, with what the model writes before and after:")
    for i in range(min(3, len(task.test))):
        prompt, answer = task.test[i]
        print(f"  {prompt!r}\n    truth  {answer!r}\n    before {before['predictions'][i]!r}\n"
              f"    after  {r['predictions_after'][i]!r}")
    parts = {"before": scores(before["predictions"], task), "after": scores(r["predictions_after"], task)}
    fields = list(parts["after"]["by_field"])
    print(f"\nOn the {len(task.test)} test prompts: in the format (one word, then a newline), exactly right, "
          f"and right by the field asked:")
    print(f"{'':<8} {'in the format':>14} {'exactly right':>14}" + "".join(f"{f:>8}" for f in fields))
    for when, s in parts.items():
        print(f"{when:<8} {s['format_rate']:>14.1%} {s['accuracy']:>14.1%}"
              + "".join(f"{s['by_field'][f]:>8.0%}" for f in fields))
    print("(An answer counts as right only when every character is: 'bakers' for 'baker' is wrong.)")
    return r, parts


@lesson_section("4. what it costs")
def show_costs(r, counts, vocab_size):
    """Three costs, each measured on the run above. Memory while training: AdamW's m and v for every
    trained weight. Storage: the saved result is a whole model, for every task. Forgetting: the weights
    that held the pretraining knowledge were free to move, nothing in the fine-tuning data asks the model
    to go on predicting ordinary text, and nothing holds the weights near the pretrained ones, so the
    model may lose some of what it knew; it is measured with the fine-tuned model, on held-out pretraining
    text (the corpus loss) and on the world's facts (recall, as in lesson 04)."""
    print(f"Memory while training: AdamW's m and v take {mib(r['optimizer_state_bytes'])}, twice the "
          f"{mib(counts['weight_bytes'])} of the weights themselves.")
    print(f"Storage: save_pretrained wrote {mib(r['saved_bytes'])}; a full copy of the model is "
          f"{mib(r['full_copy_bytes'])} (ratio {r['saved_bytes'] / r['full_copy_bytes']:.3f}).")
    print(f"  So every task is a whole model: 10 tasks fine-tuned this way take {mib(10 * r['saved_bytes'])}.")
    kb, ka = r["knowledge_before"], r["knowledge_after"]
    print("Forgetting:")
    print(f"  corpus loss   {kb['corpus_loss']:.3f} -> {ka['corpus_loss']:.3f} nats per character "
          f"({ka['corpus_loss'] - kb['corpus_loss']:+.3f}; guessing uniformly scores ln({vocab_size}) = "
          f"{math.log(vocab_size):.3f})")
    print(f"  fact recall   {kb['fact_recall']:.1%} -> {ka['fact_recall']:.1%} "
          f"({100 * (ka['fact_recall'] - kb['fact_recall']):+.1f} points)")


@lesson_section("5. a cheaper variant: train only the last blocks")
def train_last_k(base, tok, task, before, full, run, k):
    """pm = get_peft_model(model, FullFineTuningConfig(last_k_blocks=k)): the last k blocks and the final
    layer norm train; the blocks below, the embeddings and the LM head (tied to wte) stay frozen. Fewer
    weights train, so AdamW's state and the saved file shrink; the saved file still needs the base to run,
    and a trained block is still a full block. The same run as section 3, quietly:"""
    counts = count_trainable(base, FullFineTuningConfig(last_k_blocks=k))
    last = finetune(base, tok, FullFineTuningConfig(last_k_blocks=k), task, out=lambda line: None, **run)
    runs = {"all weights": full, f"last {k} block{'s' if k > 1 else ''}": last}
    print(f"\n{'':<18} {'trainable':>10} {'AdamW state':>12} {'saved file':>11} {'val loss':>9} {'accuracy':>9} "
          f"{'corpus loss':>12} {'fact recall':>12}")
    for label, r in runs.items():
        print(f"{label:<18} {r['trainable_params']:>10,} {mib(r['optimizer_state_bytes']):>12} "
              f"{mib(r['saved_bytes']):>11} {r['final_val_loss']:>9.3f} {r['accuracy_after']:>9.1%} "
              f"{r['knowledge_after']['corpus_loss']:>12.3f} {r['knowledge_after']['fact_recall']:>12.1%}")
    print(f"{'(before)':<18} {'':>10} {'':>12} {'':>11} {full['history']['val_loss'][0]:>9.3f} "
          f"{before['accuracy']:>9.1%} {before['knowledge']['corpus_loss']:>12.3f} "
          f"{before['knowledge']['fact_recall']:>12.1%}")
    return runs, counts


@lesson_section("figures")
def save_figures(runs, out_dir):
    """loss_curves.png: train and validation loss of both runs against steps.
    costs.png: AdamW's state and the saved file per task against a full copy of the model, and the
    facts recalled before and after each run."""
    paths = [os.path.join(out_dir, "loss_curves.png"), os.path.join(out_dir, "costs.png")]
    plot_losses(runs, paths[0])
    plot_costs(runs, paths[1])
    for path in paths:
        print(f"saved {os.path.relpath(path)}")
    return paths


# ----------------------------------------------------------------------------------------------------
# figures

def plot_losses(runs, path):
    fig, ax = plt.subplots(figsize=(10, 6))
    for (label, r), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        h = r["history"]
        ax.plot(h["step"], smooth(h["train_loss"], 10), color=color, lw=1.5,
                label=f"{label}: train loss (mean of the last 10 steps)")
        ax.plot(h["val_step"], h["val_loss"], "o--", color=color, lw=1.5, label=f"{label}: validation loss")
    log_loss_axis(ax)
    ax.set_xlabel(f"step (batches of {r['batch_size']} examples)")
    ax.set_ylabel("loss per answer token (nats, log scale)")
    ax.set_title(f"Full fine-tuning on the {r['task']} task: all weights, or only the last blocks")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_costs(runs, path):
    labels = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    x = np.arange(len(labels))
    ax = axes[0]
    state = [runs[k]["optimizer_state_bytes"] / 2 ** 20 for k in labels]
    saved = [runs[k]["saved_bytes"] / 2 ** 20 for k in labels]
    bars = ax.bar(x - 0.2, state, 0.4, color="tab:purple", label="AdamW state (m and v) while training")
    ax.bar_label(bars, fmt="%.2f MiB", fontsize=9)
    bars = ax.bar(x + 0.2, saved, 0.4, color="tab:gray", label="file written by save_pretrained")
    ax.bar_label(bars, fmt="%.2f MiB", fontsize=9)
    ax.axhline(runs[labels[0]]["full_copy_bytes"] / 2 ** 20, color="black", ls="--", label="a full copy of the model")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("mebibytes (MiB)")
    ax.set_title("Memory and storage per task")
    ax.legend(fontsize=9)
    ax = axes[1]
    before = [100 * runs[k]["knowledge_before"]["fact_recall"] for k in labels]
    after = [100 * runs[k]["knowledge_after"]["fact_recall"] for k in labels]
    bars = ax.bar(x - 0.2, before, 0.4, color="tab:green", label="before fine-tuning")
    ax.bar_label(bars, fmt="%.1f%%", fontsize=9)
    bars = ax.bar(x + 0.2, after, 0.4, color="tab:red", label="after fine-tuning")
    ax.bar_label(bars, fmt="%.1f%%", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("pretraining facts recalled exactly (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Forgetting: fact recall before and after")
    ax.legend(fontsize=9)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=300, lr=LR, batch_size=8, last_k_blocks=1, checkpoint=CHECKPOINT, config=None, n_test=None,
         n_val=VAL_EXAMPLES, seed=0, out_dir=OUT_DIR):
    """Run the lesson.

    steps, lr, batch_size: each fine-tuning run's; last_k_blocks: the variant's k; checkpoint: the
    pretrained model (made if missing); config: GPTConfig fields of a random model to use instead (for
    tests); n_test: score only the first n test examples (None: all); n_val: validation examples in the
    validation loss.
    Returns a dict of what it measured (and the paths of its figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config, seed)
    task = get_task(DEFAULT_TASK, World(data["world_seed"], data["n_people"]))
    task = dataclasses.replace(task, test=task.test[:n_test])
    probe = knowledge_probe(data, tok, base.config.block_size)
    before = measure_base(base, tok, task, probe)      # the same for every run: measured once
    run = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, n_val=n_val, probe=probe, before=before,
               eval_interval=max(1, steps // 6), log_interval=max(1, steps // 6))
    show_task(base, task, before, source)
    counts = show_trainable(base)
    full, parts = train_full(base, tok, task, before, run, out_dir)
    show_costs(full, counts, base.config.vocab_size)
    runs, last_counts = train_last_k(base, tok, task, before, full, run, last_k_blocks)
    figures = save_figures(runs, out_dir)
    last = list(runs.values())[1]
    return dict(pretrained=config is None, task=task.name, steps=steps,
                trainable_params=full["trainable_params"], total_params=base.num_parameters(),
                formula_count=counts["formula_count"], weight_bytes=counts["weight_bytes"],
                optimizer_state_bytes=full["optimizer_state_bytes"], saved_bytes=full["saved_bytes"],
                full_copy_bytes=full["full_copy_bytes"], val_loss_before=full["history"]["val_loss"][0],
                val_loss_after=full["final_val_loss"], train_loss_first=full["history"]["train_loss"][0],
                accuracy_before=before["accuracy"], accuracy_after=full["accuracy_after"], scores=parts,
                knowledge_before=before["knowledge"], knowledge_after=full["knowledge_after"],
                last_k_blocks=last_k_blocks, last_k_trainable_params=last["trainable_params"],
                last_k_formula_count=last_counts["formula_count"], last_k_saved_bytes=last["saved_bytes"],
                last_k_optimizer_state_bytes=last["optimizer_state_bytes"],
                last_k_val_loss_after=last["final_val_loss"], last_k_accuracy_after=last["accuracy_after"],
                last_k_knowledge_after=last["knowledge_after"], figures=figures)


if __name__ == "__main__":
    main()
