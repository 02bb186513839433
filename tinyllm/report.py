"""
What `python -m tinyllm compare` writes: the plots (matplotlib's Agg backend: files only, no window),
the terminal's table and report.md.
"""
import os
import re

import numpy as np

from .claims import fmt_bytes
from .plots import smooth


COLORS = {"full": "#d62728", "lora": "#1f77b4", "prefix": "#2ca02c", "prompt": "#9467bd", "adapter": "#ff7f0e"}
LABELS = {"full": "full", "lora": "LoRA", "prefix": "prefix", "prompt": "prompt", "adapter": "adapter"}


def whiskers(summary, methods, key):
    """Bar heights (means) and [below, above] whisker lengths (to the min and max over seeds)."""
    mean = np.array([summary[m][key]["mean"] for m in methods])
    lo = np.array([summary[m][key]["min"] for m in methods])
    hi = np.array([summary[m][key]["max"] for m in methods])
    return mean, np.vstack([mean - lo, hi - mean])


def plot_all(results, folder):
    """Write every figure of the comparison into folder; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    some = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "235" else "")     # minor ticks: 2, 3, 5 only
    tasks = results["tasks"]
    names = list(tasks)
    seeds = results["settings"]["seeds"]
    spread_note = f" (lines: mean of {seeds} seeds, bands/whiskers: min to max)" if seeds > 1 else ""
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=110)
        plt.close(fig)
        files.append(name)

    # loss curves: against steps and against training seconds, all methods on one figure per task
    for t in names:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for m, rs in tasks[t]["runs"].items():
            hs = [r["history"] for r in rs]
            steps = np.array(hs[0]["step"])
            seconds = np.mean([h["train_seconds"] for h in hs], axis=0)
            train = np.array([smooth(h["train_loss"], 10) for h in hs])
            vstep = np.array(hs[0]["val_step"])
            vsec = np.mean([h["val_seconds"] for h in hs], axis=0)
            val = np.array([h["val_loss"] for h in hs])
            for ax, x, vx in ((axes[0], steps, vstep), (axes[1], seconds, vsec)):
                ax.plot(x, train.mean(0), color=COLORS[m], lw=1, alpha=0.45)
                ax.plot(vx, val.mean(0), color=COLORS[m], lw=2, marker="o", ms=3, label=LABELS[m])
                if len(hs) > 1:
                    ax.fill_between(vx, val.min(0), val.max(0), color=COLORS[m], alpha=0.15)
        for ax, xlabel in ((axes[0], "optimizer step"), (axes[1], "training time (seconds, evaluations excluded)")):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)              # 0.5, 1, 2 rather than 5x10^-1
            ax.yaxis.set_minor_formatter(some)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss on answer tokens (nats, log scale)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(title="val (thick), train (thin, smoothed)", fontsize=8, title_fontsize=8)
        axes[0].set_title(f"{t}: loss against steps")
        axes[1].set_title(f"{t}: loss against wall-clock seconds")
        fig.suptitle(f"Fine-tuning on the {t} task, {results['settings']['steps']} steps each{spread_note}",
                     fontsize=10)
        save(fig, f"loss_{t}.png")

    first = tasks[names[0]]
    methods = list(first["runs"])
    x = np.arange(len(methods))
    colors = [COLORS[m] for m in methods]
    ticks = [LABELS[m] for m in methods]

    # trainable parameters, log scale
    fig, ax = plt.subplots(figsize=(7, 4.5))
    counts = [first["runs"][m][0]["trainable_params"] for m in methods]
    ax.bar(x, counts, color=colors)
    ax.axhline(results["model"]["parameters"], color="k", ls="--", lw=1,
               label=f"whole model ({results['model']['parameters']:,})")
    for xi, c in zip(x, counts):
        ax.text(xi, c * 1.15, f"{c:,}", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=results["model"]["parameters"] * 4)
    ax.set_xticks(x, ticks)
    ax.set_ylabel("trainable parameters (log scale)")
    ax.set_title("Parameters each method trains")
    ax.legend(fontsize=8, loc="lower left")
    save(fig, "params.png")

    # task accuracy, per task: after fine-tuning, the base model, the best few-shot prompt
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, t in zip(axes[0], names):
        s = tasks[t]["summary"]
        width = 0.4 if "format_rate" in s[methods[0]] else 0.7
        mean, err = whiskers(s, methods, "accuracy_after")
        left = x - (width / 2 if width < 0.7 else 0)
        ax.bar(left, mean, width, yerr=err if seeds > 1 else None, capsize=3, color=colors)
        for xi, v in zip(left, mean):
            ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
        handles = [Patch(color="gray", label="exact match (test)")]
        if "format_rate" in s[methods[0]]:
            mean, err = whiskers(s, methods, "format_rate")
            ax.bar(x + width / 2, mean, width, yerr=err if seeds > 1 else None, capsize=3, color=colors, alpha=0.4,
                   hatch="//")
            for xi, v in zip(x + width / 2, mean):
                ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
            handles.append(Patch(facecolor="gray", alpha=0.4, hatch="//", label="answer in record format"))
        handles.append(ax.axhline(tasks[t]["base"]["accuracy"], color="k", ls="--", lw=1,
                                  label="base model, no fine-tuning"))
        shots = [r for r in tasks[t]["few_shot"] if r["fits"] and r["k"] > 0]
        if shots:
            best = max(shots, key=lambda r: r["accuracy"])
            handles.append(ax.axhline(best["accuracy"], color="gray", ls=":", lw=1.5,
                                      label=f"base model, best few-shot (k={best['k']})"))
        if tasks[t]["kind"] == "classify":
            handles.append(ax.axhline(0.5, color="gray", ls="-.", lw=1, label="chance"))
        ax.set_xticks(x, ticks)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy (fraction of test examples)")
        ax.set_title(f"{t}: test accuracy after fine-tuning (n={tasks[t]['n_test']})")
        ax.legend(handles=handles, fontsize=7, loc="upper right")
    save(fig, "accuracy.png")

    # forgetting: corpus loss and fact recall, before and after, with the method active
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(names)
    for j, t in enumerate(names):
        s, base = tasks[t]["summary"], tasks[t]["base"]
        offset = (j - (len(names) - 1) / 2) * width
        for ax, key, before in ((axes[0], "corpus_loss_after", base["corpus_loss"]),
                                (axes[1], "fact_recall_after", base["fact_recall"])):
            mean, err = whiskers(s, methods, key)
            ax.bar(x + offset, mean, width, yerr=err if seeds > 1 else None, capsize=3, color=colors,
                   alpha=1.0 - 0.3 * j, edgecolor="k", lw=0.5)
            for xi, v in zip(x + offset, mean):
                ax.text(xi, v, f"{v:.2f}" + (f"\n{t[0]}" if len(names) > 1 else ""), ha="center", va="bottom",
                        fontsize=7)
    base = tasks[names[0]]["base"]
    axes[0].axhline(base["corpus_loss"], color="k", ls="--", lw=1,
                    label=f"before (pretrained): {base['corpus_loss']:.3f}")
    axes[1].axhline(base["fact_recall"], color="k", ls="--", lw=1,
                    label=f"before (pretrained): {base['fact_recall']:.2f}")
    top = max(max(tasks[t]["summary"][m]["corpus_loss_after"]["max"] for m in methods) for t in names)
    axes[0].set_ylim(0, 1.35 * max(top, base["corpus_loss"]))
    axes[0].set_ylabel("loss (nats per character)")
    axes[0].set_title("Pretraining corpus: validation loss after fine-tuning\n(higher = forgot more)")
    axes[1].set_ylabel("fraction of facts recalled")
    axes[1].set_ylim(0, 1.25)
    axes[1].set_title("Fact recall (cloze, greedy) after fine-tuning\n(lower = forgot more)")
    for ax in axes:
        ax.set_xticks(x, ticks)
        ax.legend(fontsize=8, loc="upper left", title="PEFT measured with the adapter on" +
                  (f"; letters: task ({', '.join(names)})" if len(names) > 1 else ""), title_fontsize=7)
    save(fig, "forgetting.png")

    # seconds per step: timed in turns (bars, quartile whiskers), and as measured during each run (dots)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for j, t in enumerate(names):
        timing = tasks[t]["step_times"]
        median = np.array([timing[m]["median"] for m in methods]) * 1e3
        quartiles = np.array([[timing[m]["median"] - timing[m]["q1"], timing[m]["q3"] - timing[m]["median"]]
                              for m in methods]).T * 1e3
        offset = (j - (len(names) - 1) / 2) * width
        ax.bar(x + offset, median, width, yerr=quartiles, capsize=3, color=colors, alpha=1.0 - 0.3 * j,
               edgecolor="k", lw=0.5)
        for xi, v, up in zip(x + offset, median, quartiles[1]):
            ax.text(xi, v + up, f"{v:.0f}" + (f"\n{t[0]}" if len(names) > 1 else ""), ha="center", va="bottom",
                    fontsize=7)
        in_run = [[r["seconds_per_step"] * 1e3 for r in tasks[t]["runs"][m]] for m in methods]
        for xi, values in zip(x + offset, in_run):
            ax.plot([xi] * len(values), values, "k.", ms=6)
    ax.set_xticks(x, ticks)
    ax.set_ylabel("milliseconds per optimizer step")
    ax.set_title(f"Time per step (batch {results['settings']['batch_size']}; forward, backward, AdamW)"
                 + (f"\nletters: task ({', '.join(names)})" if len(names) > 1 else ""), fontsize=10)
    ax.legend(handles=[Patch(color="gray", label="median, methods timed in turns (whiskers: quartiles)"),
                       ax.plot([], [], "k.", ms=6, label="median during the training run (one after another)")[0]],
              fontsize=8, loc="upper right")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
    save(fig, "step_time.png")

    # memory: optimizer state and saved file, next to a full copy of the model
    fig, ax = plt.subplots(figsize=(8, 4.5))
    opt = [first["runs"][m][0]["optimizer_state_bytes"] for m in methods]
    saved = [first["runs"][m][0]["saved_bytes"] for m in methods]
    copy = first["runs"][methods[0]][0]["full_copy_bytes"]
    ax.bar(x - 0.2, opt, 0.4, color=colors)
    ax.bar(x + 0.2, saved, 0.4, color=colors, alpha=0.45, hatch="//")
    for xi, o, s_ in zip(x, opt, saved):
        ax.text(xi - 0.2, o * 1.15, fmt_bytes(o), ha="center", fontsize=7)
        ax.text(xi + 0.2, s_ * 1.15, fmt_bytes(s_), ha="center", fontsize=7)
    line = ax.axhline(copy, color="k", ls="--", lw=1, label=f"a full copy of the model ({fmt_bytes(copy)})")
    ax.set_yscale("log")
    ax.set_ylim(top=max(max(opt), copy) * 5)
    ax.set_xticks(x, ticks)
    ax.set_ylabel("bytes (log scale)")
    ax.set_title("Memory for training, and storage per task")
    ax.legend(handles=[Patch(color="gray", label="AdamW state (m and v) while training"),
                       Patch(facecolor="gray", alpha=0.45, hatch="//", label="saved file (save_pretrained)"), line],
              fontsize=8, loc="upper right")
    save(fig, "memory.png")

    # the variants: does the setting matter?
    variants = next((tasks[t]["variants"] for t in names if tasks[t].get("variants")), None)
    if variants:
        fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 4), squeeze=False)
        for ax, (group, rows) in zip(axes[0], variants.items()):
            labels = list(rows)
            vals = [rows[k]["val_loss"] for k in labels]
            ax.bar(range(len(labels)), vals, color=COLORS[next(iter(rows.values()))["method"]],
                   alpha=0.85, edgecolor="k", lw=0.5)
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.3f}\n{rows[labels[i]]['trainable_params']:,} p", ha="center", va="bottom",
                        fontsize=7)
            ax.set_xticks(range(len(labels)), [k + ("*" if rows[k]["main"] else "") for k in labels])
            ax.set_ylim(0, max(vals) * 1.3)
            ax.set_ylabel("final val loss (nats)")
            ax.set_title(group.replace("_", " "), fontsize=10)
        fig.suptitle(f"Settings of LoRA and prefix tuning ({results['settings']['variant_steps']} steps each, task "
                     f"{next(t for t in names if tasks[t].get('variants'))}; p = trainable parameters; * = the setting "
                     f"of the main comparison)", fontsize=10)
        save(fig, "variants.png")
    return files



# ----------------------------------------------------------------------------------------------------
# tables: the terminal's and the report's

def pm_text(s, fmt, seeds=1):
    """'mean' or 'mean ± std' (over seeds) of one summarised metric."""
    text = format(s["mean"], fmt)
    return text + " ± " + format(s["std"], fmt) if seeds > 1 else text


def results_rows(t, seeds, lrs):
    """Header and rows of one task's results table."""
    header = ["method", "trainable", "lr", "test acc", "val loss", "ms/step", "optimizer", "saved",
              "corpus loss", "fact recall"]
    record = "format_rate" in next(iter(t["summary"].values()))
    if record:
        header.insert(4, "format ok")
    base = t["base"]
    rows = [["base (before)", "0", "-", f"{base['accuracy']:.3f}"] + ([f"{base['format_rate']:.3f}"] if record else [])
            + ["-", "-", "-", "-", f"{base['corpus_loss']:.3f}", f"{base['fact_recall']:.3f}"]]
    for m, s in t["summary"].items():
        r = t["runs"][m][0]
        row = [LABELS[m], f"{r['trainable_params']:,}", f"{lrs[m]:g}", pm_text(s["accuracy_after"], ".3f", seeds=seeds)]
        if record:
            row.append(pm_text(s["format_rate"], ".3f", seeds=seeds))
        row += [pm_text(s["final_val_loss"], ".3f", seeds=seeds), f"{1e3 * t['step_times'][m]['median']:.0f}",
                fmt_bytes(r["optimizer_state_bytes"]), fmt_bytes(r["saved_bytes"]),
                pm_text(s["corpus_loss_after"], ".3f", seeds=seeds),
                pm_text(s["fact_recall_after"], ".3f", seeds=seeds)]
        rows.append(row)
    return header, rows


def text_table(header, rows):
    """A plain-text table: numbers right-aligned, words left-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    number = re.compile(r"[-+]?[\d.,]+( ± [\d.,]+)?( [KMG]?B)?|-")
    column_of_numbers = [all(number.fullmatch(str(r[i])) for r in rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) if num else str(c).ljust(w)
                                   for c, w, num in zip(cells, widths, column_of_numbers))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header, rows):
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def load_note(timing):
    """Why wall time and CPU time differ, read off the two."""
    wall, cpu = timing["total_seconds"], timing["cpu_seconds"]
    if wall > 1.2 * cpu:
        return " (less CPU than wall time: other programs were using the cores too, so timings are slower than alone)"
    if cpu > 1.2 * wall:
        return " (more CPU than wall time: the matrix products used several cores)"
    return ""


def write_report(results, path, figures):
    s, tasks = results["settings"], results["tasks"]
    seeds, lrs = s["seeds"], results["learning_rates"]
    p = results["pretrain"]
    lines = [
        "# Fine-tuning methods, side by side",
        "",
        f"Written by `{results['command']}`. Every number here was computed by that run; the verdicts at the end",
        "are computed from them by the rules listed before the table (tinyllm/claims.py, `CLAIMS`).",
        "",
        "## Setup",
        "",
        f"- Base model: `{p['checkpoint']}`, a {results['model']['parameters']:,}-parameter GPT "
        f"({results['model']['config']['n_layer']} layers, {results['model']['config']['n_embd']} wide, context "
        f"{results['model']['config']['block_size']}), " +
        (f"pretrained by this run in {p['seconds']:.0f} s." if p["made_now"] else "reused (pretrained earlier)."),
        f"- Each method: {s['steps']} steps of {s['batch_size']} examples, the same for all; loss on the answer tokens "
        f"only; AdamW, warmup then cosine decay, gradient clipping at 1 (tinyllm.train.train); {seeds} seed(s)"
        + (" (tables show mean ± std)." if seeds > 1 else "."),
        "- Learning rates (tuned per method, see `LRS` in tinyllm/compare.py for the measurements): " +
        ", ".join(f"{LABELS[m]} {lrs[m]:g}" for m in lrs) + ".",
        "- Methods: " + "; ".join(f"{LABELS[m]}: {tasks[next(iter(tasks))]['runs'][m][0]['formula']}"
                                  for m in lrs) + ".",
        "- Forgetting: loss on fixed windows of the pretraining corpus's validation split and greedy recall of every "
        "fact (\"mia lives in\" -> \" oslo\", whatever punctuation follows), before and after; PEFT methods measured "
        "with the adapter on.",
        f"- Timings: measured on this machine ({results['timing']['cpu_note']}); total wall time "
        f"{results['timing']['total_seconds']:.0f} s (" +
        (f"pretraining {results['timing']['pretrain_seconds']:.0f} s, " if p["made_now"] else "") +
        f"fine-tuning and evaluation {results['timing']['compare_seconds']:.0f} s), "
        f"{results['timing']['cpu_seconds']:.0f} CPU seconds in this process{load_note(results['timing'])}.",
        "",
    ]
    for name, t in tasks.items():
        header, rows = results_rows(t, seeds, lrs)
        lines += [f"## Task `{name}`", "",
                  f"{t['n_train']} training examples, {t['n_test']} test examples. test acc: "
                  + ("exact match of greedy decoding" if t["kind"] == "generate"
                     else "the label scored higher, as a classifier head")
                  + ("; format ok: the answer has the record's structure" if name == "record" else "") + ". "
                  "ms/step: median of steps timed in turns with the other methods (fair under a changing load). "
                  "optimizer: AdamW's m and v. saved: the files save_pretrained writes.", "",
                  md_table(header, rows), "",
                  "Few-shot prompting of the base model (no training), in a context of "
                  f"{results['model']['config']['block_size']} tokens:", "",
                  md_table(["k shots", "tokens per query", "fits", "test accuracy"],
                           [[r["k"], f"{r['tokens_per_query']:.0f}", "yes" if r["fits"] else "no",
                             "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"] for r in t["few_shot"]]), "",
                  "Examples (greedy answers on the first test prompts):", ""]
        for ex in t["examples"]:
            lines.append(f"- `{ex['input']!r}` -> expected `{ex['expected']!r}`")
            lines += [f"    - {k}: `{v!r}`" for k, v in ex["outputs"].items()]
        if t.get("variants"):
            lines += ["", f"Variants ({s['variant_steps']} steps each, seed 0, final val loss):", "",
                      md_table(["setting", "value", "trainable", "val loss at start", "final val loss"],
                               [[g.replace("_", " "), label, f"{v['trainable_params']:,}", f"{v['val_start']:.3f}",
                                 f"{v['val_loss']:.3f}"]
                                for g, rows_ in t["variants"].items() for label, v in rows_.items()])]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    lines += ["## How each verdict is decided", "",
              "Where a rule has several cases (tasks, methods, settings) it is supported if every case holds, not "
              "supported if none does, mixed otherwise, and not measured if the run had no case. \"Clearly\" means by "
              "more than two standard errors of the difference of two accuracies on the test set (`noise`).", ""]
    lines += [f"{i}. **{c['claim']}**: {c['rule']}" for i, c in enumerate(results["claims"], 1)] + [""]
    lines += ["## Claims, measured at this scale", "",
              md_table(["#", "claim", "what we measured", "verdict"],
                       [[i, c["claim"], c["measured"], f"**{c['verdict']}**"]
                        for i, c in enumerate(results["claims"], 1)])]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


