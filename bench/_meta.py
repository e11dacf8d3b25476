"""The "meta" block every bench/results/*.json written by the newer scripts carries: the exact
command, when it ran, the load average at its start and end (the machine is shared, so a time
without its load is not a number a reader can weigh) and the machine.

    meta = start_meta("bench.outliers", sys.argv[1:]); ...; finish_meta(meta)
"""
from __future__ import annotations

import os
import shlex
from datetime import datetime, timezone


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def start_meta(module: str, argv: list[str]) -> dict:
    """{"command", "date" (ISO, UTC), "load": {"start": [1, 5, 15 min]}, "machine"} at the start."""
    return dict(command=" ".join(["python", "-m", module, *map(shlex.quote, argv)]),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                load=dict(start=_load()), machine=f"{os.cpu_count()}-core CPU")


def finish_meta(meta: dict) -> dict:
    """``meta`` with the load average at the end added (``load.end``); returns it."""
    meta["load"]["end"] = _load()
    return meta
