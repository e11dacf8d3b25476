"""The local executor: a run is torchrun on this machine (or, for an emulated link, the cluster
supervisor ``launch.cluster``), started in a new session so its process group id is its pid.

It watches the processes it started (their exit code) and, after a queue restart, the process
groups it re-attached (alive or not); it enforces ``time_limit_s`` itself (SIGTERM, then
SIGKILL after the grace period) and ends every process of a run, ranks that outlived torchrun
included (``launch.procs``: the group plus every process naming the run's spec file).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

from launch import cluster, procs
from launch.executors import Ended
from launch.failures import failure_text
from launch.layout import RunPaths, read_json
from launch.spec import JobSpec
from launch.submit import REPO_ROOT, job_env, torchrun_command


class LocalExecutor:
    name = "local"
    uses_local_cpus = True
    claim_status = "running"

    def __init__(self, root: Path, index, kill_grace_s: float = 5.0, parallel_jobs: int = 1):
        self.root, self.index = Path(root), index
        self.kill_grace_s = kill_grace_s
        self.parallel_jobs = parallel_jobs
        self._procs: dict[str, subprocess.Popen] = {}   # runs this object started
        self._attached: set[str] = set()                # runs re-attached after a restart

    @staticmethod
    def submit_problems(spec: JobSpec, root: Path) -> list[tuple[str, str]]:
        if spec.nnodes > 1:
            return [("nnodes", f"{spec.nnodes} nodes: the queue runs single-node jobs; print the per-node "
                               "torchrun commands with `python -m launch commands spec.json`")]
        return []

    def tracks(self, run_id: str) -> bool:
        return run_id in self._procs or run_id in self._attached

    def start(self, spec: JobSpec, paths: RunPaths) -> None:
        command = _job_command(spec, paths)
        with open(paths.launcher_log, "ab") as log:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=job_env(spec, paths, self.parallel_jobs),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._procs[spec.run_id] = proc
        self.index.set_process(spec.run_id, proc.pid, proc.pid)  # new session: pgid == pid

    def poll(self, row: dict, paths: RunPaths) -> Ended | None:
        run_id = row["id"]
        limit = _time_limit(row)
        if row["started"] and limit and time.time() - row["started"] > limit:
            return Ended("timeout", f"time limit of {limit:g} s exceeded; process group {row['pgid']} stopped "
                                    "(SIGTERM, then SIGKILL)", stop=True)
        proc = self._procs.get(run_id)
        if proc is not None:
            returncode = proc.poll()
            if returncode is None:
                return None
            procs.kill_group(row["pgid"], 1.0, str(paths.spec))  # a rank that outlived torchrun: none may remain
            if returncode == 0:
                return Ended("done", returncode=0)
            return Ended("failed", failure_text(paths, returncode), returncode=returncode)
        if procs.group_alive(row["pgid"], str(paths.spec)):
            return None
        if isinstance(read_json(paths.result), dict):
            return Ended("done")
        return Ended("failed", failure_text(paths, None))

    def reattach(self, row: dict, paths: RunPaths) -> bool:
        if row["pgid"] and _group_runs(row["pgid"], paths):
            self._attached.add(row["id"])
            return True
        return False

    def stop(self, row: dict | None, paths: RunPaths, grace_s: float) -> None:
        procs.kill_group(row and row["pgid"], grace_s, str(paths.spec))
        _teardown_cluster(paths.run_id)

    def forget(self, run_id: str) -> None:
        proc = self._procs.pop(run_id, None)
        self._attached.discard(run_id)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _teardown_cluster(run_id)

    def tracked(self) -> list[str]:
        return list(self._procs) + list(self._attached)

    def cleanup(self) -> None:
        """After a restart: namespaces of emulated clusters whose supervisor is gone."""
        try:
            cluster.remove_stale()
        except Exception:  # noqa: BLE001 - cleanup must not break the scheduler
            traceback.print_exc(file=sys.stderr)


def _job_command(spec: JobSpec, paths: RunPaths) -> list[str]:
    """torchrun for loopback jobs; for an emulated link the cluster supervisor (launch.cluster),
    which builds one network namespace per rank, runs a torchrun node in each and removes them.
    Refused (field ``link``) where this process cannot create namespaces."""
    if spec.link == "loopback":
        return torchrun_command(spec, paths.spec, paths.logs)
    problem = cluster.link_problem(spec.link)
    if problem:
        raise cluster.ClusterError(problem)
    return cluster.supervisor_command(paths.spec)


def _teardown_cluster(run_id: str) -> None:
    """Cleanup hook where a run ends (done, failed, cancelled, timed out, lost): remove its
    emulated-cluster namespaces unless a live supervisor still owns them. Never raises."""
    try:
        cluster.teardown_run(run_id)
    except Exception:  # noqa: BLE001 - cleanup must not break the scheduler
        traceback.print_exc(file=sys.stderr)


def _time_limit(row: dict) -> float | None:
    try:
        return float(json.loads(row["spec_json"]).get("time_limit_s"))
    except (TypeError, ValueError, json.JSONDecodeError):
        return None


def _group_runs(pgid: int, paths: RunPaths) -> bool:
    """Does process group ``pgid`` still run this run (and not a reused pid)?"""
    return any(str(paths.spec) in procs.cmdline(pid) for pid in procs.group_members(pgid, str(paths.spec)))
