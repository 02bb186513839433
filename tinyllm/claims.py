"""
The claims an introduction to fine-tuning makes, and the rules that judge each one from the numbers
`python -m tinyllm compare` measured (tinyllm.compare.task_facts gathers them; tests feed made-up ones).

A claim is a fact or a measurement:
  fact         true by construction (a parameter count of the sizes chosen, a file that holds every weight):
               shown with its arithmetic, never as a verdict
  measured     a rule reads the numbers and says supported, not supported, mixed (its parts disagree),
               inconclusive (the difference is within the noise) or not measured (the run lacks what the
               claim needs, e.g. a classification task)

Noise. A comparison is a difference of two means with a standard error that holds both sources of chance:
the items it was measured on (test examples, facts, corpus windows: both sides are scored on the same
ones, so the difference is paired, item by item) and the seeds (a method's spread over its k runs). The
interval is the difference +- t x its standard error, t the 97.5% point of Student's t at the
Welch-Satterthwaite degrees of freedom (with three seeds the spread is itself uncertain, and t grows towards
4.3). A difference counts when its interval excludes 0. "No change" needs more than a small difference:
the whole interval must lie inside a stated margin (LOSS_MARGIN, ...), and "worse by more than the margin"
needs the whole interval outside it. A single run has no measured spread, so a comparison that needs one
says inconclusive.

Legend: facts F = {task: f}; f["methods"][m] holds (k, n) lists: k seeds of n items (accuracy: 0/1 per
test example; val_loss: n = 1); f["base"] the pretrained model's, one list of n items; see
tinyllm.compare.task_facts.
"""
import math
from dataclasses import dataclass

import numpy as np

from .memory import base_count
from .model import GPT2_SMALL, GPTConfig

SUPPORTED, NOT_SUPPORTED, MIXED, INCONCLUSIVE, NOT_MEASURED = (
    "supported", "not supported", "mixed", "inconclusive", "not measured")
FACT = "fact"                       # true by construction: its arithmetic, not a verdict
SMOKE = "no verdict (smoke test)"   # --quick: a few steps prove the code runs, not a claim
VERDICTS = (SUPPORTED, NOT_SUPPORTED, MIXED, INCONCLUSIVE, NOT_MEASURED, FACT, SMOKE)

LOSS_MARGIN = 0.05      # a loss "kept": within 5% of the base's, the whole interval
POINTS_MARGIN = 0.05    # an accuracy or recall "kept": within 5 points, the whole interval
SUITED_MARGIN = 0.10    # "suited": within 10 points of the best alternative
TUNE_MARGIN = 0.05      # "needs tuning": the worst setting's test loss is clearly more than 5% above the best's;
                        # "does not": less than 5% above it, the whole interval

# ----------------------------------------------------------------------------------------------------
# differences and their noise

# Student's t, 97.5% point, against 1/dof (np.interp needs it increasing): 1.96 at infinite dof
T_TABLE = ((0.0, 1.96), (1 / 60, 2.00), (1 / 30, 2.04), (1 / 20, 2.09), (1 / 15, 2.13), (1 / 10, 2.23),
           (1 / 8, 2.31), (1 / 6, 2.45), (1 / 5, 2.57), (1 / 4, 2.78), (1 / 3, 3.18), (1 / 2, 4.30), (1.0, 12.71))


def t975(dof):
    if dof < 1:
        return math.inf
    x, t = zip(*T_TABLE)
    return float(np.interp(1.0 / dof, x, t))


@dataclass
class Diff:
    """mean(a) - mean(b), its standard error and degrees of freedom."""
    value: float
    se: float
    dof: float

    @property
    def half_width(self):
        return t975(self.dof) * self.se if self.se > 0 else 0.0

    @property
    def lo(self):
        return self.value - self.half_width

    @property
    def hi(self):
        return self.value + self.half_width

    @property
    def sign(self):
        """+1 if a is clearly larger, -1 if clearly smaller, 0 within the noise (or the noise unknown)."""
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0

    def __str__(self):
        return f"{self.value:+.3f} ± {self.half_width:.3f}" if math.isfinite(self.half_width) else \
            f"{self.value:+.3f} (one run: spread unknown)"


def runs(x):
    """A measurement as a (k, n) array: k runs (seeds) of n items (test examples, facts, corpus windows; n = 1
    for one number per run), and whether its runs are seeds of a training (whose spread counts) or one fixed
    model (the base: a 1-D list, no spread)."""
    a = np.asarray(x, dtype=float)
    return (a, True) if a.ndim == 2 else (a.reshape(1, -1), False)


def mean(x):
    return float(np.mean(x))


def diff(a, b, scale=1.0, same_seeds=False):
    """mean(a) - mean(b), divided by scale (a relative difference when scale is b's mean), with its noise.

    a, b: see runs(). Two sources of chance add up:
      seeds  each seeded side's spread of its k per-seed means / k. A per-seed mean already holds that
             seed's noise over the items, so this term counts it.
      items  which items were drawn (which test examples, facts, windows). Paired when both sides have the
             same n items: the spread of the per-item differences / n, less the part of it the seeds'
             noise explains (counted above; without this the same noise would count twice); otherwise
             each side's spread over its items / n.
    same_seeds: a and b are the same k trainings measured twice (before and after a second task): the
    difference is taken seed by seed, and only its spread counts.
    A seeded side with one run has no measured spread: the difference's noise is then unknown (infinite)."""
    (A, seeded_a), (B, seeded_b) = runs(a), runs(b)
    if same_seeds:
        return diff(A - B, np.zeros(A.shape[1]), scale)
    value = (A.mean() - B.mean()) / scale
    terms = []                                     # (variance, degrees of freedom)
    for X, seeded in ((A, seeded_a), (B, seeded_b)):
        if seeded:
            if len(X) < 2:
                return Diff(value, math.inf, 0)
            terms.append((X.mean(axis=1).var(ddof=1) / len(X), len(X) - 1))
    if A.shape[1] == B.shape[1] > 1:               # paired: the same items on both sides
        d = A.mean(axis=0) - B.mean(axis=0)
        seed_part = sum(X.var(axis=0, ddof=1).mean() / len(X) for X, seeded in ((A, seeded_a), (B, seeded_b)) if seeded)
        terms.append((max(0.0, d.var(ddof=1) - seed_part) / len(d), len(d) - 1))
    else:
        terms += [(X.mean(axis=0).var(ddof=1) / X.shape[1], X.shape[1] - 1) for X in (A, B) if X.shape[1] > 1]
    var = sum(v for v, _ in terms)
    if var == 0:
        return Diff(value, 0.0, math.inf)
    dof = var * var / sum(v * v / d for v, d in terms if v > 0)           # Welch-Satterthwaite
    return Diff(value, math.sqrt(var) / scale, dof)


def combine(signs):
    """Per-case outcomes (+1 the claim holds, -1 it does not, 0 within the noise) -> one verdict: every case
    holds: supported; every case fails: not supported; some hold and some fail: mixed; else (a case
    within the noise, and the others all one way): inconclusive, since more seeds could tip it either way,
    and two runs' verdicts that are not inconclusive must agree."""
    signs = list(signs)
    if not signs:
        return NOT_MEASURED
    if all(s > 0 for s in signs):
        return SUPPORTED
    if all(s < 0 for s in signs):
        return NOT_SUPPORTED
    return MIXED if 1 in signs and -1 in signs else INCONCLUSIVE


def peft(f):
    return [m for m in f["methods"] if m != "full"]


def fmt_bytes(n):
    """Bytes in binary units, written as such: 512 B, 16.0 KiB, 3.1 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def best_method(f, methods=None):
    methods = methods or list(f["methods"])
    return max(methods, key=lambda m: mean(f["methods"][m]["accuracy"]))


def generation_tasks(F):
    return {t: f for t, f in F.items() if f["kind"] == "generate"}

# ----------------------------------------------------------------------------------------------------
# fine-tuning against prompting


def claim_more_examples(F):
    """Fact: the most solved examples a prompt can hold is what fits in the context; fine-tuning reads as many
    as the training set has."""
    parts = []
    for t, f in F.items():
        k_max = max(r["k"] for r in f["few_shot"] if r["fits"])
        seen = min(max(f["steps"].values()) * f["batch_size"], f["n_train"])
        parts.append(f"{t}: k <= {k_max} shots fit in {f['block_size']} positions; fine-tuning read {seen:,} "
                     f"distinct examples (up to {max(f['steps'].values())} steps x {f['batch_size']}, of "
                     f"{f['n_train']:,})")
    return "; ".join(parts), FACT


def claim_beats_few_shot(F):
    """The best fine-tuned method's test accuracy is clearly above the best k-shot prompt of the base model
    that fits, on every task."""
    parts, signs = [], []
    for t, f in F.items():
        shots = [r for r in f["few_shot"] if r["fits"]]
        shot = max(shots, key=lambda r: r["accuracy"])
        m = best_method(f)
        d = diff(f["methods"][m]["accuracy"], shot["correct"])
        parts.append(f"{t}: {m} {mean(f['methods'][m]['accuracy']):.2f} vs {shot['k']}-shot {shot['accuracy']:.2f} "
                     f"(difference {d})")
        signs.append(d.sign)
    return "; ".join(parts), combine(signs)


def claim_shorter_inputs(F):
    """Fact: a fine-tuned model reads the bare prompt (plus a prefix's or prompt's virtual positions); a
    k-shot prompt carries k solved examples in front of it."""
    parts = []
    for t, f in F.items():
        one = next((r for r in f["few_shot"] if r["k"] == 1), None)
        longest = max(m["tokens_per_query"] for m in f["methods"].values())
        parts.append(f"{t}: {f['base']['tokens_per_query']:.0f}-{longest:.0f} positions per query fine-tuned "
                     f"(virtual tokens included)" + (f" vs {one['tokens_per_query']:.0f} for 1 shot" if one else ""))
    return "; ".join(parts), FACT


def claim_complex_instructions(F):
    """On each generation task, the best method's test accuracy is clearly above the base model's and its
    best few-shot prompt's, and clearly above 0.5 (supported); clearly above them but clearly below 0.5:
    mixed (it learned something, not the task); not clearly above them: not supported."""
    parts, signs = [], []
    for t, f in generation_tasks(F).items():
        m = best_method(f)
        acc = f["methods"][m]["accuracy"]
        shot = max((r["correct"] for r in f["few_shot"] if r["fits"]), key=mean, default=f["base"]["accuracy"])
        d, half = diff(acc, max(shot, f["base"]["accuracy"], key=mean)), diff(acc, [0.5])
        parts.append(f"{t}: best {m} {mean(acc):.2f} (- 0.5: {half}) vs base {mean(f['base']['accuracy']):.2f}, "
                     f"best few-shot {mean(shot):.2f} (difference {d})")
        signs += [d.sign] if d.sign <= 0 else [1, -1] if half.sign < 0 else [half.sign]
    return ("; ".join(parts) or "needs a generation task"), combine(signs)


def claim_structure(F):
    """On each generation task, the share of answers in the task's format (one word and a newline for extract
    and qa, the record's fields for record) is clearly higher for the best method than for the base model.
    Tone is not measured: no task here has one."""
    parts, signs = [], []
    for t, f in generation_tasks(F).items():
        if f["base"].get("format_ok") is None:
            continue
        rates = {m: f["methods"][m]["format_ok"] for m in f["methods"]}
        m = max(rates, key=lambda k: mean(rates[k]))
        d = diff(rates[m], f["base"]["format_ok"])
        parts.append(f"{t}: answers in format: base {mean(f['base']['format_ok']):.2f}, " +
                     ", ".join(f"{k} {mean(v):.2f}" for k, v in rates.items()) + f" (best - base {d})")
        signs.append(d.sign)
    return ("; ".join(parts) or "needs a generation task with a format"), combine(signs)

# ----------------------------------------------------------------------------------------------------
# full fine-tuning


def step_sign(f, m):
    """-1 if m's training step is clearly cheaper than full's, +1 clearly dearer, 0 within the noise (the
    steps were timed in turns; the ratio's logarithm is averaged over the rounds)."""
    r = f["methods"][m]["step_ratio"]
    return Diff(r["log_mean"], r["log_se"], r["n"] - 1).sign


def claim_full_expensive(F):
    """Full fine-tuning's training step is clearly slower than every PEFT method's (timed in turns). Its AdamW
    state, two numbers per trained parameter, is shown beside it: arithmetic, not a measurement."""
    parts, signs = [], []
    for t, f in F.items():
        full = f["methods"]["full"]
        signs += [-step_sign(f, m) for m in peft(f)]
        parts.append(f"{t}: step time / full's: " + ", ".join(
            f"{m} {math.exp(f['methods'][m]['step_ratio']['log_mean']):.2f}" for m in peft(f)) +
            f"; AdamW state full {fmt_bytes(full['optimizer_state_bytes'])} vs PEFT at most "
            f"{fmt_bytes(max(f['methods'][m]['optimizer_state_bytes'] for m in peft(f)))}")
    return "; ".join(parts), combine(signs)


def claim_full_forgets(F):
    """With full fine-tuning's weights, the loss on held-out pretraining text rises by more than LOSS_MARGIN, or
    the recall of the world's facts falls by more than POINTS_MARGIN, the whole interval, against the base
    model (either: supported); both stay within their margin, the whole interval: not supported. (The same
    margins as "PEFT preserves knowledge", so that one change cannot count as kept there and lost here.)"""
    parts, signs = [], []
    for t, f in F.items():
        full, base = f["methods"]["full"], f["base"]
        loss = diff(full["corpus_loss"], base["corpus_loss"], scale=mean(base["corpus_loss"]))
        recall = diff(full["fact_recall"], base["fact_recall"])
        parts.append(f"{t}: corpus loss {mean(base['corpus_loss']):.3f} -> {mean(full['corpus_loss']):.3f} "
                     f"(relative {loss}), fact recall {mean(base['fact_recall']):.2f} -> {mean(full['fact_recall']):.2f} "
                     f"({recall})")
        signs.append(1 if loss.lo > LOSS_MARGIN or recall.hi < -POINTS_MARGIN else
                     -1 if loss.hi <= LOSS_MARGIN and recall.lo >= -POINTS_MARGIN else 0)
    return "; ".join(parts), combine(signs)


def claim_full_copy(F):
    """Fact: full fine-tuning changes every weight, so each task stores a whole model; a PEFT method stores
    only its own parameters."""
    f = next(iter(F.values()))
    full, copy = f["methods"]["full"]["saved_bytes"], f["methods"]["full"]["full_copy_bytes"]
    return (f"full saves {fmt_bytes(full)} per task (a full copy is {fmt_bytes(copy)}); " +
            ", ".join(f"{m} {fmt_bytes(f['methods'][m]['saved_bytes'])}" for m in peft(f))), FACT

# ----------------------------------------------------------------------------------------------------
# PEFT


def claim_peft_compute(F):
    """Each PEFT method's training step is clearly faster than full fine-tuning's (timed in turns), per task
    and method."""
    parts, signs = [], []
    for t, f in F.items():
        signs += [-step_sign(f, m) for m in peft(f)]
        parts.append(f"{t}: ms/step full {1e3 * f['methods']['full']['seconds_per_step']:.0f}, " + ", ".join(
            f"{m} {1e3 * f['methods'][m]['seconds_per_step']:.0f}" for m in peft(f)))
    return "; ".join(parts), combine(signs)


def claim_base_untouched(F):
    """With the method switched off, every PEFT run gives the base model's logits bit for bit (supported);
    any difference at all: not supported. (finetune also refuses a run that moved a frozen weight.)"""
    worst = max(m["disabled_max_diff"] for f in F.values() for k, m in f["methods"].items() if k != "full")
    return (f"largest |logits with the method off - base logits| over every PEFT run: {worst:g}",
            SUPPORTED if worst == 0 else NOT_SUPPORTED)


def claim_peft_keeps_facts(F):
    """With the method switched on, each PEFT method recalls the world's facts (cloze prompts in the
    pretraining text's own words) within POINTS_MARGIN of the base model, the whole interval (supported), or
    more than POINTS_MARGIN below it, the whole interval (not supported)."""
    parts, signs = [], []
    for t, f in F.items():
        base = f["base"]
        ds = {m: diff(f["methods"][m]["fact_recall"], base["fact_recall"]) for m in peft(f)}
        parts.append(f"{t}: fact recall base {mean(base['fact_recall']):.2f} -> " +
                     ", ".join(f"{m} {mean(f['methods'][m]['fact_recall']):.2f} ({d})" for m, d in ds.items()))
        signs += [1 if d.lo >= -POINTS_MARGIN else -1 if d.hi < -POINTS_MARGIN else 0 for d in ds.values()]
    return "; ".join(parts), combine(signs)


def claim_peft_keeps_language(F):
    """With the method switched on, each PEFT method's loss on held-out pretraining text stays within
    LOSS_MARGIN of the base model's, the whole interval (supported), or rises by more than LOSS_MARGIN, the
    whole interval (not supported)."""
    parts, signs = [], []
    for t, f in F.items():
        base = f["base"]["corpus_loss"]
        ds = {m: diff(f["methods"][m]["corpus_loss"], base, scale=mean(base)) for m in peft(f)}
        parts.append(f"{t}: corpus loss base {mean(base):.3f} -> " +
                     ", ".join(f"{m} {mean(f['methods'][m]['corpus_loss']):.3f} (relative {d})" for m, d in ds.items()))
        signs += [1 if d.hi <= LOSS_MARGIN else -1 if d.lo > LOSS_MARGIN else 0 for d in ds.values()]
    return "; ".join(parts), combine(signs)


def claim_peft_forgets_less(F):
    """With the methods switched on, each PEFT method's corpus loss is clearly below full fine-tuning's (it
    forgets less of the pretraining text), per task and method."""
    parts, signs = [], []
    for t, f in F.items():
        full = f["methods"]["full"]["corpus_loss"]
        ds = {m: diff(full, f["methods"][m]["corpus_loss"], scale=mean(full)) for m in peft(f)}
        parts.append(f"{t}: corpus loss full {mean(full):.3f} vs " +
                     ", ".join(f"{m} {mean(f['methods'][m]['corpus_loss']):.3f} (relative {d})" for m, d in ds.items()))
        signs += [d.sign for d in ds.values()]
    return "; ".join(parts), combine(signs)


def claim_one_adapter_per_task(F):
    """Task after task: full fine-tuning on the task and then on a second one leaves the first task's test
    accuracy clearly lower than before; an adapter per task on one base keeps both (switching adapters
    is exact, so its first task's accuracy is unchanged)."""
    parts, signs = [], []
    for t, f in F.items():
        s = f.get("sequential")
        if not s:
            continue
        d = diff(s["full"]["a_after_b"], s["full"]["a"], same_seeds=True)
        parts.append(f"{t} then {s['task_b']}: full {t} accuracy {mean(s['full']['a']):.2f} -> "
                     f"{mean(s['full']['a_after_b']):.2f} ({d}); {s['peft']} adapters: {t} "
                     f"{mean(s['adapter']['a']):.2f} and {s['task_b']} {mean(s['adapter']['b']):.2f} on one base "
                     f"(full's {s['task_b']}: {mean(s['full']['b']):.2f})")
        signs.append(1 if d.sign < 0 else -1 if d.lo >= -POINTS_MARGIN else 0)
    return ("; ".join(parts) or "needs the task-after-task runs"), combine(signs)


def seconds_to(f, m, target):
    """Per seed: training seconds until the val loss first reaches target (the step where the curve crosses
    it, linear between two evaluations, x seconds per step, the one step time of the timing in turns); inf
    when it never does."""
    steps = f["methods"][m]["val_steps"]
    out = []
    for curve in f["methods"][m]["val_curves"]:
        i = next((i for i, v in enumerate(curve) if v <= target), None)
        if i is None:
            out.append(math.inf)
            continue
        s = steps[i] if i == 0 else steps[i - 1] + (steps[i] - steps[i - 1]) * (curve[i - 1] - target) / (curve[i - 1] - curve[i])
        out.append(s * f["methods"][m]["seconds_per_step"])
    return out


def claim_peft_faster(F):
    """Each PEFT method reaches a validation loss that both it and full fine-tuning reach (the higher of the
    two methods' final losses, worst seed) in clearly less training time than full fine-tuning needs to
    reach it. The level is one both get to, so the rule compares speed, not where each ends."""
    parts, signs = [], []
    for t, f in F.items():
        shown = []
        for m in peft(f):
            target = float(max(np.max(f["methods"]["full"]["val_loss"]), np.max(f["methods"][m]["val_loss"])))
            times, full = seconds_to(f, m, target), seconds_to(f, "full", target)
            if not all(map(math.isfinite, times + full)):   # a curve that bounced above its final loss
                signs.append(0)
            else:
                signs.append(-diff([[x] for x in times], [[x] for x in full]).sign)
            shown.append(f"{m} {np.mean(times):.1f}s vs full {np.mean(full):.1f}s (to {target:.3f})")
        parts.append(f"{t}: seconds to reach the loss both reach: " + ", ".join(shown))
    return "; ".join(parts), combine(signs)

# ----------------------------------------------------------------------------------------------------
# LoRA


def claim_lora_beyond_generation(F):
    """On the classify task (scored as a classifier head), LoRA's test accuracy is clearly above the base
    model's."""
    if "classify" not in F:
        return "needs the classify task (--task classify or all)", NOT_MEASURED
    f = F["classify"]
    d = diff(f["methods"]["lora"]["accuracy"], f["base"]["accuracy"])
    return (f"classify accuracy: base {mean(f['base']['accuracy']):.2f}, LoRA {mean(f['methods']['lora']['accuracy']):.2f} "
            f"(difference {d}; chance 0.50)"), combine([d.sign])


def variant_spread(group):
    """The best and the worst setting of a variant group, and their relative difference in test loss (each
    setting's seeds x test examples, paired example by example)."""
    means = {k: mean(v["test_losses"]) for k, v in group.items()}
    best, worst = min(means, key=means.get), max(means, key=means.get)
    return best, worst, diff(group[worst]["test_losses"], group[best]["test_losses"], scale=means[best])


def needs_tuning(group):
    """+1 the worst setting is clearly more than TUNE_MARGIN worse than the best; -1 it is less than that,
    the whole interval; 0 else."""
    _, _, d = variant_spread(group)
    return 1 if d.lo > TUNE_MARGIN else -1 if d.hi <= TUNE_MARGIN else 0


def show_group(name, group):
    return f"{name}: " + ", ".join(f"{k} {mean(v['test_losses']):.3f} ({v['trainable_params']:,} params)"
                                   for k, v in group.items()) + f" (worst/best - 1: {variant_spread(group)[2]})"


def first_variants(F, groups):
    for t, f in F.items():
        found = {g: f.get("variants", {}).get(g) for g in groups}
        if all(found.values()):
            return t, found
    return None, None


def claim_lora_placement(F):
    """Where LoRA goes changes the result: the best and the worst placement tried (all of c_attn, its q and v
    slices, the MLP; each at its own tuned lr, from the sweep) differ in test loss by more than TUNE_MARGIN,
    the whole interval (supported), or by less, the whole interval (not supported). The choice itself is a
    fact of the API: target_modules takes any linear layer."""
    t, found = first_variants(F, ["lora_place"])
    if not found:
        return "needs the sweep's variant runs (python -m tinyllm sweep)", NOT_MEASURED
    return f"{t} (sweep), {show_group('test loss', found['lora_place'])}", combine([needs_tuning(found["lora_place"])])


def duel(f, a, b):
    """+1 if a does clearly better than b on a task's test examples, in accuracy or in loss, and clearly
    worse in neither; -1 the other way round; 0 else (both within the noise, or one each way)."""
    ma, mb = f["methods"][a], f["methods"][b]
    signs = (diff(ma["accuracy"], mb["accuracy"]).sign, -diff(ma["test_loss"], mb["test_loss"]).sign)
    return 1 if max(signs) > 0 and min(signs) >= 0 else -1 if min(signs) < 0 and max(signs) <= 0 else 0


def claim_lora_better(F):
    """LoRA does clearly better than each other PEFT method, per task: on the test examples, a higher accuracy
    or a lower loss beyond the noise, and clearly worse in neither."""
    parts, signs = [], []
    for t, f in F.items():
        others = [m for m in peft(f) if m != "lora"]
        outcome = {m: duel(f, "lora", m) for m in others}
        signs += outcome.values()
        show = lambda m: f"{m} acc {mean(f['methods'][m]['accuracy']):.2f} loss {mean(f['methods'][m]['test_loss']):.3f}"
        word = {1: "LoRA better", -1: "LoRA worse", 0: "tie"}
        parts.append(f"{t}: {show('lora')} vs " + ", ".join(f"{show(m)} ({word[o]})" for m, o in outcome.items()))
    return "; ".join(parts), combine(signs)


def claim_lora_more_params(F):
    """Fact: the counts follow from the sizes chosen, r (in + out) per targeted linear for LoRA and
    2 L P C for a prefix; the ratio is a choice, not a finding."""
    f = next(iter(F.values()))
    lora, prefix = f["methods"]["lora"], f["methods"]["prefix"]
    return (f"{lora['formula']}; {prefix['formula']}; ratio {lora['trainable_params'] / prefix['trainable_params']:.2f}"), FACT


def claim_lora_rank(F):
    """LoRA's rank matters: the best and the worst of the ranks the sweep tried (lora_alpha = 2r, each at its
    own tuned lr) differ in test loss by more than TUNE_MARGIN, the whole interval (supported), or by less,
    the whole interval (not supported)."""
    t, found = first_variants(F, ["lora_rank"])
    if not found:
        return "needs the sweep's variant runs (python -m tinyllm sweep)", NOT_MEASURED
    return f"{t} (sweep), {show_group('test loss', found['lora_rank'])}", combine([needs_tuning(found["lora_rank"])])

# ----------------------------------------------------------------------------------------------------
# prefix tuning


def claim_prefix_efficient(F):
    """Fact: a prefix trains 2 L P C numbers (keys and values, per layer and virtual token), a share of the
    model that shrinks as the model grows."""
    f = next(iter(F.values()))
    m = f["methods"]["prefix"]
    P = m["virtual_tokens"]
    small = GPTConfig(**GPT2_SMALL)
    n_small = 2 * small.n_layer * P * small.n_embd
    return (f"{m['formula']}: {100 * m['trainable_params'] / f['base_params']:.2f}% of this model; the same {P} "
            f"tokens on GPT-2 small: {n_small:,} = {100 * n_small / base_count(small):.3f}%"), FACT


def claim_prefix_generation(F):
    """On each generation task, prefix tuning's test accuracy is within SUITED_MARGIN of the best PEFT
    method's, the whole interval (supported), or more than SUITED_MARGIN below it, the whole interval (not
    supported)."""
    parts, signs = [], []
    for t, f in generation_tasks(F).items():
        m = best_method(f, peft(f))
        d = diff(f["methods"]["prefix"]["accuracy"], f["methods"][m]["accuracy"])
        parts.append(f"{t}: prefix {mean(f['methods']['prefix']['accuracy']):.2f} vs best PEFT {m} "
                     f"{mean(f['methods'][m]['accuracy']):.2f} ({d})")
        signs.append(1 if d.lo >= -SUITED_MARGIN else -1 if d.hi < -SUITED_MARGIN else 0)
    return ("; ".join(parts) or "needs a generation task"), combine(signs)


def claim_prefix_narrower(F):
    """Against LoRA, prefix tuning does worse on classification than on generation: its test-accuracy gap to
    LoRA is clearly larger on classify than on each generation task."""
    gens = generation_tasks(F)
    if "classify" not in F or not gens:
        return "needs the classify task and a generation task (--task all)", NOT_MEASURED
    ds = {t: diff(F[t]["methods"]["lora"]["accuracy"], F[t]["methods"]["prefix"]["accuracy"])
          for t in ["classify", *gens]}
    signs = []
    for t in gens:
        c, g = ds["classify"], ds[t]
        signs.append(Diff(c.value - g.value, math.hypot(c.se, g.se), min(c.dof, g.dof)).sign)
    return ("LoRA - prefix accuracy: " + ", ".join(f"{t} {d}" for t, d in ds.items())), combine(signs)


def claim_prefix_tuning(F):
    """The prefix's length (the sweep's P) and its initialisation (random, or the keys and values of real
    text) each matter: their best and worst settings differ in test loss by more than TUNE_MARGIN, the whole
    interval (from the sweep)."""
    t, found = first_variants(F, ["prefix_length", "prefix_init"])
    if not found:
        return "needs the sweep's variant runs (python -m tinyllm sweep)", NOT_MEASURED
    return (f"{t} (sweep), " + "; ".join(show_group(g.replace("_", " "), v) for g, v in found.items()),
            combine(needs_tuning(v) for v in found.values()))


# (claim as introductions put it, the rule that decides it, where to look: figure, lesson)
CLAIMS = [
    ("Fine-tuning lets you give more examples than few-shot prompting", claim_more_examples, ("accuracy.png", "14")),
    ("Fine-tuning does better than few-shot prompting", claim_beats_few_shot, ("accuracy.png", "14")),
    ("Fine-tuning shortens every input (no examples in the prompt)", claim_shorter_inputs, ("", "14")),
    ("Fine-tuning can teach complex instructions", claim_complex_instructions, ("accuracy.png", "09")),
    ("Fine-tuning can change the structure or tone of responses", claim_structure, ("accuracy.png", "09")),
    ("Full fine-tuning is expensive", claim_full_expensive, ("step_time.png", "16")),
    ("Full fine-tuning risks overwriting existing knowledge", claim_full_forgets, ("forgetting.png", "05")),
    ("Full fine-tuning needs a full copy of the model per task", claim_full_copy, ("memory.png", "05")),
    ("PEFT cuts compute", claim_peft_compute, ("step_time.png", "16")),
    ("PEFT preserves knowledge: the base model is untouched", claim_base_untouched, ("", "06")),
    ("PEFT preserves knowledge: the facts are still recalled with it on", claim_peft_keeps_facts, ("forgetting.png", "09")),
    ("PEFT preserves knowledge: the language is kept with it on", claim_peft_keeps_language, ("forgetting.png", "09")),
    ("PEFT forgets less than full fine-tuning", claim_peft_forgets_less, ("forgetting.png", "09")),
    ("One adapter per task keeps every task; full fine-tuning overwrites", claim_one_adapter_per_task,
     ("sequential_{task}.png", "06")),
    ("PEFT trains faster", claim_peft_faster, ("loss_{task}.png", "09")),
    ("LoRA applies beyond generation", claim_lora_beyond_generation, ("accuracy.png", "09")),
    ("LoRA gives fine control over where it is injected", claim_lora_placement, ("variants.png", "10")),
    ("LoRA performs better (than the other PEFT methods)", claim_lora_better, ("accuracy.png", "09")),
    ("LoRA adds slightly more parameters than prefix tuning", claim_lora_more_params, ("params.png", "09")),
    ("LoRA needs its rank tuned", claim_lora_rank, ("variants.png", "10")),
    ("Prefix tuning is extremely parameter-efficient", claim_prefix_efficient, ("params.png", "07")),
    ("Prefix tuning is suited to generation", claim_prefix_generation, ("accuracy.png", "07")),
    ("Prefix tuning is narrower than LoRA", claim_prefix_narrower, ("accuracy.png", "11")),
    ("Prefix tuning's length and initialization need tuning", claim_prefix_tuning, ("variants.png", "11")),
]


MARGIN_WORDS = {"LOSS_MARGIN": f"{LOSS_MARGIN:.0%}", "POINTS_MARGIN": f"{100 * POINTS_MARGIN:.0f} points",
                "SUITED_MARGIN": f"{100 * SUITED_MARGIN:.0f} points", "TUNE_MARGIN": f"{TUNE_MARGIN:.0%}"}


def rule_text(rule):
    """A rule's docstring on one line, with each margin's name followed by its value."""
    text = " ".join(rule.__doc__.split())
    for name, words in MARGIN_WORDS.items():
        text = text.replace(name, f"{name} ({words})")
    return text


def judge_claims(facts, smoke=False):
    """[{claim, measured, verdict, rule, figure, lesson}] for every claim in CLAIMS, from facts (see
    compare.task_facts). smoke: a --quick run; every measured claim gets SMOKE instead of a verdict."""
    rows, first = [], next(iter(facts))
    for claim, rule, (figure, lesson) in CLAIMS:
        measured, verdict = rule(facts)
        if smoke and verdict != FACT:
            verdict = SMOKE
        rows.append({"claim": claim, "measured": measured, "verdict": verdict, "rule": rule_text(rule),
                     "figure": figure.format(task=first), "lesson": lesson})
    return rows
