"""The tables of docs/jobs.md: what the command line prints, from a stored run."""
from __future__ import annotations

from bench.blocks import block, load, source_line
from launch.client import format_results


@block("evaluate-tasks")
def evaluate_tasks() -> str:
    """The CLI's own evaluate table (``launch.client.format_results``) of a stored run, as printed."""
    name = "evaluate-sciq-openbookqa.json"
    data = load(name)
    return f"```text\n$ .venv/bin/{data['meta']['command']}\n{format_results(data)}\n```\n\n" + \
        source_line(name, data, f"wall time {data['meta']['wall_seconds']} s, queue wait included; the command "
                                    "writes `<out>/results.json`, kept here as one file")
