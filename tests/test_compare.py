"""`python -m tinyllm compare`: the files it writes, the claims' rules (on hand-made numbers, both ways), lesson 09."""
import copy
import dataclasses
import json
import os

import pytest

import tinyllm.claims as claims
import tinyllm.compare as cmp
from tinyllm import GPT, GPTConfig
from tinyllm.__main__ import main
from tinyllm.data import World
from tinyllm.tasks import get_task
from tinyllm.tokenizer import default_tokenizer
from lesson_helpers import PNG_MAGIC, load_lesson

VERDICTS = {claims.SUPPORTED, claims.NOT_SUPPORTED, claims.MIXED, claims.NOT_MEASURED}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `compare --quick` through the command line: a tiny pretraining, then a few steps per method."""
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_every_file(quick_run):
    names = set(os.listdir(quick_run))
    assert {"results.json", "report.md", "loss_record.png", "params.png", "accuracy.png", "forgetting.png",
            "step_time.png", "memory.png", "variants.png"} <= names
    for name in names:
        if name.endswith(".png"):
            with open(quick_run / name, "rb") as f:
                assert f.read(8) == PNG_MAGIC, name


def test_results_have_every_method_and_metric(quick_run):
    with open(quick_run / "results.json") as f:
        results = json.load(f)
    record = results["tasks"]["record"]
    assert set(record["runs"]) == set(record["summary"]) == set(cmp.METHODS)
    for m in cmp.METHODS:
        assert set(record["summary"][m]) == set(cmp.SCALARS), m          # record adds format and field scores
        run = record["runs"][m][0]
        for key in ("history", "formula", "knowledge_before", "knowledge_after", "base_unchanged",
                    "disable_restores_base", "optimizer_state_bytes", "saved_bytes", "full_copy_bytes"):
            assert key in run, (m, key)
        if m != "full":
            assert run["base_unchanged"] and run["disable_restores_base"], m
            assert run["saved_bytes"] < run["full_copy_bytes"], m
    assert record["few_shot"][0]["k"] == 0 and not record["few_shot"][-1]["fits"]   # no record shot fits in 128
    assert set(record["variants"]) == set(cmp.VARIANTS)
    assert [c["claim"] for c in results["claims"]] == [c for c, _ in claims.CLAIMS]
    assert all(c["verdict"] in VERDICTS and c["measured"] and c["rule"] for c in results["claims"])
    assert results["pretrain"]["made_now"] and results["timing"]["total_seconds"] > 0


def test_report_ends_with_the_claims_table(quick_run):
    lines = (quick_run / "report.md").read_text().strip().splitlines()
    table = lines[-len(claims.CLAIMS):]
    assert lines[-len(claims.CLAIMS) - 4] == "## Claims, measured at this scale"   # then a blank, the header, ---
    for i, (row, (claim, _)) in enumerate(zip(table, claims.CLAIMS), 1):
        assert row.startswith(f"| {i} | {claim} |") and any(f"**{v}**" in row for v in VERDICTS), row


def test_adapter_files_are_smaller_than_a_full_copy(quick_run):
    folder = quick_run / "adapters" / "record"
    size = {m: sum(f.stat().st_size for f in (folder / m).iterdir()) for m in cmp.METHODS}
    assert all(size[m] < size["full"] / 4 for m in cmp.METHODS if m != "full")


def test_seeds_give_mean_and_spread(quick_run, tmp_path):
    results = cmp.compare(task="qa", seeds=2, quick=True, out=str(tmp_path), variants=False, echo=lambda line: None,
                          checkpoint=str(quick_run / "pretrain" / "ckpt.npz"))
    summary = results["tasks"]["qa"]["summary"]["lora"]["accuracy_after"]
    assert set(summary) == {"mean", "std", "min", "max"} and summary["min"] <= summary["mean"] <= summary["max"]
    assert len(results["tasks"]["qa"]["runs"]["lora"]) == 2 and not results["pretrain"]["made_now"]
    assert "±" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "adapters" / "qa" / "prefix" / "seed1" / "adapter_model.npz").exists()


def test_bad_flags_fail_cleanly(tmp_path, capsys):
    assert main(["compare", "--quick", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", "--task", "poetry"])
    assert e.value.code == 2


def test_lesson_09_runs(quick_run, tmp_path):
    m = load_lesson("09_comparison").main(task="classify", quick=True, out_dir=str(tmp_path),
                                          checkpoint=str(quick_run / "pretrain" / "ckpt.npz"))
    assert set(m["metrics"]["classify"]) == set(cmp.METHODS)
    assert all(0 <= v["accuracy"] <= 1 and v["ms_per_step"] > 0 for v in m["metrics"]["classify"].values())
    assert len(m["claims"]) == len(claims.CLAIMS) and set(m["claims"].values()) <= VERDICTS
    assert m["claims"]["LoRA applies beyond generation"] != claims.NOT_MEASURED      # classify was run
    assert os.path.exists(m["report"]) and any(f.endswith("forgetting.png") for f in m["figures"])

# ----------------------------------------------------------------------------------------------------
# the measurements compare adds


def test_record_scores():
    answers = [" name=kim|city=rome|age=31\n", " name=ada|job=chef\n", " name=bob|pet=cat|color=red\n"]
    predictions = [" name=kim|city=rome|age=31\n",           # right
                   " name=ada|job=baker\n",                  # right structure, one field wrong
                   " ada is a chef\n"]                       # no structure
    s = cmp.record_scores(predictions, answers)
    assert s["format_rate"] == pytest.approx(2 / 3)
    assert s["field_accuracy"] == pytest.approx((3 + 1 + 0) / 8)


def test_few_shot_baseline_stops_at_the_first_k_that_does_not_fit():
    tok = default_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=80, n_layer=1, n_head=2, n_embd=16))
    task = get_task("qa", World(0, 6))
    task = dataclasses.replace(task, test=task.test[:3])
    rows = cmp.few_shot_baseline(model, tok, task, base_accuracy=0.25, max_shots=8)
    assert rows[0] == {"k": 0, "tokens_per_query": pytest.approx(sum(len(p) for p, _ in task.test) / 3),
                       "fits": True, "accuracy": 0.25}
    assert [r["fits"] for r in rows] == [True] * (len(rows) - 1) + [False] and rows[-1]["accuracy"] is None
    assert all(a["tokens_per_query"] < b["tokens_per_query"] for a, b in zip(rows, rows[1:]))

# ----------------------------------------------------------------------------------------------------
# the rules, on hand-made numbers: each one both ways


def facts():
    """Plausible numbers for one generation task (record): full is slow and forgets, PEFT is cheap and keeps."""
    peft = dict(accuracy=0.5, val_loss=1.0, val_start=4.0, val_steps=[0, 100, 200], val_losses=[4.0, 2.0, 1.0],
                seconds_per_step=0.05, trainable_params=30_000, optimizer_state_bytes=240_000, saved_bytes=120_000,
                full_copy_bytes=3_300_000, corpus_loss=0.40, fact_recall=0.50, virtual_tokens=0,
                tokens_per_query=60, disable_restores_base=True, format_rate=0.9, field_accuracy=0.8)
    methods = {m: dict(peft) for m in cmp.METHODS}
    methods["full"].update(seconds_per_step=0.10, trainable_params=817_920, optimizer_state_bytes=6_543_360,
                           saved_bytes=3_300_000, corpus_loss=0.60, fact_recall=0.30, disable_restores_base=False)
    methods["lora"].update(trainable_params=16_384, accuracy=0.65, val_loss=0.9)
    methods["prefix"].update(trainable_params=10_240, virtual_tokens=10, tokens_per_query=70)
    methods["prompt"].update(trainable_params=1_280, virtual_tokens=10, tokens_per_query=70)
    variant = lambda val, start=4.0, params=10_000: dict(val_loss=val, val_start=start, trainable_params=params)
    record = dict(kind="generate", n_test=200, n_train=2000, steps=200, batch_size=8, block_size=128,
                  base_params=817_920,
                  base=dict(accuracy=0.0, corpus_loss=0.40, fact_recall=0.50, format_rate=0.0, tokens_per_query=60),
                  few_shot=[dict(k=0, tokens_per_query=60, fits=True, accuracy=0.0),
                            dict(k=1, tokens_per_query=160, fits=False, accuracy=None)],
                  methods=methods,
                  variants=dict(lora_rank={"r=8": variant(1.0), "r=2": variant(2.0), "r=32": variant(1.05)},
                                lora_place={"c_attn": variant(1.0), "mlp": variant(1.2), "q,v": variant(1.1)},
                                prefix_length={"P=10": variant(1.0), "P=3": variant(2.0), "P=25": variant(1.0)},
                                prefix_init={"random": variant(1.0), "text": variant(1.5)}))
    return {"record": record}


def with_classify(F, prefix_val=2.0, prefix_acc=0.5, lora_acc=0.9):
    c = copy.deepcopy(F["record"])
    c.update(kind="classify", variants={})
    c["base"].update(accuracy=0.5)
    c["methods"]["lora"].update(accuracy=lora_acc, val_loss=1.0)
    c["methods"]["prefix"].update(accuracy=prefix_acc, val_loss=prefix_val)
    return {**F, "classify": c}


def setting(path, value):
    """A change to facts(): path like 'record.methods.full.seconds_per_step'; '*' means every method."""
    def change(F):
        keys = path.split(".")
        targets = [F]
        for k in keys[:-1]:
            targets = [t[x] for t in targets for x in (t if k == "*" else [k])]
        for t in targets:
            t[keys[-1]] = value(t) if callable(value) else value
        return F
    return change


def peft_methods(key, value):
    def change(F):
        for m in ("lora", "prefix", "prompt", "adapter"):
            F["record"]["methods"][m][key] = value
        return F
    return change


def chain(*changes):
    def change(F):
        for c in changes:
            F = c(F)
        return F
    return change


R = "record.methods."
CASES = [  # (rule, change that makes it supported, change that makes it not supported)
    (claims.claim_more_examples, None,
     chain(setting("record.steps", 1), setting("record.batch_size", 2),
           setting("record.few_shot", [dict(k=k, tokens_per_query=60 * (k + 1), fits=True, accuracy=0.1)
                                       for k in range(4)]))),
    (claims.claim_shorter_inputs, None, setting("record.few_shot", [dict(k=0, tokens_per_query=60, fits=True, accuracy=0),
                                                                 dict(k=1, tokens_per_query=55, fits=True,
                                                                      accuracy=0)])),
    (claims.claim_complex_instructions, None, setting(R + "*.accuracy", 0.01)),
    (claims.claim_structure, None, setting(R + "*.format_rate", 0.02)),
    (claims.claim_full_expensive, None, chain(setting(R + "full.seconds_per_step", 0.01),
                                           setting(R + "full.optimizer_state_bytes", 1))),
    (claims.claim_full_forgets, None, chain(setting(R + "full.corpus_loss", 0.41), setting(R + "full.fact_recall", 0.49))),
    (claims.claim_full_copy, None, chain(setting(R + "full.saved_bytes", 100_000),
                                      peft_methods("saved_bytes", 1_000_000))),
    (claims.claim_peft_compute, None, peft_methods("seconds_per_step", 0.2)),
    (claims.claim_peft_preserves, None, peft_methods("fact_recall", 0.2)),
    (claims.claim_peft_faster, None, peft_methods("val_losses", [4.0, 3.0, 2.0])),
    (claims.claim_lora_beyond_generation, with_classify, lambda F: with_classify(F, lora_acc=0.45)),
    (claims.claim_lora_placement, None, setting("record.variants.lora_place.*.val_loss", 3.0)),
    (claims.claim_lora_better, None, setting(R + "lora.accuracy", 0.2)),
    (claims.claim_lora_more_params, None, setting(R + "lora.trainable_params", 5_000)),
    (claims.claim_lora_rank, None, setting("record.variants.lora_rank.*.val_loss", 1.0)),
    (claims.claim_prefix_efficient, setting(R + "prefix.trainable_params", 5_000),
     setting(R + "prefix.trainable_params", 100_000)),
    (claims.claim_prefix_generation, setting(R + "prefix.accuracy", 0.6), setting(R + "prefix.val_loss", 3.0)),
    (claims.claim_prefix_narrower, with_classify, lambda F: with_classify(F, prefix_val=0.5, prefix_acc=0.95)),
    (claims.claim_prefix_tuning, None, chain(setting("record.variants.prefix_length.*.val_loss", 1.0),
                                          setting("record.variants.prefix_init.*.val_loss", 1.0))),
]


def test_every_claim_has_a_rule_test():
    assert [rule for rule, _, _ in CASES] == [rule for _, rule in claims.CLAIMS]


@pytest.mark.parametrize("rule, supported, not_supported", CASES, ids=[r.__name__ for r, _, _ in CASES])
def test_rule_both_ways(rule, supported, not_supported):
    yes = (supported or (lambda F: F))(facts())
    measured, verdict = rule(yes)
    assert verdict == claims.SUPPORTED, measured
    measured, verdict = rule(not_supported(facts()))
    assert verdict == claims.NOT_SUPPORTED, measured


@pytest.mark.parametrize("rule, change, verdict", [
    (claims.claim_complex_instructions, chain(setting(R + "*.accuracy", 0.0), setting(R + "lora.accuracy", 0.2)),
     claims.MIXED),                                                                           # clearly above base, < 0.5
    (claims.claim_full_expensive, setting(R + "full.seconds_per_step", 0.01), claims.MIXED),      # bigger state, not slower
    (claims.claim_peft_compute, setting(R + "prompt.seconds_per_step", 0.5), claims.MIXED),
    (claims.claim_lora_more_params, setting(R + "lora.trainable_params", 100_000), claims.MIXED), # more, but not slightly
    (claims.claim_prefix_efficient, None, claims.MIXED),                                          # 1.25% of the model
    (claims.claim_prefix_tuning, setting("record.variants.prefix_init.*.val_loss", 1.0), claims.MIXED),
    (claims.claim_lora_beyond_generation, None, claims.NOT_MEASURED),                             # no classify task
    (claims.claim_prefix_narrower, None, claims.NOT_MEASURED),
    (claims.claim_lora_rank, setting("record.variants", {}), claims.NOT_MEASURED),
])
def test_rule_mixed_and_not_measured(rule, change, verdict):
    measured, got = rule((change or (lambda F: F))(facts()))
    assert got == verdict, measured


def test_accuracy_differences_within_noise_are_ties():
    assert not claims.clearly_above(0.55, 0.50, 200)          # 2 s.e. of a difference at n=200 is about 0.1
    assert claims.clearly_above(0.65, 0.50, 200)
    assert not claims.clearly_above(0.01, 0.0, 200)           # two examples out of 200
    assert not claims.clearly_above(0.5, 0.0, 2)              # two examples tell nothing
    F = facts()
    F["record"]["methods"]["lora"].update(accuracy=0.52, val_loss=1.1)    # a tie in accuracy: val loss decides
    assert not claims.beats(F["record"], "lora", "adapter")
    F["record"]["methods"]["lora"]["val_loss"] = 0.9
    assert claims.beats(F["record"], "lora", "adapter")


def test_judge_claims_covers_every_claim():
    rows = claims.judge_claims(with_classify(facts()))
    assert len(rows) == len(claims.CLAIMS)
    assert all(r["verdict"] in VERDICTS - {claims.NOT_MEASURED} for r in rows)
