"""The run index: ``runs/index.sqlite``, one row per run, for listing and scheduling.

The run directories hold the truth (spec, events, results); the index says which runs exist,
their status and timings, and which process group runs them (a Slurm run's job ids are in its
folder: ``launch.executors.slurm``). WAL mode lets the app read while the queue writes. Status
moves only forward:

    queued -> running -> done | failed | cancelled | timeout | lost
    queued -> pending -> running -> ...      (Slurm: pending while the job waits in Slurm's queue)
    queued | pending -> cancelled

``finish`` changes a row only while it is queued or running, so a finished run is never
rewritten (a late exit code cannot turn ``cancelled`` into ``failed``).
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from launch.layout import index_path

ACTIVE = ("queued", "pending", "running")
FINISHED = ("done", "failed", "cancelled", "timeout", "lost")
STATUSES = ACTIVE + FINISHED

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,   -- submission order
    id           TEXT UNIQUE NOT NULL,
    kind         TEXT NOT NULL,
    model        TEXT NOT NULL,
    tp           INTEGER NOT NULL,
    status       TEXT NOT NULL,
    spec_json    TEXT NOT NULL,
    created      REAL NOT NULL,
    started      REAL,
    finished     REAL,
    pid          INTEGER,
    pgid         INTEGER,
    returncode   INTEGER,
    error        TEXT,
    result_paths TEXT                                -- JSON list of file names in the run dir
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, seq);
"""


class RunIndex:
    recovered_from: tuple[str, str] | None = None  # (moved-aside file, error) after a corrupt index
    def __init__(self, root: Path | None = None):
        self.path = index_path(root)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            # An unreadable index must not stop the app: keep it aside for inspection and start a
            # new one; the run directories still hold every spec and result (listed as unindexed).
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self.recovered_from = (str(aside), str(exc))
            self._create()

    def _create(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self):
        # A connection per call: safe across threads, and the scheduler never holds a lock long.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    # -- writes ------------------------------------------------------------------------------
    def add(self, run_id: str, spec: dict, status: str = "queued", created: float | None = None) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO runs (id, kind, model, tp, status, spec_json, created) VALUES (?,?,?,?,?,?,?)",
                       (run_id, spec["kind"], str(spec["model"]), int(spec["tp"]), status,
                        json.dumps(spec, sort_keys=True), created or time.time()))

    def claim(self, run_id: str, status: str = "running") -> bool:
        """queued -> running (no pid yet), or -> pending (handed to a scheduler, not started:
        no start time yet); False when someone else changed it first."""
        if status not in ("running", "pending"):
            raise ValueError(f"claim: status must be running or pending, got {status!r}")
        with self._connect() as db:
            cur = db.execute("UPDATE runs SET status=?, started=? WHERE id=? AND status='queued'",
                             (status, time.time() if status == "running" else None, run_id))
            return cur.rowcount == 1

    def set_running(self, run_id: str, started: float | None = None) -> bool:
        """pending -> running at ``started`` (the scheduler's start time, default now)."""
        with self._connect() as db:
            cur = db.execute("UPDATE runs SET status='running', started=? WHERE id=? AND status='pending'",
                             (started or time.time(), run_id))
            return cur.rowcount == 1

    def set_process(self, run_id: str, pid: int, pgid: int) -> None:
        with self._connect() as db:
            db.execute("UPDATE runs SET pid=?, pgid=? WHERE id=?", (pid, pgid, run_id))

    def finish(self, run_id: str, status: str, error: str | None = None, returncode: int | None = None,
               result_paths: list[str] | None = None) -> bool:
        """Record the end of a run; a no-op (False) when the run had already finished."""
        if status not in FINISHED:
            raise ValueError(f"status must be one of {FINISHED}, got {status!r}")
        with self._connect() as db:
            cur = db.execute(
                "UPDATE runs SET status=?, finished=?, error=?, returncode=?, result_paths=? "
                "WHERE id=? AND status IN ('queued', 'pending', 'running')",
                (status, time.time(), error, returncode, json.dumps(result_paths or []), run_id))
            return cur.rowcount == 1

    # -- reads -------------------------------------------------------------------------------
    def get(self, run_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return _row(row) if row else None

    def list(self, statuses: tuple[str, ...] | None = None) -> list[dict]:
        """Runs in submission order (optionally only those with one of ``statuses``)."""
        with self._connect() as db:
            if statuses:
                marks = ",".join("?" * len(statuses))
                rows = db.execute(f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY seq", statuses).fetchall()
            else:
                rows = db.execute("SELECT * FROM runs ORDER BY seq").fetchall()
        return [_row(r) for r in rows]

    def ids(self) -> set[str]:
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT id FROM runs")}


def _row(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["result_paths"] = json.loads(d["result_paths"]) if d.get("result_paths") else []
    return d
