"""Process groups of running jobs: who is in one, and ending all of it.

Each job's torchrun starts with ``start_new_session=True``, so its process group id is
torchrun's pid. torch >= 2.13 starts every rank in a session of its own, so the ranks are *not*
in that group: a job's processes are the group's members plus every process whose command line
names the job's spec file (``marker``; each rank runs ``-m launch.worker runs/<id>/spec.json``).
That also finds ranks that outlived a killed torchrun (re-parented to init) after a restart.
Cancelling or timing out a job signals all of them (SIGTERM, then SIGKILL after a grace period),
so no rank is left behind. Members are read from /proc (Linux); zombies do not count.
"""
from __future__ import annotations

import fcntl
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


def group_members(pgid: int | None, marker: str | None = None) -> list[int]:
    """Live processes of process group ``pgid``, plus (with ``marker``) every live process whose
    command line contains ``marker`` (never this process)."""
    found = set(_pgid_members(pgid)) if pgid and pgid > 1 else set()
    if marker:
        found |= {p for p in live_pids() if marker in cmdline(p)}
    found.discard(os.getpid())
    return sorted(found)


def _pgid_members(pgid: int) -> list[int]:
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


def group_alive(pgid: int | None, marker: str | None = None) -> bool:
    return bool(group_members(pgid, marker))


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


def kill_group(pgid: int | None, grace_s: float = 5.0, marker: str | None = None) -> bool:
    """SIGTERM the group and every process naming ``marker``, SIGKILL what is left after
    ``grace_s``; True when none remain. Never signals this process's own group."""
    own = os.getpgrp()
    if pgid == own:
        pgid = None
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        members = group_members(pgid, marker)
        if not members:
            return True
        if pgid and pgid > 1:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in members:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_members(pgid, marker):
                return True
            time.sleep(0.05)
    return not group_members(pgid, marker)


def lock_held(path: Path) -> bool:
    """Does a live process hold an exclusive flock on ``path``? (A process's flock ends with it,
    so a held lock means a live owner: the queue supervisor, a cluster's supervisor.) Creates
    the file if it is missing; a file that cannot be opened counts as not held."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
