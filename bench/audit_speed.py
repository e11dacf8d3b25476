"""How long the pre-flight audit takes, and what it finds: one ``python -m lowbit audit`` over
every preset, timed from its start to its exit, with its report kept for docs/preflight.md.

    LOWBIT_RUNS=runs python -m bench.audit_speed --model smollm2-135m --tp 3
    LOWBIT_RUNS=runs python -m bench.audit_speed --model gemma3-270m --tp 2 --eval-tokens 512

Runs the command line a user runs (a child process; every flag after ``--`` is passed to it),
records the wall time, the CPU seconds of the whole run (every rank, ``resource.RUSAGE_CHILDREN``:
a figure a busy machine does not inflate the way it inflates the wall time), the load average
before and after, the seconds per stage from the run's events, and the report itself (the run's
result.json). The issue's target: at most 600 s for smollm2-135m at TP 3 over all formats.
Writes ``bench/results/audit-<model>-tp<N>.json`` with a meta block.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench._meta import end_load, finish_meta, start_load, start_meta
from bench.accuracy import stage_seconds
from launch.events import read_events
from launch.layout import run_paths

RUN_ID = re.compile(r"^run (\S+): audit", re.M | re.I)  # the client's first line (stdout or stderr)
TARGET_SECONDS = 600.0  # issue 26: smollm2-135m at TP 3, all formats, at most 10 minutes


def audit_timed(argv: list[str]) -> dict:
    """One ``python -m lowbit audit <argv>``: run id, wall and CPU seconds, load before/after."""
    load = start_load()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "lowbit", "audit", *argv], capture_output=True, text=True)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = RUN_ID.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"audit failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return dict(run=found.group(1), wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1), load=end_load(load))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--site-tokens", type=int, default=512)
    parser.add_argument("--out", default=None, help="default bench/results/audit-<model>-tp<N>.json")
    parser.add_argument("extra", nargs="*", help="after --: more flags of python -m lowbit audit")
    args = parser.parse_args(argv)
    meta = start_meta("bench.audit_speed", argv)
    cli = ["--model", args.model, "--tp", str(args.tp), "--eval-tokens", str(args.eval_tokens),
           "--site-tokens", str(args.site_tokens), *args.extra]
    row = audit_timed(cli)
    paths = run_paths(row["run"])
    report = json.loads(paths.result.read_text())
    row["stages"] = {k: round(v, 1) for k, v in stage_seconds(read_events(paths.events)).items()}
    row["within_target"] = row["wall_seconds"] <= TARGET_SECONDS
    print(f"{row['run']}: {row['wall_seconds']:.0f} s wall, {row['cpu_seconds']:.0f} CPU s, load "
          f"{row['load']['start']} -> {row['load']['end']}; target {TARGET_SECONDS:.0f} s: "
          f"{'met' if row['within_target'] else 'MISSED'}")
    for f in report["formats"]:
        fix = f.get("fix")
        print(f"  {f['format']}: {f['verdict']}" + (f" (fix: {fix['kind']} {fix['text']})" if fix else ""))
    out = Path(args.out or f"bench/results/audit-{args.model}-tp{args.tp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=finish_meta(meta), model=args.model, tp=args.tp, target_seconds=TARGET_SECONDS,
                                   timing=row, report=report), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
