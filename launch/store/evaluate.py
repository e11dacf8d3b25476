"""Evaluate and sweep results as frames: one row per scheme (parsed fields, text and task metrics,
% kept with its standard error), tasks, per-layer errors, the Pareto front, a sweep's answers."""
from __future__ import annotations

import json
import math

import pandas as pd

from launch.store.runs import finished_ok, load_result
from lowbit import stats
from lowbit.method.evaluate import RECORD_NUMBERS
from lowbit.method.sweep import grid_schemes, undominated
from lowbit.scheme import SchemeError, parse_scheme_map

def scheme_fields(text: str) -> dict:
    """What a scheme string means, as columns: bits, granularity, select, k, algo, second leg."""
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
                               ("sr", s.stochastic), (f"s{s.quant.scale_format}", s.quant.scale_format != "bf16"
                                                      and s.quant.dynamic)) if on]
    return dict(family=s.quant.code.family, bits=s.quant.bits,
                granularity=s.quant.granularity_text, select=select, k=k_text, algo=s.algo,
                second=str(s.second) if s.second else None, options=" ".join(options) or "-",
                overrides=len(smap.overrides), parse_error=None)


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def result_records(result: dict | None) -> list[dict]:
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
    return [r for r in result_records(result) if isinstance(r.get("scheme"), str)]


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


SCHEME_FIELDS = ("family", "bits", "granularity", "select", "k", "algo", "second", "options", "overrides")
# every numeric column: the record's numbers (lowbit.method.evaluate owns them) and those derived here
SCHEME_NUMERIC = [*RECORD_NUMBERS, "avg_primary_se", "comm_ms_per_ktok"]
SCHEME_COLUMNS = ["scheme", "reference", *SCHEME_NUMERIC, *SCHEME_FIELDS]


def scheme_frame(result: dict | None) -> pd.DataFrame:
    """One row per scheme of an evaluate result (the reference first), with its parsed fields."""
    records = _records(result)
    reference = (result or {}).get("reference", "fp32")
    tasks = task_frame(result)
    ref_tasks = next((r.get("tasks") for r in records if r["scheme"] == reference), None)
    rows = []
    for r in records:
        mine = tasks[tasks["scheme"] == r["scheme"]]
        ses = [s for s in mine["se"] if s is not None and not pd.isna(s)]
        row = dict(scheme=r["scheme"], reference=r["scheme"] == reference,
                   **{k: _num(r.get(k)) for k in RECORD_NUMBERS},
                   avg_primary_se=math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else None)
        if row["kept_se"] is None and isinstance(r.get("tasks"), dict) and isinstance(ref_tasks, dict):
            row["kept_se"] = _num(stats.kept_pct(r["tasks"], ref_tasks)[1])  # a record from before it was stored
        tokens, seconds = row["text_tokens"], row["comm_seconds"]
        row["comm_ms_per_ktok"] = seconds / tokens * 1e6 if tokens and seconds is not None else None
        fields = scheme_fields(r["scheme"])
        row.update({k: fields[k] for k in SCHEME_FIELDS})
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
        link = data.get("link") or "loopback"
        rows.append(dict(id=run["id"], model=data.get("model", run["model"]), tp=data.get("tp", run["tp"]),
                         created=run["created"], schemes=len(records), link=link,
                         has_layers=bool(data.get("layer_errors")),
                         label=f"{run['id']} · {data.get('model', run['model'])} TP {data.get('tp', run['tp'])} · "
                               f"{len(records)} schemes" + (f" · {link}" if link != "loopback" else "")
                               + (" (auto-tune)" if run["kind"] == "sweep" else "")))
    return pd.DataFrame(rows, columns=["id", "model", "tp", "created", "schemes", "link", "has_layers", "label"])


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
    return grid_schemes(grid, hidden, tp, budget_min, budget_max)


def pareto_front(cost: pd.Series, quality: pd.Series) -> pd.Series:
    """True for points no other point beats: lower-or-equal cost and higher-or-equal quality,
    strictly better in one (``lowbit.method.sweep.undominated``, the one Pareto rule)."""
    return pd.Series(undominated(cost.to_numpy(dtype=float), -quality.to_numpy(dtype=float)), index=cost.index)


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
