"""Submitting a job: write ``runs/<id>/spec.json``, add it to the index as queued, and build
the torchrun argument lists that run it (never a shell string).

    run_id = submit(JobSpec(kind="generate", model="tiny-llama", tp=2, prompt="Hi"))
    torchrun_command(spec, spec_path)   # single node: --standalone, what the queue starts
    node_commands(spec, spec_path)      # multi-node: one argument list per node, c10d rendezvous

The queue (``launch.queue``) starts queued runs; ``submit`` itself starts nothing.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from launch.index import RunIndex
from launch.layout import RunPaths, new_run_id, runs_root, write_atomic
from launch.spec import JobSpec, SpecError

REPO_ROOT = Path(__file__).resolve().parent.parent
# How often torchrun checks its ranks: a crashed rank is noticed within this many seconds.
MONITOR_INTERVAL_S = 0.5


def _as_spec(spec: JobSpec | dict) -> JobSpec:
    return spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)


def torchrun_args(nnodes: int, node_rank: int, nproc: int, rendezvous: list[str], spec_path: Path,
                 log_dir: Path | None = None) -> list[str]:
    """The one torchrun argument list (never run through a shell): ``nproc`` ranks of node
    ``node_rank`` of ``nnodes``, torchrun's own rendezvous options (``--standalone``, c10d, or a
    master address), ranks tee'd to ``log_dir``, each running ``launch.worker`` on the spec."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
           "--nproc-per-node", str(nproc), "--monitor-interval", str(MONITOR_INTERVAL_S), *rendezvous]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir), "--tee", "3"]
    return cmd + ["-m", "launch.worker", str(spec_path)]


def torchrun_command(spec: JobSpec, spec_path: Path, log_dir: Path | None = None) -> list[str]:
    """The single-node torchrun argument list for ``spec`` (all ranks on this machine)."""
    return torchrun_args(1, 0, spec.tp, ["--standalone"], spec_path, log_dir)


def node_commands(spec: JobSpec, spec_path: Path) -> list[list[str]]:
    """One torchrun argument list per node for a multi-node spec (torchrun's own c10d
    rendezvous at ``spec.rdzv_endpoint``); the spec file must exist at ``spec_path`` on every node."""
    if spec.nnodes > 1 and not spec.rdzv_endpoint:
        raise SpecError([("rdzv_endpoint", "required when nnodes > 1, as host:port")])
    rdzv_id = spec.run_id or "lowbit"
    rendezvous = (["--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint, "--rdzv-id", rdzv_id]
                  if spec.nnodes > 1 else ["--standalone"])
    return [torchrun_args(spec.nnodes, node, spec.nproc_per_node, rendezvous, spec_path)
            for node in range(spec.nnodes)]


def job_env(spec: JobSpec, paths: RunPaths, parallel_jobs: int = 1) -> dict[str, str]:
    """Environment of a job's torchrun: the repo on PYTHONPATH, CPU threads split between
    ranks, and torchrun's root-cause error file inside the run directory."""
    threads = max(1, (os.cpu_count() or 1) // max(1, spec.nproc_per_node * parallel_jobs))
    return dict(os.environ,
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)),
                TORCHELASTIC_ERROR_FILE=str(paths.error),
                LOWBIT_RUNS=str(paths.root),
                PYTHONUNBUFFERED="1")


def write_spec(spec: JobSpec, root: Path | None = None) -> tuple[JobSpec, RunPaths]:
    """Give ``spec`` a run id (unless it has one) and write ``runs/<id>/spec.json``; refuses an
    id that already has a directory (results are never overwritten)."""
    root = root or runs_root()
    if spec.run_id is None:
        spec = copy.copy(spec)  # already validated; the generated id matches RUN_ID_PATTERN
        spec.run_id = new_run_id(spec.kind)
    paths = RunPaths(root, spec.run_id)
    try:
        paths.dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise SpecError([("run_id", f"{spec.run_id!r} already exists under {root}; choose another id")]) from None
    paths.make()
    write_atomic(paths.spec, spec.to_json())
    return spec, paths


def submit(spec: JobSpec | dict, root: Path | None = None) -> str:
    """Validate, write ``runs/<id>/spec.json`` and queue the run; returns its id. A queue
    (``launch.queue.JobQueue``, or ``python -m launch serve``) starts it in submission order."""
    spec = _as_spec(spec)
    if spec.nnodes > 1:
        raise SpecError([("nnodes", f"{spec.nnodes} nodes: the queue runs single-node jobs; print the per-node "
                                    "torchrun commands with `python -m launch commands spec.json`")])
    index = RunIndex(root)
    spec, paths = write_spec(spec, root)
    index.add(spec.run_id, spec.to_dict())
    return spec.run_id
