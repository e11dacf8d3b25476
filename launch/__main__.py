"""Command line for jobs: submit, watch, list, cancel.

    python -m launch submit spec.json [--wait]   # queue a run; --wait shows a progress bar until it ends
    python -m launch list                        # every run: status, kind, model, tp, times
    python -m launch show ID                     # one run: index row, spec, result files, error
    python -m launch cancel ID                   # stop a queued or running run (whole process group)
    python -m launch tail ID [--follow]          # its progress events (and, with --logs, torchrun's log)
    python -m launch commands spec.json          # multi-node: the torchrun command to run on each node
    python -m launch serve [--until-idle]        # run the queue in this process
    python -m launch calibrate|evaluate|tp-check ...   # the method's jobs, queued and watched (launch.client)
    python -m launch audit --model M --tp N            # the pre-flight audit (launch.audit_cli)

Runs live under $LOWBIT_RUNS (default ./runs). Without --wait, ``submit`` starts a background
``serve --until-idle`` when no other process (the app, another CLI) is running the queue.
Exit codes: 0 ok, 1 the run failed / was cancelled / timed out, 2 bad spec or usage.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from launch import audit_cli, client
from launch.client import report_end, watch
from launch.events import progress, read_events, text_bar
from launch.index import FINISHED, RunIndex
from launch.layout import queue_lock_path, queue_log_path, run_id_problem, run_paths, runs_root
from launch.procs import lock_held
from launch.queue import JobQueue, cancel, list_runs
from launch.spec import JobSpec, SpecError
from launch.submit import REPO_ROOT, node_commands, write_spec


def _load_spec(path: str) -> JobSpec:
    return JobSpec.load(Path(path))


def _queue_owner_alive() -> bool:
    return lock_held(queue_lock_path())


def _start_background_queue() -> None:
    log = open(queue_log_path(), "ab")
    subprocess.Popen([sys.executable, "-m", "launch", "serve", "--until-idle"], cwd=REPO_ROOT,
                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                     env=dict(os.environ, LOWBIT_RUNS=str(runs_root())))


def cmd_submit(args) -> int:
    spec = _load_spec(args.spec)
    queue = JobQueue()
    run_id = queue.submit(spec)
    print(f"submitted {run_id}  ({spec.kind}, {spec.model}, tp {spec.tp})")
    if not args.wait:
        if not _queue_owner_alive():
            _start_background_queue()
        print(f"follow it with: python -m launch tail {run_id} --follow")
        return 0
    return report_end(watch(queue, run_id))


def _fmt_time(t) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_list(args) -> int:
    rows = list_runs()
    print(f"{'id':40s} {'status':10s} {'kind':10s} {'model':16s} {'tp':>3s} {'created':15s} {'took':>8s}")
    for r in rows:
        took = f"{r['finished'] - r['started']:.1f}s" if r.get("started") and r.get("finished") else ""
        note = f"  ({r['problem']})" if r.get("problem") else ""
        print(f"{r['id']:40s} {r['status']:10s} {str(r['kind']):10s} {str(r['model'])[:16]:16s} "
              f"{str(r['tp'] or ''):>3s} {_fmt_time(r.get('created')):15s} {took:>8s}{note}")
    return 0


def _check_id(run_id: str) -> None:
    problem = run_id_problem(run_id)
    if problem:
        raise SystemExit(f"error: run id {run_id!r}: {problem}")


def cmd_show(args) -> int:
    _check_id(args.id)
    row = next((r for r in list_runs() if r["id"] == args.id), None)
    if row is None:
        print(f"error: unknown run {args.id!r}", file=sys.stderr)
        return 2
    spec = row.pop("spec_json", None)
    error = row.pop("error", None)
    for key, value in row.items():
        if key in ("created", "started", "finished"):
            value = _fmt_time(value)
        print(f"{key:14s} {value}")
    fraction, message = progress(read_events(run_paths(args.id).events))
    print(f"{'progress':14s} {text_bar(fraction, message)}")
    if spec:
        print("spec:\n" + json.dumps(json.loads(spec), indent=2, sort_keys=True))
    if error:
        print("error:\n" + error)
    return 0


def cmd_cancel(args) -> int:
    _check_id(args.id)
    try:
        status = cancel(args.id)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(f"{args.id}: {status}")
    return 0


def cmd_tail(args) -> int:
    _check_id(args.id)
    paths = run_paths(args.id)
    index = RunIndex()
    if index.get(args.id) is None and not paths.dir.is_dir():
        print(f"error: unknown run {args.id!r}", file=sys.stderr)
        return 2
    shown = 0
    while True:
        events = read_events(paths.events)
        for e in events[shown:]:
            counter = f" {e['step']}/{e['total']}" if e.get("total") else ""
            metrics = f"  {json.dumps(e['metrics'])}" if e.get("metrics") else ""
            print(f"{_fmt_time(e.get('time'))}  {e['stage']}{counter}  {e.get('message', '')}{metrics}", flush=True)
        shown = len(events)
        row = index.get(args.id)
        if not args.follow or row is None or row["status"] in FINISHED:
            break
        time.sleep(0.5)
    if args.logs and paths.launcher_log.exists():
        print(paths.launcher_log.read_text(errors="replace")[-20_000:])
    if row is not None and row["status"] in FINISHED:
        print(f"-- {row['status']}" + (f": {row['error'].splitlines()[0]}" if row["error"] else ""))
    return 0


def cmd_commands(args) -> int:
    spec = _load_spec(args.spec)
    if args.write:
        spec, paths = write_spec(spec)
        spec_path = paths.spec
    else:
        spec_path = Path(args.spec).resolve()
    print(f"# {spec.nnodes} node(s) x {spec.nproc_per_node} rank(s); run from {REPO_ROOT} on each node, with "
          f"the spec at {spec_path}")
    for node, cmd in enumerate(node_commands(spec, spec_path)):
        print(f"# node {node}\n{shlex.join(cmd)}")
    return 0


def cmd_serve(args) -> int:
    queue = JobQueue(max_parallel=args.max_parallel)
    if args.until_idle:
        try:
            queue.run_until_idle(idle_s=2.0)
        finally:
            queue.stop()
        return 0
    queue.start()
    print(f"queue running on {queue.root} (max_parallel {queue.max_parallel}); Ctrl-C to stop "
          "(running jobs continue and are re-attached by the next queue)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        queue.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    client.add_commands(sub)
    audit_cli.add_command(sub)
    p = sub.add_parser("submit", help="queue a run from a spec.json")
    p.add_argument("spec")
    p.add_argument("--wait", action="store_true", help="run the queue here and show progress until it ends")
    p.set_defaults(fn=cmd_submit)
    sub.add_parser("list", help="all runs").set_defaults(fn=cmd_list)
    for name, fn, help_ in (("show", cmd_show, "one run in detail"), ("cancel", cmd_cancel, "cancel a run")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("id")
        p.set_defaults(fn=fn)
    p = sub.add_parser("tail", help="progress events of a run")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--logs", action="store_true", help="also print torchrun's log")
    p.set_defaults(fn=cmd_tail)
    p = sub.add_parser("commands", help="per-node torchrun commands for a (multi-node) spec")
    p.add_argument("spec")
    p.add_argument("--write", action="store_true", help="first write the spec to runs/<id>/spec.json")
    p.set_defaults(fn=cmd_commands)
    p = sub.add_parser("serve", help="run the queue in this process")
    p.add_argument("--until-idle", action="store_true", help="exit when nothing is queued or running")
    p.add_argument("--max-parallel", type=int, default=None)
    p.set_defaults(fn=cmd_serve)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as exc:
        print("invalid spec:\n" + "\n".join(f"  {f}: {m}" for f, m in exc.problems), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
