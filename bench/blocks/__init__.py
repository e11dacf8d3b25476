"""The table renderers of ``bench.report``, one module per page (``readme`` for README.md, ``<page>``
for docs/<page>.md; a new page's module is found without registration), and what they share:
reading a result file, its source line, a Markdown table, the registry. Each renderer returns
one block's Markdown and is registered with ``@block("name")``; ``bench.report`` imports every
module of this package, nothing else needs to.

    PYTHONPATH=. python -c "from bench import report; print(report.TABLES['presets']())"
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench/blocks/__init__.py
RESULTS = Path("bench/results")


class ReportError(ValueError):
    """A table cannot be rendered from its files (missing file, missing row)."""


TABLES: dict[str, Callable[[], str]] = {}


def block(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register the decorated function as the renderer of ``<!-- table: name -->`` blocks."""
    def register(render_table: Callable[[], str]) -> Callable[[], str]:
        if name in TABLES:
            raise ValueError(f"table '{name}' is registered twice")
        TABLES[name] = render_table
        return render_table
    return register


# -- reading files -----------------------------------------------------------------------------
def result_path(name: str) -> Path:
    """Where the result file ``name`` lives (``bench/results/<name>`` under the checkout)."""
    return ROOT / RESULTS / name


def load(name: str) -> dict:
    path = result_path(name)
    if not path.exists():
        raise ReportError(f"{RESULTS / name}: no such result file")
    return json.loads(path.read_text())


def _load_text(values: list[float]) -> str:
    """The 1-minute load average of a ``getloadavg()``-style list."""
    return f"{values[0]:.1f}"


def source_line(name: str, data: dict, note: str = "") -> str:
    """'Source: `file`: `command` (date, load x at the start, y at the end)' from the file's meta."""
    meta = data.get("meta", data)
    parts = [f"`{RESULTS / name}`"]
    command = meta.get("command")
    if command:
        parts.append(f"`{command}`")
    when = [str(meta["date"])[:19].replace("T", " ")] if meta.get("date") else []
    load = meta.get("load") or {}  # bench._meta's load block: {"start": [...], "end": [...]}
    if "start" in load:
        when.append(f"load {_load_text(load['start'])}" + (f" -> {_load_text(load['end'])}" if "end" in load else ""))
    run = data.get("run") if isinstance(data.get("run"), (str, dict)) else None
    if run:
        when.append(f"run `{run['id'] if isinstance(run, dict) else run}`")
    text = "Source: " + ": ".join(parts) + (f" ({', '.join(when)})" if when else "")
    return text + (f"; {note}" if note else "")


def rows_by_scheme(data: dict, schemes: list[str]) -> list[dict]:
    by = {r["scheme"]: r for r in data["rows"]}
    missing = [s for s in schemes if s not in by]
    if missing:
        raise ReportError(f"no rows for {', '.join(missing)}")
    return [by[s] for s in schemes]


def table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; a ``|`` inside a cell (e.g. ``|x|``) is escaped so it does not split the cell."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(head), "|" + "---|" * len(head)] + [line(r) for r in rows])


def pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def ppl(v) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def ms(seconds: float) -> str:
    milli = 1e3 * seconds
    return f"{milli:.3g}" if milli < 100 else f"{milli:.0f}"
