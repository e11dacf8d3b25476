"""Runs: the run directories and the index as frames, a run's spec/result/progress/logs, two runs compared.

Every reader tolerates missing, half-written or corrupt files: it returns an empty frame or a
problem text instead of raising, so a failed run never breaks a page.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from pathlib import Path

import pandas as pd

from launch.events import progress, read_events
from launch.index import ACTIVE, RunIndex
from launch.layout import RunPaths, run_id_problem, runs_root, tail_text
from launch.queue import list_runs

RUN_COLUMNS = ["id", "kind", "model", "tp", "status", "created", "started", "finished", "duration_s",
               "fraction", "message", "error", "problem", "schemes"]


def resolve_root(root=None) -> Path:
    """The runs folder a store reader reads: ``root`` made absolute (so the paths built from it,
    e.g. a run's calibration folder, compare equal however the caller spelled it), or the
    configured one (``launch.layout.runs_root``) when ``root`` is None."""
    return Path(root).resolve() if root else runs_root()


def read_json(path: Path) -> tuple[object | None, str | None]:
    """(parsed JSON, None) or (None, why it could not be read)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, f"{Path(path).name} is missing"
    except OSError as exc:
        return None, f"cannot read {Path(path).name}: {exc.strerror or exc}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"{Path(path).name} is not valid JSON ({exc.msg} at line {exc.lineno})"


def run_paths(run_id: str, root=None) -> RunPaths:
    return RunPaths(resolve_root(root), run_id)


def load_spec(run_id: str, root=None) -> dict | None:
    if run_id_problem(run_id):
        return None
    data, _ = read_json(run_paths(run_id, root).spec)
    return data if isinstance(data, dict) else None


def load_result(run_id: str, root=None) -> tuple[dict | None, str | None]:
    """(result.json as a dict, None) or (None, what is wrong with it)."""
    problem = run_id_problem(run_id)
    if problem:
        return None, f"run id {run_id!r}: {problem}"
    data, problem = read_json(run_paths(run_id, root).result)
    if problem:
        return None, problem
    if not isinstance(data, dict):
        return None, f"result.json holds a {type(data).__name__}, not an object"
    return data, None


def run_progress(run_id: str, root=None) -> tuple[float, str, list[dict]]:
    """(fraction in [0, 1], one-line message, all events) from the run's events.jsonl."""
    try:
        events = read_events(run_paths(run_id, root).events)
    except OSError as exc:  # an unreadable events file is shown, not raised (torn lines are skipped)
        return 0.0, f"events unreadable: {exc}", []
    fraction, message = progress(events)
    return fraction, message, events


def runs_frame(root=None) -> pd.DataFrame:
    """Every run (newest first): index rows checked against their directories, with progress."""
    try:
        rows = list_runs(resolve_root(root))
    except (OSError, sqlite3.Error) as exc:  # an unreadable or damaged index: the page says so
        return pd.DataFrame([dict(id="(index)", kind="?", model="?", status="corrupt", problem=str(exc))],
                            columns=RUN_COLUMNS)
    out = []
    now = time.time()
    for row in rows:
        spec = {}
        try:
            spec = json.loads(row.get("spec_json") or "{}")
        except (TypeError, json.JSONDecodeError):
            pass
        if not spec and not run_id_problem(row["id"]):
            spec = load_spec(row["id"], root) or {}
        started, finished = row.get("started"), row.get("finished")
        duration = (finished or now) - started if started else None
        fraction, message = (1.0, "") if row["status"] == "done" else (None, "")
        if row["status"] in ACTIVE:
            fraction, message, _ = run_progress(row["id"], root)
        schemes = spec.get("schemes") if isinstance(spec.get("schemes"), list) else []
        out.append(dict(id=row["id"], kind=row.get("kind"), model=row.get("model"), tp=row.get("tp"),
                        status=row["status"], created=_when(row.get("created")), started=_when(started),
                        finished=_when(finished), duration_s=duration, fraction=fraction, message=message,
                        error=row.get("error"), problem=row.get("problem"),
                        schemes=", ".join(map(str, schemes))))
    frame = pd.DataFrame(out, columns=RUN_COLUMNS)
    return frame.sort_values("created", ascending=False, na_position="last").reset_index(drop=True)


def runs_stamp(root=None) -> tuple:
    """A cheap fingerprint of what the store reads under ``root``: (name, mtime, size) of the index
    files and of every run directory's spec, result and events. Equal stamps, equal frames: the
    app keys the frames it caches for every session by it (a few stat calls per run, no JSON)."""
    root = resolve_root(root)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    parts = []
    for entry in entries:
        if entry.name.startswith("index.sqlite") and entry.is_file():
            files = [entry.path]
        elif entry.is_dir() and not run_id_problem(entry.name):
            paths = RunPaths(root, entry.name)
            files = [paths.spec, paths.result, paths.events]
        else:
            continue
        for path in files:
            try:
                info = os.stat(path)
            except OSError:
                continue
            parts.append((entry.name, os.path.basename(path), info.st_mtime_ns, info.st_size))
    return tuple(parts)


def _when(t) -> pd.Timestamp | None:
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        return None
    return pd.Timestamp.fromtimestamp(t).floor("s")  # local time, as the user's clock shows it


def active_runs(root=None) -> pd.DataFrame:
    """Queued and running runs in submission order: one index query (cheap enough to poll)."""
    try:
        rows = RunIndex(resolve_root(root)).list(ACTIVE)
    except (OSError, sqlite3.Error):  # an unreadable index shows as no active run; Runs shows why
        rows = []
    return pd.DataFrame([dict(id=r["id"], kind=r["kind"], model=r["model"], tp=r["tp"], status=r["status"],
                              created=_when(r["created"])) for r in rows],
                        columns=["id", "kind", "model", "tp", "status", "created"])


def finished_ok(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Done runs of ``kind`` (status done or unindexed with a result), newest first."""
    ok = frame[(frame["kind"] == kind) & frame["status"].isin(["done", "unindexed"])]
    return ok.reset_index(drop=True)


def log_tail(run_id: str, root=None, lines: int = 40) -> dict[str, str]:
    """Last ``lines`` of the launcher log and of each rank's log (name -> text)."""
    paths = run_paths(run_id, root)
    out = {}
    for path in [paths.launcher_log, *paths.rank_logs()]:
        text = tail_text(path, lines)
        if text:
            out[str(path.relative_to(paths.dir))] = text
    return out


def codec_changes(events: list[dict]) -> list[str]:
    """The run's ``codec`` events (``lowbit.comm.codec``: a message took another path than announced,
    or than its site's previous call): one line each, for the Runs page to show apart."""
    return [str(e.get("message") or "") for e in events if e.get("stage") == "codec"]


def events_frame(events: list[dict]) -> pd.DataFrame:
    rows = [dict(time=_when(e.get("time")), stage=e.get("stage"), step=e.get("step"), total=e.get("total"),
                 message=e.get("message")) for e in events]
    return pd.DataFrame(rows, columns=["time", "stage", "step", "total", "message"])
