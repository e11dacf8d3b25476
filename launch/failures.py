"""Why a run failed, read from what its launcher left: torchrun's failure report in the launcher
log, the ranks' ``@record`` error files, and the link faults an emulated cluster's supervisor
logged. The queue calls this where a run ends; it never parses logs itself.

    failure_text(paths, returncode)                 # the local launcher log (logs/launcher.log)
    failure_text(paths, None, log=paths.logs / "task-3.log", error_file=...)   # one Slurm array task
    has_failure_report(paths)                        # did torchrun (or the supervisor) say why?

torchrun lists every failed rank (exit code, signal, the traceback ``@record`` wrote to its error
file); when one rank dies, its peers fail too with "connection closed" errors, so the root cause
is the first failure that is not such an echo.
"""
from __future__ import annotations

import re
from pathlib import Path

from launch.cluster import FAULT_PREFIX
from launch.layout import RunPaths, read_json, tail_text

ERROR_TEXT_CHARS = 4000
# Errors a rank raises because a peer died, not because of its own fault.
_ECHOES = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer", "Broken pipe",
           "Signal 15 (SIGTERM)", "Signal 1 (SIGHUP)")


def failure_text(paths: RunPaths, returncode: int | None, log: Path | None = None,
                 error_file: Path | None = None) -> str:
    """The failing rank's error, after the link faults an emulated cluster's supervisor saw
    (a link down explains a rank's collective timeout). ``log`` defaults to the run's launcher
    log, ``error_file`` to its torchrun root-cause file."""
    log = log or paths.launcher_log
    faults = "".join(f"link fault: {f}\n" for f in link_faults(log))
    return clip(faults + _rank_failure_text(log, error_file or paths.error, returncode))


def has_failure_report(paths: RunPaths, log: Path | None = None) -> bool:
    """Did torchrun or the cluster supervisor write down why the run ended?"""
    log = log or paths.launcher_log
    return bool(rank_failures(log) or link_faults(log))


def _rank_failure_text(log: Path, error_file: Path, returncode: int | None) -> str:
    failures = rank_failures(log)
    if failures:
        root = min(failures, key=lambda f: (_is_echo(f), f["rank"]))
        message = error_file_message(Path(root["error_file"])) if root.get("error_file") else None
        text = f"rank {root['rank']} failed (exitcode {root.get('exitcode', '?')}): " + \
            (message or root.get("traceback") or "no traceback")
        others = sorted(f["rank"] for f in failures if f is not root)
        if others:
            text += f"\n(also ended: rank {', '.join(map(str, others))}, after rank {root['rank']})"
        return clip(text)
    message = error_file_message(error_file)
    tail = tail_text(log, 25)
    parts = [p for p in (message, tail and "log tail:\n" + tail) if p]
    return clip("\n".join(parts) or f"torchrun exited with code {returncode} and left no error file or log")


def clip(text: str) -> str:
    """At most ERROR_TEXT_CHARS: the head (the error message) and the tail (where it was raised)."""
    if len(text) <= ERROR_TEXT_CHARS:
        return text
    half = ERROR_TEXT_CHARS // 2
    return f"{text[:half]}\n[...]\n{text[-half:]}"


def link_faults(log: Path) -> list[str]:
    """The link faults the cluster supervisor wrote to ``log`` (``FAULT_PREFIX`` lines), first
    seen first, each once."""
    try:
        with open(log, errors="replace") as f:
            lines = [line.rstrip("\n") for line in f if line.startswith(FAULT_PREFIX)]
    except OSError:
        return []
    return list(dict.fromkeys(line[len(FAULT_PREFIX):] for line in lines))


def _is_echo(failure: dict) -> bool:
    text = failure.get("traceback", "") or ""
    if failure.get("error_file"):
        text += error_file_message(Path(failure["error_file"])) or ""
    return any(e in text for e in _ECHOES)


def rank_failures(log: Path) -> list[dict]:
    """torchrun's failure report in ``log`` (sections "Failures:" and "Root Cause") as one dict
    per rank: rank, exitcode, error_file, traceback."""
    text = tail_text(log, 2000) or ""
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


def error_file_message(path: Path) -> str | None:
    """The message (and Python call stack) of a torchrun error file written by ``@record``."""
    data = read_json(path)
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
