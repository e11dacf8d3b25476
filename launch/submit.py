"""Submitting a job: validate it (the spec, then its executor against the machine or cluster),
write ``runs/<id>/spec.json``, add it to the index as queued, and build the torchrun argument
lists that run it (never a shell string).

    run_id = submit(JobSpec(kind="generate", model="tiny-llama", tp=2, prompt="Hi"))
    torchrun_command(spec, spec_path)   # single node: --standalone, what the queue starts
    node_commands(spec, spec_path)      # multi-node: one argument list per node, c10d rendezvous

The queue (``launch.queue``) starts queued runs; ``submit`` itself starts nothing.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from launch.executors import executor_class
from launch.index import RunIndex
from launch.layout import RunPaths, new_run_id, runs_root, write_atomic
from launch.spec import JobSpec, SpecError
from launch.torchrun import STANDALONE, c10d, torchrun_args, worker_program

REPO_ROOT = Path(__file__).resolve().parent.parent


def _as_spec(spec: JobSpec | dict) -> JobSpec:
    return spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)


def torchrun_command(spec: JobSpec, spec_path: Path, log_dir: Path | None = None) -> list[str]:
    """The single-node torchrun argument list for ``spec`` (all ranks on this machine)."""
    return torchrun_args(worker_program(spec_path), spec.tp, log_dir=log_dir)


def node_commands(spec: JobSpec, spec_path: Path) -> list[list[str]]:
    """One torchrun argument list per node for a multi-node spec (torchrun's own c10d
    rendezvous at ``spec.rdzv_endpoint``); the spec file must exist at ``spec_path`` on every node."""
    if spec.nnodes > 1 and not spec.rdzv_endpoint:
        raise SpecError([("rdzv_endpoint", "required when nnodes > 1, as host:port")])
    rendezvous = c10d(spec.rdzv_endpoint, spec.run_id or "lowbit") if spec.nnodes > 1 else STANDALONE
    return [torchrun_args(worker_program(spec_path), spec.nproc_per_node, spec.nnodes, node, rendezvous)
            for node in range(spec.nnodes)]


def lowbit_env(paths: RunPaths, threads: int | str, error_file: Path | str | None = None) -> dict[str, str]:
    """What a job's torchrun needs besides the caller's environment: the repo on PYTHONPATH,
    ``threads`` CPU threads per rank, torchrun's root-cause error file inside the run directory,
    the runs root, unbuffered output."""
    return dict(PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)),
                TORCHELASTIC_ERROR_FILE=str(error_file or paths.error),
                LOWBIT_RUNS=str(paths.root),
                PYTHONUNBUFFERED="1")


def job_env(spec: JobSpec, paths: RunPaths, parallel_jobs: int = 1) -> dict[str, str]:
    """Environment of a local job's torchrun: this process's, plus ``lowbit_env`` with this
    machine's CPU threads split between the job's ranks and the jobs running at once."""
    threads = max(1, (os.cpu_count() or 1) // max(1, spec.nproc_per_node * parallel_jobs))
    return dict(os.environ, **lowbit_env(paths, threads))


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
    (``launch.queue.JobQueue``, or ``python -m launch serve``) starts it in submission order.
    The executor checks what the spec alone cannot (a Slurm partition, the shared runs folder)
    first: a spec it refuses leaves nothing behind."""
    spec = _as_spec(spec)
    problems = executor_class(spec.executor).submit_problems(spec, Path(root).resolve() if root else runs_root())
    if problems:
        raise SpecError(problems)
    index = RunIndex(root)
    spec, paths = write_spec(spec, root)
    index.add(spec.run_id, spec.to_dict())
    return spec.run_id
