"""
The dependency ranges requirements.txt states are true: .ci/run runs the tests again in a fresh venv with
exactly the lowest versions (.ci/minimum.txt), and these tests check that the two files agree, that this
environment is inside the ranges, and what broke at the lower bounds once (np.savez before NumPy 2.2 stores
an allow_pickle=... argument as one more array).
"""
import os
import re
import zipfile
from importlib.metadata import version

import numpy as np

from tinyllm.checkpoint import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINYLLM_DIR = os.path.join(ROOT, "tinyllm")


def lines(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def as_tuple(v):
    return tuple(int(part) for part in re.findall(r"\d+", v)[:3])


def test_requirements_lower_bounds_are_the_versions_ci_tests():
    bounds = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", line).groups() for line in lines("requirements.txt"))
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line).groups() for line in lines(".ci/minimum.txt"))
    assert bounds == pins and {"numpy", "matplotlib"} <= set(bounds)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert ".ci/minimum.txt" in f.read()


def test_this_environment_is_inside_the_stated_ranges():
    for line in lines("requirements.txt"):
        name, low = line.split(">=")
        assert as_tuple(version(name)) >= as_tuple(low), f"{name} {version(name)} is below {low}"


def test_a_checkpoint_holds_exactly_the_arrays_it_was_given(tmp_path):
    save_checkpoint(tmp_path / "c.npz", {"model/w": np.ones(3, np.float32), "optim/t": np.array(2)}, {"step": 2})
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert sorted(z.namelist()) == ["__meta__.npy", "model/w.npy", "optim/t.npy"]
    arrays, meta = load_checkpoint(tmp_path / "c.npz")
    assert sorted(arrays) == ["model/w", "optim/t"] and meta["step"] == 2


def test_no_np_savez_in_tinyllm_passes_allow_pickle():
    for folder, _, files in os.walk(TINYLLM_DIR):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    for line in f:
                        if "np.savez" in line and "(" in line:
                            assert "allow_pickle" not in line, f"{name}: {line.strip()}"
