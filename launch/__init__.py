"""Jobs: validated specs, torchrun process management, progress events and the run index.

    from launch import JobSpec, JobQueue, cancel
    q = JobQueue().start()
    run_id = q.submit(JobSpec(kind="generate", model="tiny-llama", tp=2, prompt="Hello"))
    q.wait(run_id)["status"]          # 'done'; results in runs/<run_id>/result.json

Modules: ``spec`` (JobSpec, SpecError), ``registry`` (the job kinds), ``layout`` (run directory
layout), ``events`` (progress lines), ``index`` (SQLite run index), ``submit`` (spec.json and
torchrun commands), ``torchrun`` (the one torchrun command line), ``queue`` (scheduler, cancel,
recovery), ``executors`` (where a run runs: ``local`` processes or ``slurm`` batch jobs),
``failures`` (why a run failed, from torchrun's report), ``procs`` (process groups), ``worker``
(torchrun entry point), ``kinds`` (tp-check, generate, selftest, ...). CLI: ``python -m launch``.
"""
from launch.events import EventLog, progress, read_events
from launch.index import RunIndex
from launch.layout import RunPaths, run_paths, runs_root
from launch.queue import JobQueue, cancel, list_runs
from launch.registry import KINDS, available_kinds
from launch.spec import JobSpec, SpecError
from launch.submit import node_commands, submit, torchrun_command

__all__ = ["EventLog", "progress", "read_events", "RunIndex", "RunPaths", "run_paths", "runs_root", "JobQueue",
           "cancel", "list_runs", "KINDS", "available_kinds", "JobSpec", "SpecError", "node_commands", "submit",
           "torchrun_command"]
