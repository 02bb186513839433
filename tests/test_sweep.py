"""The sweep: its rule for a learning rate and a budget, each way it can come out, a tiny sweep end to end,
and compare reading what it wrote (or saying that nothing was tuned)."""
import json

import pytest

import tinyllm.sweep as sweep
from tinyllm.data import World
from tinyllm.presets import PRESETS, tuned
from tinyllm.tasks import get_task
from tinyllm.tokenizer import default_tokenizer
from tinyllm import GPT, GPTConfig


def test_the_ladder():
    assert sweep.step_on_ladder(1e-3, 1) == 3e-3 and sweep.step_on_ladder(1e-3, -1) == pytest.approx(3e-4)
    assert sweep.step_on_ladder(3.0, 1) is None and sweep.step_on_ladder(1e-5, -1) is None
    assert all(sweep.step_on_ladder(lr, 0) == lr for m in PRESETS.values() for lr in m.lrs)   # grids on the ladder


def test_flattened_needs_a_small_gain_relative_or_absolute():
    assert not sweep.flattened(1.0, 0.9)                 # 10% better: still falling
    assert sweep.flattened(1.0, 0.97)                    # 3%: flat
    assert sweep.flattened(0.03, 0.015)                  # halved, but by 0.015 nats only: flat near zero
    assert not sweep.flattened(0.1, 0.05)
    assert sweep.flattened(0.5, 0.6)                     # worse with more steps: flat (or overfitting)


def budgets(*losses, steps=(125, 250, 500, 1000)):
    return [{"steps": s, "best_lr": 1e-3 * (i + 1), "best_val_loss": v} for i, (s, v) in enumerate(zip(steps, losses))]


def test_choose_every_way(monkeypatch):
    c = sweep.choose(budgets(1.0, 0.5, 0.49))            # 250 -> 500 gains 2%: 250 is the budget
    assert (c["steps"], c["lr"], c["flattened"], c["doubled_val_loss"]) == (250, 2e-3, True, 0.49)
    c = sweep.choose(budgets(1.0, 0.5, 0.3, 0.1))        # still falling at 1000, the cap: 1000, gain unknown
    assert (c["steps"], c["flattened"], c["doubled_val_loss"]) == (1000, False, None)
    c = sweep.choose(budgets(1.0, 0.5, 0.3, 0.01))       # at the cap with a loss below ABS_TOL: nothing left
    assert (c["steps"], c["flattened"]) == (1000, True)
    monkeypatch.setattr(sweep, "CAP", 500)              # a lower cap: the budget above it says what it gains
    c = sweep.choose(budgets(1.0, 0.5, 0.3, 0.1))        # still falling at 500, the cap: 500, not flattened
    assert (c["steps"], c["flattened"], c["doubled_val_loss"]) == (500, False, 0.1)
    c = sweep.choose(budgets(1.0, 0.5, 0.3, 0.299))      # 500 -> 1000 gains nothing: 500, flattened
    assert (c["steps"], c["flattened"]) == (500, True)
    c = sweep.choose(budgets(1.0, 0.9, steps=(125, 250)))   # a short sweep: its largest budget, unknown gain
    assert (c["steps"], c["flattened"], c["doubled_val_loss"]) == (250, False, None)


def test_a_tiny_sweep_end_to_end_and_compare_reads_it(tmp_path):
    tok = default_tokenizer()
    base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16))
    task = get_task("extract", World(0, 24))
    r = sweep.sweep_method(base, tok, task, "lora", echo=lambda line: None, budgets=(2, 4), seeds=(1000,))
    assert [b["steps"] for b in r["budgets"]] == [2, 4]
    assert set(r["budgets"][0]["scores"]) >= {f"{lr:g}" for lr in PRESETS["lora"].lrs}    # the whole grid first
    assert len(r["budgets"][1]["scores"]) <= 3 + 2                                       # then neighbours (+ edges)
    chosen_budget = next(b for b in r["budgets"] if b["steps"] == r["chosen"]["steps"])
    assert r["chosen"]["lr"] in [float(k) for k in chosen_budget["scores"]]
    folder = tmp_path / "extract"
    folder.mkdir()
    (folder / "lora.json").write_text(json.dumps({**r, "task": "extract"}))
    found = tuned("extract", str(folder))
    assert found["lora"]["lr"] == r["chosen"]["lr"] and found["lora"]["steps"] == r["chosen"]["steps"]
    assert found["full"]["source"] == "fallback" and found["full"]["steps"] is None


def test_variants_choose_the_lr_on_one_seed_and_compare_fresh_seeds_on_test(tmp_path):
    tok = default_tokenizer()
    base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16))
    task = get_task("extract", World(0, 24))
    lrs_steps = {"prefix": {"lr": 0.1, "steps": 2}}
    out = sweep.sweep_variants(base, tok, task, "prefix_init", lrs_steps, echo=lambda line: None, seeds=(1000, 1001))
    assert set(out["settings"]) == {"random", "text"} and out["steps"] == 2
    for label, s in out["settings"].items():
        assert [r["seed"] for r in s["selection"]] == [sweep.SELECT_SEED] * 3          # lr and a rung either side
        assert s["lr"] == min(s["selection"], key=lambda r: r["val_loss"])["lr"]
        assert [r["seed"] for r in s["runs"]] == [1000, 1001] and all(r["lr"] == s["lr"] for r in s["runs"])
        assert len(s["test_losses"]) == 2 and all(len(x) == len(task.test) for x in s["test_losses"])
        assert s["main"] == (label == "random")


def test_the_committed_sweep_is_what_compare_reads():
    """tinyllm/sweeps/extract/ holds every main method's choice and every variant group's runs, in the form
    the claims read (a variant setting: one list of per-example test losses per seed)."""
    from tinyllm import claims, presets
    tuned = presets.tuned("extract")
    assert all(t["source"] != "fallback" and t["steps"] <= sweep.CAP for t in tuned.values()), tuned
    groups = presets.sweep_variants("extract")
    assert set(groups) == set(presets.VARIANTS)
    for name, g in groups.items():
        assert set(g["settings"]) == set(presets.VARIANTS[name][1]), name
        for label, s in g["settings"].items():
            assert len(s["test_losses"]) == len(sweep.VARIANT_SEEDS) and all(len(x) > 0 for x in s["test_losses"])
        assert name in claims.show_group(name, g["settings"])
