"""How long the classroom demo takes from submit to result, the way docs/teaching.md times it.

    LOWBIT_RUNS=runs python -m bench.demo_timing --model gemma3-270m --tp 2

Submits ``launch.presets.demo_spec`` with ``python -m launch submit <spec> --wait`` (a child
process, timed from its start to its exit) ``--repeats`` times (default 2): the first finds the
demo's shared calibration missing when it is (calibration cold) and makes it, the next ones reuse
it. Before each submit it records whether the converted model and the demo's calibration are
cached, the load average before and after (the machine may be shared) and the CPU seconds of
the whole run (every rank; ``resource.RUSAGE_CHILDREN``), which a busy machine does not inflate
the way it does the wall time. ``--fresh-calibration`` makes the first submit calibration-cold
without deleting anything: a new cache root links the real one's models and tokens. Per submit it saves
the run id, the wall time, the seconds per stage from the run's events (``bench.accuracy.
stage_seconds``; the first stage after loading also carries the model load) and the demo's
metrics per scheme (top-1 agreement, KL, perplexity). Writes ``bench/results/demo-<model>-tp<N>.json``
with a meta block.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._meta import end_load, finish_meta, path as meta_path, start_load, start_meta
from bench.accuracy import stage_seconds
from launch.events import read_events
from launch.layout import calibration_folder, run_paths
from launch.presets import demo_spec
from launch.spec import JobSpec
from lowbit.artifacts import cache_root

RUN_ID = re.compile(r"submitted (\S+)")


def submit_timed(spec: dict) -> dict:
    """One ``python -m launch submit --wait`` of ``spec``: run id, wall seconds, load before/after."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    load = start_load()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "launch", "submit", f.name, "--wait"], capture_output=True,
                          text=True)
    wall = time.time() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(f.name)
    found = RUN_ID.search(proc.stdout)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"demo submit failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    # every process of the run (torchrun, its ranks) is waited for below the child, so their CPU
    # time adds up here: a measure of the work that a loaded machine's wall time does not give
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return dict(run=found.group(1), wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
                load=end_load(load))


def fresh_calibration_cache() -> Path:
    """A new cache root whose entries link to the real one's, all but the shared calibrations
    (``calib``): the model and token caches stay warm, the demo's calibration is cold."""
    root = Path(tempfile.mkdtemp(prefix="lowbit-cache-"))
    for entry in cache_root().iterdir():
        if entry.name != "calib":
            (root / entry.name).symlink_to(entry)
    return root


def demo_metrics(result: dict) -> dict:
    """{scheme: top-1 agreement, KL, perplexity} of a demo result."""
    return {r["scheme"]: dict(top1_agreement=r["top1_agreement"], kl=r["kl"], ppl=r["ppl"])
            for r in result["records"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="submits in a row (the first may calibrate)")
    parser.add_argument("--fresh-calibration", action="store_true",
                        help="run against a new cache root linked to the real one but without its calibrations, "
                             "so the first submit calibrates (model cache warm, calibration cold)")
    parser.add_argument("--out", default=None, help="default bench/results/demo-<model>-tp<N>.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: must be >= 1, got {args.repeats}")
    meta = start_meta("bench.demo_timing", sys.argv[1:] if argv is None else list(argv))
    if args.fresh_calibration:
        os.environ["LOWBIT_CACHE"] = str(fresh_calibration_cache())  # the submits inherit it
    spec = demo_spec(args.model, args.tp)
    calib = calibration_folder(JobSpec.from_dict(spec))
    model_dir = cache_root() / "models" / args.model.replace("/", "--")
    submits = []
    for i in range(args.repeats):
        state = dict(model_cached=model_dir.exists(), calibration_cached=calib.exists())
        row = dict(state, **submit_timed(spec))
        result = json.loads(run_paths(row["run"]).result.read_text())
        row.update(stages={k: round(v, 1) for k, v in stage_seconds(read_events(run_paths(row["run"]).events)).items()},
                   metrics=demo_metrics(result), eval_tokens=result["eval_tokens"],
                   calibration_tokens=(result.get("calibration") or {}).get("tokens"))
        submits.append(row)
        print(f"submit {i + 1}: {row['run']} {row['wall_seconds']:.0f} s, {row['cpu_seconds']:.0f} CPU s (model cached {state['model_cached']}, "
              f"calibration cached {state['calibration_cached']}; load {row['load']['start']} -> {row['load']['end']})")
        print("  stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in row["stages"].items()))
        print("  " + "; ".join(f"{s}: top-1 {100 * m['top1_agreement']:.1f}% KL {m['kl']:.4f}"
                               for s, m in row["metrics"].items()))
    out = Path(args.out or f"bench/results/demo-{args.model}-tp{args.tp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=finish_meta(meta), model=args.model, tp=args.tp, spec=spec,
                                   cache_root=meta_path(cache_root()), calibration_folder=meta_path(calib), submits=submits),
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
