"""How fast task scoring is: the packed scorer at TP N against the old path and the single-process floor.

    python -m bench.scoring --model smollm2-135m --tp 3 --tasks arc_easy,piqa --items 40 \\
        --schemes bf16,int4-static-top1/64 --calib-from <calibrate run> --out bench/results/scoring-smollm2-135m-tp3.json

One invocation, the same items throughout, the machine's load beside each part:
1. ``packed``: an evaluate job at TP N with the packed scorer (``lowbit.method.choices``);
2. ``legacy``: the same job with ``params.legacy_scoring`` (each choice's whole sequence, 32 per
   forward, the full head on every rank: the path before issue 27);
3. ``floor``: the unsharded model in this one process scoring the same items once with the packed
   scorer and no communication (``floor_seconds``; torch's default threads).
Each job times the forwards of every scheme on rank 0 (``result.task_timing``: tokenizing and
packing, done once for all schemes, are counted apart). The figures: seconds per item per scheme
of each path, ``legacy / packed`` (the speed-up on the same items) and ``packed / floor`` (how far
TP N over gloo on this machine is from one process doing the whole model). The machine is shared:
the ratios are measured minutes apart in one run, each with the load averages around it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench._meta import end_load, finish_meta, start_load, start_meta
from launch.client import submit_and_watch
from launch.kinds import codec as kind_codec
from lowbit.method.evaluate import REFERENCE, task_hits, task_logliks
from lowbit.model.data import load_task
from lowbit.model.models import load_model


def floor_seconds(model_name: str, tasks: list[str], items: int | dict[str, int], seed: int,
                  max_tokens: int | None = None) -> dict:
    """The unsharded single-process run of the same items: the whole model in this process, the
    packed scorer, no communicator, torch's default threads. {task: {items, seconds,
    seconds_per_item, accuracy}} of the forwards (tokenizing and packing apart, as the jobs count
    them), with the threads and the load before and after."""
    counts = items if isinstance(items, dict) else dict.fromkeys(tasks, items)
    loaded = load_model(model_name)
    load = start_load()
    out = {}
    for task in tasks:
        chosen = {task: load_task(task, counts[task], seed)}
        kwargs = {} if max_tokens is None else dict(max_tokens=max_tokens)
        scored = task_logliks(loaded.model, None, loaded.tokenizer, chosen, {REFERENCE: None}, **kwargs)
        hits = task_hits(scored)[REFERENCE][task]
        n = len(chosen[task])
        seconds = scored.seconds[REFERENCE]
        out[task] = dict(items=n, seconds=seconds, seconds_per_item=seconds / n, shared_seconds=scored.shared_seconds,
                         acc=sum(hits["acc"]) / n, acc_norm=sum(hits["acc_norm"]) / n)
    return dict(tasks=out, threads=torch.get_num_threads(), load=end_load(load))


def task_scores(result: dict) -> dict:
    """{scheme: {task: {acc, acc_norm, flipped}}} of an evaluate result: what the two paths must agree on."""
    return {r["scheme"]: {t: {k: row[k] for k in ("acc", "acc_norm", "flipped")} for t, row in r["tasks"].items()}
            for r in result["records"]}


def score_agreement(data: dict) -> list[str]:
    """Where the packed and the old path's scores differ on the same items (one line each), with
    the items that difference is worth."""
    if "legacy" not in data["parts"] or "scores" not in data["parts"]["packed"]:
        return []
    packed, legacy, n = data["parts"]["packed"]["scores"], data["parts"]["legacy"]["scores"], data["items_per_task"]
    out = []
    for scheme, tasks in packed.items():
        for task, row in tasks.items():
            other = legacy[scheme][task]
            moved = {k: round(abs(row[k] - other[k]) * n) for k in ("acc", "acc_norm") if row[k] != other[k]}
            if moved:
                out.append(f"`{scheme}` {task}: " + ", ".join(f"{k} {100 * row[k]:.1f} vs {100 * other[k]:.1f} "
                                                              f"({v} item{'s' if v > 1 else ''})" for k, v in moved.items()))
    return out


def per_item(timing: dict) -> float:
    """Mean seconds per item per scheme of a job's ``task_timing``."""
    schemes = timing["schemes"]
    return sum(s["seconds"] for s in schemes.values()) / (timing["items"] * len(schemes))


def run_evaluate(args, legacy: bool) -> tuple[str, dict, dict]:
    """(run id, result, load around it) of one evaluate job on the bench's items."""
    params = dict(seq_len=args.seq_len, layer_error=False, legacy_scoring=legacy, codec=args.codec)
    spec = dict(kind="evaluate", model=args.model, tp=args.tp, backend="auto", calib_data="wikipedia",
                calib_tokens=args.calib_tokens, calib_from=args.calib_from, eval_data="wikipedia",
                eval_tokens=args.seq_len, schemes=args.schemes.split(","), tasks=args.tasks.split(","),
                items_per_task=args.items, seed=args.seed, time_limit_s=7 * 24 * 3600.0, params=params)
    load = start_load()
    code, run_id, result = submit_and_watch(spec)
    end_load(load)
    if result is None:
        raise SystemExit(f"{run_id or 'evaluate'} did not finish (exit {code})")
    return run_id, result, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--schemes", default="bf16,int4-static-top1/64")
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--calib-from", default=None, help="a calibrate run (needed by schemes with static scales)")
    parser.add_argument("--skip-legacy", action="store_true", help="time the packed scorer and the floor only")
    parser.add_argument("--codec", choices=kind_codec.CODECS, default="kernels",
                        help="kernels: kernels.dispatch inside the communicators (the same numbers, less time); "
                             "reference: lowbit's torch path")
    parser.add_argument("--out", default="bench/results/scoring.json")
    args = parser.parse_args(argv)
    meta = start_meta("bench.scoring", sys.argv[1:] if argv is None else list(argv))
    tasks = args.tasks.split(",")
    parts = {}
    run_id, result, load = run_evaluate(args, legacy=False)
    parts["packed"] = dict(run=run_id, load=load, task_timing=result["task_timing"], scores=task_scores(result))
    if not args.skip_legacy:
        run_id, result, load = run_evaluate(args, legacy=True)
        parts["legacy"] = dict(run=run_id, load=load, task_timing=result["task_timing"], scores=task_scores(result))
    parts["floor"] = floor_seconds(args.model, tasks, args.items, args.seed)
    floor = (sum(t["seconds"] for t in parts["floor"]["tasks"].values())
             / sum(t["items"] for t in parts["floor"]["tasks"].values()))
    figures = dict(packed=per_item(parts["packed"]["task_timing"]), floor=floor)
    if "legacy" in parts:
        figures["legacy"] = per_item(parts["legacy"]["task_timing"])
        figures["speedup_vs_legacy"] = figures["legacy"] / figures["packed"]
    figures["packed_over_floor"] = figures["packed"] / floor
    out = dict(meta=finish_meta(meta), model=args.model, tp=args.tp, tasks=tasks, items_per_task=args.items,
               codec="kernels.dispatch" if args.codec == "kernels" else "lowbit.wire.payload",
               schemes=[REFERENCE, *args.schemes.split(",")], cpu_count=os.cpu_count(), figures=figures, parts=parts,
               date=time.strftime("%Y-%m-%d"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(format_figures(out))
    print(f"wrote {args.out}")
    return 0


def speed_markdown(data: dict) -> str:
    """The three paths' seconds per item per scheme, each with the load around it, and the two ratios."""
    f, parts = data["figures"], data["parts"]
    names = {"packed": f"packed scorer, TP {data['tp']}", "legacy": f"old path (legacy_scoring), TP {data['tp']}",
             "floor": f"floor: unsharded, 1 process, {parts['floor']['threads']} threads"}
    rows = []
    for key in ("packed", "legacy", "floor"):
        if key in f:
            load = parts[key]["load"]
            run = parts[key].get("run")
            rows.append(f"| {names[key]} | {f[key]:.4f} | {load['start'][0]:.1f} -> {load['end'][0]:.1f} | "
                        + (f"`{run}`" if run else "this process") + " |")
    head = "| path | s / item / scheme | load | run |\n|---|---|---|---|"
    ratios = [f"packed / floor = **{f['packed_over_floor']:.2f}x**"]
    if "speedup_vs_legacy" in f:
        ratios.insert(0, f"legacy / packed = **{f['speedup_vs_legacy']:.2f}x**")
    agreement = score_agreement(data)
    if "scores" in data["parts"]["packed"] and "legacy" in data["parts"]:
        ratios.append("scores of the two paths: " + ("identical for every scheme and task" if not agreement
                                                      else "identical except " + "; ".join(agreement)))
    return (f"{data['model']} at TP {data['tp']}, {', '.join(data['tasks'])}, {data['items_per_task']} items per task, "
            f"schemes {', '.join(f'`{s}`' for s in data['schemes'])}, codec `{data['codec']}`.\n\n" + head + "\n" + "\n".join(rows)
            + "\n\n" + "; ".join(ratios) + ".")


def format_figures(data: dict) -> str:
    f, parts = data["figures"], data["parts"]
    lines = [f"{data['model']} TP {data['tp']}, {', '.join(data['tasks'])}, {data['items_per_task']} items per task, "
             f"{len(data['schemes'])} schemes (the reference included)"]
    for name in ("packed", "legacy", "floor"):
        if name in f:
            load = parts[name]["load"]
            lines.append(f"  {name:<7} {f[name]:.4f} s per item per scheme   (load {load['start'][0]:.1f} -> {load['end'][0]:.1f})")
    if "speedup_vs_legacy" in f:
        lines.append(f"  packed is {f['speedup_vs_legacy']:.2f}x faster than legacy on the same items")
    lines.append(f"  packed at TP {data['tp']} is {f['packed_over_floor']:.2f}x the unsharded single-process floor")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
