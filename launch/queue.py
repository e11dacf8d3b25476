"""The job queue: starts queued runs in submission order, at most ``max_parallel`` local ones at
a time, watches them, cancels, and recovers after a restart. Where a run runs is its executor's
business (``launch.executors``: ``local`` processes, or ``slurm`` batch jobs, which Slurm itself
schedules, so they do not count against ``max_parallel``).

    q = JobQueue(max_parallel=1).start()     # scheduler thread in this process (app or CLI)
    run_id = q.submit(JobSpec(kind="generate", model="tiny-llama", tp=2, prompt="Hi"))
    row = q.wait(run_id)                     # the index row: status, times, error, result files
    cancel(run_id)                           # from any process

All state is in ``runs/index.sqlite`` and the run directories, so any process can submit, list
and cancel. Exactly one process schedules at a time: the one holding an exclusive ``flock`` on
``runs/queue.lock`` (released by the kernel when that process dies, so another queue object
takes over). When a queue takes the lock it recovers: active runs its executor still finds
(a live process group, a job Slurm still knows) are re-attached and watched again; the others
end as ``done`` when their result.json was written before they vanished, ``failed`` when
torchrun's failure report in the launcher log says why they ended (``launch.failures``), else ``lost``.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from launch.executors import executor_for, executor_name
from launch.failures import failure_text, has_failure_report
from launch.index import ACTIVE, FINISHED, RunIndex
from launch.layout import (
    RunPaths,
    queue_lock_path,
    read_json,
    run_id_problem,
    runs_root,
    write_atomic,
)
from launch.spec import EXECUTORS, JobSpec, SpecError, start_problems
from launch.submit import submit

__all__ = ["JobQueue", "cancel", "list_runs", "failure_text", "default_max_parallel"]


def default_max_parallel() -> int:
    """``$LOWBIT_MAX_PARALLEL``, else 1: on a CPU machine one job already uses every core."""
    try:
        return max(1, int(os.environ.get("LOWBIT_MAX_PARALLEL", "1")))
    except ValueError:
        return 1


class JobQueue:
    def __init__(self, root: Path | None = None, max_parallel: int | None = None, poll_s: float = 0.2,
                 kill_grace_s: float = 5.0):
        self.root = Path(root).resolve() if root else runs_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = RunIndex(self.root)
        self.max_parallel = max_parallel or default_max_parallel()
        self.poll_s = poll_s
        self.kill_grace_s = kill_grace_s
        self._executors: dict = {}
        self._lock_file = None
        self._mutex = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public API --------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict) -> str:
        return submit(spec, self.root)

    def cancel(self, run_id: str) -> str:
        return cancel(run_id, self.root, self.kill_grace_s)

    def get(self, run_id: str) -> dict | None:
        return self.index.get(run_id)

    def list_runs(self) -> list[dict]:
        return list_runs(self.root)

    @property
    def is_owner(self) -> bool:
        return self._lock_file is not None

    def start(self) -> "JobQueue":
        """Run the scheduler in a background thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lowbit-job-queue", daemon=True)
            self._thread.start()
        return self

    def stop(self, kill_running: bool = False) -> None:
        """Stop scheduling and release the queue lock. Running jobs keep running (a later
        queue re-attaches them) unless ``kill_running``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._mutex:
            for ex in self._executors.values() if kill_running else ():
                for run_id in ex.tracked():
                    row = self.index.get(run_id)
                    self.index.finish(run_id, "cancelled", error="queue stopped with kill_running=True")
                    ex.stop(row, RunPaths(self.root, run_id), self.kill_grace_s)
                    ex.forget(run_id)
            self._release_lock()

    def wait(self, run_id: str, timeout_s: float | None = None, on_poll=None, poll_s: float = 0.2) -> dict:
        """Block until ``run_id`` has finished; returns its index row. ``on_poll(row)`` is called
        on every poll (e.g. to draw progress). Raises TimeoutError after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            row = self.index.get(run_id)
            if row is None:
                raise KeyError(f"unknown run {run_id!r}")
            if on_poll is not None:
                on_poll(row)
            if row["status"] in FINISHED:
                return row
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {row['status']} after {timeout_s} s")
            if self._thread is None:  # no scheduler thread: drive the queue from here
                self.step()
            time.sleep(poll_s)

    def run_until_idle(self, idle_s: float = 1.0) -> None:
        """Schedule until no run is queued, pending or running for ``idle_s`` (``python -m launch serve``)."""
        idle_since = None
        while not self._stop.is_set():
            self.step()
            busy = bool(self.index.list(ACTIVE))
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= idle_s:
                return
            time.sleep(self.poll_s)

    # -- scheduling --------------------------------------------------------------------------
    def step(self) -> None:
        """One scheduling pass: take the lock if free (then recover), watch running jobs, start
        queued ones. Safe to call from any thread."""
        with self._mutex:
            if not self.is_owner and not self._acquire_lock():
                return
            self._watch()
            self._start_queued()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the scheduler must outlive one bad pass
                traceback.print_exc(file=sys.stderr)
            self._stop.wait(self.poll_s)

    def _executor(self, name: str):
        """This queue's executor ``name`` (made on first use; it remembers the runs it watches)."""
        if name not in self._executors:
            self._executors[name] = executor_for(name, self.root, self.index, kill_grace_s=self.kill_grace_s,
                                                 parallel_jobs=self.max_parallel)
        return self._executors[name]

    def _acquire_lock(self) -> bool:
        f = open(queue_lock_path(self.root), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f
        self.recover()
        return True

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def recover(self) -> None:
        """Active runs not watched by this object: re-attach the ones their executor still finds,
        end the others as done (result written), failed (torchrun reported why) or lost."""
        for row in self.index.list(("pending", "running")):
            run_id = row["id"]
            ex = self._executor(executor_name(row))
            if ex.tracks(run_id):
                continue
            paths = RunPaths(self.root, run_id)
            if ex.reattach(row, paths):
                continue
            if isinstance(read_json(paths.result), dict):
                self.index.finish(run_id, "done", error="finished while no queue was watching",
                                  result_paths=paths.result_files())
            elif has_failure_report(paths):
                # torchrun (or the cluster supervisor) outlived its ranks and said why: a failure
                # with its cause, as when a queue watches, not a run nobody can explain.
                self.index.finish(run_id, "failed", error=failure_text(paths, None) + "\n(ended while no queue "
                                  "was watching)", result_paths=paths.result_files())
            else:
                self.index.finish(run_id, "lost", error="its processes vanished while no queue was watching "
                                                        "(app or machine restart)")
            ex.forget(run_id)
        for name in EXECUTORS:
            self._executor(name).cleanup()

    def _watch(self) -> None:
        rows = {r["id"]: r for r in self.index.list(("pending", "running"))}
        for ex in self._executors.values():
            rows.update({r["id"]: r for r in map(self.index.get, ex.tracked()) if r})
        for run_id, row in rows.items():
            ex = self._executor(executor_name(row))
            if not ex.tracks(run_id):
                continue
            paths = RunPaths(self.root, run_id)
            if row["status"] in FINISHED:
                # Finished elsewhere (cancelled from another process): make sure it is gone.
                ex.stop(row, paths, self.kill_grace_s)
                ex.forget(run_id)
                continue
            ended = ex.poll(row, paths)
            if ended is None:
                continue
            self.index.finish(run_id, ended.status, error=ended.error, returncode=ended.returncode,
                              result_paths=paths.result_files())
            if ended.stop:
                ex.stop(row, paths, self.kill_grace_s)
            ex.forget(run_id)

    def _start_queued(self) -> None:
        running = len([r for r in self.index.list(("running",)) if self._executor(executor_name(r)).uses_local_cpus])
        for row in self.index.list(("queued",)):
            ex = self._executor(executor_name(row))
            if ex.uses_local_cpus and running >= self.max_parallel:
                continue  # local runs wait their turn; a Slurm run is Slurm's to schedule
            if self.index.claim(row["id"], ex.claim_status):
                running += ex.uses_local_cpus
                self._launch(ex, row)

    def _launch(self, ex, row: dict) -> None:
        run_id = row["id"]
        paths = RunPaths(self.root, run_id)
        try:
            paths.make()
            if not paths.spec.exists():  # e.g. a submit from another process still writing it
                write_atomic(paths.spec, json.dumps(json.loads(row["spec_json"]), indent=2, sort_keys=True))
            spec = JobSpec.load_trusted(paths.spec)  # validated at submit
            problems = start_problems(spec, self.root)
            if problems:
                raise SpecError(problems)
            ex.start(spec, paths)
        except Exception as exc:  # noqa: BLE001 - a run that cannot start fails, the queue goes on
            self.index.finish(run_id, "failed", error=f"could not start: {type(exc).__name__}: {exc}")
            ex.forget(run_id)


# -- functions usable from any process ---------------------------------------------------------
def cancel(run_id: str, root: Path | None = None, grace_s: float = 5.0) -> str:
    """Cancel a queued, pending or running run (local: its whole process group; Slurm: scancel
    of its jobs); returns its status after."""
    problem = run_id_problem(run_id)
    if problem:
        raise KeyError(f"run id {run_id!r}: {problem}")
    root = Path(root).resolve() if root else runs_root()
    index = RunIndex(root)
    row = index.get(run_id)
    if row is None:
        raise KeyError(f"unknown run {run_id!r}")
    if row["status"] in FINISHED:
        return row["status"]
    # Mark first so the scheduler reads the ended process as cancelled, not failed.
    index.finish(run_id, "cancelled", error="cancelled by user")
    row = index.get(run_id)
    executor_for(executor_name(row), root, index).stop(row, RunPaths(root, run_id), grace_s)
    return row["status"]


def list_runs(root: Path | None = None) -> list[dict]:
    """Every run: the index rows, each checked against its directory, plus directories the
    index does not know. A row whose spec or result is unreadable is shown with status
    ``corrupt`` (``index_status`` keeps the stored one, ``problem`` says what is wrong)."""
    root = Path(root).resolve() if root else runs_root()
    rows = RunIndex(root).list()
    known = set()
    for row in rows:
        known.add(row["id"])
        row["index_status"] = row["status"]
        problem = _dir_problem(RunPaths(root, row["id"]), row)
        if problem:
            row["status"], row["problem"] = "corrupt", problem
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if not entry.is_dir() or entry.name in known or run_id_problem(entry.name):
            continue
        paths = RunPaths(root, entry.name)
        problem = _dir_problem(paths, None)
        spec = read_json(paths.spec) if problem is None else None
        rows.append(dict(id=entry.name, kind=(spec or {}).get("kind", "?"), model=(spec or {}).get("model", "?"),
                         tp=(spec or {}).get("tp"), status="corrupt" if problem else "unindexed",
                         index_status=None, problem=problem or "not in the index", created=entry.stat().st_mtime,
                         started=None, finished=None, error=None, result_paths=paths.result_files()))
    return rows


# -- helpers -----------------------------------------------------------------------------------
def _dir_problem(paths: RunPaths, row: dict | None) -> str | None:
    if not paths.dir.is_dir():
        return "run directory is missing"
    if not paths.spec.exists():
        return "spec.json is missing"
    if not isinstance(read_json(paths.spec), dict):
        return "spec.json is not a JSON object"
    if row is not None and row["status"] == "done" and paths.result.exists() \
            and not isinstance(read_json(paths.result), dict):
        return "result.json is not valid JSON"
    return None
