"""Submit-and-watch for every command line: queue a spec, draw its progress, report its end.

    python -m launch calibrate --model smollm2-135m --tp 3 --tokens 4096
    python -m launch evaluate --tp 3 --schemes bf16,int4-static-top1/64 --calib-from <id> --tasks arc_easy
    python -m launch tp-check --model smollm2-135m --tp 3

``python -m lowbit calibrate|evaluate|tp-check`` hands over to these (the library does not import
the job layer). ``bench.*`` scripts and ``python -m launch submit --wait`` use ``submit_and_watch``
/ ``watch`` too: one loop that runs the queue here until the run ends; Ctrl-C cancels it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


from launch.events import progress, read_events, text_bar
from launch.index import RunIndex
from launch.layout import run_paths
from launch.queue import JobQueue, cancel
from launch.spec import SpecError
from lowbit.model.models import ModelUnavailable, load_config, prepare
from lowbit.stats import UNRESOLVED_NOTE, score_table
from lowbit.model.tp import TPSizeError, check_tp_size

_last_progress = [""]


def print_progress(run_id: str, final: bool = False) -> None:
    """Redraw the bar in place on a terminal; elsewhere print a line only when it changes."""
    fraction, message = progress(read_events(run_paths(run_id).events))
    line = text_bar(fraction, message)[:110]
    if line == _last_progress[0] and not final:
        return
    _last_progress[0] = line
    if sys.stdout.isatty():
        print(f"\r{line:<110}", end="\n" if final else "", flush=True)
    elif not final:
        print(line, flush=True)


def watch(queue: JobQueue, run_id: str) -> dict:
    """Run the queue here until ``run_id`` ends, drawing its progress bar; Ctrl-C cancels it.
    Returns its index row."""
    queue.start()
    try:
        row = queue.wait(run_id, on_poll=lambda row: print_progress(run_id))
    except KeyboardInterrupt:
        print(f"\ncancelling {run_id} ...")
        cancel(run_id)
        row = RunIndex().get(run_id)
    finally:
        queue.stop()
    print_progress(run_id, final=True)
    return row


def report_end(row: dict) -> int:
    took = f"{row['finished'] - row['started']:.1f} s" if row["started"] and row["finished"] else "-"
    print(f"{row['id']}: {row['status']} ({took})")
    if row["status"] != "done":
        print(row["error"] or "", file=sys.stderr)
        return 1
    for name in row["result_paths"]:
        print(f"  {run_paths(row['id']).dir / name}")
    return 0


def submit_and_watch(spec: dict, label: str | None = None) -> tuple[int, str | None, dict | None]:
    """Queue ``spec`` (validated once, here), watch it to its end; (exit code, run id, rank 0's
    result or None). Exit code 2: the spec was refused, each problem printed with its field."""
    try:
        queue = JobQueue()
        run_id = queue.submit(spec)
    except SpecError as exc:
        for name, problem in exc.problems:
            print(f"error: {name}: {problem}", file=sys.stderr)
        return 2, None, None
    print(label or f"run {run_id}: {spec['kind']} {spec.get('model', '')} at TP {spec.get('tp', 1)}", flush=True)
    code = report_end(watch(queue, run_id))
    result = run_paths(run_id).result
    return code, run_id, (json.loads(result.read_text()) if code == 0 and result.exists() else None)


# -- the method's commands ------------------------------------------------------------------------
def _method_spec(args, kind: str) -> dict:
    params = {k: v for k, v in dict(seq_len=args.seq_len, batch_size=args.batch_size, gamma=args.gamma).items()
              if v is not None}
    return dict(kind=kind, model=args.model, tp=args.tp, backend=args.backend, calib_data=args.data,
                calib_tokens=args.tokens, time_limit_s=args.time_limit, params=params)


def cmd_calibrate(args) -> int:
    """Queue a calibration run and watch it."""
    code, _, result = submit_and_watch(_method_spec(args, "calibrate"))
    if result:
        print(f"calibration artifact: {result['artifact']}")
    return code


def format_results(result: dict) -> str:
    """evaluate's records as a text table (one row per scheme; ``lowbit.stats.score_table``):
    every task score with its standard error, the paired difference to the reference with its
    error, % kept with its error (``!`` when the error exceeds the gap it claims)."""
    frame = score_table(result)
    text = frame.to_string(index=False)
    if any(str(v).endswith(" !") for v in frame.get("kept %", [])):
        text += "\n" + UNRESOLVED_NOTE
    if any(c.startswith("Δ ") for c in frame.columns):
        text += (f"\n± one standard error over the items; Δ: paired difference to {result.get('reference', 'fp32')} "
                 "on the same items, percentage points")
    return text


def cmd_evaluate(args) -> int:
    spec = _method_spec(args, "evaluate")
    schemes = [s.strip() for s in (args.schemes or "").split(",") if s.strip()] + (args.scheme or [])
    spec.update(schemes=schemes or ["int4-static-top1/64"], eval_data=args.eval_data,
                eval_tokens=args.eval_tokens, tasks=[t for t in args.tasks.split(",") if t],
                items_per_task=args.items, seed=args.seed, calib_from=args.calib_from)
    if args.no_layer_error:
        spec["params"]["layer_error"] = False
    code, _, result = submit_and_watch(spec)
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


def cmd_tp_check(args) -> int:
    try:
        check_tp_size(load_config(args.model), args.tp, args.model)
        prepare(args.model)
    except (TPSizeError, ModelUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = dict(kind="tp-check", model=args.model, tp=args.tp, backend=args.backend,
                max_new_tokens=args.max_new_tokens, prompt=args.prompt)
    start = time.perf_counter()
    code, _, report = submit_and_watch(spec)
    if report is None:
        return code or 1
    print(f"model {report['model']}  tp {report['tp']}  backend {report['backend']}  "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"unsharded: {report['full_text']!r}")
    print(f"sharded:   {report['sharded_text']!r}")
    print(f"max abs logit diff {report['max_abs_logit_diff']:.3g} (tolerance {report['atol']:g}); "
          f"greedy continuation match: {'yes' if report['greedy_match'] else 'no'}; "
          f"{'OK' if report['ok'] else 'MISMATCH'}")
    return 0 if report["ok"] else 1


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




def add_commands(sub) -> None:
    """The method's subcommands (calibrate, evaluate, tp-check) on an argparse ``sub`` parser."""
    p = sub.add_parser("tp-check", help="sharded vs unsharded logits and greedy text")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompt", default=None)
    p.set_defaults(fn=cmd_tp_check)
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
    p.add_argument("--tasks", default="", help="comma-separated, e.g. arc_easy,piqa (`python -m lowbit tasks` "
                   "lists them all)")
    p.add_argument("--items", type=int, default=50, help="items per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-layer-error", action="store_true")
    p.set_defaults(fn=cmd_evaluate)
