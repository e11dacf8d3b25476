"""Job bodies for the method: calibrate and evaluate, as run on every torchrun rank.

``launch.worker`` calls these through its job kinds; ``python -m lowbit calibrate|evaluate``
builds the same parameters. ``check_*`` functions validate parameters *before* any process
starts (cheap: configs and scheme strings only) and report every problem at once.

Parameters (plain dicts, as in a job spec):
- calibrate: model, tp, source, chunks, seq_len, batch_size, gamma, out (artifact folder; default
  ``default_calibration_dir(...)`` under $LOWBIT_CACHE, reused when present).
- evaluate: model, tp, schemes (list), calibration (folder; default as above, made on the fly
  with the calibrate defaults when a scheme needs it and none exists), eval_source, eval_chunks,
  seq_len, batch_size, tasks (list), items, seed, layer_error (bool), layer_error_chunks, out.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lowbit.calibrate import Calibration, run_calibration
from lowbit.data import CLASSIC_TASKS, TASKS, TEXT_SOURCES, load_task, token_chunks
from lowbit.engine import build_tp_model
from lowbit.models import cache_root, load_config
from lowbit.scheme import SchemeError, parse_scheme_map
from lowbit.tp import text_config

CALIBRATE_DEFAULTS = dict(source="wikipedia", chunks=16, seq_len=256, batch_size=4, gamma=0.01)
EVALUATE_DEFAULTS = dict(schemes=["bf16", "int4-static-top1/64"], eval_source="wikipedia", eval_chunks=8,
                         seq_len=256, batch_size=4, tasks=list(CLASSIC_TASKS), items=20, seed=0, layer_error=True,
                         layer_error_chunks=2, fused_kernels=False)


def default_calibration_dir(model: str, tp: int, source: str, chunks: int, seq_len: int, gamma: float) -> Path:
    safe = model.replace("/", "--")
    return cache_root() / "calib" / f"{safe}-tp{tp}-{source}-{chunks}x{seq_len}-g{gamma:g}"


def _calibration_params(params: dict) -> dict:
    return {k: params.get(k, v) for k, v in CALIBRATE_DEFAULTS.items()}


def check_calibrate(params: dict) -> list[str]:
    p = _calibration_params(params)
    problems = []
    if p["source"] not in TEXT_SOURCES:
        problems.append(f"source: {p['source']!r} unknown; allowed: {', '.join(TEXT_SOURCES)}")
    for key in ("chunks", "seq_len", "batch_size"):
        if not isinstance(p[key], int) or p[key] < 1:
            problems.append(f"{key}: {p[key]!r} must be an integer >= 1")
    if not isinstance(p["gamma"], (int, float)) or not 0 < p["gamma"] <= 1:
        problems.append(f"gamma: {p['gamma']!r} must be in (0, 1]")
    return problems


def check_evaluate(params: dict) -> list[str]:
    """Every problem with an evaluate job's parameters (scheme strings, tasks, calibration)."""
    p = dict(EVALUATE_DEFAULTS, **params)
    problems = []
    hidden = text_config(load_config(p["model"])).hidden_size
    needs_calibration = False
    for text in p["schemes"]:
        try:
            smap = parse_scheme_map(text)
            smap.validate_for(hidden, p["tp"])
            needs_calibration |= any(s.needs_calibration for s in smap.schemes())
        except SchemeError as exc:
            problems.append(f"schemes: {text!r}: {exc}")
    for task in p["tasks"]:
        if task not in TASKS:
            problems.append(f"tasks: {task!r} unknown; allowed: {', '.join(TASKS)}")
    if p["eval_source"] not in TEXT_SOURCES:
        problems.append(f"eval_source: {p['eval_source']!r} unknown; allowed: {', '.join(TEXT_SOURCES)}")
    for key in ("eval_chunks", "seq_len", "batch_size", "items"):
        if not isinstance(p[key], int) or p[key] < (0 if key == "items" else 1):
            problems.append(f"{key}: {p[key]!r} must be an integer >= {0 if key == 'items' else 1}")
    if needs_calibration and p.get("calibration"):
        try:
            Calibration.load(p["calibration"]).check_matches(p["model"], p["tp"])
        except ValueError as exc:
            problems.append(str(exc))
    return problems + check_calibrate(params)


def calibrate(group, params: dict, progress=None) -> dict | None:
    """Collective: calibrate and save the artifact (rank 0). Reuses an existing artifact."""
    p = _calibration_params(params)
    out = Path(params.get("out") or default_calibration_dir(params["model"], group.world_size, p["source"],
                                                           p["chunks"], p["seq_len"], p["gamma"]))
    if (out / "calibration.json").exists() and not params.get("force"):
        cal = Calibration.load(out)
        cal.check_matches(params["model"], group.world_size)
        return dict(artifact=str(out), reused=True, meta=cal.meta) if group.rank == 0 else None
    tp_model = build_tp_model(params["model"], group)
    return _calibrate_model(tp_model, group, params, out, progress)


def _calibrate_model(tp_model, group, params: dict, out: Path, progress) -> dict | None:
    p = _calibration_params(params)
    chunks = token_chunks(tp_model.tokenizer, p["source"], "calib", p["chunks"], p["seq_len"])
    meta = dict(model=params["model"], source=p["source"], chunks=p["chunks"], seq_len=p["seq_len"],
                created=time.strftime("%Y-%m-%d %H:%M:%S"))
    cal = run_calibration(tp_model.model, group, list(chunks.split(p["batch_size"])), p["gamma"], meta, progress)
    if group.rank == 0:
        cal.save(out)
    group.barrier()
    return dict(artifact=str(out), reused=False, meta=cal.meta) if group.rank == 0 else None


def evaluate(group, params: dict, progress=None) -> dict | None:
    """Collective: text metrics, task accuracy and per-layer error for each scheme.
    Rank 0 writes ``results.json`` (one record per scheme) and ``layer_errors.json`` to ``out``."""
    from lowbit.evaluate import REFERENCE, evaluate_tasks, evaluate_text, layer_errors, summary_record
    p = dict(EVALUATE_DEFAULTS, **params)
    tp_model = build_tp_model(p["model"], group)
    schemes = list(p["schemes"])
    calibration = None
    if any(s.needs_calibration for text in schemes for s in parse_scheme_map(text).schemes()):
        cp = _calibration_params(p)
        folder = Path(p.get("calibration") or default_calibration_dir(p["model"], group.world_size, cp["source"],
                                                                     cp["chunks"], cp["seq_len"], cp["gamma"]))
        if not (folder / "calibration.json").exists():
            _calibrate_model(tp_model, group, p, folder, progress)
        calibration = Calibration.load(folder)
        calibration.check_matches(p["model"], group.world_size)
    tok = tp_model.tokenizer
    held = token_chunks(tok, p["eval_source"], "eval", p["eval_chunks"], p["seq_len"])
    codec = None
    if p["fused_kernels"]:  # the kernels inside the communicators: same numbers, less codec time
        from kernels import dispatch as codec
    start = time.perf_counter()
    text = evaluate_text(tp_model.model, group, held, schemes, calibration, p["batch_size"], progress, codec)
    tasks = None
    if p["items"] and p["tasks"]:
        items = {t: load_task(t, p["items"], p["seed"]) for t in p["tasks"]}
        tasks = evaluate_tasks(tp_model.model, group, tok, items, schemes, calibration, progress, codec=codec)
    layers = []
    if p["layer_error"]:
        layers = layer_errors(tp_model.model, group, list(held[:p["layer_error_chunks"]].split(1)), schemes,
                              calibration, progress=progress)
    if group.rank != 0:
        return None
    names = [REFERENCE, *schemes]
    records = [summary_record(s, text[s], tasks[s] if tasks else None, tasks[REFERENCE] if tasks else None)
               for s in names]
    result = dict(model=p["model"], tp=group.world_size, backend=getattr(group, "backend", "?"),
                  reference=REFERENCE, eval_source=p["eval_source"], eval_tokens=int(held.numel()),
                  items_per_task=p["items"], seed=p["seed"], calibration=calibration.meta if calibration else None,
                  codec="kernels.dispatch" if codec else "lowbit.payload",
                  seconds=round(time.perf_counter() - start, 1), records=records)
    out = p.get("out")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text(json.dumps(result, indent=2))
        (Path(out) / "layer_errors.json").write_text(json.dumps(layers, indent=1))
    result["layer_errors"] = layers
    return result
