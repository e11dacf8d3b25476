"""Auto-tune sweep: evaluate candidate schemes over a bits/value range, return the Pareto frontier.

Given a budget range ``[budget_min, budget_max]`` (bits per value, as the communicator sends
them) and an accuracy floor (``kl_max`` and/or ``kept_min`` % of the exact run's task score),
the sweep evaluates

1. explicit candidate schemes (the job spec's ``schemes``),
2. a grid (``grid``: code x bits x granularity x outliers x rotation x rounding) filtered to the range,
3. per-site allocations (``allocate``: a list of budgets): ``lowbit.method.sensitivity`` measures every
   site's KL increase for each of ``allocate_candidates`` once, then allocates bits per site
   for each budget; the resulting scheme maps are candidates like the others,
4. the paper's ``int4-static-top1/64`` as the point of comparison (``include_paper``),

each against the fp32 all-reduce on the same tokens (perplexity, KL, top-1 agreement, and task
accuracy with paired deltas when ``tasks``/``items`` are set). The Pareto frontier is the set of
in-range points that no other in-range point beats on both bits and KL; ``best`` is the
cheapest frontier point that meets the floor, ``best_at[b]`` the lowest-KL point at <= b bits.

Resumable: every finished point is one file ``points/<key>.json`` in the run directory (written
atomically by rank 0); a rerun over the same folder, or a new run with ``resume_from=<run id>``,
skips them, and the sensitivity table is kept the same way (``points/sensitivity.json``).
A scheduler may run the sweep as pieces, one job each (``sweep_pieces``, ``run_sweep(piece=...)``);
``gather_sweep`` then reads the same answer from the point files.

    python -m launch submit sweep.json --wait       # kind "sweep", see launch.registry
    # sweep.json: {"kind": "sweep", "model": "smollm2-135m", "tp": 3, "calib_from": "<id>",
    #              "params": {"budget_min": 2.5, "budget_max": 4.3, "kl_max": 0.05, "allocate": [3.0]}}
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lowbit.comm.dist import ThreadWorld
from lowbit.calibration import Calibration
from lowbit.method.evaluate import (
    REFERENCE,
    evaluate_tasks,
    evaluate_text,
    layer_errors,
    summary_record,
)
from lowbit.method.sensitivity import (
    DEFAULT_CANDIDATES,
    BudgetError,
    allocate,
    map_bits_per_value,
    site_sensitivity,
)
from lowbit.model.data import token_chunks
from lowbit.model.engine import build_tp_model
from lowbit.model.models import load_model
from lowbit.model.tp import row_parallel_sites
from lowbit.provenance import command_line, portable_path
from lowbit.scheme import SchemeError, parse_scheme, parse_scheme_map
from lowbit.wire.accounting import scheme_bits_per_value, table_bytes

PAPER = "int4-static-top1/64"
SENSITIVITY_FILE = "sensitivity.json"
SWEEP_DEFAULTS = dict(
    budget_min=2.0, budget_max=4.5, kl_max=None, kept_min=None,
    # e.g. {"code": ["int", "nf", "lm", "fp4e2m1"], "bits": [3, 4], "granularity": ["token", "group32"],
    #       "rotation": [null, 64]}: a code with its width in it (fp4e2m1, lm4s) ignores "bits"
    grid=None,
    allocate=[], allocate_candidates=list(DEFAULT_CANDIDATES), allocate_method="dp", sensitivity_chunks=1,
    include_paper=True, report_at=[4.2, 3.5, 3.0, 2.5], resume_from=None,
    seq_len=256, batch_size=2,
)
GRID_KEYS = ("code", "bits", "granularity", "outliers", "rotation", "rounding")


def point_key(scheme: str) -> str:
    """File name stem of a point: a hash of its canonical scheme string."""
    return hashlib.sha1(str(parse_scheme_map(scheme)).encode()).hexdigest()[:16]


def grid_schemes(grid: dict | None, hidden: int, tp: int, budget_min: float, budget_max: float) -> list[str]:
    """Canonical scheme strings of the grid whose bits per value lie in the range. A code value is
    a family (``int``, ``nf``, ``lm``: the ``bits`` axis gives the width) or a whole code with its
    width (``fp4e2m1``, ``fp8e4m3``, ``lm4s``, ``int3a``: ``bits`` does not apply)."""
    if not grid:
        return []
    out = []
    for code, bits, gran, outl, rot, rounding in itertools.product(
            grid.get("code", ["int"]), grid.get("bits", [4]), grid.get("granularity", ["token"]),
            grid.get("outliers", [None]), grid.get("rotation", [None]), grid.get("rounding", ["nearest"])):
        code_text = code if any(ch.isdigit() for ch in code) else f"{code}{bits}"
        text = f"{code_text}-{gran}" + (f"-{outl}" if outl else "") + (f"-rot{rot}" if rot else "") \
            + ("-sr" if rounding == "stochastic" else "")
        try:
            scheme = parse_scheme(text)
            scheme.validate_for(hidden, tp)
        except SchemeError:
            continue  # e.g. rotation with static scales, nf2, nf/lm/fp with -sr: not a candidate
        if budget_min - 1e-9 <= scheme_bits_per_value(scheme, hidden, tp) <= budget_max + 1e-9:
            out.append(str(scheme))
    return list(dict.fromkeys(out))


def undominated(cost, loss) -> list[bool]:
    """The one Pareto rule: True for points no other point beats (lower-or-equal cost and
    lower-or-equal loss, strictly lower in one). Non-finite points are never on the front."""
    c, q = np.asarray(cost, dtype=float), np.asarray(loss, dtype=float)
    ok = np.isfinite(c) & np.isfinite(q)
    front = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(ok):
        front[i] = not (ok & (c <= c[i]) & (q <= q[i]) & ((c < c[i]) | (q < q[i]))).any()
    return front.tolist()


def pareto_frontier(points: list[dict], x: str = "bits_per_value", y: str = "kl") -> list[dict]:
    """Points not dominated on (x lower, y lower) (``undominated``), sorted by x; of identical
    (x, y) points the first is kept."""
    ordered = sorted(points, key=lambda p: (p[x], p[y]))
    keep = undominated([p[x] for p in ordered], [p[y] for p in ordered])
    frontier, seen = [], set()
    for p, on in zip(ordered, keep):
        if on and (p[x], p[y]) not in seen:
            frontier.append(p)
            seen.add((p[x], p[y]))
    return frontier


def meets_floor(point: dict, kl_max: float | None, kept_min: float | None) -> bool:
    if kl_max is not None and point["kl"] > kl_max:
        return False
    if kept_min is not None and (point.get("kept_pct") is None or point["kept_pct"] < kept_min):
        return False
    return True


def summarize(points: list[dict], p: dict) -> dict:
    """Frontier, best point meeting the floor, and the best point at each ``report_at`` budget."""
    in_range = [q for q in points if p["budget_min"] - 1e-9 <= q["bits_per_value"] <= p["budget_max"] + 1e-9]
    frontier = pareto_frontier(in_range)
    ok = [q for q in frontier if meets_floor(q, p["kl_max"], p["kept_min"])]
    best_at = {}
    for budget in p["report_at"]:
        under = [q for q in points if q["bits_per_value"] <= budget + 1e-9]
        best_at[str(budget)] = min(under, key=lambda q: q["kl"])["scheme"] if under else None
    return dict(frontier=[q["scheme"] for q in frontier], best=ok[0]["scheme"] if ok else None, best_at=best_at)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _agree(group, flags: list[bool]) -> list[bool]:
    """Rank 0's view of which files exist, on every rank (collective decisions must match)."""
    t = torch.tensor([1 if f else 0 for f in flags] or [0], dtype=torch.long)
    return [bool(v) for v in group.all_gather(t)[0].tolist()][:len(flags)]


def _cached_sensitivity(points_dir: Path, p: dict) -> list[dict]:
    """The rows of ``points/sensitivity.json`` for the allocation candidates, when the table was
    measured on the same number of chunks (else [])."""
    path = Path(points_dir) / SENSITIVITY_FILE
    if not path.exists():
        return []
    cands = [str(parse_scheme(c)) for c in p["allocate_candidates"]]
    data = json.loads(path.read_text())
    if data.get("chunks", 1) != max(1, p["sensitivity_chunks"]):
        return []
    return [r for r in data["rows"] if r["scheme"] in cands]


def _sensitivity(model, group, p, calibration, held, points_dir: Path, progress) -> list[dict]:
    """Rows for every allocation candidate; candidates already in the table (same token count)
    are reused, so adding a candidate to a finished sweep measures only that one."""
    path = points_dir / SENSITIVITY_FILE
    cands = [str(parse_scheme(c)) for c in p["allocate_candidates"]]
    chunks = max(1, p["sensitivity_chunks"])
    cached = _cached_sensitivity(points_dir, p)
    have = _agree(group, [any(r["scheme"] == c for r in cached) for c in cands])
    missing = [c for c, ok in zip(cands, have) if not ok]
    if not missing:
        return cached
    batches = list(held[:chunks].split(p["batch_size"]))
    rows = site_sensitivity(model, group, batches, missing, calibration, progress=progress)
    rows = [r for r in cached if r["scheme"] not in missing] + rows
    if group.rank == 0:
        _write_json(path, dict(candidates=list(dict.fromkeys(r["scheme"] for r in rows)), chunks=chunks, rows=rows))
    return rows


def _evaluate_point(model, group, tokenizer, scheme, calibration, held, items, p, progress) -> dict:
    text = evaluate_text(model, group, held, [scheme], calibration, p["batch_size"], progress)
    tasks = evaluate_tasks(model, group, tokenizer, items, [scheme], calibration, progress) if items else None
    rec = summary_record(scheme, text[scheme], tasks[scheme] if tasks else None, tasks[REFERENCE] if tasks else None)
    rec["reference_ppl"] = text[REFERENCE]["ppl"]
    if tasks:
        rec["reference_tasks"] = {t: r for t, r in tasks[REFERENCE].items() if not t.startswith("_")}
    return rec


def _allocated(rows: list[dict], budgets, hidden: int, method: str) -> dict[str, float]:
    """Scheme map -> the first budget it was allocated for (a budget below the cheapest map: none)."""
    out: dict[str, float] = {}
    for budget in budgets:
        try:
            out.setdefault(str(allocate(rows, budget, hidden, method)), budget)
        except BudgetError:
            continue
    return out


def fixed_candidates(p: dict, hidden: int, tp: int) -> list[str]:
    """The candidates that need no measurement first, canonical, in evaluation order: the
    paper's scheme, the explicit schemes, the grid."""
    texts = ([PAPER] if p["include_paper"] else []) + list(p.get("schemes", [])) \
        + grid_schemes(p["grid"], hidden, tp, p["budget_min"], p["budget_max"])
    return list(dict.fromkeys(str(parse_scheme_map(t)) for t in texts))


def candidates(p: dict, hidden: int, tp: int, rows: list[dict]) -> dict[str, float | None]:
    """Every candidate in evaluation order -> the budget it was allocated for: the allocations
    (from the sensitivity ``rows``) first, then ``fixed_candidates``."""
    out: dict[str, float | None] = dict(_allocated(rows, p["allocate"], hidden, p["allocate_method"])) \
        if p["allocate"] else {}
    for scheme in fixed_candidates(p, hidden, tp):
        out.setdefault(scheme, None)
    return out


def sweep_pieces(params: dict, hidden: int, tp: int) -> list[dict]:
    """The sweep cut into independent pieces for a scheduler: one ``{"scheme": s}`` per fixed
    candidate, one ``{"allocate": budget}`` per allocation budget (all of them need the
    sensitivity table, measured once before: ``{"prepare": true}``). ``run_sweep(piece=...)``
    evaluates one piece; ``gather_sweep`` reads the answer from the point files."""
    p = dict(SWEEP_DEFAULTS, **params)
    return [dict(scheme=s) for s in fixed_candidates(p, hidden, tp)] + [dict(allocate=b) for b in p["allocate"]]


def _summary(points: list[dict], p: dict, evaluated: int, reused: int) -> dict:
    return dict(points=points, **summarize(points, p), params={k: p[k] for k in SWEEP_DEFAULTS},
                evaluated=evaluated, reused=reused)


def run_sweep(tp_model, group, params: dict, calibration, held: torch.Tensor, items: dict | None,
              points_dir: str | Path, progress=None, piece: dict | None = None) -> dict | None:
    """Collective: evaluate every candidate not already in ``points_dir``; rank 0 returns the
    points, the frontier and the best schemes (see the module docstring). With ``piece`` (one
    piece of ``sweep_pieces``, or ``{"prepare": true}``: the sensitivity table only) it evaluates
    that piece, writes its point file and returns None on every rank."""
    p = dict(SWEEP_DEFAULTS, **params)
    model = tp_model.model
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, tp = cfg.hidden_size, group.world_size
    points_dir = Path(points_dir)
    if group.rank == 0:
        points_dir.mkdir(parents=True, exist_ok=True)
    group.barrier()
    needs_rows = p["allocate"] and (piece is None or "allocate" in piece or "prepare" in piece)
    rows = _sensitivity(model, group, p, calibration, held, points_dir, progress) if needs_rows else []
    if piece is None:
        chosen = candidates(p, hidden, tp, rows)
    elif "scheme" in piece:
        chosen = {str(parse_scheme_map(piece["scheme"])): None}
    elif "allocate" in piece:
        chosen = _allocated(rows, [piece["allocate"]], hidden, p["allocate_method"])
    else:
        chosen = {}
    names = list(chosen)
    all_sites = [(site.layer, site.module) for site in row_parallel_sites(model)]
    done = _agree(group, [(points_dir / f"{point_key(s)}.json").exists() for s in names])
    points = []
    for i, (scheme, finished) in enumerate(zip(names, done)):
        path = points_dir / f"{point_key(scheme)}.json"
        if finished:
            if group.rank == 0:
                points.append(json.loads(path.read_text()))
            continue
        start = time.perf_counter()
        rec = _evaluate_point(model, group, tp_model.tokenizer, scheme, calibration, held, items, p, progress)
        rec.update(allocated_for=chosen[scheme], seconds=round(time.perf_counter() - start, 2),
                   nominal_bits=map_bits_per_value(scheme, all_sites, hidden, tp))
        if group.rank == 0:
            _write_json(path, rec)
            points.append(rec)
        if progress:
            progress("sweep", i + 1, len(names), f"{scheme}: {rec['bits_per_value']:.3f} bits, KL {rec['kl']:.4g}", {})
    if group.rank != 0 or piece is not None:
        return None
    return _summary(points, p, evaluated=sum(1 for d in done if not d), reused=sum(done))


def gather_sweep(params: dict, hidden: int, tp: int, points_dir: str | Path, reused: set[str]) -> dict:
    """The answer of a sweep whose pieces ran as separate jobs: the same points, frontier and
    best schemes ``run_sweep`` returns, read from the point files (``reused``: point keys that
    were there before the pieces started). A candidate without its point file is an error."""
    p = dict(SWEEP_DEFAULTS, **params)
    points_dir = Path(points_dir)
    chosen = candidates(p, hidden, tp, _cached_sensitivity(points_dir, p) if p["allocate"] else [])
    missing = [s for s in chosen if not (points_dir / f"{point_key(s)}.json").exists()]
    if missing:
        raise FileNotFoundError(f"sweep: no point file for {len(missing)} candidate(s), e.g. {missing[0]!r} "
                                f"({points_dir}/{point_key(missing[0])}.json)")
    points = []
    for scheme, budget in chosen.items():
        rec = json.loads((points_dir / f"{point_key(scheme)}.json").read_text())
        if point_key(scheme) not in reused:
            rec["allocated_for"] = budget  # a fixed piece may have evaluated a map an allocation also chose
        points.append(rec)
    n_reused = sum(point_key(s) in reused for s in chosen)
    return _summary(points, p, evaluated=len(chosen) - n_reused, reused=n_reused)


# -- job kind "sweep" (registered in launch.registry) --------------------------------------------
# -- stochastic vs nearest rounding: the error of the sum over ranks -----------------------------
def sum_error(model_name: str, tp: int, schemes: list[str], calibration_dir: str | None, chunks: int = 1,
              seq_len: int = 256, source: str = "wikipedia") -> list[dict]:
    """Per scheme: relative error of the reduced sum vs the exact fp32 sum at every site with exact
    inputs (``lowbit.method.evaluate.layer_errors`` "local"), as mean / median / max over sites, and the
    KL of the whole run. TP ranks are threads of this process (``lowbit.comm.dist.ThreadWorld``)."""

    loaded = load_model(model_name)
    cal = Calibration.load(calibration_dir) if calibration_dir else None
    held = token_chunks(loaded.tokenizer, source, "eval", chunks, seq_len)

    def body(group):
        m = build_tp_model(model_name, group, loaded=loaded)
        rows = layer_errors(m.model, group, list(held.split(1)), schemes, cal, modes=("local",))
        text = evaluate_text(m.model, group, held, schemes, cal, batch_size=1)
        sites = [(site.layer, site.module) for site in row_parallel_sites(m.model)]
        hidden = m.model.config.get_text_config().hidden_size
        return rows, text, {s: table_bytes(s, sites, hidden, group.world_size) for s in schemes}
    rows, text, tables = ThreadWorld(tp).run(body)[0]
    out = []
    for s in schemes:
        errs = [r["rel_error"] for r in rows if r["scheme"] == s and r["leg"] == "final"]
        out.append(dict(scheme=s, mean_rel_error=statistics.fmean(errs), median_rel_error=statistics.median(errs),
                        max_rel_error=max(errs), sites=len(errs), kl=text[s]["kl"], ppl=text[s]["ppl"],
                        top1_agreement=text[s]["top1_agreement"],
                        bits_per_value=text[s]["bits_per_value"], tokens=text[s]["tokens"],
                        table_bytes=tables[s]))  # fitted codebooks (lm): once per run, not per message
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lowbit.method.sweep sum-error --schemes a,a-sr,... [--calibration DIR]``: the rounding
    comparison in one process (threads as ranks); the sweep itself runs as the job kind."""
    parser = argparse.ArgumentParser(prog="python -m lowbit.method.sweep")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sum-error", help="relative error of the sum over ranks per scheme (e.g. -sr vs nearest)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--schemes", required=True)
    p.add_argument("--calibration", default=None, help="calibration folder (runs/<id>/calibration)")
    p.add_argument("--chunks", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=None, help="also write the rows and the run's meta (command, date, load) as JSON")
    args = parser.parse_args(argv)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    started, load_start = datetime.now(timezone.utc), os.getloadavg()
    rows = sum_error(args.model, args.tp, schemes, args.calibration, args.chunks, args.seq_len)
    if args.out:
        meta = dict(command=command_line("lowbit.method.sweep", list(argv or sys.argv[1:])),
                    date=started.isoformat(timespec="seconds"), seconds=round((datetime.now(timezone.utc) - started)
                                                                              .total_seconds(), 1),
                    load=dict(start=list(load_start), end=list(os.getloadavg())), machine=f"{os.cpu_count()}-core CPU",
                    cpus=os.cpu_count(),
                    model=args.model, tp=args.tp, chunks=args.chunks, seq_len=args.seq_len,
                    calibration=args.calibration and portable_path(args.calibration))
        _write_json(Path(args.out), dict(meta=meta, rows=rows))
    for row in rows:
        print(f"{row['scheme']:32s} bits {row['bits_per_value']:.3f}  sum rel. error mean {row['mean_rel_error']:.4f} "
              f"median {row['median_rel_error']:.4f} max {row['max_rel_error']:.4f} over {row['sites']} sites  "
              f"KL {row['kl']:.4f}  top-1 {100 * row['top1_agreement']:.1f}%  ppl {row['ppl']:.2f}  ({row['tokens']} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
