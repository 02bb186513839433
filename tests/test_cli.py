"""
The command line, `python -m tinyllm`: help for every command, and every bad input answered with one
line on stderr and exit status 2, never a traceback. Ctrl-C saves and says how to resume.

The commands are read from the parser, so a new command is covered by the help and wrong-flag tests as
soon as it is added. (test_train.py has the first CLI tests: --help, --bogus, --steps many, a missing
--resume file.)
"""
import argparse
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinyllm.__main__ import build_parser, main
from tinyllm.checkpoint import load_checkpoint, save_checkpoint
from train_helpers import DELETE, changed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = sorted(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)


def run(*args, timeout=120):
    """python -m tinyllm args, as a learner types it: (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "tinyllm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def exit_status(argv):
    """main(argv) in this process; argparse's own exits become their status."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def assert_one_line_error(status, err, *fragments):
    assert status == 2, err
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_help_as_a_real_process_lists_every_command():
    status, out, err = run("--help")
    assert status == 0 and err == ""
    assert all(command in out for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert exit_status([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m tinyllm {command}") and "--" in out


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--no-such-flag", "--stpes=3", "stray-argument"])
def test_a_wrong_flag_is_one_line_and_status_2(command, flag, capsys):
    assert_one_line_error(exit_status([command, flag]), capsys.readouterr().err, flag, "--help")


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["fine-tune"], "invalid choice"),
    (["pretrain", "--steps", "many"], "invalid int value"),
    (["pretrain", "--lr"], "expected one argument"),
    (["bench", "--repeats", "2.5"], "invalid int value"),
    (["bench", "--configs", "huge"], "invalid choice"),
    (["compare", "--task", "poetry"], "invalid choice"),
    (["compare", "--seeds", "two"], "invalid int value"),
])
def test_values_argparse_rejects(argv, message, capsys):
    assert_one_line_error(exit_status(argv), capsys.readouterr().err, message)


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--steps", "-1"], "TrainConfig.max_steps"),
    (["pretrain", "--batch-size", "0"], "TrainConfig.batch_size"),
    (["pretrain", "--lr", "nan"], "TrainConfig.lr"),
    (["pretrain", "--lr", "-0.1"], "TrainConfig.lr"),
    (["pretrain", "--seed", "-3"], "TrainConfig.seed"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["compare", "--steps", "0", "--quick"], "steps"),
    (["compare", "--seeds", "0", "--quick"], "seeds"),
])
def test_values_tinyllm_rejects_before_any_work(argv, message, tmp_path, capsys):
    argv = argv + ["--out", str(tmp_path / ("c.npz" if argv[0] == "pretrain" else "out"))] \
        if argv[0] != "bench" else argv
    assert_one_line_error(exit_status(argv), capsys.readouterr().err, message)
    assert not os.path.exists(tmp_path / "c.npz")


def bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "half.npz").write_bytes(b"PK\x03\x04 and then the disk was full")
    save_checkpoint(tmp_path / "other.npz", {"x": np.zeros(2)}, {"kind": "finetune"})
    return {"missing.npz": "no checkpoint at", "notes.txt": "not a tinyllm checkpoint",
            "half.npz": "truncated or corrupted", "other.npz": "not a pretraining checkpoint"}


def test_files_that_are_not_what_was_asked_for(tmp_path, capsys):
    for name, message in bad_files(tmp_path).items():
        assert_one_line_error(exit_status(["pretrain", "--resume", str(tmp_path / name)]), capsys.readouterr().err,
                              name, message)
    for name in ("notes.txt", "half.npz"):
        assert_one_line_error(exit_status(["compare", "--checkpoint", str(tmp_path / name), "--out",
                                           str(tmp_path / "out")]), capsys.readouterr().err, name)
    assert_one_line_error(exit_status(["pretrain", "--quick", "--out", str(tmp_path)]), capsys.readouterr().err,
                          "is a folder")
    assert (tmp_path / "notes.txt").read_text() == "not a checkpoint\n"     # nothing was written over


def test_a_file_error_as_a_real_process_has_no_traceback(tmp_path):
    bad_files(tmp_path)
    status, _, err = run("pretrain", "--resume", str(tmp_path / "half.npz"))
    assert_one_line_error(status, err, "half.npz", "truncated or corrupted")


def test_ctrl_c_saves_says_how_to_resume_and_the_resume_finishes(tmp_path):
    ckpt = str(tmp_path / "ckpt.npz")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "tinyllm", "pretrain", "--quick", "--steps", "3",
                             "--out", ckpt], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:                    # the step-0 validation line: training is under way
        lines.append(line)
        if "val loss" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    lines.append(out)
    assert proc.returncode == 130 and "Traceback" not in err, err
    resume = f"python -m tinyllm pretrain --resume {ckpt}"
    assert resume in "".join(lines)
    step = load_checkpoint(ckpt)[1]["step"]
    assert step < 3
    status, out, err = run(*resume.split()[3:])
    assert status == 0 and "Traceback" not in err, err
    assert f"resuming {ckpt} at step {step}" in out and load_checkpoint(ckpt)[1]["step"] == 3


def test_bench_json_to_an_unwritable_place_fails_before_timing(tmp_path, capsys):
    from tinyllm.__main__ import main as cli_main
    assert cli_main(["bench", "--json", str(tmp_path / "no" / "such" / "dir" / "x.json")]) == 2
    assert "cannot write --json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# issue 14: crafted checkpoints, output paths, absurd sizes and a diverging run, each one line and status 2
# (1 for the divergence), found before any work starts

def pretraining_checkpoint(tmp_path):
    """A finished checkpoint with everything `tinyllm pretrain` writes, of a tiny GPT (the commands refuse the
    crafted copies below before they would use the model)."""
    from tinyllm import GPT, GPTConfig
    from tinyllm.pretrain import PRETRAIN_DATA
    from tinyllm.train import TrainConfig, train
    from train_helpers import batches
    path = tmp_path / "good.npz"
    train(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)), batches(),
          TrainConfig(max_steps=1, batch_size=4, eval_iters=0, warmup_steps=1, checkpoint=str(path)), out=lambda s: None,
          meta={"kind": "pretrain", "tokenizer_chars": "abcdefghij\n", "data": PRETRAIN_DATA})
    return load_checkpoint(path)


def crafted(tmp_path, good, name, field, value):
    """A copy of the checkpoint good with field set to value (None: removed), saved as tmp_path/name."""
    arrays, meta = good
    save_checkpoint(tmp_path / name, arrays, changed(meta, field, DELETE if value is None else value))
    return str(tmp_path / name)


CRAFTED = [   # (file, field, value (None: removed), what the error names)
    ("step.npz", "step", "3", "step"), ("history.npz", "history", [1, 2], "history"),
    ("config.npz", "config", [4, 128], "config"), ("chars.npz", "tokenizer_chars", 64, "tokenizer_chars"),
    ("data.npz", "data", None, "data"), ("people.npz", "data.n_people", "24", "n_people"),
]
RESUME_ONLY = [("train.npz", "train_config", [0.003], "train_config"), ("typo.npz", "train_config.max_stesp", 9, "max_stesp"),
               ("rng.npz", "rng_state.bit_generator", "seed", "bit generator")]


def test_crafted_checkpoints_on_the_command_line(tmp_path, capsys):
    good = pretraining_checkpoint(tmp_path)
    for name, field, value, named in CRAFTED + RESUME_ONLY:
        path = crafted(tmp_path, good, name, field, value)
        assert_one_line_error(exit_status(["pretrain", "--resume", path]), capsys.readouterr().err, name, named)
        if (name, field, value, named) in RESUME_ONLY:
            continue
        assert_one_line_error(exit_status(["compare", "--checkpoint", path, "--out", str(tmp_path / "out")]),
                              capsys.readouterr().err, name, named)
        assert_one_line_error(exit_status(["sweep", "--checkpoint", path, "--out", str(tmp_path / "sweep")]),
                              capsys.readouterr().err, name, named)
    arrays, meta = good
    np.savez(tmp_path / "deep.npz", **arrays, __meta__=np.frombuffer(
        (json.dumps(meta)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(), np.uint8))
    for argv in (["pretrain", "--resume"], ["compare", "--out", str(tmp_path / "out"), "--checkpoint"]):
        assert_one_line_error(exit_status(argv + [str(tmp_path / "deep.npz")]), capsys.readouterr().err, "nested")
    assert not os.path.exists(tmp_path / "sweep") and not os.path.exists(tmp_path / "out" / "results.json")


def test_a_crafted_checkpoint_where_compare_quick_would_reuse_it(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "pretrain").mkdir(parents=True)
    crafted(out / "pretrain", pretraining_checkpoint(tmp_path), "ckpt.npz", "data", None)
    assert_one_line_error(exit_status(["compare", "--quick", "--out", str(out)]), capsys.readouterr().err,
                          "ckpt.npz", "data")


def unwritable_folder(tmp_path):
    """A folder in which this user cannot create a file (root writes anywhere the permission bits forbid, but
    not in sysfs or procfs)."""
    from tinyllm.checkpoint import can_write_in
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return str(folder)
    for folder in ("/sys", "/proc"):
        if os.path.isdir(folder) and not can_write_in(folder):
            return folder
    pytest.skip("no folder here that root cannot write")


def test_output_paths_that_cannot_work_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x\n")
    locked = unwritable_folder(tmp_path)
    for out, message in (("", "--out must be a folder path"), (str(tmp_path / "file.txt"), "is a file"),
                         (str(tmp_path / "file.txt" / "sub"), "cannot be created"),
                         (os.path.join(locked, "tinyllm-out"), "not a writable folder")):
        for command in ("compare", "sweep"):
            argv = [command, "--out", out] + (["--quick"] if command == "compare" else [])
            assert_one_line_error(exit_status(argv), capsys.readouterr().err, message)
    for out, message in (("", "--out must be a file path"), (str(tmp_path), "is a folder"),
                         (str(tmp_path / "file.txt" / "c.npz"), "not a writable folder"),
                         (os.path.join(locked, "c.npz"), "not a writable folder")):
        assert_one_line_error(exit_status(["pretrain", "--quick", "--out", out]), capsys.readouterr().err, message)
    for path, message in (("", "--json must be the path of a file"), (str(tmp_path), "--json must be the path of a file"),
                          (str(tmp_path / "file.txt" / "b.json"), "cannot write --json"),
                          (os.path.join(locked, "b.json"), "cannot write --json")):
        assert_one_line_error(exit_status(["bench", "--json", path]), capsys.readouterr().err, message)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"] + (["read-only"] if os.geteuid() != 0 else [])


@pytest.mark.parametrize("argv", [["--batch-size", str(10 ** 9)], ["--batch-size", str(10 ** 5)],
                                  ["--quick", "--batch-size", str(2 ** 40)]])
def test_an_absurd_batch_size_is_refused_before_any_work(argv, tmp_path, capsys):
    status = exit_status(["pretrain", *argv, "--out", str(tmp_path / "c.npz")])
    assert_one_line_error(status, capsys.readouterr().err, "TrainConfig.batch_size", "GiB")
    assert os.listdir(tmp_path) == []


def test_a_diverging_run_prints_its_one_error_line_and_no_warnings(tmp_path):
    status, out, err = run("pretrain", "--quick", "--steps", "6", "--lr", "1e9", "--out", str(tmp_path / "c.npz"))
    assert status == 1, err
    assert err.count("\n") == 1 and err.startswith("error: step ") and "not a finite number" in err, err
    assert "Warning" not in err + out and "Traceback" not in err
