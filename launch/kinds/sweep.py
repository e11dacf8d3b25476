"""Kind ``sweep``: auto-tune candidate schemes over a bits/value range (``lowbit.method.sweep``),
resumable from an earlier sweep's ``points/``.

On a scheduler (``launch.executors.slurm``) a sweep fans out: ``fan_out`` writes its pieces to
``points/pieces.json`` (one per fixed candidate, one per allocation budget), each piece runs as
one job (``ctx.task`` = its index; ``"prepare"``: calibration and sensitivity table first, when
missing), and ``gather`` reads the answer from the point files into the same result.json a
single-job sweep writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from launch.executors import PREPARE
from launch.kinds import method
from launch.layout import (
    RunPaths,
    calibration_folder,
    calibration_params,
    run_id_problem,
    runs_root,
    write_atomic,
)
from lowbit.artifacts import CALIBRATE_DEFAULTS
from lowbit.calibration import ARTIFACT_META, Calibration
from lowbit.method.calibrate import load_or_calibrate
from lowbit.method.sweep import (
    GRID_KEYS,
    SENSITIVITY_FILE,
    SWEEP_DEFAULTS,
    gather_sweep,
    point_key,
    run_sweep,
    sweep_pieces,
)
from lowbit.model.data import load_task, token_chunks
from lowbit.model.engine import build_tp_model
from lowbit.model.models import load_config
from lowbit.model.tp import text_config
from lowbit.scheme import SchemeError, parse_scheme, parse_scheme_map


def check_params(params: dict) -> list[tuple[str, str]]:
    """(field, problem) pairs for a sweep's ``params`` (cheap: no model)."""
    problems = []
    for key in sorted(set(params) - set(SWEEP_DEFAULTS)):
        problems.append((f"params.{key}", f"unknown sweep parameter; allowed: {', '.join(sorted(SWEEP_DEFAULTS))}"))
    p = dict(SWEEP_DEFAULTS, **params)

    def number(key, lo, hi, optional=False):
        v = p[key]
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            problems.append((f"params.{key}", f"must be a number in [{lo}, {hi}], got {v!r}"))
    number("budget_min", 0, 32)
    number("budget_max", 0, 32)
    number("kl_max", 0, 100, optional=True)
    number("kept_min", 0, 1000, optional=True)
    if not any(f[0] in ("params.budget_min", "params.budget_max") for f in problems) \
            and p["budget_min"] > p["budget_max"]:
        problems.append(("params.budget_min", f"must be <= budget_max ({p['budget_max']}), got {p['budget_min']}"))
    for key in ("seq_len", "batch_size", "sensitivity_chunks"):
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8192:
            problems.append((f"params.{key}", f"must be an integer in [1, 8192], got {v!r}"))
    for key in ("allocate", "report_at"):
        v = p[key]
        if not isinstance(v, list) or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 32
                                          for b in v):
            problems.append((f"params.{key}", f"must be a list of budgets in (0, 32] bits/value, got {v!r}"))
    if p["allocate_method"] not in ("dp", "greedy"):
        problems.append(("params.allocate_method", f"{p['allocate_method']!r} unknown; allowed: dp, greedy"))
    if not isinstance(p["include_paper"], bool):
        problems.append(("params.include_paper", f"must be true or false, got {p['include_paper']!r}"))
    cands = p["allocate_candidates"]
    if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
        problems.append(("params.allocate_candidates", f"must be a non-empty list of scheme strings, got {cands!r}"))
    else:
        for i, c in enumerate(cands):
            try:
                if ";" in c:
                    raise SchemeError("scheme", "a candidate is one scheme, not a map")
                parse_scheme(c)
            except SchemeError as exc:
                problems.append((f"params.allocate_candidates[{i}]", f"{c!r}: {exc}"))
    grid = p["grid"]
    if grid is not None:
        if not isinstance(grid, dict) or set(grid) - set(GRID_KEYS) \
                or not all(isinstance(v, list) and v for v in grid.values()):
            problems.append(("params.grid", f"must map some of {', '.join(GRID_KEYS)} to non-empty lists, got {grid!r}"))
    rf = p["resume_from"]
    if rf is not None:
        problem = run_id_problem(rf) if isinstance(rf, str) else "must be a run id string"
        if problem:
            problems.append(("params.resume_from", problem))
    return problems


def check_spec(spec: dict) -> list[tuple[str, str]]:
    """Candidates against the model's hidden size and the TP size; resume_from must exist."""
    problems = []
    hidden, tp = text_config(load_config(spec["model"])).hidden_size, spec["tp"]
    for i, text in enumerate(spec["schemes"]):
        try:
            parse_scheme_map(text).validate_for(hidden, tp)
        except SchemeError as exc:
            problems.append((f"schemes[{i}]", f"{text!r}: {exc}"))
    p = dict(SWEEP_DEFAULTS, **spec["params"])
    for i, text in enumerate(p["allocate_candidates"]):
        try:
            parse_scheme(text).validate_for(hidden, tp)
        except SchemeError as exc:
            problems.append((f"params.allocate_candidates[{i}]", f"{text!r}: {exc}"))
    if p["resume_from"] and not (RunPaths(runs_root(), p["resume_from"]).dir / "points").is_dir():
        problems.append(("params.resume_from", f"run {p['resume_from']!r} has no points/ folder to resume from"))
    if spec.get("calib_from"):
        try:
            Calibration.load(RunPaths(runs_root(), spec["calib_from"]).dir / "calibration").check_matches(
                spec["model"], tp)
        except Exception as exc:  # noqa: BLE001 - any unreadable artifact is this field's problem
            problems.append(("calib_from", f"run {spec['calib_from']!r} has no usable calibration: {exc}"))
    return problems


PIECES_FILE = "pieces.json"  # in points/: the pieces a scheduler runs, and the points there before them


def _params(spec) -> dict:
    return dict(SWEEP_DEFAULTS, **spec.params, schemes=list(spec.schemes))


def _own_calibration(p: dict) -> dict:
    """The sweep's calibration parameters (its seq_len, the method's gamma and batch size)."""
    return dict(seq_len=p["seq_len"], gamma=CALIBRATE_DEFAULTS["gamma"], batch_size=CALIBRATE_DEFAULTS["batch_size"])


def _copy_resumed(points_dir: Path, resume_from: str | None, root: Path) -> None:
    """An earlier sweep's points into this one's ``points/`` (those it does not have yet)."""
    points_dir.mkdir(parents=True, exist_ok=True)
    if resume_from:
        for f in (RunPaths(root, resume_from).dir / "points").glob("*.json"):
            if f.name != PIECES_FILE and not (points_dir / f.name).exists():
                shutil.copy2(f, points_dir / f.name)


def fan_out(spec, paths: RunPaths) -> dict:
    """The sweep as separate jobs: resumed points copied in, then the pieces whose point is not
    there yet written to ``points/pieces.json``. Returns {pieces: how many, prepare: whether a
    first job must make the calibration (missing) or the sensitivity table (allocations)}."""
    p = _params(spec)
    points_dir = paths.dir / "points"
    _copy_resumed(points_dir, p["resume_from"], paths.root)
    there = {f.stem for f in points_dir.glob("*.json")} - {Path(SENSITIVITY_FILE).stem, Path(PIECES_FILE).stem}
    hidden = text_config(load_config(spec.model)).hidden_size
    pieces = [t for t in sweep_pieces(p, hidden, spec.tp) if "allocate" in t or point_key(t["scheme"]) not in there]
    folder = calibration_folder(spec, paths.run_id, paths.root, **_own_calibration(p))
    write_atomic(points_dir / PIECES_FILE, json.dumps(dict(pieces=pieces, reused=sorted(there)), indent=1))
    return dict(pieces=len(pieces), prepare=bool(p["allocate"]) or not (folder / ARTIFACT_META).exists())


def gather(spec, paths: RunPaths) -> dict:
    """The sweep's result from its point files, once every piece has ended (no model is loaded)."""
    points_dir = paths.dir / "points"
    reused = set(json.loads((points_dir / PIECES_FILE).read_text())["reused"])
    hidden = text_config(load_config(spec.model)).hidden_size
    return gather_sweep(_params(spec), hidden, spec.tp, points_dir, reused)


def _piece(ctx) -> dict | None:
    """This job's piece: None (the whole sweep), the prepare step, or ``pieces.json``'s entry."""
    task = getattr(ctx, "task", None)
    if task is None:
        return None
    if task == PREPARE:
        return {"prepare": True}
    return json.loads((ctx.paths.dir / "points" / PIECES_FILE).read_text())["pieces"][int(task)]


def run(ctx) -> dict | None:
    """Worker entry of kind ``sweep``: load the model and calibration, resume, sweep (or one
    piece of it, ``ctx.task``)."""
    spec, group = ctx.spec, ctx.group
    p = _params(spec)
    points_dir = ctx.paths.dir / "points"
    piece = _piece(ctx)
    if group.rank == 0 and piece is None:
        _copy_resumed(points_dir, p["resume_from"], ctx.paths.root)
    group.barrier()
    ctx.events.plan([*(["sensitivity"] if p["allocate"] else []), "sweep"])
    ctx.events.loading(f"loading {spec.model} sharded {group.world_size} ways")
    tp_model = build_tp_model(spec.model, group)
    own = _own_calibration(p)
    cp = calibration_params(spec, **own)
    folder = calibration_folder(spec, ctx.paths.run_id, ctx.paths.root, **own)
    calibration = load_or_calibrate(tp_model, group, cp, folder)
    held = token_chunks(tp_model.tokenizer, spec.eval_data, "eval", max(1, spec.eval_tokens // p["seq_len"]),
                        p["seq_len"])
    items = {t: load_task(t, spec.items_per_task, spec.seed) for t in spec.tasks} \
        if spec.tasks and spec.items_per_task else None
    return run_sweep(tp_model, group, p, calibration, held, items, points_dir, method.progress(ctx), piece=piece)
