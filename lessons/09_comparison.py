"""
Lesson 09: the fine-tuning methods side by side, and what the usual claims about them look like measured.

Introductions to fine-tuning say many things: that it beats few-shot prompting, that full fine-tuning is
expensive and forgets, that PEFT methods are cheap and keep what the model knew, that LoRA performs better
and prefix tuning is the most parameter-efficient. Here every one of those sentences is either a fact with
its arithmetic, or a measurement that a rule written in code (tinyllm/claims.py) turns into a verdict, with
the noise of the seeds and of the test set taken into account. Nothing in the verdict column is typed by
hand. This lesson runs `python -m tinyllm compare` (tinyllm.compare.compare) and reads its results.

Run from the repository root (several minutes on 2 cores with the pretraining; see README.md for the time
measured):

    python lessons/09_comparison.py                # the extract task, 3 seeds
    python lessons/09_comparison.py all            # every task (measures the claims about classification)

Figures and report.md go to runs/lessons/09_comparison/.
"""
import os
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

from tinyllm import GPT, GPTConfig
from tinyllm.claims import FACT, INCONCLUSIVE, MIXED, NOT_MEASURED, NOT_SUPPORTED, SMOKE, SUPPORTED
from tinyllm.compare import DEFAULT_CHECKPOINT, compare
from tinyllm.peft import get_peft_model
from tinyllm.presets import DEFAULT_TASK, MAIN_METHODS, PRESETS, method_config, tuned
from lessons.common import indented, lesson_section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "09_comparison")


@lesson_section("1. the methods, what each trains, and how long")
def show_methods(task):
    """Each method at the sizes the comparison uses, the numbers it trains, and the learning rate and step
    budget `python -m tinyllm sweep` chose for it on validation data (tinyllm/sweeps/<task>/): a method
    that trains few numbers wants a larger step for each, and one stopped while its loss still falls is
    measured on how fast it starts, not where it ends. 'flattened': doubling the budget no longer lowered
    the validation loss by 5%; where it still did, the comparison stops at the most steps it affords and
    the report says how much more doubling would have given."""
    base = GPT(GPTConfig())
    found = tuned(task)
    for m in MAIN_METHODS:
        pm = get_peft_model(GPT(GPTConfig()), method_config(m))
        n, _ = pm.get_nb_trainable_parameters()
        t = found[m]
        budget = "no sweep: a preset lr" if t["source"] == "fallback" else \
            f"{t['steps']} steps, {'flattened' if t['flattened'] else 'still falling'}"
        print(f"{PRESETS[m].label:8} {n:>9,} trainable ({100 * n / base.num_parameters():6.2f}%)  lr {t['lr']:<6g} "
              f"{budget}\n{'':10}{pm.formula()}")


@lesson_section("2. fine-tuning every method, every seed")
def run_comparison(task, seeds, seed, steps, quick, checkpoint, out_dir):
    """tinyllm.compare.compare pretrains a model if there is none, then for every method and seed runs the
    training loop every lesson uses (tinyllm.train.train), measures test accuracy, the loss on held-out
    pretraining text and the recall of the world's facts with the method switched on, times one step of
    every method in turns, and runs a task after the task (full fine-tuning continued on a second task; a
    second LoRA adapter beside the first). Its progress lines:"""
    return compare(task=task, seeds=seeds, seed=seed, steps=steps, out=out_dir, quick=quick, echo=indented,
                   checkpoint=checkpoint, command=f"python lessons/09_comparison.py {task}")


@lesson_section("3. what the files show")
def show_files(out_dir):
    """report.md starts with the claims, their verdicts and the numbers behind each, then says how to read
    them; every figure has a caption there. What to look for:
      loss_<task>.png   each method's validation loss against steps and against seconds of training
      accuracy.png      test accuracy (whiskers: the seeds' spread), the base model and its best few-shot prompt
      forgetting.png    what the model still knows from pretraining with each method switched on
      sequential_<task>.png  task after task: full fine-tuning overwrites the first task, adapters do not
      step_time.png     a training step of each method, timed in turns
      memory.png        AdamW's state while training and the file each method saves"""
    for name in sorted(os.listdir(out_dir)):
        if name.endswith((".png", ".md", ".json")):
            print(f"  {os.path.relpath(os.path.join(out_dir, name))}")


@lesson_section("4. the claims, measured at this scale")
def show_claims(claims):
    """A verdict is about THIS model (under a million parameters, a character vocabulary) and THIS budget.
    'fact': true by construction, shown with its arithmetic. 'inconclusive': the difference is within the
    noise of the seeds and the test set (a second run with other seeds, --seed 10, may come out either
    way; a supported or not-supported verdict should not flip). 'mixed': its parts disagree. 'not measured':
    the run lacks what it needs (run `python lessons/09_comparison.py all` for classification). The rules
    are in tinyllm/claims.py next to each claim: change a margin and see what flips."""
    width = max(len(c["claim"]) for c in claims)
    for i, c in enumerate(claims, 1):
        print(f"{i:>2}. {c['claim']:<{width}}  {c['verdict'].upper()}")
        for line in textwrap.wrap(c["measured"], 96):
            print(f"      {line}")
    counts = {v: sum(c["verdict"] == v for c in claims)
              for v in (SUPPORTED, NOT_SUPPORTED, MIXED, INCONCLUSIVE, NOT_MEASURED, FACT, SMOKE)}
    print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items() if n))


def main(task=DEFAULT_TASK, seeds=None, seed=0, steps=None, quick=False, checkpoint=None, out_dir=OUT_DIR):
    """Run the lesson: the comparison of tinyllm.compare.compare, with explanations.

    task: one of tinyllm.tasks.TASKS or 'all'; seeds: runs per method (default 3); seed: the first seed;
    steps: the same budget for every method instead of the sweep's; quick: a smoke test (a tiny pretraining,
    a few steps, no verdicts); checkpoint: the pretrained model (default runs/pretrain/ckpt.npz, made if
    missing; with quick, a tiny one in out_dir).
    Returns a dict: per task and method the test accuracy, val loss, ms per step and fact recall; the claims'
    verdicts; the report's and the figures' paths.
    """
    show_methods(task if task != "all" else DEFAULT_TASK)
    results = run_comparison(task, seeds, seed, steps, quick,
                             checkpoint or (None if quick else os.path.join(ROOT, DEFAULT_CHECKPOINT)), out_dir)
    show_files(out_dir)
    show_claims(results["claims"])
    metrics = {t: {m: {"accuracy": s["accuracy_after"]["mean"], "val_loss": s["final_val_loss"]["mean"],
                       "ms_per_step": 1e3 * r["step_times"][m]["median"],
                       "fact_recall": s["fact_recall_after"]["mean"]}
                   for m, s in r["summary"].items()} for t, r in results["tasks"].items()}
    return dict(metrics=metrics, claims={c["claim"]: c["verdict"] for c in results["claims"]},
                seconds=results["timing"]["total_seconds"], report=os.path.join(out_dir, "report.md"),
                figures=sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".png")))


if __name__ == "__main__":
    main(task=sys.argv[1] if len(sys.argv) > 1 else DEFAULT_TASK)
