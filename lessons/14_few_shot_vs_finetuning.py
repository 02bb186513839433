"""
Lesson 14: few-shot prompting against fine-tuning.

Instead of training, one can show the base model k solved examples in its prompt and let it continue the
pattern ("in-context learning"). It costs nothing to set up, but every query carries the k examples, and
the context must hold them. This lesson measures both sides:

  1. how many solved examples fit in the context, for every task
  2. the base model with k = 0, 1, ... shots on the lab's task (several choices of shots): test accuracy,
     the loss on the answer tokens, and the tokens each query needs
  3. the same base model fine-tuned with LoRA and with full fine-tuning, asked with no shots at all
  4. the bill: prompt tokens per query, against the one-time cost of fine-tuning
  5. the figure

Run from the repository root (a few minutes on 2 cores; README.md has the measured time; pretraining
first if there is no checkpoint):

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

from tinyllm.data import World
from tinyllm.finetune import finetune, val_loss_fn
from tinyllm.presets import DEFAULT_TASK, PRESETS, method_config, tuned
from tinyllm.tasks import TASKS, evaluate, few_shot_task, get_task
from lessons.common import CHECKPOINT, lesson_section, load_base

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "14_few_shot_vs_finetuning")
# The lab's task, extract: fine-tuning learns it within this lesson's budget, so the gap between the two sides
# is about prompting, not about a task no method can learn yet (qa, whose answers are facts pretraining taught,
# stays hard for every method at this budget). Its prompts are long, so only one shot fits, and not for every
# choice of it: section 1 shows that limit for every task, and with main(task_name="qa"), whose prompts
# are shorter, more shots fit (section 1 prints how many).
TASK = DEFAULT_TASK


def tokens(tok, text):
    return len(tok.encode(text))


def shots(k):
    return f"{k} shot{'' if k == 1 else 's'}"


def fits(tok, task, block_size):
    """Whether every val and test prompt of a (few-shot) task, with its answer, fits in the context: greedy
    decoding of an answer of n tokens after a prompt of p needs p + n - 1 positions."""
    return all(tokens(tok, p) + tokens(tok, a) - 1 <= block_size for p, a in task.val + task.test)


# ----------------------------------------------------------------------------------------------------

@lesson_section("1. how many solved examples fit in the context?")
def shots_that_fit(tok, world, block_size, seeds, max_shots, task_name):
    """A k-shot prompt is k training examples (prompt + answer) followed by the query; the same k examples
    for every query of one choice (seed). For each task and k: for how many choices of shots every val and
    test query, with its answer, still fits in the context. GPT-2's 1,024 tokens (and today's much longer
    contexts) push this limit out, but never remove it."""
    print(f"The context: {block_size} tokens (characters). Over {len(seeds)} choices of shots:\n")
    print(f"{'task':<9} {'example tokens':>15}   " + "  ".join(f"{'k=' + str(k):>11}" for k in range(max_shots + 1)))
    table = {}
    for name in TASKS:
        task = get_task(name, world)
        lengths = [tokens(tok, p + a) for p, a in task.train]
        table[name] = {k: sum(fits(tok, few_shot_task(task, k, s) if k else task, block_size) for s in seeds)
                       for k in range(max_shots + 1)}
        print(f"{name:<9} {min(lengths):>6} to {max(lengths):<6}   " +
              "  ".join(f"{f'{n}/{len(seeds)} fit':>11}" for n in table[name].values()))
    largest = {name: max([k for k, n in row.items() if n == len(seeds)], default=None) for name, row in table.items()}
    print("\nLargest k that fits for every choice of shots: " + ", ".join(f"{n} k = {k}" for n, k in largest.items()) + ".")
    print(f"The rest of the lesson uses {task_name}.")
    return table, largest


@lesson_section("2. the base model with k shots")
def prompted(base, tok, task, ks, seeds):
    """tokens/query: the mean prompt tokens of a test query; answer loss: nats per answer token on the val
    examples (how likely the model finds the right answer, even when it does not produce it); accuracy:
    exact match of the greedy answer on the test examples. k = 0 has no shots to choose, so one row."""
    print(f"Task {task.name!r}, e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}.\n")
    print(f"{'k':>2} {'seed':>5} {'tokens/query':>13} {'answer loss':>12} {'test accuracy':>14}")
    rows = {}
    for k in ks:
        rows[k] = []
        for s in (seeds if k else seeds[:1]):
            shot = few_shot_task(task, k, s) if k else task
            if not fits(tok, shot, base.config.block_size):
                print(f"{k:>2} {s:>5}   does not fit")
                continue
            row = {"seed": s, "tokens": float(np.mean([tokens(tok, p) for p, _ in shot.test])),
                   "answer_loss": float(val_loss_fn(tok, shot, base.config.block_size)(base)),
                   "accuracy": evaluate(base, tok, shot)["accuracy"]}
            rows[k].append(row)
            print(f"{k:>2} {s:>5} {row['tokens']:>13.1f} {row['answer_loss']:>12.3f} {row['accuracy']:>14.3f}", flush=True)
    k_max = max(k for k in rows if rows[k])
    print(f"\nOne {k_max}-shot prompt, as the model reads it:\n" +
          "\n".join("  | " + line for line in few_shot_task(task, k_max, seeds[0]).test[0][0].split("\n")))
    return rows


@lesson_section("3. the base model fine-tuned, then asked with no shots")
def fine_tuned(base, tok, task, methods, steps, batch_size):
    """Each method trains on the task's training examples and is then asked the test examples bare, as in
    section 2's k = 0 row. Learning rates: the sweep's (`python -m tinyllm sweep`) for this task, or where it
    has not covered it, those it tuned on the lab's default task."""
    found = tuned(task.name)
    rows = {}
    for m in methods:
        t = found[m] if found[m]["source"] != "fallback" else tuned(DEFAULT_TASK)[m]
        r = finetune(base, tok, method_config(m), task, steps=steps, batch_size=batch_size, lr=t["lr"],
                     eval_interval=steps, out=lambda line: None, log_interval=steps)
        mean_example = np.mean([tokens(tok, p + a) - 1 for p, a in task.train])
        rows[m] = {"tokens": float(np.mean([tokens(tok, p) for p, _ in task.test])) + r["virtual_tokens"],
                   "answer_loss": r["final_val_loss"], "accuracy": r["accuracy_after"],
                   "train_examples": steps * batch_size, "train_tokens": float(steps * batch_size * mean_example),
                   "seconds": r["train_seconds"], "params": r["trainable_params"], "lr": t["lr"]}
        where = t["source"] if t["source"] != "fallback" else "the preset's: no sweep yet"
        print(f"  {m:<5} lr {t['lr']:g} ({where}); {steps} steps of {batch_size} ({rows[m]['train_examples']:,} "
              f"examples, about {rows[m]['train_tokens']:,.0f} tokens, {r['train_seconds']:.0f} s): answer loss "
              f"{r['final_val_loss']:.3f}, test accuracy {r['accuracy_after']:.3f}, {rows[m]['tokens']:.1f} tokens "
              f"per query", flush=True)
    return rows


@lesson_section("4. what it shows, and the bill")
def the_bill(prompt_rows, tuned_rows):
    """Shots are paid for on every query: k of them add their tokens to each prompt, and attention's cost
    grows with the square of the length. Fine-tuning is paid once: a training token costs a forward and a
    backward, and the backward costs about two forwards when every weight gets a gradient (full fine-tuning:
    dx and dW for every linear) and about one when frozen weights skip their dW
    (tinyllm.layers.linear_backward). Break-even: the number of queries after which the shots have cost as
    many forward passes as the fine-tuning did."""
    ks = [k for k in prompt_rows if prompt_rows[k]]
    best_k = max(ks, key=lambda k: np.mean([r["accuracy"] for r in prompt_rows[k]]))
    shot_acc = np.mean([r["accuracy"] for r in prompt_rows[best_k]])
    loss_by_k = {k: float(np.mean([r["answer_loss"] for r in prompt_rows[k]])) for k in ks}
    print("Prompting: " + (f"the best k was {best_k}, mean test accuracy {shot_acc:.3f}" if shot_acc > 0 else
                           "no k answered a single test example exactly") +
          "; the answer loss went " + " -> ".join(f"{loss_by_k[k]:.3f} (k={k})" for k in ks) + ".")
    for m, r in tuned_rows.items():
        print(f"Fine-tuned {m}: test accuracy {r['accuracy']:.3f}, answer loss {r['answer_loss']:.3f}, with "
              f"{r['tokens']:.0f} tokens per query.")
    k_max, zero = ks[-1], prompt_rows[0][0]["tokens"]
    extra = np.mean([r["tokens"] for r in prompt_rows[k_max]]) - zero
    print(f"\nThe bill: {shots(k_max)} add{'s' if k_max == 1 else ''} {extra:.0f} prompt tokens to every query "
          f"({(zero + extra) / zero:.1f}x the 0-shot prompt).")
    for m, r in tuned_rows.items():
        factor = 3 if m == "full" else 2           # forward + backward, in forwards (see the docstring)
        print(f"{m} fine-tuning processed about {r['train_tokens']:,.0f} tokens, about {factor} forwards each: "
              f"{factor * r['train_tokens']:,.0f} token-forwards, paid back after about "
              f"{factor * r['train_tokens'] / max(extra, 1e-9):,.0f} {k_max}-shot queries.")
    best_tuned = min((r["answer_loss"] for r in tuned_rows.values()), default=None)
    if loss_by_k[k_max] < loss_by_k[0]:
        print(f"The shots do teach something: the answer loss falls from {loss_by_k[0]:.3f} to {loss_by_k[k_max]:.3f} "
              f"with {shots(k_max)}" + (f", but fine-tuning reaches {best_tuned:.3f} with none." if best_tuned is not None else "."))
    print("A tiny model trained on one small corpus is a weak in-context learner. Large pretrained models are much "
          "better at it, which is why few-shot prompting, free to set up, is the first thing to try with them.")
    return best_k, float(extra)


@lesson_section("5. the figure")
def save_figure(prompt_rows, tuned_rows, task_name, n_test, out_dir):
    """few_shot_vs_finetuning.png: test accuracy and answer loss against the prompt tokens a query needs;
    the base model with k shots (the range over choices of shots), and each fine-tuned model with none."""
    path = os.path.join(out_dir, "few_shot_vs_finetuning.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, label in ((ax1, "accuracy", f"test accuracy (exact match, {n_test} examples)"),
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
            ax.plot([r["tokens"]], [r[key]], "*", ms=16, color=PRESETS[m].color,
                    label=f"{PRESETS[m].label} fine-tuned, 0 shots")
        ax.set_xlim(right=max(x) * 1.1)                     # room for the last label
        ax.set_xlabel("prompt tokens per query")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.set_ylim(-0.02, max(0.2, 1.2 * max([r["accuracy"] for r in tuned_rows.values()] +
                                          [r["accuracy"] for rs in prompt_rows.values() for r in rs])))
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "125" else ""))
    ax1.set_title(f"Accuracy against tokens per query ({task_name})")
    ax2.set_title(f"Answer loss against tokens per query ({task_name}, log scale)")
    ax1.legend(fontsize=9, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {os.path.relpath(path)}")
    return path


# ----------------------------------------------------------------------------------------------------

def main(task_name=TASK, max_shots=3, seeds=(0, 1, 2), methods=("lora", "full"), steps=200, batch_size=8,
         checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson.

    task_name: the task prompted and fine-tuned (see TASK); max_shots: the largest k tried;
    seeds: choices of shots; methods, steps, batch_size: the fine-tuning runs; checkpoint: the pretrained
    model (pretrained first if missing); config: GPTConfig fields of a random model to use instead (tests).
    Returns a dict of the measured numbers and the figure's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config)
    world, block_size = World(data["world_seed"], data["n_people"]), base.config.block_size
    print(f"Base model: {source}.")
    table, largest = shots_that_fit(tok, world, block_size, seeds, max_shots, task_name)
    task = get_task(task_name, world)
    prompt_rows = prompted(base, tok, task, [k for k in range(max_shots + 1) if table[task_name][k] > 0], list(seeds))
    tuned_rows = fine_tuned(base, tok, task, methods, steps, batch_size)
    best_k, extra = the_bill(prompt_rows, tuned_rows)
    path = save_figure(prompt_rows, tuned_rows, task_name, len(task.test), out_dir)
    return dict(source=source, task=task_name, block_size=block_size, fit=table, largest_k=largest,
                prompted=prompt_rows, tuned=tuned_rows, best_k=best_k, extra_tokens=extra, figures=[path])


if __name__ == "__main__":
    main()
