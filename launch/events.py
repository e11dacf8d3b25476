"""Progress events: rank 0 appends one JSON object per line to ``runs/<id>/events.jsonl``.

    {"time": 1700000000.1, "stage": "running", "step": 3, "total": 10, "message": "layer 3", "metrics": {}}

Stages used by the worker: ``loading`` (joining the group, loading the model), ``running``
(step/total of the kind's main loop), ``done`` or ``failed``. A kind may add its own stage names;
a kind with several stages first emits a ``plan`` event naming them in order (``metrics.stages``),
so the bar runs once from 0 to 100 % over the whole job instead of restarting at every stage.
Readers (the app, ``python -m launch tail``) tolerate a partial last line: the writer may be in
the middle of appending it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class EventLog:
    """Appends progress events. Only the writing rank (rank 0) gets ``enabled=True``; the
    others call the same methods, which then do nothing, so job kinds need no rank checks."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and path is not None

    def emit(self, stage: str, message: str = "", step: int | None = None, total: int | None = None,
             **metrics) -> dict:
        event = dict(time=time.time(), stage=stage, step=step, total=total, message=message,
                     metrics=_jsonable(metrics))
        if self.enabled:
            line = (json.dumps(event, allow_nan=False) + "\n").encode()
            # One write call per line on an O_APPEND file: a reader sees whole lines or a tail.
            with open(self.path, "a+b") as f:
                if f.tell() > 0:
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":  # a torn line from an earlier writer: keep ours whole
                        line = b"\n" + line
                f.write(line)
        return event

    def loading(self, message: str = "", **metrics) -> dict:
        return self.emit("loading", message, **metrics)

    def step(self, step: int, total: int, message: str = "", **metrics) -> dict:
        return self.emit("running", message, step=step, total=total, **metrics)

    def plan(self, stages: list[str]) -> dict:
        """The stages this job will report, in order (a stage that turns out to be unneeded, such as
        a calibration found in the cache, is skipped over: the bar jumps forward, never back)."""
        return self.emit("plan", " -> ".join(stages), stages=list(stages))

    def done(self, message: str = "", **metrics) -> dict:
        return self.emit("done", message, **metrics)

    def failed(self, message: str, **metrics) -> dict:
        return self.emit("failed", message, **metrics)


def _jsonable(value):
    """Metrics as strict JSON: non-finite floats become None, tensors/numpy become numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_events(path: Path) -> list[dict]:
    """All complete events of ``path`` (missing file: []). Lines that do not parse, such as a
    half-written last line, are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and isinstance(event.get("stage"), str):
            events.append(event)
    return events


def progress(events: list[dict]) -> tuple[float, str]:
    """(fraction done in [0, 1], a one-line message) for a progress bar. With a ``plan`` event the
    fraction covers the whole job: stage i of n at step/total is (i + step/total) / n, so it never
    goes back when a new stage starts; events of stages outside the plan (a sweep's per-point text
    evaluation) change the message, not the bar."""
    if not events:
        return 0.0, "waiting to start"
    last = events[-1]
    stage, message = last["stage"], last.get("message") or ""
    if stage == "done":
        return 1.0, f"done{': ' + message if message else ''}"
    plans = [e for e in events if e["stage"] == "plan" and isinstance((e.get("metrics") or {}).get("stages"), list)]
    stages = plans[-1]["metrics"]["stages"] if plans else None
    fraction, where = 0.0, ""
    for event in reversed(events):
        step, total = event.get("step"), event.get("total")
        if not (isinstance(step, (int, float)) and isinstance(total, (int, float)) and total > 0):
            continue
        part = min(1.0, max(0.0, step / total))
        if stages is None:
            fraction = part
            break
        if event["stage"] in stages:
            index = stages.index(event["stage"])
            fraction, where = (index + part) / len(stages), f" (stage {index + 1} of {len(stages)})"
            break
    counter = ""
    if isinstance(last.get("step"), int) and isinstance(last.get("total"), int):
        counter = f" {last['step']}/{last['total']}"
    if stage == "plan":
        return fraction, f"planned: {message}"
    return fraction, f"{stage}{counter}{': ' + message if message else ''}{where}"


def text_bar(fraction: float, message: str, width: int = 30) -> str:
    """``[#########.....................]  30%  running 3/10: layer 3`` for terminals."""
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%  {message}"
