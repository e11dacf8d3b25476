"""lowbit command line.

    python -m lowbit models                          # what can be loaded here
    python -m lowbit tp-check --model smollm2-135m --tp 3
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
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
