"""The README says what is true: its learning path lists every lesson with the time lessons/timings.py measured."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timings_module():
    spec = importlib.util.spec_from_file_location("timings", os.path.join(ROOT, "lessons", "timings.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_lesson_has_a_measured_time():
    timings = timings_module()
    measured = timings.load()["lessons"]
    missing = [name for name in timings.lessons() if name not in measured]
    assert not missing, f"lessons without a measured time: {missing}; run python lessons/timings.py"
    assert all(t["seconds"] > 0 for t in measured.values())


def test_readme_learning_path_is_the_measured_table():
    timings = timings_module()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    expected = timings.table(timings.load())
    assert expected in readme, "README's lesson table differs from lessons/timings.json; paste python lessons/timings.py's table"


def test_table_fails_for_a_lesson_without_a_time(tmp_path):
    timings = timings_module()
    with pytest.raises(KeyError):
        timings.table({"lessons": {}})
