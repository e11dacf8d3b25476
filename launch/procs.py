"""Process groups of running jobs: who is in one, and ending all of it.

Each job's torchrun starts with ``start_new_session=True``, so torchrun and every rank it spawns
share one process group whose id is torchrun's pid. Cancelling or timing out a job signals that
whole group (SIGTERM, then SIGKILL after a grace period), so no rank is left behind. Members
are read from /proc (Linux); zombies (already dead, waiting to be reaped) do not count.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_PROC = Path("/proc")


def _stat_fields(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of ``pid`` from /proc/<pid>/stat, or None if it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = text[text.rindex(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2])


def cmdline(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def live_pids() -> list[int]:
    """Every live (non-zombie) process visible here."""
    pids = []
    for entry in _PROC.iterdir() if _PROC.is_dir() else ():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    if not _PROC.is_dir():  # no /proc: ask the kernel whether anything of the group is left
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for pid in live_pids():
        fields = _stat_fields(pid)
        if fields and fields[2] == pgid:
            members.append(pid)
    return members


def group_alive(pgid: int | None) -> bool:
    return bool(pgid) and bool(group_members(pgid))


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...), whatever their group."""
    children: dict[int, list[int]] = {}
    for p in live_pids():
        fields = _stat_fields(p)
        if fields:
            children.setdefault(fields[1], []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_group(pgid: int | None, grace_s: float = 5.0) -> bool:
    """SIGTERM the whole group, SIGKILL what is left after ``grace_s``; True when none remain."""
    if not pgid or pgid <= 1 or pgid == os.getpgrp():
        return not group_alive(pgid) if pgid and pgid > 1 else True
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            return not group_alive(pgid)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_members(pgid):
                return True
            time.sleep(0.05)
    return not group_members(pgid)
