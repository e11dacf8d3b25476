"""Shared fixtures: tiny models are cached per session; the threaded fake group runs TP ranks
as threads of the test process (real processes are used only in tests marked ``slow``).

Hypothesis runs under the ``lowbit`` profile by default (``make test`` and any pytest line): the
examples are derandomized (drawn from a hash of each test, the same on every run and machine, no
example database), and a failure prints the ``@reproduce_failure`` blob that replays it. Fresh
examples are an explicit, separate step, never part of the gate:

    make explore                                                  # the property tests, fresh draws
    HYPOTHESIS_PROFILE=explore .venv/bin/python -m pytest tests/test_formats.py -q
    .venv/bin/python -m pytest tests/test_formats.py --hypothesis-profile=explore -q
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Loaded here, before any test module is imported: a test's own @settings(...) takes the fields
# it does not name from the profile active when the decorator runs.
settings.register_profile("lowbit", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("explore", derandomize=False, print_blob=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lowbit"))

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In the tests a native kernel that fails in LOWBIT_KERNELS=auto is an error, never a silent fallback
# (kernels.dispatch; a run records the fallback as an event instead). Child processes inherit it.
os.environ.setdefault("LOWBIT_KERNELS_STRICT", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in the interpreter. Triton reads the switch when it is
    # first imported (its own helpers included), so it is set before any test module imports a
    # package that loads Triton (torchao does), whatever the collection order.
    from kernels import dispatch
    dispatch.import_interpreted()


@pytest.fixture(scope="session")
def tiny_models():
    """name -> LoadedModel for the tiny random configs, loaded once."""
    from lowbit.model.models import TINY_CONFIGS, load_model
    return {name: load_model(name) for name in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm2():
    from lowbit.model.models import load_model
    return load_model("smollm2-135m")


@pytest.fixture
def queue(tmp_path, monkeypatch):
    """A started one-at-a-time job queue over a fresh runs root (LOWBIT_RUNS points at it);
    stopped, its running job killed, after the test."""
    from launch.queue import JobQueue
    root = tmp_path / "runs"
    monkeypatch.setenv("LOWBIT_RUNS", str(root))
    q = JobQueue(root, max_parallel=1, poll_s=0.1, kill_grace_s=3.0).start()
    yield q
    q.stop(kill_running=True)


def pytest_collection_finish(session):
    """Slurm counts time limits in whole minutes and checks them every 30 s: when the Slurm tests
    will run, their cluster and over-limit job start now, so that case runs during the tests
    before them (tests/test_slurm.py: ``start_early``)."""
    if not session.config.option.collectonly and \
            any(item.nodeid.startswith("tests/test_slurm.py") for item in session.items):
        from tests.test_slurm import start_early  # already collected; only a run with Slurm tests needs it
        start_early()


def pytest_sessionfinish(session):
    """The Slurm test cluster is stopped even when its tests never ran (e.g. the session stopped)."""
    module = sys.modules.get("tests.test_slurm")
    if module is not None and module.EARLY:
        module.stop_early()


@pytest.fixture(autouse=True)
def _no_cluster_answer_from_an_earlier_test():
    """The sidebar's Slurm panel keeps ``sinfo``'s answer for 30 s in the process
    (``launch.store.machine.cluster_frame``): a Slurm test's cluster would still show on the next
    test's pages, whatever the shuffled order put there. Each test asks afresh."""
    from launch.store import machine
    machine._cluster_cache[:] = [0.0, None]
    yield
