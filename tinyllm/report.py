"""
What `python -m tinyllm compare` writes: the plots (matplotlib's Agg backend: files only, no window), one
function per figure, each with its caption; the terminal's tables; and report.md, which starts with the
answer (the claims, their verdicts and the number behind each), then how to read it, then the details.

Units: bytes in KiB and MiB (1024-based, written as such); losses in nats per answer token; times in
seconds or milliseconds from the one step timing of the run, the methods timed in turns.
"""
import os
import re

import numpy as np

from .checkpoint import atomic_open
from .claims import FACT, SMOKE, fmt_bytes, t975
from .finetune import ABS_TOL, REL_TOL
from .plots import log_loss_axis
from .presets import PRESETS
from .sweep import CAP


def label(m):
    return PRESETS[m].label


def color(m):
    return PRESETS[m].color


def spread(summary, methods, key):
    """Bar heights (means) and [below, above] whiskers to the min and max over seeds."""
    mean = np.array([summary[m][key]["mean"] for m in methods])
    lo = np.array([summary[m][key]["min"] for m in methods])
    hi = np.array([summary[m][key]["max"] for m in methods])
    return mean, np.vstack([mean - lo, hi - mean])


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, folder, name):
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=110)
    pyplot().close(fig)
    return name

# ----------------------------------------------------------------------------------------------------
# the figures: each returns (file name, caption)


def plot_loss(t, folder):
    """Validation loss against steps and against training seconds, every method, mean of its seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for m, rs in t["runs"].items():
        steps = np.array(rs[0]["history"]["val_step"])
        val = np.array([r["history"]["val_loss"] for r in rs])
        seconds = steps * t["step_times"][m]["median"]
        for ax, x in ((axes[0], steps), (axes[1], seconds)):
            ax.plot(x, val.mean(0), color=color(m), lw=2, marker="o", ms=3, label=label(m))
            if len(rs) > 1:
                ax.fill_between(x, val.min(0), val.max(0), color=color(m), alpha=0.15)
    for ax, xlabel in ((axes[0], "optimizer step"), (axes[1], "training seconds (steps x the step time timed in turns)")):
        log_loss_axis(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss per answer token (nats)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_title(f"{t['task']}: validation loss against steps")
    axes[1].set_title(f"{t['task']}: validation loss against seconds")
    name = save(fig, folder, f"loss_{t['task']}.png")
    return name, (f"Validation loss of each method on {t['task']} while it trains, at its own tuned learning "
                  f"rate and budget; line: mean over {len(t['seeds'])} seeds, band: min to max. Right: the same "
                  "against training time, each step counted at the step time measured in turns.")


def plot_params(results, folder):
    plt = pyplot()
    first = next(iter(results["tasks"].values()))
    methods = list(first["runs"])
    counts = [first["runs"][m][0]["trainable_params"] for m in methods]
    total = results["model"]["parameters"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(len(methods))
    ax.bar(x, counts, color=[color(m) for m in methods])
    ax.axhline(total, color="k", ls="--", lw=1, label=f"whole model ({total:,})")
    for xi, c in zip(x, counts):
        ax.text(xi, c * 1.15, f"{c:,}", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=total * 4)
    ax.set_xticks(x, [label(m) for m in methods])
    ax.set_ylabel("trainable parameters (log scale)")
    ax.set_title("Parameters each method trains")
    ax.legend(fontsize=8, loc="lower left")
    return save(fig, folder, "params.png"), "Trainable parameters of each method, against the whole model (log scale)."


def plot_accuracy(results, folder):
    plt = pyplot()
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.8 * len(tasks), 4.5), squeeze=False)
    for ax, (name, t) in zip(axes[0], tasks.items()):
        methods = list(t["runs"])
        s, x = t["summary"], np.arange(len(methods))
        has_format = "format_rate" in s[methods[0]]
        width = 0.4 if has_format else 0.7
        left = x - (width / 2 if has_format else 0)
        mean, err = spread(s, methods, "accuracy_after")
        ax.bar(left, mean, width, yerr=err, capsize=3, color=[color(m) for m in methods], label="test accuracy")
        for xi, v in zip(left, mean):
            ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
        if has_format:
            mean, err = spread(s, methods, "format_rate")
            ax.bar(x + width / 2, mean, width, yerr=err, capsize=3, color=[color(m) for m in methods], alpha=0.35,
                   hatch="//", label="answers in the task's format")
        ax.axhline(t["base"]["accuracy"], color="k", ls="--", lw=1, label="base model, no fine-tuning")
        shots = [r for r in t["few_shot"] if r["fits"] and r["k"] > 0]
        if shots:
            best = max(shots, key=lambda r: r["accuracy"])
            ax.axhline(best["accuracy"], color="gray", ls=":", lw=1.5, label=f"base model, best few-shot (k={best['k']})")
        if t["kind"] == "classify":
            ax.axhline(0.5, color="gray", ls="-.", lw=1, label="chance")
        ax.set_xticks(x, [label(m) for m in methods])
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("fraction of test examples")
        ax.set_title(f"{name}: test accuracy (n={t['n_test']})")
        ax.legend(fontsize=7, loc="upper right")
    return save(fig, folder, "accuracy.png"), (
        "Test accuracy after fine-tuning (bars: mean over seeds, whiskers: min to max) and, hatched, the share of "
        "answers in the task's format whether right or wrong; the lines are the base model alone and prompted "
        "with its best number of solved examples.")


def plot_forgetting(results, folder):
    plt = pyplot()
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(tasks)
    for j, (name, t) in enumerate(tasks.items()):
        methods = list(t["runs"])
        x = np.arange(len(methods)) + (j - (len(tasks) - 1) / 2) * width
        for ax, key, base in ((axes[0], "corpus_loss_after", t["base"]["corpus_loss"]),
                              (axes[1], "fact_recall_after", t["base"]["fact_recall"])):
            mean, err = spread(t["summary"], methods, key)
            ax.bar(x, mean, width, yerr=err, capsize=3, color=[color(m) for m in methods], alpha=1 - 0.3 * j,
                   edgecolor="k", lw=0.5)
            for xi, v in zip(x, mean):
                ax.text(xi, v, f"{v:.2f}" + (f"\n{name}" if len(tasks) > 1 else ""), ha="center", va="bottom", fontsize=7)
            ax.axhline(base, color="k", ls="--", lw=1)
    first = next(iter(tasks.values()))
    methods = list(first["runs"])
    axes[0].set_ylabel("loss on held-out pretraining text (nats per character)")
    axes[0].set_title(f"General language: corpus loss (base {first['base']['corpus_loss']:.3f}, dashed)\nhigher = forgot more")
    axes[1].set_ylabel("fraction of the world's facts recalled")
    axes[1].set_ylim(0, 1.1)
    axes[1].set_title(f"Pretrained facts: cloze recall (base {first['base']['fact_recall']:.2f}, dashed)\nlower = forgot more")
    for ax in axes:
        ax.set_xticks(np.arange(len(methods)), [label(m) for m in methods])
    return save(fig, folder, "forgetting.png"), (
        "What the model still knows from pretraining with each method switched on (bars: mean over seeds, whiskers: "
        "min to max; dashed: the base model). Switched off, every PEFT method is the base model exactly.")


def plot_step_time(results, folder):
    plt = pyplot()
    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.8 / len(tasks)
    for j, (name, t) in enumerate(tasks.items()):
        methods = list(t["runs"])
        timing = t["step_times"]
        median = np.array([timing[m]["median"] for m in methods]) * 1e3
        whiskers = np.array([[timing[m]["median"] - timing[m]["q1"], timing[m]["q3"] - timing[m]["median"]]
                             for m in methods]).T * 1e3
        x = np.arange(len(methods)) + (j - (len(tasks) - 1) / 2) * width
        ax.bar(x, median, width, yerr=whiskers, capsize=3, color=[color(m) for m in methods], alpha=1 - 0.3 * j,
               edgecolor="k", lw=0.5)
        for xi, v, up, m in zip(x, median, whiskers[1], methods):
            ratio = np.exp(timing[m]["log_ratio_mean"])
            ax.text(xi, v + up, f"{v:.0f}\n{ratio:.2f}x" + (f"\n{name}" if len(tasks) > 1 else ""), ha="center",
                    va="bottom", fontsize=7)
    methods = list(next(iter(tasks.values()))["runs"])
    ax.set_xticks(np.arange(len(methods)), [label(m) for m in methods])
    ax.set_ylabel("milliseconds per training step")
    ax.set_title(f"Time per step (batch {results['settings']['batch_size']}: forward, backward, clipping, AdamW)", fontsize=10)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.3)
    return save(fig, folder, "step_time.png"), (
        "Milliseconds per training step, the methods timed in turns on the same batches (bars: median, whiskers: "
        "quartiles; the number under each: the step time as a multiple of full fine-tuning's in the same round). "
        "This one timing is used by every plot and verdict.")


def plot_memory(results, folder):
    plt = pyplot()
    first = next(iter(results["tasks"].values()))
    methods = list(first["runs"])
    opt = [first["runs"][m][0]["optimizer_state_bytes"] for m in methods]
    saved = [first["runs"][m][0]["saved_bytes"] for m in methods]
    copy = first["runs"][methods[0]][0]["full_copy_bytes"]
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(x - 0.2, opt, 0.4, color=[color(m) for m in methods], label="AdamW state (m and v) while training")
    ax.bar(x + 0.2, saved, 0.4, color=[color(m) for m in methods], alpha=0.45, hatch="//",
           label="saved file (save_pretrained)")
    for xi, o, s in zip(x, opt, saved):
        ax.text(xi - 0.2, o * 1.15, fmt_bytes(o), ha="center", fontsize=7)
        ax.text(xi + 0.2, s * 1.15, fmt_bytes(s), ha="center", fontsize=7)
    ax.axhline(copy, color="k", ls="--", lw=1, label=f"a full copy of the model ({fmt_bytes(copy)})")
    ax.set_yscale("log")
    ax.set_ylim(top=max(max(opt), copy) * 5)
    ax.set_xticks(x, [label(m) for m in methods])
    ax.set_ylabel("bytes (log scale)")
    ax.set_title("Memory for training, and storage per task")
    ax.legend(fontsize=8, loc="upper right")
    return save(fig, folder, "memory.png"), ("AdamW's state while training (two numbers per trained parameter) and the "
                                             "file each method saves per task, against a full copy of the model.")


def plot_variants(results, folder):
    plt = pyplot()
    variants = results["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 4), squeeze=False)
    for ax, (group, v) in zip(axes[0], variants.items()):
        labels = list(v["settings"])
        vals = [np.mean(v["settings"][k]["test_losses"], axis=1) for k in labels]          # one per seed
        mean = np.array([np.mean(x) for x in vals])
        err = np.vstack([mean - [min(x) for x in vals], [max(x) for x in vals] - mean])
        ax.bar(range(len(labels)), mean, yerr=err, capsize=3, color=color(v["method"]), alpha=0.85,
               edgecolor="k", lw=0.5)
        for i, k in enumerate(labels):
            ax.text(i, mean[i], f"{mean[i]:.3f}\n{v['settings'][k]['trainable_params']:,} p\nlr {v['settings'][k]['lr']:g}",
                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)), [k + ("*" if v["settings"][k]["main"] else "") for k in labels])
        ax.set_ylim(0, mean.max() * 1.45)
        ax.set_ylabel("test loss per answer token (nats)")
        ax.set_title(f"{group.replace('_', ' ')} ({v['steps']} step{'' if v['steps'] == 1 else 's'})", fontsize=10)
    return save(fig, folder, "variants.png"), (
        "Settings of LoRA and prefix tuning, from the stored sweep (python -m tinyllm sweep): each at its own lr "
        "(chosen on validation), its method's budget, three fresh seeds scored on the test examples (bars: mean, "
        "whiskers: min to max; p = trainable parameters; * = the setting of the main comparison).")


def plot_sequential(t, folder):
    plt = pyplot()
    s = t["sequential"]
    a, b = t["task"], s["task_b"]
    groups = [(f"full on {a}", s["full"]["a"], color("full"), 1.0),
              (f"full on {a}\nthen {b}", s["full"]["a_after_b"], color("full"), 0.45),
              (f"LoRA adapter {a}\n(adapter {b} beside it)", s["adapter"]["a"], color("lora"), 1.0)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, per_example, c, alpha) in enumerate(groups):
        vals = [np.mean(x) for x in per_example]                     # accuracy per seed
        mean = np.mean(vals)
        ax.bar(i, mean, 0.6, yerr=[[mean - min(vals)], [max(vals) - mean]], capsize=3, color=c, alpha=alpha)
        ax.text(i, mean + 0.02, f"{mean:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"test accuracy on {a}")
    ax.set_title(f"Task after task: does {a} survive training on {b}?")
    return save(fig, folder, f"sequential_{a}.png"), (
        f"Accuracy on {a} after fine-tuning on it, after full fine-tuning then continues on {b}, and with one LoRA "
        f"adapter per task on one base (switched to the {a} adapter); mean over seeds, whiskers min to max. On {b}: "
        f"full {np.mean(s['full']['b']):.2f}, its LoRA adapter {np.mean(s['adapter']['b']):.2f}.")


def plot_all(results, folder):
    """Write every figure of the comparison into folder; returns [(file name, caption)]."""
    figures = [plot_loss(t, folder) for t in results["tasks"].values()]
    figures += [plot_accuracy(results, folder), plot_forgetting(results, folder), plot_step_time(results, folder),
                plot_params(results, folder), plot_memory(results, folder)]
    figures += [plot_sequential(t, folder) for t in results["tasks"].values() if t.get("sequential")]
    if results.get("variants"):
        figures.append(plot_variants(results, folder))
    return figures

# ----------------------------------------------------------------------------------------------------
# tables: the terminal's and the report's


def pm_text(s, fmt):
    """'mean' or 'mean ± std' (over seeds) of one summarised metric."""
    text = format(s["mean"], fmt)
    return text + " ± " + format(s["std"], fmt) if len(s["values"]) > 1 else text


def results_rows(t):
    """Header and rows of one task's results table."""
    header = ["method", "trainable", "lr", "steps", "test acc", "val loss", "flattened", "ms/step", "AdamW state",
              "saved", "corpus loss", "fact recall"]
    has_format = "format_rate" in t["base"]
    if has_format:
        header.insert(5, "format")
    base = t["base"]
    rows = [["base (before)", "0", "-", "-", f"{base['accuracy']:.3f}"] +
            ([f"{base['format_rate']:.3f}"] if has_format else []) +
            ["-", "-", "-", "-", "-", f"{base['corpus_loss']:.3f}", f"{base['fact_recall']:.3f}"]]
    for m, s in t["summary"].items():
        rs = t["runs"][m]
        row = [label(m), f"{rs[0]['trainable_params']:,}", f"{rs[0]['lr']:g}", str(rs[0]["steps"]),
               pm_text(s["accuracy_after"], ".3f")]
        if has_format:
            row.append(pm_text(s["format_rate"], ".3f"))
        row += [pm_text(s["final_val_loss"], ".3f"), f"{sum(bool(r['flattened']) for r in rs)}/{len(rs)}",
                f"{1e3 * t['step_times'][m]['median']:.0f}", fmt_bytes(rs[0]["optimizer_state_bytes"]),
                fmt_bytes(rs[0]["saved_bytes"]), pm_text(s["corpus_loss_after"], ".3f"),
                pm_text(s["fact_recall_after"], ".3f")]
        rows.append(row)
    return header, rows


def text_table(header, rows):
    """A plain-text table: numbers right-aligned, words left-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    number = re.compile(r"[-+]?[\d.,]+( ± [\d.,]+)?( [KMG]?i?B)?|-|\d+/\d+")
    numeric = [all(number.fullmatch(str(r[i])) for r in rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) if num else str(c).ljust(w) for c, w, num in zip(cells, widths, numeric))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header, rows):
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])

# ----------------------------------------------------------------------------------------------------
# report.md


def summary_section(results, captions):
    rows = []
    for i, c in enumerate(results["claims"], 1):
        where = ", ".join(x for x in (f"[{c['figure']}]({c['figure']})" if c["figure"] in captions else "",
                                      f"lesson {c['lesson']}" if c["lesson"] else "") if x)
        rows.append([i, c["claim"], f"**{c['verdict']}**", c["measured"], where])
    return ["## The claims, measured", "", md_table(["#", "claim", "verdict", "the numbers behind it", "see"], rows), ""]


def budget_note(x):
    """Why a method ran the steps it did, when it is not the sweep's flattened budget."""
    if x["source"] == "fallback":
        return " (not tuned: no sweep)"
    if "steps set to" in x["source"]:
        return " (set by --steps)"
    return "" if x["flattened"] else " (capped)"


def how_to_read(results):
    s, p, mc = results["settings"], results["pretrain"], results["model"]["config"]
    first = next(iter(results["tasks"].values()))
    k = len(s["seeds"])
    lines = ["## How to read this", "",
             f"- **Scale.** One {results['model']['parameters']:,}-parameter GPT ({mc['n_layer']} layers, {mc['n_embd']} "
             f"wide, a {mc['vocab_size']}-character vocabulary, context {mc['block_size']}), pretrained on a synthetic "
             f"world. A verdict is about this model and these tasks; claims about scale (a prefix is a tiny share of "
             f"the model) can come out differently at 124M parameters, and the facts say by how much.",
             "- **Budget.** Each method trains at its own learning rate for its own number of steps, both chosen by "
             f"`python -m tinyllm sweep` on validation data: the budget is the first at which doubling it lowered the "
             f"best validation loss by less than {REL_TOL:.0%} (or {ABS_TOL} nats), at most {CAP} steps (what this "
             "run affords; *capped* below means the loss was still falling there). " + "; ".join(
                 f"{label(m)} lr {x['lr']:g}, {x['steps']} steps" + budget_note(x) for m, x in first["tuning"].items()) +
             f". Batch {s['batch_size']}; the loss counts answer tokens only.",
             f"- **Noise.** {k} seeds per method ({', '.join(map(str, s['seeds']))}); test accuracy on {first['n_test']} "
             f"examples. A difference is called when it exceeds t x its standard error, which holds the seeds' spread "
             f"and the finite test set (t = {t975(2 * k - 2):.2f} for two methods of {k} seeds each, no test-set "
             "error); otherwise the verdict is *inconclusive*. A *fact* is true by construction and shows its "
             "arithmetic instead of a verdict. Rules and margins: tinyllm/claims.py.",
             "- **Time.** " + (f"Pretraining {p['seconds']:.0f} s, then " if p["made_now"] else "") +
             f"{results['timing']['compare_seconds']:.0f} s of fine-tuning and evaluation, "
             f"{results['timing']['total_seconds']:.0f} s in all on {results['timing']['cores']} cores.", ""]
    if results["smoke_test"]:
        lines[2:2] = ["**This was a smoke test (`--quick`): a tiny pretraining and a few steps prove that the code "
                      "runs. Its numbers mean nothing and no claim is judged.**", ""]
    return lines


def accuracies(per_seed):
    """'0.95, 0.93, 0.96': each seed's accuracy, from its per-example results."""
    return ", ".join(f"{np.mean(x):.2f}" for x in per_seed)


def task_section(name, t, block_size):
    header, rows = results_rows(t)
    lines = [f"### Task `{name}`", "",
             f"{t['n_train']} training examples, {t['n_test']} test examples. test acc: " +
             ("exact match of greedy decoding" if t["kind"] == "generate" else "the label scored higher, as a classifier head") +
             f". flattened: runs whose val loss fell less than {REL_TOL:.0%} (or {ABS_TOL} nats) over their last fifth. ms/step: median, timed in "
             "turns. AdamW state: m and v. saved: the files save_pretrained writes. corpus loss and fact recall: "
             "with the method switched on.", "", md_table(header, rows), "",
             f"Few-shot prompting of the base model (no training), in a context of {block_size} positions:", "",
             md_table(["k shots", "positions per query", "fits", "test accuracy"],
                      [[r["k"], f"{r['tokens_per_query']:.0f}", "yes" if r["fits"] else "no",
                        "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"] for r in t["few_shot"]]), "",
             "Greedy answers to the first test prompts (first seed):", ""]
    for ex in t["examples"]:
        lines.append(f"- `{ex['input']!r}` -> expected `{ex['expected']!r}`")
        lines += [f"    - {k}: `{v!r}`" for k, v in ex["outputs"].items()]
    s = t.get("sequential")
    if s:
        lines += ["", f"Task after task ({name}, then {s['task_b']}; per seed):", "",
                  md_table(["", f"{name} accuracy", f"{s['task_b']} accuracy"],
                           [["full, after " + name, accuracies(s["full"]["a"]), "-"],
                            [f"full, after {name} then {s['task_b']}", accuracies(s["full"]["a_after_b"]),
                             accuracies(s["full"]["b"])],
                            ["two LoRA adapters on one base", accuracies(s["adapter"]["a"]), accuracies(s["adapter"]["b"])]])]
    return lines + [""]


def write_report(results, path, figures):
    captions = dict(figures)
    title = "# Fine-tuning methods, side by side" + (" (SMOKE TEST: no verdicts)" if results["smoke_test"] else "")
    lines = [title, "", f"Written by `{results['command']}`. Every number was computed by that run, except the "
             "tuning claims' (from the stored sweep, which the table says); every verdict by a rule in "
             "tinyllm/claims.py.", ""]
    lines += summary_section(results, captions)
    lines += how_to_read(results)
    lines += ["## Details", ""]
    for name, t in results["tasks"].items():
        lines += task_section(name, t, results["model"]["config"]["block_size"])
    lines += ["## Figures", ""]
    for name, caption in figures:
        lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    lines += ["## The rules", ""]
    lines += [f"{i}. **{c['claim']}** ({'fact' if c['verdict'] == FACT else 'measured'}): {c['rule']}"
              for i, c in enumerate(results["claims"], 1)] + [""]
    if results["smoke_test"]:
        lines += [f"(Every measured claim reads *{SMOKE}*.)", ""]
    with atomic_open(path) as f:
        f.write(("\n".join(lines) + "\n").encode())
