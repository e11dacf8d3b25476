"""``python -m lowbit audit`` (= ``python -m launch audit``): queue a pre-flight audit, watch it,
print its report and write it as JSON and Markdown.

    python -m lowbit audit --model smollm2-135m --tp 3                       # every preset that runs at TP 3
    python -m lowbit audit --model gemma3-270m --tp 2 --formats quickreduce-int4,mxfp8 --degrades-kl 0.05
    python -m lowbit audit --model ./my-hf-folder --tp 2 --out reports/      # a local HF folder

The run goes through the same queue as every job (``launch.client.submit_and_watch``); its
folder keeps result.json (the report) and audit.md. ``--out DIR`` also writes
``DIR/audit-<model>-tp<N>.json`` and ``.md``. A refused spec exits 2 with each problem named by
its flag (``--formats: 'foo': ...``), a failed run 1.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from launch.client import submit_and_watch
from launch.kinds.audit import MARKDOWN_FILE
from launch.layout import run_paths
from launch.spec import JobSpec, SpecError
from lowbit.method.audit import AUDIT_DEFAULTS, Thresholds, runnable_presets
from lowbit.method.audit_report import markdown
from lowbit.model.models import ModelUnavailable, load_config
from lowbit.model.tp import text_config
from lowbit.scheme import PRESETS

FLAGS = {"schemes": "--formats", "eval_data": "--eval-data", "eval_tokens": "--eval-tokens", "calib_from": "--calib-from",
         "time_limit_s": "--time-limit"}
DEFAULT_EVAL_TOKENS = 1024
DEFAULT_SITE_TOKENS = 512


def flag_of(field: str) -> str:
    """The command-line flag of a spec field (``schemes[2]`` -> ``--formats``, ``params.breaks_kl``
    -> ``--breaks-kl``)."""
    name = re.sub(r"\[\d+\]$", "", field).removeprefix("params.")
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def default_formats(model: str, tp: int) -> tuple[list[str], dict[str, str]]:
    """Every preset that runs at this model's hidden size and ``tp``, and why the others do not
    (all presets when the model's config cannot be read: the spec check then names the model)."""
    try:
        hidden = text_config(load_config(model)).hidden_size
    except (OSError, ValueError, KeyError, ModelUnavailable):  # the spec check names the model field
        return list(PRESETS), {}
    return runnable_presets(hidden, tp)


def audit_spec(args) -> dict:
    """The job spec of the command line's arguments (validated at submit)."""
    model = args.model
    if Path(model).is_dir():  # the ranks run elsewhere (the repository root): pass the folder absolute
        model = str(Path(model).resolve())
    if args.formats is None:  # every preset that runs here; the others are named on stderr
        formats, left_out = default_formats(model, args.tp)
        for name, why in left_out.items():
            print(f"note: {name} left out (cannot run at this model and TP size): {why}", file=sys.stderr)
    else:
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    params = dict(seq_len=args.seq_len, batch_size=args.batch_size, site_tokens=args.site_tokens,
                  max_fixes=args.max_fixes, codec=args.codec)
    if args.gate_bytes is not None:
        params["gate_bytes"] = args.gate_bytes
    params.update({name: getattr(args, name) for name in Thresholds.names()})
    return dict(kind="audit", model=model, tp=args.tp, backend=args.backend, schemes=formats, eval_data=args.eval_data,
                eval_tokens=args.eval_tokens, calib_from=args.calib_from, seed=args.seed,
                time_limit_s=args.time_limit, params=params)


def cmd_audit(args) -> int:
    spec = audit_spec(args)
    try:
        JobSpec.from_dict(spec)
    except SpecError as exc:
        for field, problem in exc.problems:
            print(f"error: {flag_of(field)} ({field}): {problem}", file=sys.stderr)
        return 2
    code, run_id, report = submit_and_watch(spec)
    if report is None:
        return code
    text = run_paths(run_id).file(MARKDOWN_FILE).read_text()
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"audit-{Path(report['model']).name}-tp{report['tp']}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (out / f"{stem}.md").write_text(markdown(report))
        print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return code


def add_command(sub) -> None:
    """The ``audit`` subcommand on an argparse ``sub`` parser."""
    th = Thresholds()
    p = sub.add_parser("audit", help="pre-flight audit: will a quantized all-reduce break this model, where, and "
                                     "the cheapest measured fix", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="an embedded or tiny model name (python -m lowbit "
                   "models), stress-tiny, or a local Hugging Face folder (config.json + safetensors + tokenizer)")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--formats", default=None, help="comma-separated presets or scheme strings (default: every "
                   f"preset: {', '.join(PRESETS)}); the exact bf16 all-reduce is always the baseline")
    p.add_argument("--eval-data", default="wikipedia", help="held-out text for KL, top-1 and perplexity")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    p.add_argument("--site-tokens", type=int, default=DEFAULT_SITE_TOKENS, help="tokens of the per-site pass")
    p.add_argument("--seq-len", type=int, default=AUDIT_DEFAULTS["seq_len"])
    p.add_argument("--batch-size", type=int, default=AUDIT_DEFAULTS["batch_size"],
                   help="sequences per forward: a message is batch-size x seq-len tokens")
    p.add_argument("--breaks-kl", type=float, default=th.breaks_kl, help="KL above this: breaks (nats per token)")
    p.add_argument("--degrades-kl", type=float, default=th.degrades_kl, help="KL above this: degrades")
    p.add_argument("--min-sqnr-db", type=float, default=th.min_sqnr_db, help="a site below this SQNR: degrades")
    p.add_argument("--max-group-loss", type=float, default=th.max_group_loss,
                   help="share of a site's groups attenuated or underflowed above which it degrades (0: any)")
    p.add_argument("--gate-bytes", type=int, default=None, help="the size gate to try as a fix (default: just "
                   "above the audit's message size)")
    p.add_argument("--max-fixes", type=int, default=AUDIT_DEFAULTS["max_fixes"], help="fixes tried per format")
    p.add_argument("--codec", default="reference", choices=["reference", "kernels"])
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--calib-from", default=None, help="run id of a calibrate run (formats with static scales)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=3600.0, help="seconds")
    p.add_argument("--out", default=None, help="also write DIR/audit-<model>-tp<N>.json and .md")
    p.set_defaults(fn=cmd_audit)
