"""Prefill and decode tokens/s of a TP model with the exact all-reduce vs quantized schemes, and
the share of each rank's time spent communicating (quantize + collective + dequantize).

    python -m bench.throughput --tp 3 --schemes bf16,int4-static-top1/64 --out bench/results/throughput.json
    python -m bench.throughput --tp 3 --link 100mbit ...     # on the emulated cluster's links

Runs as the ``throughput`` job kind (real torchrun ranks through the launch queue). Every scheme
is timed in the same run, interleaved round by round (scheme A, B, A, B, ...) so that machine
noise hits them alike; the medians are reported, with the ratio to the first scheme. The
communication share is measured per rank from the communicator's own per-call wall times.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from launch.kinds import codec as kind_codec
from bench._meta import command as meta_command, end_load, start_load
from launch.kinds.method import plan as scheme_plan
from launch.kinds.method import progress as job_progress
from launch.kinds.throughput import DEFAULTS, check_params  # noqa: F401 - the kind owns its params
from launch.layout import calibration_folder, calibration_params
from lowbit.method.calibrate import load_or_calibrate
from lowbit.method.evaluate import make_communicator
from lowbit.model.data import token_chunks
from lowbit.model.engine import build_tp_model, greedy_generate
from lowbit.model.tp import set_communicator
from lowbit.scheme.plan import SchemePlan


def throughput_job(ctx) -> dict | None:
    """Job kind body (every rank): time prefill and decode for each scheme of the spec."""


    spec, group = ctx.spec, ctx.group
    p = dict(DEFAULTS, **spec.params)
    schemes = list(spec.schemes) or ["bf16", "int4-static-top1/64"]
    ctx.events.loading(f"loading {spec.model} sharded {group.world_size} ways")
    tp = build_tp_model(spec.model, group)
    plan = scheme_plan(ctx) if spec.schemes else SchemePlan(schemes)
    calibration = None
    if plan.needs_calibration:
        calibration = load_or_calibrate(tp, group, calibration_params(spec),
                                        calibration_folder(spec, ctx.paths.run_id, ctx.paths.root))
    ids = token_chunks(tp.tokenizer, spec.eval_data, "eval", p["batch"], p["prompt_tokens"])
    codec_label, codec = kind_codec.make(kind_codec.codec_name(p, "kernels"))
    # no per-call counters: their torch decode would be timed as communication
    comms = {s: make_communicator(group, plan[s], calibration, codec, job_progress(ctx), counters=False)
             for s in schemes}
    timings = {s: dict(prefill=[], decode=[], prefill_comm=[], decode_comm=[]) for s in schemes}
    total = p["rounds"] * len(schemes)
    step = 0
    for round_ in range(p["rounds"] + 1):  # round 0 warms up every scheme
        for scheme, comm in comms.items():
            set_communicator(tp.model, comm)
            group.barrier()
            comm.calls.clear()
            out = greedy_generate(tp.model, ids, p["new_tokens"])
            prefill_calls = 2 * tp.model.config.num_hidden_layers
            comm_prefill = sum(c.seconds for c in comm.calls[:prefill_calls])
            comm_decode = sum(c.seconds for c in comm.calls[prefill_calls:])
            if round_ == 0:
                continue
            t = timings[scheme]
            t["prefill"].append(out["prefill_seconds"])
            t["decode"].append(out["decode_seconds"])
            t["prefill_comm"].append(comm_prefill)
            t["decode_comm"].append(comm_decode)
            step += 1
            ctx.events.step(step, total, f"round {round_}/{p['rounds']}: {scheme}")
    gathered = group.all_gather(torch.tensor([[statistics.median(timings[s][k]) for k in
                                               ("prefill", "decode", "prefill_comm", "decode_comm")]
                                              for s in schemes], dtype=torch.float64))  # [tp, schemes, 4]
    if group.rank != 0:
        return None
    records = []
    for i, scheme in enumerate(schemes):
        per_rank = gathered[:, i]
        prefill_s, decode_s = per_rank[:, 0].max().item(), per_rank[:, 1].max().item()  # the slowest rank sets the pace
        records.append(dict(
            scheme=scheme, prompt_tokens=p["prompt_tokens"] * p["batch"], new_tokens=p["new_tokens"] * p["batch"],
            prefill_tokens_per_s=p["prompt_tokens"] * p["batch"] / prefill_s,
            decode_tokens_per_s=(p["new_tokens"] - 1) * p["batch"] / decode_s if decode_s > 0 else None,
            prefill_comm_share=[round(v, 4) for v in (per_rank[:, 2] / per_rank[:, 0]).tolist()],
            decode_comm_share=[round(v, 4) for v in (per_rank[:, 3] / per_rank[:, 1]).tolist()],
            bits_per_value=8.0 * sum(c.bytes_sent for c in comms[scheme].calls)
            / max(1, sum(c.tokens * c.hidden for c in comms[scheme].calls))))
    base = records[0]
    for r in records:
        r["prefill_speedup"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        r["decode_speedup"] = (r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                               if r["decode_tokens_per_s"] and base["decode_tokens_per_s"] else None)
    return dict(model=spec.model, tp=group.world_size, link=spec.link, rounds=p["rounds"], records=records,
                codec=codec_label, codec_paths={s: c.paths.by_site() for s, c in comms.items()}, gates=getattr(ctx, "gates", None))


def markdown(result: dict) -> str:
    lines = ["| scheme | bits/value | prefill tok/s | × vs first | comm share (ranks) | decode tok/s | × vs first | comm share (ranks) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        share = lambda v: " / ".join(f"{100 * x:.0f}%" for x in v)  # noqa: E731
        lines.append(f"| `{r['scheme']}` | {r['bits_per_value']:.4g} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['prefill_speedup']:.2f} | {share(r['prefill_comm_share'])} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_speedup']:.2f} | {share(r['decode_comm_share'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.accuracy import run_job
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--schemes", default="bf16,int4-static-top1/64,int4-static-top1/64@twoshot")
    parser.add_argument("--link", default="loopback")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"])
    parser.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"])
    parser.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    parser.add_argument("--codec", choices=kind_codec.CODECS, default=DEFAULTS["codec"],
                        help="kernels: kernels.dispatch inside the communicators (default); reference: lowbit's torch path")
    parser.add_argument("--calib-from", default=None)
    parser.add_argument("--out", default="bench/results/throughput.json")
    args = parser.parse_args(argv)
    spec = dict(kind="throughput", model=args.model, tp=args.tp, backend="auto", link=args.link,
                schemes=[s for s in args.schemes.split(",") if s], calib_from=args.calib_from,
                calib_tokens=4096, eval_data="wikipedia", time_limit_s=3 * 3600.0,
                params=dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, rounds=args.rounds,
                            codec=args.codec))
    load = start_load()
    run_id, result = run_job(spec)
    result.update(command=meta_command("bench.throughput", sys.argv[1:] if argv is None else list(argv)),
                  machine=f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores", date=time.strftime("%Y-%m-%d"),
                  load=end_load(load), run=run_id)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    out.with_suffix(".md").write_text(f"{result['model']}, TP {result['tp']}, link {result['link']}, "
                                      f"{result['machine']}, {result['date']}\n\n{table}\n\n`{result['command']}`\n")
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
