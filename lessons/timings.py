"""
How long each lesson takes, measured, so that the README's learning path says what is true.

    python lessons/timings.py            # runs every lesson at its defaults, in order, each in a fresh process

It starts from what a fresh clone has (no runs/ folder: lesson 01 makes the pretrained model the others
reuse, as a learner's first run does), writes lessons/timings.json, and prints the README's table. A test
(tests/test_readme.py) checks that the README's table is this file's and lists every lesson.
"""
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = os.path.join(ROOT, "lessons", "timings.json")


WHAT = {   # one line per lesson, for the README's learning path
    "01_tokens_and_embeddings": "pretrains the small GPT the other lessons use (live progress); the world corpus, tokens, batches, what the embeddings learned",
    "02_attention": "q, k, v, the causal mask, heads; which head looks at the previous character; the KV cache gives the same logits",
    "03_backprop_by_hand": "the backward pass in reverse order; every gradient against finite differences, in a table",
    "04_pretraining": "pretraining from scratch: loss against tokens seen, samples, fact recall",
    "05_full_finetuning": "every weight trains: accuracy, forgetting, and the cost of a full copy per task",
    "06_lora": "the no-op start, training, merging, the adapter file next to a full copy, many adapters on one base",
    "07_prefix_tuning": "a prefix is a trained KV cache; its length and initialization; why it is not prompt tuning",
    "08_prompt_tuning_and_adapters": "virtual input tokens, bottleneck adapters that start as the identity, (IA)^3's rescaling",
    "09_comparison": "the methods side by side at their tuned learning rates, and each common claim about them, measured",
    "10_lora_rank_and_targets": "LoRA's rank, and which matrices it goes into",
    "11_prefix_prompt_adapter_sizes": "prefix and prompt length and init, adapter width",
    "12_data_size": "how each method fares from 20 examples to all of them",
    "13_is_the_update_low_rank": "the singular values of full fine-tuning's weight update, next to LoRA's rank",
    "14_few_shot_vs_finetuning": "prompting with examples against fine-tuning: tokens per query and accuracy",
    "15_memory_at_scale": "weights, gradients, AdamW state and activations per method, GPT-2 small to XL",
    "16_speed": "where a training step's time goes, what freezing can save, the KV cache",
    "17_new_tokens": "a symbol pretraining never showed: why only some methods can learn it, and the fix",
    "18_to_hugging_face_and_back": "the same weights and adapters in transformers and PEFT: file formats, one logit apart",
    "19_many_cores": "data parallelism: split the batch, add the gradients, get the same step on every core",
}


def lessons():
    return sorted(f for f in os.listdir(os.path.join(ROOT, "lessons")) if f[:2].isdigit() and f.endswith(".py"))


def minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def table(timings):
    """The README's rows: lesson | what it shows | the time it took."""
    rows = ["| lesson | what you see | time |", "|---|---|---|"]
    for name in lessons():
        seconds = timings["lessons"][name]["seconds"]
        rows.append(f"| `{name[:-3]}` | {WHAT[name[:-3]]} | {minutes(seconds)} |")
    return "\n".join(rows)


def load():
    with open(TIMINGS) as f:
        return json.load(f)


def main(fresh=True):
    if fresh and os.path.isdir(os.path.join(ROOT, "runs")):
        shutil.move(os.path.join(ROOT, "runs"), os.path.join(ROOT, f"runs.before-timings-{int(time.time())}"))
    out = {"date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "fresh_clone": fresh,
           "command": "python lessons/timings.py", "lessons": {}}
    for name in lessons():
        start = time.perf_counter()
        done = subprocess.run([sys.executable, os.path.join("lessons", name)], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        out["lessons"][name] = {"seconds": round(seconds, 1)}
        print(f"{name:40} {minutes(seconds):>8}", flush=True)
    with open(TIMINGS + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(TIMINGS + ".tmp", TIMINGS)
    print("\n" + table(out))


if __name__ == "__main__":
    main(fresh="--keep-runs" not in sys.argv)
