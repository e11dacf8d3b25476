"""Where a run's torchrun runs: ``local`` (a process group on this machine, the default) or
``slurm`` (a batch job whose step runs torchrun on the allocation). The queue (``launch.queue``)
keeps the order, the index and the states; an executor starts, watches and stops one run, behind
one small interface:

    ex = executor_for("slurm", root, index)       # one per queue (it remembers what it started)
    ex.submit_problems(spec, root)               # at submit, before anything is written: [(field, problem)]
    ex.start(spec, paths)                        # after the queue's claim (status ``ex.claim_status``)
    ex.poll(row, paths)                          # None while it goes on, else Ended(status, error, returncode)
    ex.reattach(row, paths)                      # after a queue restart: True when it still runs (now watched)
    ex.stop(row, paths, grace_s)                 # end it: cancel, or the queue stopped with kill_running
    ex.forget(run_id)                            # the queue recorded its end
    ex.cleanup()                                 # after recovery: leftovers of runs nobody owns

``uses_local_cpus`` says whether a run counts against the queue's ``max_parallel``. Executors are
named by string and imported on first use (as ``launch.registry`` does for job kinds), so the spec
and the submit path stay cheap and free of import cycles.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from launch.spec import EXECUTORS

TASK_ENV = "LOWBIT_TASK"   # which piece of a fanned-out run a job is (launch.worker: ctx.task)
PREPARE = "prepare"        # the piece that makes what the others share first (a sweep's calibration)
_CLASSES = {"local": "launch.executors.local:LocalExecutor", "slurm": "launch.executors.slurm:SlurmExecutor"}
assert tuple(_CLASSES) == EXECUTORS, "every executor the spec allows has a class here"


@dataclass(frozen=True)
class Ended:
    """How a run ended: an index status (done, failed, timeout, cancelled, lost), the error text,
    torchrun's or the job's exit code, and ``stop``: end what is left of it after recording."""

    status: str
    error: str | None = None
    returncode: int | None = None
    stop: bool = False


def executor_class(name: str):
    module, _, attr = _CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def executor_for(name: str, root: Path, index, **options):
    """A new executor ``name`` over the runs ``root`` and its ``index``."""
    return executor_class(name)(root, index, **options)


def executor_name(row: dict) -> str:
    """The executor of an index row (its spec's ``executor``; rows from before it existed: local)."""
    try:
        name = json.loads(row.get("spec_json") or "{}").get("executor", "local")
    except (TypeError, ValueError):
        return "local"
    return name if name in _CLASSES else "local"
