"""The README accuracy table, end to end: calibrate, evaluate every scheme, write JSON/CSV/Markdown.

    python -m bench.accuracy --tp 3 --items 100 --out bench/results/accuracy.json

Both steps run as real torchrun jobs through the launch queue (so they also appear in the app's
Runs page). Task accuracies carry their standard error over items; the paired difference to the
exact run on the same items (``Δ``) has a much smaller one, and KL / top-1 agreement on held-out
text are the low-noise measures. Nothing here is tuned: the table is what the run measured.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

from launch.client import submit_and_watch
from lowbit import stats

# The table: exact, Int8/4/3/2 on all features (static per-feature scales, as the paper's
# baseline), random-BF16 and top-k-BF16 Int4 (the paper), and a dynamic per-group scheme.
DEFAULT_SCHEMES = ["bf16", "int8-static", "int4-static", "int3-static", "int2-static", "int4-static-rand1/64",
                   "int4-static-top1/64", "int4-group32"]
DEFAULT_TASKS = ["arc_easy", "piqa", "winogrande"]


def run_job(spec: dict) -> tuple[str, dict]:
    """Queue ``spec``, watch it here with a progress bar, return (run id, result)."""
    code, run_id, result = submit_and_watch(spec)
    if result is None:
        raise SystemExit(f"{run_id or spec['kind']} did not finish (exit {code}); see above")
    return run_id, result


def flat_rows(result: dict) -> list[dict]:
    """One flat row per scheme: bits, text metrics, per-task primary score ± SE and paired Δ."""
    rows = []
    for r in result["records"]:
        row = dict(scheme=r["scheme"], bits_per_value=r["bits_per_value"], ppl=r["ppl"], kl=r["kl"],
                   top1_agreement=r["top1_agreement"], kept_pct=r.get("kept_pct"), kept_se=r.get("kept_se"),
                   avg_primary=r.get("avg_primary"),
                   clamped=r.get("clamped"), comm_seconds=r.get("comm_seconds"))
        deltas, delta_vars = [], []
        for task, t in (r.get("tasks") or {}).items():
            metric = t["primary"]
            row[f"{task}"] = t[metric]
            row[f"{task}_se"] = t[f"{metric}_se"]
            row[f"{task}_n"] = t["n"]
            deltas.append(t.get("delta", 0.0))
            delta_vars.append(t.get("delta_se", 0.0) ** 2)
        if deltas:
            row["avg_delta"] = sum(deltas) / len(deltas)
            row["avg_delta_se"] = math.sqrt(sum(delta_vars)) / len(deltas)
        rows.append(row)
    return rows


def markdown(result: dict, rows: list[dict], tasks: list[str]) -> str:
    head = ["scheme", "bits/value", "ppl", "KL", "top-1 %"] + [t for t in tasks] + ["avg %", "Δ avg (paired) pts", "kept %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['scheme']}`", f"{row['bits_per_value']:.4g}", f"{row['ppl']:.3f}", f"{row['kl']:.4f}",
                 f"{100 * row['top1_agreement']:.1f}"]
        cells += [f"{100 * row[t]:.1f} ± {100 * row[t + '_se']:.1f}" if t in row else "" for t in tasks]
        cells.append("" if row.get("avg_primary") is None else f"{100 * row['avg_primary']:.1f}")
        cells.append("" if "avg_delta" not in row else f"{100 * row['avg_delta']:+.1f} ± {100 * row['avg_delta_se']:.1f}")
        kept_se = (row.get("kept_se") if row["scheme"] != result.get("reference", "fp32") else None)
        cells.append(stats.fmt_pm(row.get("kept_pct"), kept_se)
                     + (" !" if kept_se is not None and stats.kept_is_unresolved(row.get("kept_pct"), kept_se) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--items", type=int, default=60, help="items per task (seeded subset)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="chunks per forward (default 4; 2 halves the memory of Gemma's 262k-vocab logits)")
    parser.add_argument("--calib-from", default=None, help="reuse this calibrate run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/accuracy.json")
    args = parser.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    start = time.time()
    common = dict(model=args.model, tp=args.tp, backend="auto", calib_data="wikipedia", calib_tokens=args.calib_tokens,
                  time_limit_s=7 * 24 * 3600.0, params=dict(seq_len=args.seq_len))
    evaluate_params = dict(seq_len=args.seq_len, layer_error_chunks=1)
    if args.batch_size is not None:
        common["params"]["batch_size"] = evaluate_params["batch_size"] = args.batch_size
    calib_id = args.calib_from
    if calib_id is None:
        calib_id, _ = run_job(dict(common, kind="calibrate"))
    eval_id, result = run_job(dict(common, kind="evaluate", params=evaluate_params, schemes=schemes, calib_from=calib_id,
                                   eval_data="wikipedia", eval_tokens=args.eval_tokens, tasks=tasks,
                                   items_per_task=args.items, seed=args.seed))
    rows = flat_rows(result)
    table = markdown(result, rows, tasks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(command="python -m bench.accuracy " + " ".join(sys.argv[1:] if argv is None else argv),
                machine=f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, {platform.system()}",
                date=time.strftime("%Y-%m-%d"), wall_seconds=round(time.time() - start, 1),
                calibrate_run=calib_id, evaluate_run=eval_id)
    out.write_text(json.dumps(dict(info, result=result, rows=rows), indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "scheme", k))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    meta = (f"{args.model}, TP {args.tp}, {result['eval_tokens']} held-out tokens ({result['eval_source']}), "
            f"{args.items} items per task (seed {args.seed}), calibration: {result['calibration']['tokens']} tokens "
            f"of {result['calibration']['source']}; {info['machine']}, {info['date']}, {info['wall_seconds']:.0f} s")
    out.with_suffix(".md").write_text(f"{meta}\n\n{table}\n\n`{info['command']}`\n")
    print(meta)
    print(table)
    print(f"wrote {out}, {out.with_suffix('.csv')}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
