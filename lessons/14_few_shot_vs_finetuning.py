"""
Lesson 14: few-shot prompting against fine-tuning.

Instead of training, one can show the base model k solved examples in its prompt and let it continue the
pattern ("in-context learning"). It costs nothing to set up, but every query carries the k examples, and
the context must hold them. This lesson measures both sides:

  1. how many shots fit: tinyllm's context is 128 characters, and the examples of each task are 40 to 100
  2. the base model with k = 0, 1, 2, ... shots on qa (three different choices of shots): test accuracy,
     the loss on the answer tokens, and the tokens each query needs
  3. the same base model fine-tuned with LoRA and with full fine-tuning, asked with no shots at all
  4. the bill: prompt tokens per query, against the one-time cost of fine-tuning

Run from the repository root (about 1 minute on 2 CPU cores; pretraining first if there is no checkpoint):

    python lessons/14_few_shot_vs_finetuning.py

Figures go to runs/lessons/14_few_shot_vs_finetuning/.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.presets import method_config, tuned_lrs

LRS = tuned_lrs()
from tinyllm.data import World
from tinyllm.finetune import finetune, val_loss_fn
from tinyllm.tasks import TASKS, evaluate, few_shot_task, get_task
from lessons.common import CHECKPOINT, load_base, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "14_few_shot_vs_finetuning")
COLORS = {"lora": "tab:blue", "full": "tab:red"}


def tokens(tok, text):
    return len(tok.encode(text))


def fits(tok, task, block_size):
    """Whether every val and test prompt of a (few-shot) task, with its answer, fits in the context: greedy
    decoding of an answer of n tokens after a prompt of p needs p + n - 1 positions."""
    return all(tokens(tok, p) + tokens(tok, a) - 1 <= block_size for p, a in task.val + task.test)


# ----------------------------------------------------------------------------------------------------
# 1. how many shots fit

def shots_that_fit(tok, world, block_size, seeds, max_shots):
    section(f"1. how many solved examples fit in a context of {block_size} tokens?")
    print("A k-shot prompt is k training examples (prompt + answer) followed by the query; the same k examples for")
    print(f"every query of one choice (seed). For each task and k, over {len(seeds)} choices of shots:\n")
    print(f"{'task':<9} {'example tokens':>15}   " + "  ".join(f"{'k=' + str(k):>11}" for k in range(max_shots + 1)))
    table = {}
    for name in TASKS:
        task = get_task(name, world)
        lengths = [tokens(tok, p + a) for p, a in task.train]
        cells, table[name] = [], {}
        for k in range(max_shots + 1):
            ok = [fits(tok, few_shot_task(task, k, s) if k else task, block_size) for s in seeds]
            table[name][k] = sum(ok)
            cells.append(f"{sum(ok)}/{len(seeds)} fit")
        print(f"{name:<9} {min(lengths):>6} to {max(lengths):<6}   " + "  ".join(f"{c:>11}" for c in cells))
    largest = {name: max([k for k, n in row.items() if n == len(seeds)], default=None) for name, row in table.items()}
    print("\nLargest k that fits for every choice of shots: " + ", ".join(f"{n} k = {k}" for n, k in largest.items()) + ".")
    print("GPT-2's 1,024 tokens (and today's much longer contexts) push this limit out, but never remove it.")
    return table, largest


# ----------------------------------------------------------------------------------------------------
# 2. the base model, prompted

def prompted(base, tok, task, ks, seeds):
    section(f"2. the base model with k shots ({task.name})")
    print(f"{'k':>2} {'seed':>5} {'tokens/query':>13} {'answer loss':>12} {'test accuracy':>14}")
    rows = {}
    for k in ks:
        rows[k] = []
        for s in (seeds if k else seeds[:1]):                      # k = 0 has no shots to choose
            shot = few_shot_task(task, k, s) if k else task
            if not fits(tok, shot, base.config.block_size):
                print(f"{k:>2} {s:>5}   does not fit")
                continue
            row = {"seed": s, "tokens": float(np.mean([tokens(tok, p) for p, _ in shot.test])),
                   "answer_loss": float(val_loss_fn(tok, shot, base.config.block_size)(base)),
                   "accuracy": evaluate(base, tok, shot)["accuracy"]}
            rows[k].append(row)
            print(f"{k:>2} {s:>5} {row['tokens']:>13.1f} {row['answer_loss']:>12.3f} {row['accuracy']:>14.3f}", flush=True)
    print("(tokens/query: mean prompt tokens of a test query; answer loss: nats per answer token on the val questions;")
    print(" accuracy: exact match of the greedy answer on the test questions)")
    example = few_shot_task(task, max(k for k in rows if rows[k]), seeds[0]).test[0][0]
    print(f"\nOne {max(k for k in rows if rows[k])}-shot prompt, as the model reads it:\n" +
          "\n".join("  | " + line for line in example.split("\n")))
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. fine-tuned

def tuned(base, tok, task, methods, steps, batch_size):
    section(f"3. the base model fine-tuned, then asked with no shots ({task.name})")
    if task.name != "record":
        print(f"(tinyllm.compare tuned the learning rates on the record task; on {task.name} another rate may suit "
              f"some methods better.)")
    rows = {}
    for m in methods:
        r = finetune(base, tok, method_config(m), task, steps=steps, batch_size=batch_size, lr=LRS[m],
                     eval_interval=steps, out=lambda line: None, log_interval=steps)
        mean_example = np.mean([tokens(tok, p + a) - 1 for p, a in task.train])
        rows[m] = {"tokens": float(np.mean([tokens(tok, p) for p, _ in task.test])) + r["virtual_tokens"],
                   "answer_loss": r["final_val_loss"], "accuracy": r["accuracy_after"],
                   "train_examples": steps * batch_size, "train_tokens": float(steps * batch_size * mean_example),
                   "seconds": r["train_seconds"], "params": r["trainable_params"]}
        print(f"  {m:<5} {steps} steps of {batch_size} ({rows[m]['train_examples']:,} examples, about "
              f"{rows[m]['train_tokens']:,.0f} tokens, {r['train_seconds']:.0f} s): answer loss {r['final_val_loss']:.3f}, "
              f"test accuracy {r['accuracy_after']:.3f}, {rows[m]['tokens']:.1f} tokens per query", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# figure

def plot(prompt_rows, tuned_rows, task_name, n_test, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, label in ((ax1, "accuracy", f"test accuracy (exact match, {n_test} questions)"),
                           (ax2, "answer_loss", "loss on the answer tokens (nats per token)")):
        ks = [k for k in prompt_rows if prompt_rows[k]]
        x = [np.mean([r["tokens"] for r in prompt_rows[k]]) for k in ks]
        y = [np.mean([r[key] for r in prompt_rows[k]]) for k in ks]
        lo = [y_ - min(r[key] for r in prompt_rows[k]) for k, y_ in zip(ks, y)]
        hi = [max(r[key] for r in prompt_rows[k]) - y_ for k, y_ in zip(ks, y)]
        ax.errorbar(x, y, yerr=[lo, hi], fmt="o-", color="gray", lw=2, capsize=5,
                    label="base model, k shots (mean; bars: range over choices of shots)")
        for k, x_, y_ in zip(ks, x, y):
            ax.annotate(f"k={k}", (x_, y_), textcoords="offset points", xytext=(6, 6), color="gray")
        for m, r in tuned_rows.items():
            ax.plot([r["tokens"]], [r[key]], "*", ms=16, color=COLORS.get(m, "black"), label=f"{m} fine-tuned, 0 shots")
        ax.set_xlim(right=max(x) * 1.1)                     # room for the last label
        ax.set_xlabel("prompt tokens per query")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.set_ylim(-0.02, max(0.2, 1.2 * max([r["accuracy"] for r in tuned_rows.values()] +
                                          [r["accuracy"] for rs in prompt_rows.values() for r in rs])))
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "125" else ""))
    ax1.set_title(f"Accuracy against tokens per query ({task_name})")
    ax2.set_title(f"Answer loss against tokens per query ({task_name}, log scale)")
    ax1.legend(fontsize=9, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(task_name="qa", max_shots=3, seeds=(0, 1, 2), methods=("lora", "full"), steps=200, batch_size=8,
         checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    task_name: the task prompted and fine-tuned; max_shots: the largest k tried; seeds: choices of shots;
    methods, steps, batch_size: the fine-tuning runs (learning rates: tinyllm.compare's); checkpoint: the
    pretrained model (pretrained first if missing); config: GPTConfig fields of a random model to use instead
    (tests). Returns a dict of the measured numbers and the figure's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config)
    world = World(data["world_seed"], data["n_people"])
    block_size = base.config.block_size
    print(f"Base model: {source}, a context of {block_size} tokens (characters).")
    table, largest = shots_that_fit(tok, world, block_size, seeds, max_shots)

    task = get_task(task_name, world)
    ks = [k for k in range(max_shots + 1) if table[task_name][k] > 0]
    prompt_rows = prompted(base, tok, task, ks, list(seeds))
    tuned_rows = tuned(base, tok, task, methods, steps, batch_size)

    section("4. what it shows, and the bill")
    best_k = max((k for k in prompt_rows if prompt_rows[k]),
                 key=lambda k: np.mean([r["accuracy"] for r in prompt_rows[k]]))
    shot_acc = np.mean([r["accuracy"] for r in prompt_rows[best_k]])
    zero = prompt_rows[0][0]
    loss_by_k = {k: float(np.mean([r["answer_loss"] for r in rows])) for k, rows in prompt_rows.items() if rows}
    print("Prompting: " + (f"the best k was {best_k}, mean test accuracy {shot_acc:.3f}" if shot_acc > 0 else
                           "no k answered a single test question exactly") +
          "; the answer loss went " + " -> ".join(f"{loss_by_k[k]:.3f} (k={k})" for k in sorted(loss_by_k)) + ".")
    for m, r in tuned_rows.items():
        print(f"Fine-tuned {m}: test accuracy {r['accuracy']:.3f}, answer loss {r['answer_loss']:.3f}, with "
              f"{r['tokens']:.0f} tokens per query.")
    k_max = max(k for k in prompt_rows if prompt_rows[k])
    extra = np.mean([r["tokens"] for r in prompt_rows[k_max]]) - zero["tokens"]
    print(f"\nThe bill: {k_max} shots add {extra:.0f} prompt tokens to every query "
          f"({(zero['tokens'] + extra) / zero['tokens']:.1f}x the 0-shot prompt), and attention's cost grows with the "
          f"square of the length.")
    for m, r in tuned_rows.items():
        # a training token costs a forward and a backward. The backward is about two forwards when every weight
        # gets a gradient (full), about one when frozen weights skip theirs (tinyllm.layers.linear_backward).
        factor = 3 if m == "full" else 2
        break_even = factor * r["train_tokens"] / max(extra, 1e-9)
        print(f"{m} fine-tuning processed about {r['train_tokens']:,.0f} tokens, forward and backward: about "
              f"{factor} forwards each, {factor * r['train_tokens']:,.0f} in all, paid back after about "
              f"{break_even:,.0f} {k_max}-shot queries.")
    best_tuned = min(tuned_rows.values(), key=lambda r: r["answer_loss"])["answer_loss"] if tuned_rows else None
    if loss_by_k[k_max] < loss_by_k[0]:
        print(f"The shots do teach something: the answer loss falls from {loss_by_k[0]:.3f} to {loss_by_k[k_max]:.3f} with "
              f"{k_max} of them" + (f", but fine-tuning reaches {best_tuned:.3f} with none." if best_tuned else "."))
    print("A tiny model trained on one small corpus is a weak in-context learner. Large pretrained models are much")
    print("better at it, which is why few-shot prompting, free to set up, is the first thing to try with them.")

    section("figure")
    path = os.path.join(out_dir, "few_shot_vs_finetuning.png")
    plot(prompt_rows, tuned_rows, task_name, len(task.test), path)
    print(f"saved {os.path.relpath(path)}: accuracy and answer loss against prompt tokens per query")
    return dict(source=source, task=task_name, block_size=block_size, fit=table, largest_k=largest,
                prompted=prompt_rows, tuned=tuned_rows, best_k=best_k, extra_tokens=float(extra), figures=[path])


if __name__ == "__main__":
    main()
