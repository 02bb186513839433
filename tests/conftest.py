"""
Shared test setup: the repository root on sys.path (so plain `pytest` finds tinyllm without an install)
and a `record_error` fixture that collects the worst gradient-check relative error of each group,
printed at the end of the run.
"""
import os
import sys

# The tests use small matrices, where a second BLAS thread costs more in hand-offs than it saves, and on
# a busy machine two threads per process thrash. Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_WORST = defaultdict(float)   # group -> worst relative error seen in this run


@pytest.fixture(scope="module")
def world():
    """The default synthetic world (people, places, facts) the data and task tests read."""
    from tinyllm.data import World
    return World()


@pytest.fixture
def record_error():
    """record_error(group, rel) keeps the largest relative error seen per group, for the summary."""
    def record(group, rel):
        _WORST[group] = max(_WORST[group], float(rel))
    return record


def pytest_terminal_summary(terminalreporter):
    if not _WORST:
        return
    terminalreporter.section("worst relative error per gradient-check group")
    width = max(len(g) for g in _WORST)
    for group in sorted(_WORST):
        terminalreporter.write_line(f"{group:<{width}}  {_WORST[group]:.2e}")
