"""The training loop: exact resume, divergence, Ctrl-C, and the `python -m tinyllm` command line."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinyllm import GPT, GPTConfig
from tinyllm.__main__ import main
from tinyllm.checkpoint import load_checkpoint, load_pretrained
from tinyllm.optim import AdamW
from tinyllm.pretrain import pretrain
from tinyllm.train import TrainConfig, TrainingError, train
from train_helpers import batches, interrupt_at_train_batch

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path=None, **overrides):
    settings = dict(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=3, eval_interval=4, eval_iters=2,
                    log_interval=5, checkpoint_interval=5, seed=7,
                    checkpoint=None if tmp_path is None else tmp_path / "ckpt.npz")   # a Path works too
    return TrainConfig(**{**settings, **overrides})


def same_run(a, b):
    """Parameters, optimizer state and history of two finished runs (from their final checkpoints)."""
    (arrays_a, meta_a), (arrays_b, meta_b) = load_checkpoint(a), load_checkpoint(b)
    assert set(arrays_a) == set(arrays_b)
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)
    for key in ("step", "train_loss", "lr", "grad_norm", "tokens", "val_step", "val_loss"):
        assert meta_a["history"][key] == meta_b["history"][key], key
    assert meta_a["rng_state"] == meta_b["rng_state"]


@pytest.mark.parametrize("field, value", [
    ("max_steps", 0), ("batch_size", 2.5), ("lr", 0.0), ("lr", float("nan")), ("min_lr_ratio", 1.5),
    ("warmup_steps", -1), ("weight_decay", -1.0), ("grad_clip", 0.0), ("eval_interval", 0),
    ("eval_iters", -1), ("log_interval", True), ("checkpoint", 3), ("checkpoint_interval", -5), ("seed", -1),
])
def test_train_config_rejects_nonsense_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_history_and_learning(tmp_path):
    lines = []
    history = train(GPT(TINY), batches(), tiny_config(tmp_path), out=lines.append)
    assert history["status"] == "completed"
    assert history["step"] == list(range(1, 13))
    assert history["tokens"] == [4 * 8 * s for s in range(1, 13)]
    assert history["val_step"] == [0, 4, 8, 12]
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert len(history["lr"]) == len(history["elapsed"]) == len(history["train_loss"]) == 12
    progress = [line for line in lines if "tok/s" in line]
    assert len(progress) == 3 and all("\r" not in line and "eta" in line for line in progress)   # 5, 10, 12
    assert load_checkpoint(tmp_path / "ckpt.npz")[1]["step"] == 12


def test_resume_after_ctrl_c_is_bit_identical(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(GPT(TINY, seed=1), batches(), tiny_config(full), out=lambda s: None)

    lines = []
    history = train(GPT(TINY, seed=1), interrupt_at_train_batch(batches(), 8), tiny_config(cut), out=lines.append,
                    resume_command="RESUME-ME")
    assert history["status"] == "interrupted" and history["step"][-1] == 7
    assert "RESUME-ME" in lines[-1] and "interrupted at step 7" in lines[-1]
    # a different init and seed-free resume: everything must come from the checkpoint
    history = train(GPT(TINY, seed=99), batches(), tiny_config(cut), out=lambda s: None,
                    resume_from=str(cut / "ckpt.npz"))
    assert history["status"] == "completed"
    same_run(full / "ckpt.npz", cut / "ckpt.npz")


def test_ctrl_c_during_the_update_finishes_the_step_first(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(GPT(TINY, seed=1), batches(), tiny_config(full), out=lambda s: None)
    real_step, calls = AdamW.step, []

    def step_hit_by_sigint(self, grads, lr=None):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)          # arrives while the parameters are half updated
        return real_step(self, grads, lr)
    monkeypatch.setattr(AdamW, "step", step_hit_by_sigint)
    history = train(GPT(TINY, seed=1), batches(), tiny_config(cut), out=lambda s: None)
    assert history["status"] == "interrupted" and history["step"][-1] == 6
    monkeypatch.setattr(AdamW, "step", real_step)
    train(GPT(TINY, seed=1), batches(), tiny_config(cut), out=lambda s: None, resume_from=str(cut / "ckpt.npz"))
    same_run(full / "ckpt.npz", cut / "ckpt.npz")


class NanAt:
    """A protocol-following wrapper around GPT whose loss turns into nan at one training step."""

    def __init__(self, model, bad_call):
        self.model, self.config, self.calls, self.bad_call = model, model.config, 0, bad_call

    def forward_backward(self, idx, targets, workers=None):
        loss, grads = self.model.forward_backward(idx, targets, workers)
        self.calls += 1
        return (float("nan") if self.calls == self.bad_call else loss), grads

    def __getattr__(self, name):                         # backward, trainable_parameters, state_dict...
        return getattr(self.model, name)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, eval_iters=0)            # only training forwards: call k is step k
    with pytest.raises(TrainingError, match=r"step 8: the loss is nan.*step 5\), was kept") as info:
        train(NanAt(GPT(TINY), bad_call=8), batches(), cfg, out=lambda s: None)
    assert info.value.step == 8 and info.value.history["status"] == "diverged"
    assert len(info.value.history["train_loss"]) == 7
    _, meta = load_checkpoint(tmp_path / "ckpt.npz")
    assert meta["step"] == 5 and len(meta["history"]["train_loss"]) == 5


def test_only_trainable_parameters_change():
    model = GPT(TINY)
    model.freeze()
    model.unfreeze(["ln_f.weight", "ln_f.bias"])
    before = model.state_dict()
    train(model, batches(), tiny_config(max_steps=3, eval_iters=0), out=lambda s: None)
    changed = {k for k, v in model.params.items() if not np.array_equal(v, before[k])}
    assert changed == {"ln_f.weight", "ln_f.bias"}


def test_ctrl_c_without_checkpoint_path_and_wrong_batch_size():
    lines = []
    history = train(GPT(TINY), interrupt_at_train_batch(batches(), 2), tiny_config(), out=lines.append)
    assert history["status"] == "interrupted" and "nothing was saved" in lines[-1]
    with pytest.raises(ValueError, match="batch_size"):
        train(GPT(TINY), batches(), tiny_config(batch_size=3), out=lambda s: None)


# ----------------------------------------------------------------------------------------------------
# pretrain and the command line

def test_pretrain_quick_writes_a_checkpoint_lessons_can_load(tmp_path):
    out = str(tmp_path / "ckpt.npz")
    result = pretrain(out=out, steps=2, quick=True, echo=lambda s: None)
    assert result["history"]["status"] == "completed" and len(result["samples"]) == 4
    model, tokenizer, meta = load_pretrained(out)
    assert model.config == GPTConfig() and tokenizer.vocab_size == 64 and meta["kind"] == "pretrain"
    assert meta["data"]["world_seed"] == 0 and meta["step"] == 2


def test_cli_help_and_errors(tmp_path, capsys):
    for argv in (["--help"], ["pretrain", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    assert "--resume" in capsys.readouterr().out
    for argv in (["pretrain", "--bogus"], ["pretrain", "--steps", "many"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err
    assert main(["pretrain", "--resume", str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.npz" in err
    assert main(["pretrain", "--quick", "--steps", "0", "--out", str(tmp_path / "c.npz")]) == 2
    assert "TrainConfig.max_steps" in capsys.readouterr().err


def test_cli_as_a_real_process_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "tinyllm", "pretrain", "--no-such-flag"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
