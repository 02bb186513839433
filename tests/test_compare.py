"""`python -m tinyllm compare`: a smoke run through the command line writes every file, labels itself a smoke
test and states no verdict; results.json holds what readers rely on; report.md starts with the answer; lesson
09 runs. (The claims' rules, each way they can come out, are in test_claims.py.)"""
import dataclasses
import json
import os

import pytest

import tinyllm.claims as claims
import tinyllm.compare as cmp
from tinyllm import GPT, GPTConfig
from tinyllm.__main__ import main
from tinyllm.data import World
from tinyllm.presets import MAIN_METHODS
from tinyllm.tasks import get_task
from tinyllm.tokenizer import default_tokenizer
from lesson_helpers import PNG_MAGIC, load_lesson


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `compare --quick` through the command line: a tiny pretraining, then a few steps per method."""
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", "--quick", "--seed", "5", "--out", str(out)]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_quick_run_writes_every_file(quick_run):
    out, _ = quick_run
    names = set(os.listdir(out))
    assert {"results.json", "report.md", "loss_extract.png", "params.png", "accuracy.png", "forgetting.png",
            "step_time.png", "memory.png", "sequential_extract.png"} <= names
    for name in names:
        if name.endswith(".png"):
            with open(out / name, "rb") as f:
                assert f.read(8) == PNG_MAGIC, name


def test_a_smoke_test_says_so_and_states_no_verdict(quick_run):
    out, results = quick_run
    assert results["smoke_test"] is True
    assert {c["verdict"] for c in results["claims"]} == {claims.FACT, claims.SMOKE}
    report = (out / "report.md").read_text()
    assert report.splitlines()[0].endswith("(SMOKE TEST: no verdicts)") and "This was a smoke test" in report


def test_results_hold_what_readers_rely_on(quick_run):
    _, results = quick_run
    s = results["settings"]
    assert s["task"] == "extract" and s["seeds"] == [5, 6]          # --seed sets the first seed
    task = results["tasks"]["extract"]
    assert set(task["runs"]) == set(task["summary"]) == set(MAIN_METHODS)
    for m in MAIN_METHODS:
        summary = task["summary"][m]
        assert set(summary["accuracy_after"]) == {"mean", "std", "min", "max", "values"}
        assert len(summary["accuracy_after"]["values"]) == 2
        tuning = task["tuning"][m]
        assert {"lr", "steps", "flattened", "source"} <= set(tuning)
        for run in task["runs"][m]:
            assert run["seed"] in (5, 6) and run["lr"] == tuning["lr"] and run["steps"] == tuning["steps"]
            assert isinstance(run["flattened"], bool) and len(run["correct_after"]) == task["n_test"]
            if m != "full":
                assert run["base_unchanged"] and run["disabled_max_diff"] == 0.0
                assert run["saved_bytes"] < run["full_copy_bytes"]
    assert [c["claim"] for c in results["claims"]] == [c for c, _, _ in claims.CLAIMS]
    assert all(c["measured"] and c["rule"] for c in results["claims"])
    seq = task["sequential"]
    assert seq["task_b"] == "qa" and len(seq["full"]["a_after_b"]) == 2 and len(seq["adapter"]["b"]) == 2
    assert results["timing"]["total_seconds"] > 0 and results["pretrain"]["made_now"]


def test_report_starts_with_the_answer_and_captions_every_figure(quick_run):
    out, results = quick_run
    lines = (out / "report.md").read_text().splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("| #"))
    assert lines[first_table - 2] == "## The claims, measured"
    assert lines.index("## How to read this") > first_table + len(claims.CLAIMS)
    figures = [i for i, line in enumerate(lines) if line.startswith("![")]
    assert figures and all(lines[i + 2].startswith("*") and len(lines[i + 2]) > 40 for i in figures)
    assert " MB" not in "\n".join(lines) and " KB" not in "\n".join(lines)     # KiB and MiB, written as such


def test_bad_flags_fail_cleanly(tmp_path, capsys):
    assert main(["compare", "--quick", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", "--task", "poetry"])
    assert e.value.code == 2


def test_lesson_09_runs(quick_run, tmp_path):
    out, _ = quick_run
    m = load_lesson("09_comparison").main(task="classify", quick=True, out_dir=str(tmp_path),
                                          checkpoint=str(out / "pretrain" / "ckpt.npz"))
    assert set(m["metrics"]["classify"]) == set(MAIN_METHODS)
    assert all(0 <= v["accuracy"] <= 1 and v["ms_per_step"] > 0 for v in m["metrics"]["classify"].values())
    assert set(m["claims"].values()) <= {claims.FACT, claims.SMOKE}
    assert os.path.exists(m["report"]) and any(f.endswith("forgetting.png") for f in m["figures"])

# ----------------------------------------------------------------------------------------------------
# the measurements compare adds


def test_few_shot_baseline_stops_at_the_first_k_that_does_not_fit():
    tok = default_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=80, n_layer=1, n_head=2, n_embd=16))
    task = get_task("qa", World(0, 6))
    task = dataclasses.replace(task, test=task.test[:3])
    rows = cmp.few_shot_baseline(model, tok, task, max_shots=8)
    assert rows[0]["k"] == 0 and rows[0]["tokens_per_query"] == pytest.approx(sum(len(p) for p, _ in task.test) / 3)
    assert [r["fits"] for r in rows] == [True] * (len(rows) - 1) + [False] and rows[-1]["accuracy"] is None
    assert all(len(r["correct"]) == 3 for r in rows[:-1])
    assert all(a["tokens_per_query"] < b["tokens_per_query"] for a, b in zip(rows, rows[1:]))


def test_task_facts_are_what_the_rules_read(quick_run):
    """task_facts turns results.json into the per-seed, per-item lists claims.diff pairs up."""
    _, results = quick_run
    from tinyllm.claims import judge_claims
    base = GPT(GPTConfig(**results["model"]["config"]))
    facts = {"extract": cmp.task_facts(results["tasks"]["extract"], base, {})}
    f = facts["extract"]
    assert len(f["methods"]["lora"]["accuracy"]) == 2 and len(f["methods"]["lora"]["accuracy"][0]) == f["n_test"]
    assert len(f["base"]["accuracy"]) == f["n_test"]
    assert [c["claim"] for c in judge_claims(facts)] == [c for c, _, _ in claims.CLAIMS]
