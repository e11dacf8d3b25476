"""Kind ``sweep``: auto-tune candidate schemes over a bits/value range (``lowbit.method.sweep``),
resumable from an earlier sweep's ``points/``."""
from __future__ import annotations

import shutil

from launch.kinds import method
from launch.layout import RunPaths, calibration_folder, calibration_params, run_id_problem, runs_root
from lowbit.artifacts import CALIBRATE_DEFAULTS
from lowbit.calibration import Calibration
from lowbit.method.calibrate import load_or_calibrate
from lowbit.method.sweep import GRID_KEYS, SWEEP_DEFAULTS, run_sweep
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


def run(ctx) -> dict | None:
    """Worker entry of kind ``sweep``: load the model and calibration, resume, sweep."""
    spec, group = ctx.spec, ctx.group
    p = dict(SWEEP_DEFAULTS, **spec.params, schemes=list(spec.schemes))
    points_dir = ctx.paths.dir / "points"
    if group.rank == 0:
        points_dir.mkdir(parents=True, exist_ok=True)
        if p["resume_from"]:
            for f in (RunPaths(ctx.paths.root, p["resume_from"]).dir / "points").glob("*.json"):
                if not (points_dir / f.name).exists():
                    shutil.copy2(f, points_dir / f.name)
    group.barrier()
    ctx.events.loading(f"loading {spec.model} sharded {group.world_size} ways")
    tp_model = build_tp_model(spec.model, group)
    own = dict(seq_len=p["seq_len"], gamma=CALIBRATE_DEFAULTS["gamma"], batch_size=CALIBRATE_DEFAULTS["batch_size"])
    cp = calibration_params(spec, **own)
    folder = calibration_folder(spec, ctx.paths.run_id, ctx.paths.root, **own)
    calibration = load_or_calibrate(tp_model, group, cp, folder)
    held = token_chunks(tp_model.tokenizer, spec.eval_data, "eval", max(1, spec.eval_tokens // p["seq_len"]),
                        p["seq_len"])
    items = {t: load_task(t, spec.items_per_task, spec.seed) for t in spec.tasks} \
        if spec.tasks and spec.items_per_task else None
    return run_sweep(tp_model, group, p, calibration, held, items, points_dir, method.progress(ctx))
