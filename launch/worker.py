"""Entry point of every torchrun rank: read the job spec, join the group, run the job kind.

    python -m torch.distributed.run --standalone --nproc-per-node 3 -m launch.worker runs/<id>/spec.json

The spec was validated once, at submit time; the worker trusts ``spec.json`` (``JobSpec.load_trusted``)
and what can change between submit and start (a calibration artifact that was deleted) fails
inside the kind with the field named. The kind named by
``spec.kind`` is looked up in ``launch.registry.KINDS`` and called on every rank with a
``JobContext``; rank 0's return value is written to ``result.json``. A job that is one piece of
a run fanned out by a scheduler (``$LOWBIT_TASK``, e.g. a Slurm array task) gets it as
``ctx.task``; its kind writes that piece's files itself. A failing rank's traceback
is recorded by ``@record`` into torchrun's per-rank error file, which the launcher reads.
Every collective has ``spec.collective_timeout_s`` as its timeout, so a dead peer fails the
job instead of hanging it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from launch.events import EventLog
from launch.executors import TASK_ENV
from launch.layout import RunPaths, write_atomic
from launch.registry import kind_function
from launch.spec import JobSpec
from lowbit.comm.dist import init_from_env


@dataclass
class JobContext:
    """What a job kind receives: the process group, its spec, the event log (writes only on
    rank 0) and the run's paths (``paths.file(name)`` for extra result files)."""

    group: object
    spec: JobSpec
    events: EventLog
    paths: RunPaths
    task: str | None = None      # the piece of a fanned-out run this job is ($LOWBIT_TASK), else None

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def run_dir(self) -> Path:
        return self.paths.dir


def run_job(spec_path: Path) -> dict | None:


    spec_path = Path(spec_path).resolve()
    paths = RunPaths(spec_path.parent.parent, spec_path.parent.name)
    rank = int(os.environ.get("RANK", "0"))
    task = os.environ.get(TASK_ENV) or None
    events = EventLog(paths.events, enabled=rank == 0)
    spec = JobSpec.load_trusted(spec_path)
    fn = kind_function(spec.kind)
    events.loading(f"starting {spec.tp} rank(s), backend {spec.backend}")
    torch.manual_seed(spec.seed)
    start = time.perf_counter()
    group = init_from_env(spec.backend, timeout_s=spec.collective_timeout_s)
    try:
        try:
            result = fn(JobContext(group, spec, events, paths, task))
        except BaseException as exc:
            events.failed(f"rank {group.rank}: {type(exc).__name__}: {exc}")
            raise
        if group.rank == 0 and result is not None:
            result = dict(result)
            result.setdefault("run", run_block(paths.run_id, spec, group, time.perf_counter() - start))
            write_atomic(paths.result, json.dumps(result, indent=2, default=str))
        group.barrier()
        took = f"{time.perf_counter() - start:.1f} s"
        if task is None:
            events.done(f"{spec.kind} finished in {took}")
        else:  # one piece ending is not the run's end
            events.emit("piece", f"{spec.kind} piece {task} finished in {took}")
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_block(run_id: str, spec: JobSpec, group, seconds: float) -> dict:
    """The ``run`` block of result.json: the run, its kind, model, TP size, backend and placement
    (the one definition; tests/test_app_results.py writes its fixture runs with it too)."""
    return dict(id=run_id, kind=spec.kind, model=spec.model, tp=group.world_size,
                backend=getattr(group, "backend", "?"), placement=_placement(group), seconds=seconds)


def _placement(group) -> dict | None:
    """The backend/device choice of this rank and why (``lowbit.comm.placement``), for result.json."""
    placement = getattr(group, "placement", None)
    return placement.as_dict() if placement is not None else None


@record
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launch.worker runs/<id>/spec.json (started by torchrun)", file=sys.stderr)
        return 2
    run_job(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
