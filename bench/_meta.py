"""The "meta" block every bench/results/*.json written by the newer scripts carries: the exact
command, when it ran, the load average at its start and end (the machine is shared, so a time
without its load is not a number a reader can weigh) and the machine. Commands and paths are
written relative to the repository root, a run folder as ``runs/<run id>/...``
(``lowbit.provenance``): a result file never holds an absolute path of the machine that made it.

    meta = start_meta("bench.outliers", sys.argv[1:]); ...; finish_meta(meta)
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from launch.layout import runs_root
from lowbit.provenance import command_line, portable_path


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def command(module: str, argv: list[str]) -> str:
    """``python -m <module> <argv>`` as a result file records it (absolute paths made portable)."""
    return command_line(module, argv, roots=dict(runs=runs_root()))


def path(value) -> str:
    """A path as a result file records it: relative to the repository root or ``runs/<id>/...``."""
    return portable_path(value, roots=dict(runs=runs_root()))


def start_meta(module: str, argv: list[str]) -> dict:
    """{"command", "date" (ISO, UTC), "load": {"start": [1, 5, 15 min]}, "machine"} at the start."""
    return dict(command=command(module, argv), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                load=dict(start=_load()), machine=f"{os.cpu_count()}-core CPU")


def finish_meta(meta: dict) -> dict:
    """``meta`` with the load average at the end added (``load.end``); returns it."""
    meta["load"]["end"] = _load()
    return meta
