"""Fixtures with the shape of real outputs, by construction: one small real run of every job kind
(``launch.registry.KINDS``, bodies in launch/kinds/) through the launcher -- the job queue,
torchrun ranks, gloo on the CPU -- on the tiny random models. Each run's spec.json and result.json
are kept under tests/fixtures/jobs/<name>/.

    .venv/bin/python tests/scripts/make_fixtures.py                        # all (a few minutes on 2 cores)
    .venv/bin/python tests/scripts/make_fixtures.py --only collective-bench-tp2 --out "$TMPDIR/fixtures"

Who reads them: tests/test_app_results.py builds the app's fixture runs from the specs here (every
JobSpec field), writes their run blocks with the worker's own ``run_block``, takes the
collective-bench records from the files here (timings need real processes), and holds the runs it
computes on threaded ranks to these files' keys and value types; tests/test_fixtures.py makes the
collective-bench fixture afresh (slow) and fails when its keys or value types drift from the
checked-in one. Rerun this script when a kind's output changes on purpose, and commit the files.

The files hold no path of the machine that made them: the temporary runs root is written as
``runs`` and every run id as its fixture name (so ``calib_from`` reads ``calibrate``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES_DIR = REPO / "tests" / "fixtures" / "jobs"
SEQ_LEN = 64
MODEL, TP = "tiny-llama", 2
EVAL_SCHEMES = ["bf16", "int4-static", "int4-static-rand1/64", "int4-static-top1/64",
                "int4-token@twoshot+int8-token", "int8-token"]
# The collective bench at two TP sizes: decode, a short and a long prompt at the embedded model's
# width; the exact all-reduce, the paper's gather and a two-shot with an int8 second leg.
BENCH_PARAMS = dict(tokens=[16, 256, 4096], hidden=[576], repeats=5, min_repeats=3, warmup=1, budget_s=1.0,
                    compute_repeats=1, schemes=["bf16", "int4-static-top1/64", "int4-token@twoshot+int8-token"])

# name -> job spec (a plain dict, validated by launch.spec.JobSpec at submit); "calib_from" names
# another fixture, which runs first.
FIXTURES: dict[str, dict] = {
    "calibrate": dict(kind="calibrate", model=MODEL, tp=TP, calib_data="wikipedia", calib_tokens=8 * SEQ_LEN,
                      params=dict(seq_len=SEQ_LEN, batch_size=2)),
    "evaluate": dict(kind="evaluate", model=MODEL, tp=TP, schemes=EVAL_SCHEMES, calib_from="calibrate",
                     calib_tokens=8 * SEQ_LEN, eval_tokens=2 * SEQ_LEN, tasks=["arc_easy", "piqa"], items_per_task=2,
                     params=dict(seq_len=SEQ_LEN, batch_size=2, layer_error=True, layer_error_chunks=1)),
    "sweep": dict(kind="sweep", model=MODEL, tp=TP, schemes=["int8-token"], calib_from="calibrate",
                  calib_tokens=8 * SEQ_LEN, eval_tokens=2 * SEQ_LEN,
                  params=dict(grid=dict(bits=[2, 4], granularity=["token"], rotation=[None, 16]), budget_min=2.0,
                              budget_max=8.5, kl_max=1.0, batch_size=2, seq_len=SEQ_LEN)),
    "tp-check": dict(kind="tp-check", model="tiny-llama-mqa", tp=TP, max_new_tokens=3),
    "generate": dict(kind="generate", model=MODEL, tp=TP, prompt="Hello", max_new_tokens=4),
    "selftest": dict(kind="selftest", model="none", tp=TP, params=dict(sleep_s=0.3)),
    "throughput": dict(kind="throughput", model=MODEL, tp=TP, schemes=["bf16", "int4-token"],
                       params=dict(prompt_tokens=16, new_tokens=3, rounds=1)),
    # the pre-flight audit on the stress model: int4 with fp16 scales cannot hold its overflow site
    "audit": dict(kind="audit", model="stress-tiny", tp=TP, schemes=["int4-group32-sfp16", "int8-group32-sfp32"],
                  eval_tokens=2 * SEQ_LEN, params=dict(seq_len=SEQ_LEN, batch_size=2, site_tokens=SEQ_LEN,
                                                       degrades_kl=0.05)),
    "collective-bench-tp2": dict(kind="collective-bench", model="none", tp=2, link="loopback", params=BENCH_PARAMS),
    "collective-bench-tp4": dict(kind="collective-bench", model="none", tp=4, link="loopback", params=BENCH_PARAMS),
}


def fixture_spec(name: str) -> dict:
    """The checked-in spec.json of fixture ``name`` (every JobSpec field)."""
    return json.loads((FIXTURES_DIR / name / "spec.json").read_text())


def fixture_result(name: str) -> dict:
    """The checked-in result.json of fixture ``name``."""
    return json.loads((FIXTURES_DIR / name / "result.json").read_text())


def _resolve(spec: dict, ids: dict[str, str]) -> dict:
    spec = json.loads(json.dumps(spec))
    if spec.get("calib_from"):
        spec["calib_from"] = ids[spec["calib_from"]]
    return spec


def _normalized(text: str, root: Path, ids: dict[str, str]) -> str:
    """The machine's runs root -> ``runs``, each run id -> its fixture name."""
    text = text.replace(str(root), "runs")
    for name, run_id in ids.items():
        text = text.replace(run_id, name)
    return text


def make(names: list[str], out: Path, timeout_s: float = 900.0) -> dict[str, Path]:
    """Run the fixtures ``names`` (and those they calibrate from) for real; write each one's
    spec.json and result.json under ``out/<name>/``. Returns name -> folder."""
    from launch.queue import JobQueue
    wanted = list(names)
    for name in names:
        source = FIXTURES[name].get("calib_from")
        if source and source not in wanted:
            wanted.insert(0, source)
    previous = os.environ.get("LOWBIT_RUNS")
    with tempfile.TemporaryDirectory(prefix="lowbit-fixtures-") as tmp:
        root = Path(tmp) / "runs"
        os.environ["LOWBIT_RUNS"] = str(root)  # the kinds' checks (calib_from) read the runs root from here
        queue = JobQueue(root, max_parallel=1, poll_s=0.2).start()
        ids: dict[str, str] = {}
        try:
            for name in wanted:
                run_id = queue.submit(_resolve(FIXTURES[name], ids))
                row = queue.wait(run_id, timeout_s=timeout_s)
                if row["status"] != "done":
                    raise SystemExit(f"fixture {name}: run {run_id} ended {row['status']}: {row['error']}")
                ids[name] = run_id
                print(f"{name}: {run_id} done", flush=True)
        finally:
            queue.stop(kill_running=True)
            if previous is None:
                os.environ.pop("LOWBIT_RUNS", None)
            else:
                os.environ["LOWBIT_RUNS"] = previous
        written = {}
        for name in names:
            folder = Path(out) / name
            folder.mkdir(parents=True, exist_ok=True)
            for file in ("spec.json", "result.json"):
                data = json.loads(_normalized((root / ids[name] / file).read_text(), root, ids))
                (folder / file).write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=True) + "\n")
            written[name] = folder
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/scripts/make_fixtures.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(FIXTURES), default=list(FIXTURES), metavar="NAME",
                    help=f"fixtures to make (default: all): {', '.join(FIXTURES)}")
    ap.add_argument("--out", type=Path, default=FIXTURES_DIR, help="folder for <name>/spec.json and result.json")
    args = ap.parse_args(argv)
    for name, folder in make(args.only, args.out).items():
        print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
