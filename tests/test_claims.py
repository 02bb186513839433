"""The claims' rules on made-up numbers: every measured rule can come out supported and not supported (and
inconclusive when the difference is within the noise); facts never carry a verdict."""
import copy
import math

import numpy as np
import pytest

import tinyllm.claims as claims
from tinyllm.claims import FACT, INCONCLUSIVE, MIXED, NOT_MEASURED, NOT_SUPPORTED, SUPPORTED

METHODS = ("full", "lora", "prefix", "prompt", "adapter")


N = 200          # test examples
RNG = np.random.default_rng(0)


def acc(p, k=3, n=N, spread=0.01):
    """Per-example correctness (k seeds, n examples) with accuracy about p: the first p*n examples right,
    so two of these differ example by example only where their counts differ (a clean paired difference).
    k=None: one fixed model (the base), a 1-D list."""
    rows = [[1.0 if i < round((p + (j - ((k or 1) - 1) / 2) * spread) * n) else 0.0 for i in range(n)]
            for j in range(k or 1)]
    return rows if k else rows[0]


def scattered(p, k=3, n=N, seed=0):
    """Accuracy about p, but right on different examples in every seed: a noisy paired difference."""
    rng = np.random.default_rng(seed)
    return [list((rng.random(n) < p).astype(float)) for _ in range(k)]


def losses(x, k=3, n=16, spread=0.01, jitter=0.0):
    """Per-window corpus losses about x (k seeds x n windows); k=None: the base model's."""
    base = 0.4 + 0.1 * np.sin(np.arange(n))                 # windows differ; the same ones for everyone
    rows = [list(base - 0.4 + x + (j - ((k or 1) - 1) / 2) * spread + jitter * RNG.standard_normal(n))
            for j in range(k or 1)]
    return rows if k else rows[0]


def runs_of(*values):
    """One number per seed, as (k, 1)."""
    return [[v] for v in values]


def seeds(x, spread=0.01):
    return runs_of(x - spread, x, x + spread)


def ratio(r, se=0.01):
    """A step-time ratio to full's, as the timing in turns reports it: the mean log ratio over 20 rounds."""
    return {"log_mean": math.log(r), "log_se": se, "n": 20}


def facts():
    """Plausible numbers for one generation task: full and LoRA learn it, full is slow and forgets, the
    adapters keep the base's knowledge."""
    peft = dict(accuracy=acc(0.6), val_loss=seeds(0.3), test_loss=losses(0.3, n=N), format_ok=acc(0.95), corpus_loss=losses(0.40, spread=0.002),
                fact_recall=acc(0.45, n=144), val_steps=[0, 100, 200, 300], seconds_per_step=0.03,
                step_ratio=ratio(0.7), trainable_params=16_384, formula="LoRA r*(in+out) = 16,384",
                optimizer_state_bytes=131_072, saved_bytes=70_000, full_copy_bytes=3_300_000, virtual_tokens=0,
                tokens_per_query=50, disabled_max_diff=0.0)
    methods = {m: copy.deepcopy(peft) for m in METHODS}
    for m in methods.values():
        m["val_curves"] = [[3.0, 1.0, 0.5, v[0]] for v in m["val_loss"]]
    methods["full"].update(accuracy=acc(0.95), val_loss=seeds(0.05), test_loss=losses(0.05, n=N), corpus_loss=losses(0.9),
                           fact_recall=acc(0.2, n=144), seconds_per_step=0.05, step_ratio=ratio(1.0, 0.0),
                           trainable_params=817_920, optimizer_state_bytes=6_543_360, saved_bytes=3_300_000,
                           disabled_max_diff=1.5, val_curves=[[3.0, 0.5, 0.1, v[0]] for v in seeds(0.05)])
    methods["lora"].update(accuracy=acc(0.92), val_loss=seeds(0.08), test_loss=losses(0.08, n=N), val_curves=[[3.0, 0.3, 0.1, v[0]] for v in seeds(0.08)])
    methods["prefix"].update(trainable_params=10_240, formula="prefix 2*L*P*C = 10,240", virtual_tokens=10,
                             tokens_per_query=60)
    methods["prompt"].update(trainable_params=1_280, virtual_tokens=10, tokens_per_query=60)
    variant = lambda v, p=10_000: {"test_losses": losses(v, n=50), "trainable_params": p}
    f = dict(kind="generate", n_test=N, n_train=2000, batch_size=8,
             steps={m: 500 for m in METHODS}, block_size=128, base_params=817_920,
             base=dict(accuracy=acc(0.0, None), format_ok=acc(0.0, None), corpus_loss=losses(0.40, None),
                       fact_recall=acc(0.45, None, n=144), tokens_per_query=50),
             few_shot=[dict(k=0, tokens_per_query=50, fits=True, accuracy=0.0, correct=acc(0.0, None)),
                       dict(k=1, tokens_per_query=100, fits=True, accuracy=0.1, correct=acc(0.1, None)),
                       dict(k=2, tokens_per_query=150, fits=False, accuracy=None, correct=None)],
             methods=methods,
             sequential=dict(task_b="qa", peft="lora", n_test_a=N, n_test_b=72,
                             full=dict(a=acc(0.95), a_after_b=acc(0.2), b=acc(0.4, n=72)),
                             adapter=dict(a=acc(0.92), b=acc(0.4, n=72))),
             variants=dict(lora_rank={"r=2": variant(0.5), "r=8": variant(0.3), "r=32": variant(0.31)},
                           lora_place={"c_attn": variant(0.3), "q,v": variant(0.6), "mlp": variant(0.4)},
                           prefix_length={"P=3": variant(0.9), "P=10": variant(0.6), "P=25": variant(0.6)},
                           prefix_init={"random": variant(0.6), "text": variant(0.9)}))
    return {"extract": f}


def with_classify(F, lora=0.9, prefix=0.3, base=0.5, noisy=False):
    c = copy.deepcopy(F["extract"])
    c.update(kind="classify", variants={}, sequential=None)
    c["base"].update(accuracy=acc(base, None), format_ok=None)
    c["methods"]["lora"]["accuracy"] = scattered(lora) if noisy else acc(lora)
    c["methods"]["prefix"]["accuracy"] = scattered(prefix) if noisy else acc(prefix)
    return {**F, "classify": c}


def variants(**groups):
    """Variant groups of two settings: {group: (mean test loss of each, spread over seeds)}, on the same 50
    test examples."""
    v = lambda x, sd: {"test_losses": losses(x, n=50, spread=sd), "trainable_params": 1}
    return change(**{f"variants__{g}": {"a": v(a, sd), "b": v(b, sd)} for g, (a, b, sd) in groups.items()})


def change(**paths):
    """A change to facts(): keyword 'methods__full__accuracy' sets F['extract']['methods']['full']['accuracy'];
    ALL in place of a method name means every method."""
    def apply(F):
        for path, value in paths.items():
            keys = path.split("__")
            targets = [F["extract"]]
            for k in keys[:-1]:
                targets = [t[x] for t in targets for x in (t if k == "ALL" else [k])]
            for t in targets:
                t[keys[-1]] = copy.deepcopy(value)
        return F
    return apply


def peft_methods(**kw):
    return change(**{f"methods__{m}__{k}": v for m in METHODS[1:] for k, v in kw.items()})


def chain(*changes):
    def apply(F):
        for c in changes:
            F = c(F)
        return F
    return apply


same = lambda F: F
CASES = [  # (rule, change that makes it supported, one that makes it not supported, one that makes it inconclusive)
    (claims.claim_beats_few_shot, same, change(methods__ALL__accuracy=acc(0.0, spread=0)),
     change(methods__ALL__accuracy=scattered(0.12))),
    (claims.claim_complex_instructions, same, change(methods__ALL__accuracy=acc(0.0, spread=0)),
     change(methods__ALL__accuracy=scattered(0.12))),
    (claims.claim_structure, same, chain(change(methods__ALL__format_ok=acc(0.0, spread=0)), change(base__format_ok=acc(0.3, None))),
     change(methods__ALL__format_ok=scattered(0.52), base__format_ok=scattered(0.5, k=1)[0])),
    (claims.claim_full_expensive, same, peft_methods(step_ratio=ratio(1.3)), peft_methods(step_ratio=ratio(1.0, 0.05))),
    (claims.claim_full_forgets, same, change(methods__full__corpus_loss=losses(0.40, spread=0.001),
                                             methods__full__fact_recall=acc(0.45, n=144, spread=0)),
     change(methods__full__corpus_loss=losses(0.41, spread=0.03), methods__full__fact_recall=acc(0.45, n=144, spread=0))),
    (claims.claim_peft_compute, same, peft_methods(step_ratio=ratio(1.2)), peft_methods(step_ratio=ratio(1.0, 0.05))),
    (claims.claim_peft_keeps_facts, same, peft_methods(fact_recall=acc(0.2, n=144)),
     peft_methods(fact_recall=scattered(0.40, n=144))),
    (claims.claim_peft_keeps_language, same, peft_methods(corpus_loss=losses(0.8)),
     peft_methods(corpus_loss=losses(0.42, spread=0.02))),
    (claims.claim_peft_forgets_less, same, peft_methods(corpus_loss=losses(1.2)),
     peft_methods(corpus_loss=losses(0.9, spread=0.3))),
    (claims.claim_one_adapter_per_task, same, change(sequential__full__a_after_b=acc(0.95)),
     change(sequential__full__a=scattered(0.6, seed=1), sequential__full__a_after_b=scattered(0.6, seed=2))),
    (claims.claim_peft_faster, peft_methods(val_curves=[[3.0, 0.04, 0.03, 0.03]] * 3),
     peft_methods(val_curves=[[3.0, 2.9, 2.8, 0.02]] * 3, seconds_per_step=0.05), peft_methods(val_curves=[[3.0, 1.0, 0.5, 0.3], [3.0, 0.04, 0.04, 0.04], [3.0, 0.04, 0.04, 0.04]])),
    (claims.claim_lora_beyond_generation, with_classify, lambda F: with_classify(F, lora=0.3),
     lambda F: with_classify(F, lora=0.53, noisy=True)),
    (claims.claim_lora_placement, same, variants(lora_place=(0.3, 0.301, 0.001)), variants(lora_place=(0.3, 0.33, 0.05))),
    (claims.claim_lora_better, same, change(methods__lora__accuracy=acc(0.2), methods__lora__test_loss=losses(0.6, n=N)),
     change(methods__lora__accuracy=scattered(0.6), methods__lora__test_loss=losses(0.3, n=N, spread=0.05))),
    (claims.claim_lora_rank, same, variants(lora_rank=(0.3, 0.301, 0.001)), variants(lora_rank=(0.3, 0.33, 0.05))),
    (claims.claim_prefix_generation, change(methods__prefix__accuracy=acc(0.88)), same,
     change(methods__prefix__accuracy=scattered(0.82))),
    (claims.claim_prefix_narrower, with_classify, lambda F: with_classify(F, prefix=0.95),
     lambda F: with_classify(F, prefix=0.62, noisy=True)),
    (claims.claim_prefix_tuning, same, variants(prefix_length=(0.6, 0.601, 0.001), prefix_init=(0.6, 0.601, 0.001)),
     variants(prefix_length=(0.6, 0.63, 0.05), prefix_init=(0.6, 0.63, 0.05))),
]
FACTS = [claims.claim_more_examples, claims.claim_shorter_inputs, claims.claim_full_copy,
         claims.claim_lora_more_params, claims.claim_prefix_efficient]
EXACT = [claims.claim_base_untouched]         # a measured check with no noise: supported or not, never unsure


def test_every_claim_is_a_fact_or_has_its_rule_tested():
    rules = [rule for _, rule, _ in claims.CLAIMS]
    assert sorted(r.__name__ for r in rules) == sorted(r.__name__ for r in [c[0] for c in CASES] + FACTS + EXACT)


def test_base_untouched_is_measured_bit_for_bit():
    assert claims.claim_base_untouched(facts())[1] == SUPPORTED          # full's own difference does not count
    assert claims.claim_base_untouched(change(methods__prompt__disabled_max_diff=1e-7)(facts()))[1] == NOT_SUPPORTED


@pytest.mark.parametrize("rule, yes, no, unsure", CASES, ids=[c[0].__name__ for c in CASES])
def test_rule_can_come_out_every_way(rule, yes, no, unsure):
    for make, want in ((yes, SUPPORTED), (no, NOT_SUPPORTED), (unsure, INCONCLUSIVE)):
        measured, verdict = rule(make(facts()))
        assert verdict == want, (want, measured)
        assert measured


@pytest.mark.parametrize("rule", FACTS, ids=[r.__name__ for r in FACTS])
def test_facts_show_their_arithmetic_and_no_verdict(rule):
    measured, verdict = rule(facts())
    assert verdict == FACT and any(ch.isdigit() for ch in measured)


@pytest.mark.parametrize("rule, change, verdict", [
    (claims.claim_complex_instructions, change(methods__ALL__accuracy=acc(0.4)), MIXED),         # clearly above, < 0.5
    (claims.claim_complex_instructions, change(methods__ALL__accuracy=acc(0.5, spread=0.05)), INCONCLUSIVE),  # about 0.5
    (claims.claim_peft_compute, change(methods__prompt__step_ratio=ratio(1.3)), MIXED),     # three cheaper, one not
    (claims.claim_lora_beyond_generation, same, NOT_MEASURED),                                # no classify task
    (claims.claim_prefix_narrower, same, NOT_MEASURED),
    (claims.claim_lora_rank, change(variants={}), NOT_MEASURED),
    (claims.claim_one_adapter_per_task, change(sequential=None), NOT_MEASURED),
    (claims.claim_beats_few_shot, change(methods__ALL__accuracy=acc(0.9, k=1)), INCONCLUSIVE),   # one seed: no spread
])
def test_rule_mixed_and_not_measured(rule, change, verdict):
    measured, got = rule(change(facts()))
    assert got == verdict, measured


def test_differences_need_more_than_noise():
    # paired by example: the same examples right, plus 10 more, is a clear gain even at 3 seeds
    assert claims.diff(acc(0.55), acc(0.50)).sign == 1
    assert claims.diff(acc(0.45), acc(0.50)).sign == -1
    # the same accuracies right on different examples are within the noise of 200 examples
    d = claims.diff(scattered(0.52, seed=1), scattered(0.50, seed=2))
    assert d.sign == 0 and d.half_width > 0.05
    # the same means with a wide seed spread are a tie: the seeds' spread counts
    assert claims.diff(seeds(0.70, 0.15), seeds(0.50, 0.15)).sign == 0
    assert claims.diff(seeds(0.70, 0.01), seeds(0.50, 0.01)).sign == 1
    # a fixed model (the base) has no seed spread; a single run of a training has an unknown one
    assert claims.diff(seeds(0.2, 0.001), [0.0]).sign == 1
    assert claims.diff([[0.9]], [0.0]).sign == 0
    assert claims.diff(acc(0.5, None), acc(0.5, None)).half_width == 0.0


def test_combine_calls_a_split_undecided_unless_it_goes_both_ways():
    assert claims.combine([1, 1]) == SUPPORTED and claims.combine([-1, -1]) == NOT_SUPPORTED
    assert claims.combine([1, 0]) == INCONCLUSIVE and claims.combine([-1, 0]) == INCONCLUSIVE
    assert claims.combine([1, -1, 0]) == MIXED and claims.combine([]) == NOT_MEASURED


def test_standard_error_is_the_spread_it_predicts():
    """Two methods equal in truth, each 3 seeds (a seed shifts every example's chance a little) x 200 shared
    examples (some easy, some hard): over many repetitions, the differences spread as their reported standard
    errors say, so a seed's noise is not counted twice (once per seed, once per example)."""
    rng = np.random.default_rng(1)
    k, n = 3, 200
    values, ses, same_seed_values, same_seed_ses = [], [], [], []
    for _ in range(400):
        p = rng.uniform(0.2, 0.9, n)                                   # each example's difficulty, shared
        method = lambda: (rng.random((k, n)) < np.clip(p + rng.normal(0, 0.01, (k, 1)), 0, 1)).astype(float)
        d = claims.diff(method(), method())
        values.append(d.value)
        ses.append(d.se)
        before = method()
        after = np.where(rng.random((k, n)) < 0.1, 1 - before, before)     # the same runs, 10% of answers flipped
        d = claims.diff(after, before, same_seeds=True)
        same_seed_values.append(d.value)
        same_seed_ses.append(d.se)
    assert 0.85 < np.std(values) / np.sqrt(np.mean(np.square(ses))) < 1.18
    assert 0.85 < np.std(same_seed_values) / np.sqrt(np.mean(np.square(same_seed_ses))) < 1.18


def test_t_quantiles():
    assert claims.t975(4) == pytest.approx(2.78, abs=0.01)
    assert claims.t975(1e9) == pytest.approx(1.96, abs=0.01)
    assert claims.t975(0.5) == math.inf
    assert all(claims.t975(a) > claims.t975(b) for a, b in zip(range(1, 40), range(2, 41)))


def test_welch_degrees_of_freedom():
    """Two sides of 3 seeds: 4 degrees of freedom; a term measured on 200 examples brings many more."""
    a, b = seeds(0.5, 0.01), seeds(0.5, 0.02)
    assert claims.diff(a, a).dof == pytest.approx(4.0)
    assert 2.0 < claims.diff(a, b).dof < 4.0
    assert claims.diff(scattered(0.5), acc(0.5, None)).dof > claims.diff(a, a).dof


def test_judge_claims_covers_every_claim_and_smoke_states_no_verdict():
    rows = claims.judge_claims(with_classify(facts()))
    assert [r["claim"] for r in rows] == [c for c, _, _ in claims.CLAIMS]
    assert all(r["verdict"] in claims.VERDICTS and r["verdict"] != NOT_MEASURED for r in rows)
    smoke = claims.judge_claims(facts(), smoke=True)
    assert {r["verdict"] for r in smoke} == {FACT, claims.SMOKE}


def test_units_are_binary_and_say_so():
    assert claims.fmt_bytes(512) == "512 B"
    assert claims.fmt_bytes(16 * 1024) == "16.0 KiB"
    assert claims.fmt_bytes(3.5 * 2 ** 20) == "3.5 MiB"


def test_seconds_to_target_uses_the_one_step_time():
    F = facts()["extract"]
    # lora's curve goes 3.0 -> 0.3 from step 0 to 100: it crosses 0.5 at step 100 * 2.5 / 2.7
    assert claims.seconds_to(F, "lora", 0.5) == pytest.approx([100 * 2.5 / 2.7 * 0.03] * 3)
    assert claims.seconds_to(F, "prompt", 0.01) == [math.inf] * 3
    assert np.isfinite(claims.seconds_to(F, "full", float(np.max(F["methods"]["full"]["val_loss"])))).all()
