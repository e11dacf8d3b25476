# Size: ~520 lines: one state machine — claim, start, watch, time out, cancel, recover — whose steps share the index and the process table.
"""The job queue: starts queued runs in submission order, at most ``max_parallel`` at a time,
watches them, enforces time limits, cancels, and recovers after a restart.

    q = JobQueue(max_parallel=1).start()     # scheduler thread in this process (app or CLI)
    run_id = q.submit(JobSpec(kind="generate", model="tiny-llama", tp=2, prompt="Hi"))
    row = q.wait(run_id)                     # the index row: status, times, error, result files
    cancel(run_id)                           # from any process

All state is in ``runs/index.sqlite`` and the run directories, so any process can submit, list
and cancel. Exactly one process schedules at a time: the one holding an exclusive ``flock`` on
``runs/queue.lock`` (released by the kernel when that process dies, so another queue object
takes over). When a queue takes the lock it recovers: runs marked running whose process group
still lives are re-attached (watched and time-limited again); the others end as ``done`` when
their result.json was written before the processes vanished, ``failed`` when torchrun's failure
report in the launcher log says why they ended, else ``lost``.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from launch import cluster, procs
from launch.index import FINISHED, RunIndex
from launch.layout import (
    RunPaths,
    queue_lock_path,
    run_id_problem,
    runs_root,
    tail_text,
    write_atomic,
)
from launch.spec import JobSpec, SpecError, start_problems
from launch.submit import REPO_ROOT, job_env, submit, torchrun_command

ERROR_TEXT_CHARS = 4000


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
        self._procs: dict[str, subprocess.Popen] = {}   # runs this object started
        self._attached: set[str] = set()                # runs re-attached after a restart
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
            if kill_running:
                for run_id in list(self._procs) + list(self._attached):
                    row = self.index.get(run_id)
                    self.index.finish(run_id, "cancelled", error="queue stopped with kill_running=True")
                    procs.kill_group(row and row["pgid"], self.kill_grace_s, self._marker(run_id))
                self._reap_all()
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
        """Schedule until no run is queued or running for ``idle_s`` (``python -m launch serve``)."""
        idle_since = None
        while not self._stop.is_set():
            self.step()
            busy = bool(self.index.list(("queued", "running")))
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
        """Runs marked running but not watched by this object: re-attach the ones whose process
        group lives, end the others as done (result written), failed (torchrun reported why) or lost."""
        for row in self.index.list(("running",)):
            run_id = row["id"]
            if run_id in self._procs or run_id in self._attached:
                continue
            paths = RunPaths(self.root, run_id)
            if row["pgid"] and _group_runs(row["pgid"], paths):
                self._attached.add(run_id)
                continue
            if _valid_json(paths.result):
                self.index.finish(run_id, "done", error="finished while no queue was watching",
                                  result_paths=paths.result_files())
            elif _rank_failures(paths) or _link_faults(paths):
                # torchrun (or the cluster supervisor) outlived its ranks and said why: a failure
                # with its cause, as when a queue watches, not a run nobody can explain.
                self.index.finish(run_id, "failed", error=failure_text(paths, None) + "\n(ended while no queue "
                                  "was watching)", result_paths=paths.result_files())
            else:
                self.index.finish(run_id, "lost", error="its processes vanished while no queue was watching "
                                                        "(app or machine restart)")
            _teardown_cluster(run_id)
        _remove_stale_clusters()

    def _watch(self) -> None:
        now = time.time()
        rows = {r["id"]: r for r in self.index.list(("running",))}
        rows.update({r["id"]: r for r in map(self.index.get, list(self._procs)) if r})
        for run_id, row in rows.items():
            proc = self._procs.get(run_id)
            if proc is None and run_id not in self._attached:
                continue
            if row["status"] in FINISHED:
                # Finished elsewhere (cancelled from another process): make sure it is gone.
                procs.kill_group(row["pgid"], self.kill_grace_s, self._marker(run_id))
                self._forget(run_id)
                continue
            limit = _time_limit(row)
            if row["started"] and limit and now - row["started"] > limit:
                self.index.finish(run_id, "timeout", error=f"time limit of {limit:g} s exceeded; process group "
                                                           f"{row['pgid']} stopped (SIGTERM, then SIGKILL)")
                procs.kill_group(row["pgid"], self.kill_grace_s, self._marker(run_id))
                self._forget(run_id)
                continue
            if proc is not None:
                returncode = proc.poll()
                if returncode is not None:
                    self._finalize(row, returncode)
            elif not procs.group_alive(row["pgid"], self._marker(run_id)):
                paths = RunPaths(self.root, run_id)
                if _valid_json(paths.result):
                    self.index.finish(run_id, "done", result_paths=paths.result_files())
                else:
                    self.index.finish(run_id, "failed", error=failure_text(paths, None))
                self._forget(run_id)

    def _finalize(self, row: dict, returncode: int) -> None:
        run_id = row["id"]
        procs.kill_group(row["pgid"], 1.0, self._marker(run_id))  # a rank that outlived torchrun: none may remain
        paths = RunPaths(self.root, run_id)
        if returncode == 0:
            self.index.finish(run_id, "done", returncode=0, result_paths=paths.result_files())
        else:
            self.index.finish(run_id, "failed", error=failure_text(paths, returncode), returncode=returncode,
                              result_paths=paths.result_files())
        self._forget(run_id)

    def _marker(self, run_id: str) -> str:
        """What every process of the run has on its command line: its spec path."""
        return str(RunPaths(self.root, run_id).spec)

    def _forget(self, run_id: str) -> None:
        proc = self._procs.pop(run_id, None)
        self._attached.discard(run_id)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _teardown_cluster(run_id)

    def _reap_all(self) -> None:
        for run_id in list(self._procs):
            self._forget(run_id)

    def _start_queued(self) -> None:
        running = len(self.index.list(("running",)))
        for row in self.index.list(("queued",)):
            if running >= self.max_parallel:
                return
            if self.index.claim(row["id"]):
                running += 1
                self._launch(row)

    def _launch(self, row: dict) -> None:
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
            command = _job_command(spec, paths)
            with open(paths.launcher_log, "ab") as log:
                proc = subprocess.Popen(command, cwd=REPO_ROOT,
                                        env=job_env(spec, paths, self.max_parallel), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except Exception as exc:  # noqa: BLE001 - a run that cannot start fails, the queue goes on
            self.index.finish(run_id, "failed", error=f"could not start: {type(exc).__name__}: {exc}")
            return
        self._procs[run_id] = proc
        self.index.set_process(run_id, proc.pid, proc.pid)  # new session: pgid == pid


# -- functions usable from any process ---------------------------------------------------------
def cancel(run_id: str, root: Path | None = None, grace_s: float = 5.0) -> str:
    """Cancel a queued or running run (its whole process group); returns its status after."""
    problem = run_id_problem(run_id)
    if problem:
        raise KeyError(f"run id {run_id!r}: {problem}")
    index = RunIndex(root)
    row = index.get(run_id)
    if row is None:
        raise KeyError(f"unknown run {run_id!r}")
    if row["status"] in FINISHED:
        return row["status"]
    # Mark first so the scheduler reads the ended process as cancelled, not failed.
    index.finish(run_id, "cancelled", error="cancelled by user")
    row = index.get(run_id)
    procs.kill_group(row["pgid"], grace_s, str(RunPaths(Path(root).resolve() if root else runs_root(), run_id).spec))
    _teardown_cluster(run_id)
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
        spec = _read_json(paths.spec) if problem is None else None
        rows.append(dict(id=entry.name, kind=(spec or {}).get("kind", "?"), model=(spec or {}).get("model", "?"),
                         tp=(spec or {}).get("tp"), status="corrupt" if problem else "unindexed",
                         index_status=None, problem=problem or "not in the index", created=entry.stat().st_mtime,
                         started=None, finished=None, error=None, result_paths=paths.result_files()))
    return rows


def failure_text(paths: RunPaths, returncode: int | None) -> str:
    """The failing rank's error, after the link faults an emulated cluster's supervisor saw
    (a link down explains a rank's collective timeout). torchrun lists every failed rank (exit
    code, signal, the traceback ``@record`` wrote to its error file); when one rank dies, its
    peers fail too with "connection closed" errors, so the root cause is the first failure that
    is not such an echo."""
    faults = "".join(f"link fault: {f}\n" for f in _link_faults(paths))
    return _clip(faults + _rank_failure_text(paths, returncode))


def _rank_failure_text(paths: RunPaths, returncode: int | None) -> str:
    failures = _rank_failures(paths)
    if failures:
        root = min(failures, key=lambda f: (_is_echo(f), f["rank"]))
        message = _error_file_message(Path(root["error_file"])) if root.get("error_file") else None
        text = f"rank {root['rank']} failed (exitcode {root.get('exitcode', '?')}): " + \
            (message or root.get("traceback") or "no traceback")
        others = sorted(f["rank"] for f in failures if f is not root)
        if others:
            text += f"\n(also ended: rank {', '.join(map(str, others))}, after rank {root['rank']})"
        return _clip(text)
    message = _error_file_message(paths.error)
    tail = tail_text(paths.launcher_log, 25)
    parts = [p for p in (message, tail and "log tail:\n" + tail) if p]
    return _clip("\n".join(parts) or f"torchrun exited with code {returncode} and left no error file or log")


def _clip(text: str) -> str:
    """At most ERROR_TEXT_CHARS: the head (the error message) and the tail (where it was raised)."""
    if len(text) <= ERROR_TEXT_CHARS:
        return text
    half = ERROR_TEXT_CHARS // 2
    return f"{text[:half]}\n[...]\n{text[-half:]}"


def _link_faults(paths: RunPaths) -> list[str]:
    """The link faults the cluster supervisor wrote to the launcher log (``cluster.FAULT_PREFIX``
    lines), first seen first, each once."""
    try:
        with open(paths.launcher_log, errors="replace") as log:
            lines = [line.rstrip("\n") for line in log if line.startswith(cluster.FAULT_PREFIX)]
    except OSError:
        return []
    return list(dict.fromkeys(line[len(cluster.FAULT_PREFIX):] for line in lines))


# Errors a rank raises because a peer died, not because of its own fault.
_ECHOES = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer", "Broken pipe",
           "Signal 15 (SIGTERM)", "Signal 1 (SIGHUP)")


def _is_echo(failure: dict) -> bool:
    text = failure.get("traceback", "") or ""
    if failure.get("error_file"):
        text += _error_file_message(Path(failure["error_file"])) or ""
    return any(e in text for e in _ECHOES)


def _rank_failures(paths: RunPaths) -> list[dict]:
    """torchrun's failure report (sections "Failures:" and "Root Cause") as one dict per rank:
    rank, exitcode, error_file, traceback."""
    text = tail_text(paths.launcher_log, 2000) or ""
    start = text.rfind("Failures:")
    root = text.rfind("Root Cause (first observed failure):")
    if start < 0 or (0 <= root < start):
        start = root
    if start < 0:
        return []
    by_rank: dict[int, dict] = {}
    current, key = None, None
    for line in text[start:].splitlines():
        if re.fullmatch(r"\[\d+\]:", line.strip()):
            current, key = {}, None
            continue
        if current is None:
            continue
        if line.startswith(("---", "===")):
            current = None
            continue
        m = re.match(r"\s+(time|host|rank|exitcode|error_file|traceback)\s*:\s?(.*)$", line)
        if m:
            key, value = m.group(1), m.group(2).strip()
            if key == "rank":
                rank = re.match(r"\d+", value)
                if rank:
                    current = by_rank.setdefault(int(rank.group()), current)
                    current["rank"] = int(rank.group())
            elif key == "exitcode":
                current[key] = value.split(" ")[0]
            elif key == "error_file":
                current[key] = None if value.startswith("<N/A>") else value
            else:
                current[key] = value
        elif key == "traceback" and line.strip():
            current["traceback"] = current.get("traceback", "") + "\n" + line.strip()
    return [f for f in by_rank.values() if "rank" in f]


# -- helpers -----------------------------------------------------------------------------------
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


def _remove_stale_clusters() -> None:
    """After a restart: namespaces of emulated clusters whose supervisor is gone."""
    try:
        cluster.remove_stale()
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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _valid_json(path: Path) -> bool:
    return isinstance(_read_json(path), dict)


def _dir_problem(paths: RunPaths, row: dict | None) -> str | None:
    if not paths.dir.is_dir():
        return "run directory is missing"
    if not paths.spec.exists():
        return "spec.json is missing"
    if not isinstance(_read_json(paths.spec), dict):
        return "spec.json is not a JSON object"
    if row is not None and row["status"] == "done" and paths.result.exists() and not _valid_json(paths.result):
        return "result.json is not valid JSON"
    return None


def _error_file_message(path: Path) -> str | None:
    data = _read_json(path)
    if not isinstance(data, dict):
        return None
    message = data.get("message")
    if isinstance(message, dict):
        text = str(message.get("message", ""))
        stack = (message.get("extraInfo") or {}).get("py_callstack")
        if stack and stack.strip() not in text:
            text = f"{text}\n{stack.strip()}"
        return text.strip() or None
    return str(message).strip() if message else None
