"""
Lesson 09: the fine-tuning methods side by side, and what the usual claims about them look like measured.

Introductions to fine-tuning say many things: that it beats few-shot prompting, that full fine-tuning is
expensive and forgets, that PEFT methods are cheap and keep what the model knew, that LoRA performs
better and prefix tuning is the most parameter-efficient. Here every one of those sentences is a
measurement, and a rule written in code (tinyllm/claims.py, CLAIMS) turns the measurement into a
verdict: supported, not supported, mixed, or not measured. Nothing in the verdict column is typed by hand.

This lesson runs the same comparison as `python -m tinyllm compare` (tinyllm.compare.compare):

  1. one pretrained model (lesson 04's recipe; made first if runs/pretrain/ckpt.npz is missing)
  2. full fine-tuning, LoRA, prefix tuning, prompt tuning and adapters on the same task, with the same
     number of steps, each at the learning rate tuned for it
  3. measured: loss curves, test accuracy, forgetting (corpus loss and fact recall, adapter on), seconds
     per step, optimizer memory, the size of the saved files, and few-shot prompting of the base model
  4. the claims table, with a word on how to read it

Run from the repository root (about 5 minutes on 2 CPU cores with the pretraining, ~2-3 without):

    python lessons/09_comparison.py                # the record task
    python lessons/09_comparison.py all            # record, qa and classify (measures every claim)

Figures and report.md go to runs/lessons/09_comparison/.
"""
import os
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

from tinyllm.claims import MIXED, NOT_MEASURED, NOT_SUPPORTED, SUPPORTED
from tinyllm.compare import DEFAULT_CHECKPOINT, compare
from tinyllm.presets import MAIN_METHODS as METHODS, method_config, tuned_lrs

LRS = tuned_lrs()
from tinyllm.peft import get_peft_model
from lessons.common import indented, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "09_comparison")


def show_methods():
    section("1. the methods, and the numbers each one trains")
    from tinyllm import GPT, GPTConfig
    base = GPT(GPTConfig())
    for m in METHODS:
        pm = get_peft_model(GPT(GPTConfig()), method_config(m))
        n, total = pm.get_nb_trainable_parameters()
        print(f"{m:8s} lr {LRS[m]:<6g} {n:>9,} trainable ({100 * n / base.num_parameters():6.2f}% of the model)  "
              f"{pm.formula()}")
    print("\nThe learning rates were tuned per method on a short budget (see LRS in tinyllm/compare.py):")
    print("a method that trains few numbers usually wants a larger step for each.")


def show_claims(claims):
    section("4. the claims, measured at this scale")
    width = max(len(c["claim"]) for c in claims)
    for i, c in enumerate(claims, 1):
        print(f"{i:>2}. {c['claim']:<{width}}  {c['verdict'].upper()}")
        for line in textwrap.wrap(c["measured"], 96):
            print(f"      {line}")
    counts = {v: sum(c["verdict"] == v for c in claims) for v in (SUPPORTED, MIXED, NOT_SUPPORTED, NOT_MEASURED)}
    print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items()))
    print(textwrap.dedent("""
        How to read this table:
        - A verdict is about THIS model (under a million parameters, a character vocabulary) and THIS budget
          (a couple of hundred steps). Claims that are about scale, e.g. that a prefix is a tiny share of
          the model, can come out differently at 124M parameters: the measured column says by how much.
        - Accuracy differences smaller than two binomial standard errors count as a tie (rule `noise`);
          with --seeds N the spread across seeds shows how much of a difference is luck.
        - "not measured" means the run did not include what the claim needs (e.g. a classification task:
          run `python lessons/09_comparison.py all`).
        - The rules are in tinyllm/claims.py next to each claim; change a threshold and see what flips.
        """))


def main(task="record", steps=None, seeds=1, quick=False, checkpoint=None, out_dir=OUT_DIR):
    """Run the lesson: the comparison of tinyllm.compare.compare, with explanations.

    task: record, qa, classify or all; steps: per method (None: the CLI's default); seeds: runs per method;
    quick: a tiny pretraining and a few steps (seconds, for tests); checkpoint: the pretrained model to use
    (default runs/pretrain/ckpt.npz, made if missing; with quick, a tiny one in out_dir).
    Returns a dict: per task and method the test accuracy, final val loss, ms per step and fact recall
    after; the claims' verdicts; and the paths of the figures and the report.
    """
    show_methods()
    section("2. fine-tuning every method (progress lines of tinyllm.train.train)")
    results = compare(task=task, steps=steps, seeds=seeds, out=out_dir, quick=quick, echo=indented,
                      checkpoint=checkpoint or (None if quick else os.path.join(ROOT, DEFAULT_CHECKPOINT)),
                      command=f"python lessons/09_comparison.py {task}")
    section("3. what the files show")
    for name in sorted(os.listdir(out_dir)):
        if name.endswith((".png", ".md", ".json")):
            print(f"  {os.path.relpath(os.path.join(out_dir, name))}")
    print("\nWhat to look for:")
    print("  loss_<task>.png   how far each method gets per step (left) and per second of training (right);")
    print("                    a frozen weight skips its weight gradient, so a PEFT step should cost less")
    print("  forgetting.png    corpus loss and fact recall with each method switched on (the dashed line is")
    print("                    the pretrained model); a PEFT method switched off is the base exactly")
    print("  memory.png        AdamW keeps two numbers per trained parameter; the saved file is all a task")
    print("                    costs on disk when the base is shared")
    show_claims(results["claims"])
    metrics = {t: {m: {"accuracy": s["accuracy_after"]["mean"], "val_loss": s["final_val_loss"]["mean"],
                       "ms_per_step": 1e3 * r["step_times"][m]["median"],
                       "fact_recall": s["fact_recall_after"]["mean"]}
                   for m, s in r["summary"].items()} for t, r in results["tasks"].items()}
    return dict(metrics=metrics, claims={c["claim"]: c["verdict"] for c in results["claims"]},
                seconds=results["timing"]["total_seconds"], report=os.path.join(out_dir, "report.md"),
                figures=sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".png")))


if __name__ == "__main__":
    main(task=sys.argv[1] if len(sys.argv) > 1 else "record")
