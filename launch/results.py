"""The results store: run directories -> pandas DataFrames for the app's pages (no Streamlit).

    from launch import results
    results.runs_frame()                        # every run: status, kind, model, TP, times, progress
    data, problem = results.load_result(run_id) # result.json, or why it cannot be read
    results.scheme_frame(data)                  # evaluate: one row per scheme (bits, ppl, KL, top-1, % kept)
    results.layer_error_frame(data)             # evaluate: error per layer / module / mode / leg
    results.calibration_sources()               # every calibration artifact a run made or used
    results.bits_parts("int4-static-top1/64", hidden=576, tp=3)   # payload layout, stacked by part

Every reader tolerates missing, half-written or corrupt files: it returns an empty frame or a
problem text instead of raising, so a failed run never breaks a page. The functions here are
bookkeeping over files the jobs wrote (and over ``lowbit.payload``'s byte layout, the one owner
of the bit accounting); the model math happens only inside the jobs.
"""
from __future__ import annotations

import json
import math
import os
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from launch.events import progress, read_events
from launch.index import ACTIVE
from launch.layout import RunPaths, run_id_problem, runs_root
from launch.queue import _tail  # one tail reader for logs (the queue owns it)

RUN_COLUMNS = ["id", "kind", "model", "tp", "status", "created", "started", "finished", "duration_s",
               "fraction", "message", "error", "problem", "schemes"]
SCHEME_PARTS = ("payload", "outliers", "scales", "indices")
DEFAULT_TOKENS = 1024  # message length for layout-based accounting; bits/value barely depend on it


# -- runs ----------------------------------------------------------------------------------------
def _root(root) -> Path:
    return Path(root).resolve() if root else runs_root()


def read_json(path: Path) -> tuple[object | None, str | None]:
    """(parsed JSON, None) or (None, why it could not be read)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, f"{Path(path).name} is missing"
    except OSError as exc:
        return None, f"cannot read {Path(path).name}: {exc.strerror or exc}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"{Path(path).name} is not valid JSON ({exc.msg} at line {exc.lineno})"


def run_paths(run_id: str, root=None) -> RunPaths:
    return RunPaths(_root(root), run_id)


def load_spec(run_id: str, root=None) -> dict | None:
    if run_id_problem(run_id):
        return None
    data, _ = read_json(run_paths(run_id, root).spec)
    return data if isinstance(data, dict) else None


def load_result(run_id: str, root=None) -> tuple[dict | None, str | None]:
    """(result.json as a dict, None) or (None, what is wrong with it)."""
    problem = run_id_problem(run_id)
    if problem:
        return None, f"run id {run_id!r}: {problem}"
    data, problem = read_json(run_paths(run_id, root).result)
    if problem:
        return None, problem
    if not isinstance(data, dict):
        return None, f"result.json holds a {type(data).__name__}, not an object"
    return data, None


def run_progress(run_id: str, root=None) -> tuple[float, str, list[dict]]:
    """(fraction in [0, 1], one-line message, all events) from the run's events.jsonl."""
    try:
        events = read_events(run_paths(run_id, root).events)
    except Exception as exc:  # noqa: BLE001 - an unreadable events file is shown, not raised
        return 0.0, f"events unreadable: {exc}", []
    fraction, message = progress(events)
    return fraction, message, events


def runs_frame(root=None) -> pd.DataFrame:
    """Every run (newest first): index rows checked against their directories, with progress."""
    from launch.queue import list_runs
    try:
        rows = list_runs(_root(root))
    except Exception as exc:  # noqa: BLE001 - the page shows the problem instead of a traceback
        return pd.DataFrame([dict(id="(index)", kind="?", model="?", status="corrupt", problem=str(exc))],
                            columns=RUN_COLUMNS)
    out = []
    now = time.time()
    for row in rows:
        spec = {}
        try:
            spec = json.loads(row.get("spec_json") or "{}")
        except (TypeError, json.JSONDecodeError):
            pass
        if not spec and not run_id_problem(row["id"]):
            spec = load_spec(row["id"], root) or {}
        started, finished = row.get("started"), row.get("finished")
        duration = (finished or now) - started if started else None
        fraction, message = (1.0, "") if row["status"] == "done" else (None, "")
        if row["status"] in ACTIVE:
            fraction, message, _ = run_progress(row["id"], root)
        schemes = spec.get("schemes") if isinstance(spec.get("schemes"), list) else []
        out.append(dict(id=row["id"], kind=row.get("kind"), model=row.get("model"), tp=row.get("tp"),
                        status=row["status"], created=_when(row.get("created")), started=_when(started),
                        finished=_when(finished), duration_s=duration, fraction=fraction, message=message,
                        error=row.get("error"), problem=row.get("problem"),
                        schemes=", ".join(map(str, schemes))))
    frame = pd.DataFrame(out, columns=RUN_COLUMNS)
    return frame.sort_values("created", ascending=False, na_position="last").reset_index(drop=True)


def _when(t) -> pd.Timestamp | None:
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        return None
    return pd.Timestamp.fromtimestamp(t).floor("s")  # local time, as the user's clock shows it


def active_runs(root=None) -> pd.DataFrame:
    """Queued and running runs in submission order: one index query (cheap enough to poll)."""
    from launch.index import RunIndex
    try:
        rows = RunIndex(_root(root)).list(ACTIVE)
    except Exception:  # noqa: BLE001 - an unreadable index shows as no active run; Runs shows why
        rows = []
    return pd.DataFrame([dict(id=r["id"], kind=r["kind"], model=r["model"], tp=r["tp"], status=r["status"],
                              created=_when(r["created"])) for r in rows],
                        columns=["id", "kind", "model", "tp", "status", "created"])


def finished_ok(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Done runs of ``kind`` (status done or unindexed with a result), newest first."""
    ok = frame[(frame["kind"] == kind) & frame["status"].isin(["done", "unindexed"])]
    return ok.reset_index(drop=True)


def log_tail(run_id: str, root=None, lines: int = 40) -> dict[str, str]:
    """Last ``lines`` of the launcher log and of each rank's log (name -> text)."""
    paths = run_paths(run_id, root)
    out = {}
    for path in [paths.launcher_log, *paths.rank_logs()]:
        text = _tail(path, lines)
        if text:
            out[str(path.relative_to(paths.dir))] = text
    return out




def events_frame(events: list[dict]) -> pd.DataFrame:
    rows = [dict(time=_when(e.get("time")), stage=e.get("stage"), step=e.get("step"), total=e.get("total"),
                 message=e.get("message")) for e in events]
    return pd.DataFrame(rows, columns=["time", "stage", "step", "total", "message"])


# -- evaluate results ----------------------------------------------------------------------------
def scheme_fields(text: str) -> dict:
    """What a scheme string means, as columns: bits, granularity, select, k, algo, second leg."""
    from lowbit.scheme import SchemeError, parse_scheme_map
    try:
        smap = parse_scheme_map(text)
    except (SchemeError, TypeError, ValueError) as exc:
        return dict(family="?", bits=None, granularity=None, select=None, k=None, algo=None, second=None,
                    options=None, overrides=0, parse_error=str(exc))
    s = smap.default
    if s.is_exact:
        return dict(family="exact", bits=16 if s.wire_dtype == "bf16" else 32, granularity="-", select="none",
                    k="0", algo="all-reduce", second=None, options="-", overrides=len(smap.overrides),
                    parse_error=None)
    k = s.outliers.k_frac
    select, k_text = s.outliers.select, f"{k.numerator}/{k.denominator}" if k else "0"
    if s.sparse:
        select, k_text = "sparse", f"{s.sparse}/token"
    elif s.threshold is not None:
        c = s.threshold.k_frac
        select, k_text = "threshold", f"{c.numerator}/{c.denominator}"
    options = [o for o, on in (("perm", s.permute), (f"rot{s.rotation}", s.rotation is not None),
                               ("sr", s.stochastic)) if on]
    return dict(family=f"{s.quant.code}{s.quant.bits}", bits=s.quant.bits,
                granularity=str(s.quant).split("-", 1)[1], select=select, k=k_text, algo=s.algo,
                second=str(s.second) if s.second else None, options=" ".join(options) or "-",
                overrides=len(smap.overrides), parse_error=None)


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _dict_records(result: dict | None) -> list[dict]:
    """An evaluate result's ``records``, or a sweep result's ``points`` after a reference record
    rebuilt from what every point carries (``reference_ppl``, ``reference_tasks``), so sweeps and
    evaluate runs read the same way."""
    if not isinstance(result, dict):
        return []
    records = result.get("records")
    if not isinstance(records, list) and isinstance(result.get("points"), list):
        points = [r for r in result["points"] if isinstance(r, dict)]
        if not points:
            return []
        first = points[0]
        reference = dict(scheme=result.get("reference", "fp32"), bits_per_value=32.0, ppl=first.get("reference_ppl"),
                         kl=0.0, top1_agreement=1.0)
        if isinstance(first.get("reference_tasks"), dict):
            reference["tasks"] = first["reference_tasks"]
            reference["kept_pct"] = 100.0
        return [reference, *points]
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def _records(result: dict | None) -> list[dict]:
    """The scheme records of an evaluate result (records without a scheme name are skipped)."""
    return [r for r in _dict_records(result) if isinstance(r.get("scheme"), str)]


def _task_rows(record: dict) -> list[dict]:
    tasks = record.get("tasks")
    if not isinstance(tasks, dict):
        return []
    rows = []
    for task, t in tasks.items():
        if not isinstance(t, dict):
            continue
        primary = t.get("primary") if t.get("primary") in ("acc", "acc_norm") else "acc"
        rows.append(dict(scheme=record["scheme"], task=task, metric=primary, value=_num(t.get(primary)),
                         se=_num(t.get(f"{primary}_se")), acc=_num(t.get("acc")), acc_se=_num(t.get("acc_se")),
                         acc_norm=_num(t.get("acc_norm")), acc_norm_se=_num(t.get("acc_norm_se")),
                         delta=_num(t.get("delta")), delta_se=_num(t.get("delta_se")), n=_num(t.get("n"))))
    return rows


def task_frame(result: dict | None) -> pd.DataFrame:
    """One row per (scheme, task): the primary metric, its standard error, and both accuracies."""
    rows = [row for r in _records(result) for row in _task_rows(r)]
    return pd.DataFrame(rows, columns=["scheme", "task", "metric", "value", "se", "acc", "acc_se", "acc_norm",
                                       "acc_norm_se", "delta", "delta_se", "n"])


def _kept_se(scheme_tasks: pd.DataFrame, reference_tasks: pd.DataFrame) -> float | None:
    """Standard error of the paper's "% kept" (mean over tasks of scheme / reference score).
    Each task's ratio has the error of the paired difference (delta_se) over the reference score;
    without paired numbers, the scheme's own standard error is used."""
    ref = reference_tasks.set_index("task")["value"]
    terms = []
    for _, row in scheme_tasks.iterrows():
        r = ref.get(row["task"])
        if r is None or not r or pd.isna(r):
            continue
        se = row["delta_se"] if row["delta_se"] is not None and not pd.isna(row["delta_se"]) else row["se"]
        if se is None or pd.isna(se):
            continue
        terms.append((se / r) ** 2)
    return 100.0 * math.sqrt(sum(terms)) / len(terms) if terms else None


SCHEME_COLUMNS = ["scheme", "reference", "bits_per_value", "leg1_bits", "leg2_bits", "ppl", "kl", "top1_agreement",
                  "kept_pct", "kept_se", "avg_primary", "avg_primary_se", "comm_seconds", "comm_ms_per_ktok",
                  "text_tokens", "clamped", "nonfinite", "thr_overflow",
                  "family", "bits", "granularity", "select", "k", "algo", "second", "options", "overrides"]


RECORD_NUMBERS = ("bits_per_value", "leg1_bits", "leg2_bits", "ppl", "kl", "top1_agreement", "kept_pct",
                  "avg_primary", "comm_seconds", "clamped", "nonfinite", "thr_overflow", "text_tokens")
# every numeric column: the record's numbers and those scheme_frame derives from them
SCHEME_NUMERIC = [*RECORD_NUMBERS, "kept_se", "avg_primary_se", "comm_ms_per_ktok"]


def scheme_frame(result: dict | None) -> pd.DataFrame:
    """One row per scheme of an evaluate result (the reference first), with its parsed fields."""
    records = _records(result)
    reference = (result or {}).get("reference", "fp32")
    tasks = task_frame(result)
    ref_tasks = tasks[tasks["scheme"] == reference]
    rows = []
    for r in records:
        mine = tasks[tasks["scheme"] == r["scheme"]]
        ses = [s for s in mine["se"] if s is not None and not pd.isna(s)]
        row = dict(scheme=r["scheme"], reference=r["scheme"] == reference,
                   **{k: _num(r.get(k)) for k in RECORD_NUMBERS},
                   kept_se=_kept_se(mine, ref_tasks) if len(mine) and len(ref_tasks) else None,
                   avg_primary_se=math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else None)
        tokens, seconds = row["text_tokens"], row["comm_seconds"]
        row["comm_ms_per_ktok"] = seconds / tokens * 1e6 if tokens and seconds is not None else None
        fields = scheme_fields(r["scheme"])
        row.update({k: fields[k] for k in ("family", "bits", "granularity", "select", "k", "algo", "second",
                                           "options", "overrides")})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=SCHEME_COLUMNS)
    # A column that is None in every row (no tasks in the run: kept_pct, kept_se) must still be numeric,
    # or pages calling .round() on it fail.
    for col in SCHEME_NUMERIC:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame


LAYER_ERROR_COLUMNS = ["scheme", "mode", "layer", "module", "leg", "rel_error", "snr_db", "max_abs_error"]


def layer_error_frame(result: dict | None) -> pd.DataFrame:
    """Per-site error rows of an evaluate result (``layer_errors``), numbers coerced."""
    rows = (result or {}).get("layer_errors")
    if not isinstance(rows, list):
        return pd.DataFrame(columns=LAYER_ERROR_COLUMNS)
    frame = pd.DataFrame([r for r in rows if isinstance(r, dict)], columns=LAYER_ERROR_COLUMNS)
    for col in ("layer", "rel_error", "snr_db", "max_abs_error"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame.dropna(subset=["scheme", "layer"]).astype({"layer": int})


def evaluate_runs(frame: pd.DataFrame, root=None, sweeps: bool = False) -> pd.DataFrame:
    """Done evaluate runs whose result.json holds scheme records, newest first, with a label;
    with ``sweeps`` also done auto-tune sweeps (their points read as records)."""
    ok = finished_ok(frame, "evaluate")
    if sweeps:
        ok = pd.concat([ok, finished_ok(frame, "sweep")], ignore_index=True)
        ok = ok.sort_values("created", ascending=False, kind="stable").reset_index(drop=True)
    rows = []
    for _, run in ok.iterrows():
        data, problem = load_result(run["id"], root)
        records = _records(data)
        if problem or not records:
            continue
        rows.append(dict(id=run["id"], model=data.get("model", run["model"]), tp=data.get("tp", run["tp"]),
                         created=run["created"], schemes=len(records),
                         has_layers=bool(data.get("layer_errors")),
                         label=f"{run['id']} · {data.get('model', run['model'])} TP {data.get('tp', run['tp'])} · "
                               f"{len(records)} schemes" + (" (auto-tune)" if run["kind"] == "sweep" else "")))
    return pd.DataFrame(rows, columns=["id", "model", "tp", "created", "schemes", "has_layers", "label"])


def sweep_summary(result: dict | None) -> pd.DataFrame:
    """A sweep's answer per reported budget: the lowest-KL scheme at <= that many bits, with its
    bits, KL and % kept (empty for an evaluate result)."""
    best_at = (result or {}).get("best_at")
    columns = ["budget", "scheme", "bits_per_value", "kl", "kept_pct", "cheapest_meeting_floor"]
    if not isinstance(best_at, dict):
        return pd.DataFrame(columns=columns)
    points = {r["scheme"]: r for r in _records(result)}
    best = (result or {}).get("best")
    rows = []
    for budget, scheme in best_at.items():
        r = points.get(scheme, {}) if isinstance(scheme, str) else {}
        rows.append(dict(budget=str(budget), scheme=scheme, bits_per_value=_num(r.get("bits_per_value")),
                         kl=_num(r.get("kl")), kept_pct=_num(r.get("kept_pct")),
                         cheapest_meeting_floor=scheme is not None and scheme == best))
    return pd.DataFrame(rows, columns=columns)


def sweep_grid_candidates(grid: dict, hidden: int, tp: int, budget_min: float, budget_max: float) -> list[str]:
    """The grid schemes a sweep job would evaluate in the budget range (bit bookkeeping only)."""
    from lowbit.sweep import grid_schemes
    return grid_schemes(grid, hidden, tp, budget_min, budget_max)


def pareto_front(cost: pd.Series, quality: pd.Series) -> pd.Series:
    """True for points no other point beats: lower-or-equal cost and higher-or-equal quality,
    strictly better in one."""
    c, q = cost.to_numpy(dtype=float), quality.to_numpy(dtype=float)
    ok = np.isfinite(c) & np.isfinite(q)
    front = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (c <= c[i]) & (q >= q[i]) & ((c < c[i]) | (q > q[i]))
        front[i] = not others.any()
    return pd.Series(front, index=cost.index)


def compare_specs(a: dict | None, b: dict | None) -> pd.DataFrame:
    """Every spec field of two runs side by side; ``same`` False where they differ."""
    a, b = a or {}, b or {}
    rows = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        rows.append(dict(field=key, A=json.dumps(va, sort_keys=True), B=json.dumps(vb, sort_keys=True),
                         same=va == vb))
    return pd.DataFrame(rows, columns=["field", "A", "B", "same"])


def compare_results(a: dict | None, b: dict | None) -> pd.DataFrame:
    """Two results side by side: evaluate runs by scheme, anything else as flattened fields."""
    if _records(a) or _records(b):
        cols = ["scheme", "bits_per_value", "ppl", "kl", "top1_agreement", "kept_pct", "comm_seconds"]
        fa, fb = scheme_frame(a)[cols], scheme_frame(b)[cols]
        return fa.merge(fb, on="scheme", how="outer", suffixes=(" (A)", " (B)"))
    flat_a, flat_b = _flatten(a or {}), _flatten(b or {})
    rows = [dict(field=k, A=flat_a.get(k), B=flat_b.get(k)) for k in sorted(set(flat_a) | set(flat_b))]
    return pd.DataFrame(rows, columns=["field", "A", "B"])


def _flatten(d, prefix="") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            text = json.dumps(v, default=str)
            out[key] = text if len(text) <= 200 else text[:197] + "..."
    return out


# -- calibrations --------------------------------------------------------------------------------
def calibration_folder(run_id: str, spec: dict | None, root=None) -> Path | None:
    """Where the calibration a run made (calibrate) or used (evaluate) lives.

    A calibrate run keeps it in ``runs/<id>/calibration``; an evaluate run used the one of its
    ``calib_from`` run, or the shared cache folder that ``lowbit.jobs`` derives from its spec."""
    if not isinstance(spec, dict):
        return None
    root = _root(root)
    kind = spec.get("kind")
    if kind == "calibrate":
        return RunPaths(root, run_id).dir / "calibration"
    if kind != "evaluate":
        return None
    if spec.get("calib_from") and not run_id_problem(spec["calib_from"]):
        return RunPaths(root, spec["calib_from"]).dir / "calibration"
    try:
        from launch.kinds import _calibrate_params
        from lowbit.jobs import CALIBRATE_DEFAULTS, default_calibration_dir
        params = spec.get("params") if isinstance(spec.get("params"), dict) else {}
        view = SimpleNamespace(model=spec["model"], calib_data=spec.get("calib_data", CALIBRATE_DEFAULTS["source"]),
                               calib_tokens=int(spec.get("calib_tokens", 4096)), params=params)
        p = _calibrate_params(view)
        return default_calibration_dir(p["model"], int(spec["tp"]), p["source"], p["chunks"], p["seq_len"],
                                       p["gamma"])
    except Exception:  # noqa: BLE001 - a spec that no longer maps to a folder has no calibration to show
        return None


CALIBRATION_COLUMNS = ["folder", "run_id", "kind", "model", "tp", "source", "batches", "tokens", "hidden", "layers",
                       "gamma", "created", "label"]


def calibration_sources(frame: pd.DataFrame, root=None) -> pd.DataFrame:
    """Every calibration artifact that a done calibrate/evaluate run made or used (one row per
    folder, the newest run naming it), read from its calibration.json only."""
    rows, seen = [], set()
    for _, run in frame.iterrows():
        if run["kind"] not in ("calibrate", "evaluate") or run["status"] not in ("done", "unindexed"):
            continue
        folder = calibration_folder(run["id"], load_spec(run["id"], root), root)
        if folder is None or str(folder) in seen:
            continue
        meta, problem = read_json(folder / "calibration.json")
        if problem or not isinstance(meta, dict) or not (folder / "calibration.safetensors").exists():
            continue
        seen.add(str(folder))
        rows.append(dict(folder=str(folder), run_id=run["id"], kind=run["kind"], model=meta.get("model"),
                         tp=meta.get("tp"), source=meta.get("source"), batches=meta.get("batches"),
                         tokens=meta.get("tokens"), hidden=meta.get("hidden"), layers=meta.get("layers"),
                         gamma=meta.get("gamma"), created=meta.get("created"),
                         label=f"{meta.get('model')} TP {meta.get('tp')} · {meta.get('source')} · "
                               f"{meta.get('tokens')} tokens · {run['kind']} {run['id']}"))
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def load_calibration(folder: str | Path):
    """The artifact in ``folder`` (``lowbit.calibrate.Calibration``); raises CalibrationError."""
    from lowbit.calibrate import Calibration
    return Calibration.load(folder)


def rotation_view(calibration, layer: int, module: str, rank: int, block: int,
                  quant: str = "int4-token") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One stored partial (the calibration's ``sample``) before and after the block rotation.

    Returns ``values`` (one row per value: stage ``original`` / ``rotated``, token, feature,
    value) and ``tokens`` (one row per token: absmax and relative quantization error with
    ``quant``, a dynamic scheme such as ``int4-token`` or ``int4-group64``, without and with the
    rotation; see ``lowbit.rotation.rotation_effect``). Raises CalibrationError / ValueError with
    the field named."""
    from lowbit.comm import Site
    from lowbit.rotation import check_block, rotation_effect
    from lowbit.scheme import parse_scheme
    x = calibration.site_sample(Site(layer, module), rank)
    check_block(x.shape[-1], block)
    scheme = parse_scheme(quant)
    if scheme.is_exact or scheme.rotation is not None:
        raise ValueError(f"quant: {quant!r} not allowed; allowed: a dynamic scheme without rotation, e.g. int4-token")
    eff = rotation_effect(x, block, scheme.quant)
    tokens, hidden = x.shape
    grid = dict(token=np.repeat(np.arange(tokens), hidden), feature=np.tile(np.arange(hidden), tokens))
    values = pd.concat([pd.DataFrame(dict(stage="original", value=x.reshape(-1).numpy(), **grid)),
                        pd.DataFrame(dict(stage=f"rotated (R={block})", value=eff["rotated"].reshape(-1).numpy(),
                                          **grid))], ignore_index=True)
    per_token = pd.DataFrame(dict(token=np.arange(tokens), **{k: eff[k].numpy() for k in (
        "absmax", "absmax_rotated", "rms", "error", "error_rotated", "rest_error", "rest_error_rotated")}))
    return values, per_token


def spikiest_sample(calibration) -> tuple[int, str, int]:
    """(layer, module, rank) whose stored sample has the largest max|x| / RMS: the partial where
    rotation has the most to show. Raises CalibrationError when the artifact has no samples."""
    from lowbit.comm import ROW_PARALLEL_MODULES, Site
    calibration.site_sample(Site(0, ROW_PARALLEL_MODULES[0]), 0)  # the no-sample error, named
    x = calibration.sample.float()  # [L, M, tp, S, H]
    rms = x.pow(2).mean(dim=(-1, -2)).sqrt()
    crest = x.abs().amax(dim=(-1, -2)) / _safe_divisor(rms)
    layer, module, rank = np.unravel_index(int(crest.argmax()), tuple(crest.shape))
    return int(layer), ROW_PARALLEL_MODULES[int(module)], int(rank)


def _safe_divisor(t):
    """``t`` with zeros replaced by ones (a safe divisor)."""
    return t.where(t > 0, t.new_ones(()))


def outlier_count(hidden: int, k_frac: Fraction) -> int:
    """How many features a top-k / random selection keeps (the scheme grammar's rule)."""
    from lowbit.scheme import OutlierSpec
    return OutlierSpec("topk", Fraction(k_frac)).count(hidden)


def selected_features(cal, layer: int, module: str, k_frac: Fraction) -> list[int]:
    """The features the paper keeps in BF16 at this site (top-k of the range summed over ranks)."""
    from lowbit.calibrate import select_outliers
    from lowbit.comm import Site
    from lowbit.scheme import OutlierSpec
    idx = select_outliers(cal, Site(layer, module), OutlierSpec("topk", Fraction(k_frac)), cal.hidden)
    return [int(i) for i in idx]


def feature_ranges(cal, layer: int, module: str) -> pd.DataFrame:
    """EMA range 2*max(|min|,|max|) of every feature of each rank's partial: feature, rank, range."""
    ranges = cal.ranges()[layer, cal.module_index(module)].float().numpy()  # [tp, H]
    tp, hidden = ranges.shape
    return pd.DataFrame(dict(feature=np.tile(np.arange(hidden), tp), rank=np.repeat(np.arange(tp), hidden),
                             range=ranges.reshape(-1)))


def range_heatmap(cal, module: str) -> np.ndarray:
    """Range summed over ranks, [layers, features]: the selection score of every feature."""
    return cal.ranges()[:, cal.module_index(module)].sum(1).float().numpy()


def random_jaccard(hidden: int, k: int) -> float:
    """Expected Jaccard overlap of two random k-subsets of ``hidden`` features (the no-structure line)."""
    if k <= 0 or hidden <= 0:
        return 0.0
    inter = k * k / hidden
    return inter / (2 * k - inter)


def overlap_between_batches(cal, module: str, k: int) -> pd.DataFrame:
    """Per layer and batch: Jaccard of that batch's top-k (range summed over ranks) with the
    top-k of the final EMA, i.e. the selected set."""
    from lowbit.calibrate import jaccard, topk_sets
    m = cal.module_index(module)
    batch = cal.batch_ranges()[:, :, m].sum(2)  # [B, L, H]
    ema = topk_sets(cal.ranges()[:, m].sum(1), k)  # [L, k]
    sets = topk_sets(batch, k)  # [B, L, k]
    rows = [dict(layer=layer, batch=b, jaccard=jaccard(sets[b, layer], ema[layer]))
            for b in range(sets.shape[0]) for layer in range(sets.shape[1])]
    return pd.DataFrame(rows, columns=["layer", "batch", "jaccard"])


def overlap_between_ranks(cal, layer: int, module: str, k: int) -> pd.DataFrame:
    """rank x rank Jaccard of each rank's own top-k at one site."""
    from lowbit.calibrate import jaccard, topk_sets
    sets = topk_sets(cal.ranges()[layer, cal.module_index(module)], k)  # [tp, k]
    tp = sets.shape[0]
    data = [[jaccard(sets[i], sets[j]) for j in range(tp)] for i in range(tp)]
    return pd.DataFrame(data, index=[f"rank {i}" for i in range(tp)], columns=[f"rank {j}" for j in range(tp)])


def overlap_between_layers(cal, module: str, k: int) -> pd.DataFrame:
    """layer x layer Jaccard of the selected top-k sets (range summed over ranks)."""
    from lowbit.calibrate import jaccard, topk_sets
    sets = topk_sets(cal.ranges()[:, cal.module_index(module)].sum(1), k)  # [L, k]
    n = sets.shape[0]
    data = [[jaccard(sets[i], sets[j]) for j in range(n)] for i in range(n)]
    return pd.DataFrame(data, index=list(range(n)), columns=list(range(n)))


def overlap_between_sources(cal_a, cal_b, k: int) -> pd.DataFrame:
    """Per layer and module: Jaccard of the selected sets of two calibrations of the same model
    and TP size (e.g. Wikipedia-style text vs Shakespeare)."""
    from lowbit.calibrate import jaccard, topk_sets
    if cal_a.ranges().shape != cal_b.ranges().shape:
        raise ValueError(f"calibrations differ in shape {tuple(cal_a.ranges().shape)} vs "
                         f"{tuple(cal_b.ranges().shape)}: pick two of the same model and TP size")
    rows = []
    for m, module in enumerate(cal_a.meta.get("modules") or ("o_proj", "down_proj")):
        a = topk_sets(cal_a.ranges()[:, m].sum(1), k)
        b = topk_sets(cal_b.ranges()[:, m].sum(1), k)
        rows += [dict(layer=layer, module=module, jaccard=jaccard(a[layer], b[layer])) for layer in range(a.shape[0])]
    return pd.DataFrame(rows, columns=["layer", "module", "jaccard"])


def ema_trace_frame(cal, layer: int, module: str, feature: int) -> pd.DataFrame:
    """After each calibration batch: that batch's range of ``feature`` (summed over ranks) and
    the EMA the static scale comes from."""
    from lowbit.calibrate import ema_trace
    from lowbit.comm import Site
    ema = ema_trace(cal, Site(layer, module), feature).float().numpy()
    batch = cal.batch_ranges()[:, layer, cal.module_index(module), :, feature].sum(-1).float().numpy()
    return pd.DataFrame(dict(batch=np.arange(len(ema)), batch_range=batch, ema_range=ema))


# -- bits accounting (lowbit.payload owns the layout) --------------------------------------------
def site_bits(scheme, hidden: int, tp: int, tokens: int = DEFAULT_TOKENS) -> list[dict]:
    """Bits per value of one site's message for a parsed ``Scheme``: rows (leg, part, bits), as
    ``lowbit.collectives.scheme_bits_breakdown`` counts them (the one owner of that accounting:
    gather's one payload, two-shot's tp first-leg chunks and its padded second-leg chunk, rotated
    messages, sparse pairs and threshold index lists). ``tokens`` matters only for ``thr``,
    whose index list is sent once per message."""
    from lowbit.collectives import scheme_bits_breakdown
    legs = scheme_bits_breakdown(scheme, hidden, tp, tokens)
    return [dict(leg=leg, part=p, bits=float(parts.get(p, 0.0)))
            for leg, parts in legs.items() if parts is not None for p in SCHEME_PARTS]


def bits_parts(scheme_text: str, hidden: int, tp: int, tokens: int = DEFAULT_TOKENS) -> pd.DataFrame:
    """The default scheme's bits per value by leg and part (payload, outliers, scales, indices)."""
    from lowbit.scheme import parse_scheme_map
    smap = parse_scheme_map(scheme_text)
    smap.validate_for(hidden, tp)
    rows = [dict(scheme=scheme_text, **r) for r in site_bits(smap.default, hidden, tp, tokens)]
    return pd.DataFrame(rows, columns=["scheme", "leg", "part", "bits"])


def bits_per_site(scheme_text: str, hidden: int, layers: int, tp: int, tokens: int = DEFAULT_TOKENS) -> pd.DataFrame:
    """Bits per value at every (layer, module) of a scheme map (per-layer overrides differ)."""
    from lowbit.comm import ROW_PARALLEL_MODULES
    from lowbit.scheme import parse_scheme_map
    smap = parse_scheme_map(scheme_text)
    smap.validate_for(hidden, tp)
    cache: dict[str, list[dict]] = {}
    rows = []
    for layer in range(layers):
        for module in ROW_PARALLEL_MODULES:
            s = smap.for_site(layer, module)
            if str(s) not in cache:
                cache[str(s)] = site_bits(s, hidden, tp, tokens)
            rows += [dict(layer=layer, module=module, scheme=str(s), **r) for r in cache[str(s)]]
    return pd.DataFrame(rows, columns=["layer", "module", "scheme", "leg", "part", "bits"])


def traffic_per_token(scheme_text: str, hidden: int, layers: int, tp: int, tokens: int = DEFAULT_TOKENS) -> dict:
    """Bytes per token: each rank's message (its partial, encoded) summed over the 2 sites of a
    layer and over all layers, and the bytes each rank sends with the scheme's collective.

    exact: ring all-reduce, each rank sends 2 (tp-1)/tp of the message; gather: all-gather,
    each rank's payload reaches tp-1 peers ((tp-1) x payload, as in a ring all-gather); two-shot:
    all-to-all of leg 1 (the (tp-1)/tp of it bound for peers) plus an all-gather of its reduced
    chunk to tp-1 peers."""
    from lowbit.scheme import parse_scheme_map
    sites = bits_per_site(scheme_text, hidden, layers, tp, tokens)
    smap = parse_scheme_map(scheme_text)
    message = sent = 0.0
    for (layer, module), g in sites.groupby(["layer", "module"], sort=False):
        scheme = smap.for_site(layer, module)
        leg1 = g.loc[g["leg"] == "leg 1", "bits"].sum() * hidden / 8
        leg2 = g.loc[g["leg"] == "leg 2", "bits"].sum() * hidden / 8
        message += leg1 + leg2
        if tp == 1:
            continue
        if scheme.is_exact:
            sent += 2 * (tp - 1) / tp * leg1
        elif scheme.algo == "gather":
            sent += (tp - 1) * leg1
        else:
            sent += (tp - 1) / tp * leg1 + (tp - 1) * leg2
    bits = sites.groupby(["layer", "module"])["bits"].sum().mean() if len(sites) else 0.0
    return dict(scheme=scheme_text, bits_per_value=float(bits), message_bytes_per_layer=message / max(1, layers),
                message_bytes=message, sent_bytes_per_layer=sent / max(1, layers), sent_bytes=sent)


# -- models and machine --------------------------------------------------------------------------
def model_shape(name: str) -> dict:
    """hidden size, layers, heads, KV heads and vocabulary of a model, from its config only."""
    from lowbit.models import load_config
    from lowbit.tp import text_config
    cfg = text_config(load_config(name))
    return dict(model=name, hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
                heads=int(cfg.num_attention_heads),
                kv_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
                intermediate=int(getattr(cfg, "intermediate_size", 0) or 0), vocab=int(cfg.vocab_size))


def valid_tp_sizes(name: str, largest: int = 8) -> list[int]:
    """TP sizes from 1 to ``largest`` that can shard ``name`` (``lowbit.tp.check_tp_size``)."""
    from lowbit.models import load_config
    from lowbit.tp import TPSizeError, check_tp_size
    cfg = load_config(name)
    sizes = []
    for tp in range(1, largest + 1):
        try:
            check_tp_size(cfg, tp, name)
            sizes.append(tp)
        except TPSizeError:
            pass
    return sizes


def machine_info() -> dict:
    """CPU cores, GPUs and the backend ``auto`` picks here."""
    from launch.spec import available_gpus
    gpus = available_gpus()
    names = []
    if gpus:
        try:
            import torch
            names = [torch.cuda.get_device_name(i) for i in range(gpus)]
        except Exception:  # noqa: BLE001 - names are decoration
            names = []
    return dict(cpu_cores=os.cpu_count() or 1, gpus=gpus, gpu_names=names, backend="nccl" if gpus else "gloo")


# -- collective benchmark ------------------------------------------------------------------------
COLLECTIVE_COLUMNS = ["run_id", "tp", "tokens", "hidden", "method", "scheme", "median_ms", "speedup_vs_bf16",
                      "bytes_per_rank", "bits_per_value", "link", "message_mib"]


def collective_frame(frame: pd.DataFrame, root=None) -> pd.DataFrame:
    """Records of every done collective-bench run (one row per measured configuration)."""
    rows = []
    for _, run in finished_ok(frame, "collective-bench").iterrows():
        data, problem = load_result(run["id"], root)
        if problem:
            continue
        for r in _dict_records(data):
            row = dict(run_id=run["id"], **{k: r.get(k) for k in COLLECTIVE_COLUMNS[1:-1]})
            rows.append(row)
    out = pd.DataFrame(rows, columns=COLLECTIVE_COLUMNS)
    for col in ("tp", "tokens", "hidden", "median_ms", "speedup_vs_bf16", "bytes_per_rank", "bits_per_value"):
        out[col] = pd.to_numeric(out[col], errors="coerce")
    out["message_mib"] = out["tokens"] * out["hidden"] * 2 / 2**20
    return out.dropna(subset=["tp", "median_ms"])


# -- playground, two-shot, where it pays (lowbit.playground does the math) -----------------------
def playground_view(calibration, layer: int, module: str, rank: int, scheme: str, seed: int = 0) -> dict:
    """One scheme on one stored partial (``lowbit.playground.analyze``), as frames for the page:
    ``summary`` (one row: SQNR and relative error of the rank's message and of the sum over ranks,
    clamped count, bits), ``histogram`` (bin, count, kind in-range / clamped), ``grid`` (levels,
    edges in steps), ``features`` (feature, rank error, sum error, bf16 outlier flag) and ``bits``
    (leg, part, bits). Raises PlaygroundError / CalibrationError naming the field."""
    from lowbit.playground import PARTS, analyze
    out = analyze(calibration, layer, module, rank, scheme, seed)
    r, s = out["rank"], out["sum"]
    summary = pd.DataFrame([dict(scheme=out["scheme"], layer=out["layer"], module=out["module"], rank=out["rank"],
                                 tp=out["tp"], tokens=out["tokens"], hidden=out["hidden"],
                                 rank_sqnr_db=r["sqnr_db"], rank_rel_error=r["rel_error"], clamped=r["clamped"],
                                 sum_sqnr_db=s["sqnr_db"], sum_rel_error=s["rel_error"],
                                 first_leg_sqnr_db=s["first_leg_sqnr_db"], bits_per_value=out["bits"]["total"],
                                 outliers=len(r["outliers"]), payload_bytes=r["payload_bytes"])])
    hist = pd.DataFrame(columns=["left", "right", "center", "count", "kind"])
    if r["histogram"] is not None:
        h = r["histogram"]
        center = (h["left"] + h["right"]) / 2
        hist = pd.concat([pd.DataFrame(dict(left=h["left"], right=h["right"], center=center, count=h["inside"],
                                            kind="in range")),
                          pd.DataFrame(dict(left=h["left"], right=h["right"], center=center, count=h["clamped"],
                                            kind="clamped"))], ignore_index=True)
    outl = set(r["outliers"])
    features = pd.DataFrame(dict(feature=np.arange(out["hidden"]), rank_rms_error=r["feature_rms"],
                                 sum_rms_error=s["feature_rms"],
                                 bf16=[f in outl for f in range(out["hidden"])]))
    bits = pd.DataFrame([dict(leg=leg, part=p, bits=float(parts[p])) for leg, parts in out["bits"]["legs"].items()
                         if parts is not None for p in PARTS], columns=["leg", "part", "bits"])
    return dict(summary=summary, histogram=hist, grid=r["grid"], features=features, bits=bits)


def two_shot_view(calibration, layer: int, module: str, scheme: str, seed: int = 0) -> dict:
    """``lowbit.playground.two_shot_steps`` as frames: ``links`` (phase, sender, receiver, chunk,
    bytes), ``phases`` (step, method, sqnr_db, rel_error), ``sent`` (method, bytes per rank), and
    the scalars (scheme, gather_scheme, tp, tokens, hidden, width, chunk_outliers, leg1_bytes,
    leg2_bytes)."""
    from lowbit.playground import two_shot_steps
    out = two_shot_steps(calibration, layer, module, scheme, seed)
    frames = dict(links=pd.DataFrame(out["links"], columns=["phase", "sender", "receiver", "chunk", "bytes"]),
                  phases=pd.DataFrame(out["phases"], columns=["step", "method", "sqnr_db", "rel_error"]),
                  sent=pd.DataFrame([dict(method=k, bytes=float(v)) for k, v in out["sent"].items()]))
    frames.update({k: out[k] for k in ("scheme", "gather_scheme", "tp", "tokens", "hidden", "width", "chunk_outliers",
                                       "leg1_bytes", "leg2_bytes")})
    return frames


def bytes_by_tp(scheme: str, hidden: int, tokens: int) -> pd.DataFrame:
    """Bytes each rank sends per all-reduce by TP size: bf16 ring, gather, two-shot."""
    from lowbit.playground import bytes_per_rank_by_tp
    return pd.DataFrame(bytes_per_rank_by_tp(scheme, hidden, tokens), columns=["tp", "method", "bytes", "ratio_vs_bf16"])


def link_choices() -> dict[str, str]:
    """key -> name of every link the projection knows (named interconnects and emulated links)."""
    from lowbit.playground import LINKS
    return {k: v.name for k, v in LINKS.items()}


def projection_frame(link, tp: int, hidden: int, schemes: list[str], codec_gbps: float,
                     max_tokens: int = 65536) -> pd.DataFrame:
    """Modelled time per all-reduce against message size (powers of two tokens up to
    ``max_tokens``) for bf16 and each scheme (``lowbit.playground.comm_times``); ``link`` a key of
    ``link_choices()`` or an ``Interconnect`` (e.g. from ``fitted_links``)."""
    from lowbit.playground import comm_times
    sizes = [2 ** k for k in range(int(math.log2(max_tokens)) + 1)]
    rows = comm_times(link, int(tp), int(hidden), list(schemes), sizes, float(codec_gbps))
    frame = pd.DataFrame(rows, columns=["scheme", "tokens", "message_bytes", "seconds", "comm_seconds",
                                        "codec_seconds"])
    frame["us"] = frame["seconds"] * 1e6
    frame["message_mib"] = frame["message_bytes"] / 2**20
    return frame


def crossovers(frame: pd.DataFrame) -> pd.DataFrame:
    """Per scheme of a projection frame: the smallest message from which it beats bf16 (or none)."""
    from lowbit.playground import crossover
    rows = frame.to_dict("records")
    out = []
    for scheme in [s for s in dict.fromkeys(frame["scheme"]) if s != "bf16"]:
        c = crossover(rows, scheme)
        out.append(dict(scheme=scheme, tokens=c["tokens"] if c else None,
                        message_mib=c["message_bytes"] / 2**20 if c else None,
                        bf16_us=c["bf16_seconds"] * 1e6 if c else None, scheme_us=c["seconds"] * 1e6 if c else None))
    return pd.DataFrame(out, columns=["scheme", "tokens", "message_mib", "bf16_us", "scheme_us"])


def message_sizes(model: str, prompt_tokens: int = 2048, batch: int = 1) -> dict:
    """Decode- and prefill-sized messages of ``model``: tokens and MiB (BF16) per all-reduce."""
    from lowbit.playground import message_tokens
    hidden = projection_hidden(model)
    tokens = message_tokens(int(prompt_tokens), int(batch))
    return {k: dict(tokens=v, mib=v * hidden * 2 / 2**20) for k, v in tokens.items()}


def measured_link_records(frame: pd.DataFrame, root=None) -> pd.DataFrame:
    """Collective-bench records in the store with the projection's link key (loopback has
    none: it is drawn against its own fit only), for drawing over the model lines."""
    from lowbit.playground import BENCH_LINK_KEYS
    bench = collective_frame(frame, root)
    bench["link_key"] = bench["link"].map(BENCH_LINK_KEYS)
    return bench


def fitted_links(bench: pd.DataFrame, tp: int) -> dict:
    """name -> ``Interconnect`` fitted to the store's bf16 all-reduce records of each link at ``tp``."""
    from lowbit.playground import fitted_link
    records = bench.to_dict("records")
    out = {}
    for link in sorted(bench["link"].dropna().astype(str).unique()) if len(bench) else []:
        fit = fitted_link(records, link, int(tp))
        if fit is not None:
            out[fit.name] = fit
    return out


def playground_scheme(**controls) -> str:
    """The scheme string of the playground's controls (``lowbit.playground.scheme_from_controls``)."""
    from lowbit.playground import scheme_from_controls
    return scheme_from_controls(**controls)


def playground_counterpart(scheme: str) -> str:
    """The same scheme with the other kind of scales (static <-> per token)."""
    from lowbit.playground import counterpart
    return counterpart(scheme)


def projection_hidden(model: str) -> int:
    """Hidden size for the projection: the paper's models from ``lowbit.projection.SHAPES``,
    the app's models from their config."""
    from lowbit.projection import SHAPES
    return SHAPES[model].hidden if model in SHAPES else model_shape(model)["hidden"]
