"""The "meta" block every bench/results/*.json carries, and the machine's load: the one owner of both.

The meta block holds the exact command, when it ran, the load average at its start and end and
the machine. Commands and paths are written relative to the repository root, a run folder as
``runs/<run id>/...`` (``lowbit.provenance``): a result file never holds an absolute path of the
machine that made it.

The machine is shared, so a time without its load is not a number a reader can weigh. Every bench
records the load the same way, as a *load block*::

    {"start": [1, 5, 15-minute load averages], "end": [...]}   # "end" left out when only read before

in the file's ``meta`` (``meta["load"]``; at the top level of a file without a meta block), or
beside the time it qualifies (a row's, a run's or a submit's ``load``). ``bench.report`` reads
only this layout.

    meta = start_meta("bench.outliers", sys.argv[1:]); ...; finish_meta(meta)
    load = start_load(); ...; row["load"] = end_load(load)
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from launch.layout import runs_root
from lowbit.provenance import command_line, portable_path


def load_now() -> list[float]:
    """The 1, 5 and 15-minute load averages now (``os.getloadavg``), to 2 decimals."""
    return [round(v, 2) for v in os.getloadavg()]


def start_load() -> dict:
    """A load block with the load now as its ``start``."""
    return dict(start=load_now())


def end_load(load: dict) -> dict:
    """``load`` (a ``start_load`` block) with the load now as its ``end``; returns it."""
    load["end"] = load_now()
    return load


def command(module: str, argv: list[str]) -> str:
    """``python -m <module> <argv>`` as a result file records it (absolute paths made portable)."""
    return command_line(module, argv, roots=dict(runs=runs_root()))


def path(value) -> str:
    """A path as a result file records it: relative to the repository root or ``runs/<id>/...``."""
    return portable_path(value, roots=dict(runs=runs_root()))


def start_meta(module: str, argv: list[str]) -> dict:
    """{"command", "date" (ISO, UTC), "load": {"start": [1, 5, 15 min]}, "machine"} at the start."""
    return dict(command=command(module, argv), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                load=start_load(), machine=f"{os.cpu_count()}-core CPU")


def finish_meta(meta: dict) -> dict:
    """``meta`` with the load average at the end added (``load.end``); returns it."""
    end_load(meta["load"])
    return meta
