"""Collective micro-benchmark: BF16 all_reduce against quantized ``gather`` and ``two_shot``,
end to end (quantize + collective + dequantize), by message size, TP size and link.

    .venv/bin/python -m bench.collectives --tp 3 --link 100mbit --out bench/results/tp3-100mbit.json
    .venv/bin/python -m bench.collectives --tp 2 3 4 --link loopback --out bench/results/loopback.json
    .venv/bin/python -m bench.collectives --tp 3 --link loopback 1gbit 100mbit --tokens 8192 --hidden 576 \\
        --out bench/results/tp3-8192x576.json

Each (TP size, link) pair is one ``collective-bench`` job through the launch queue (``runs/``):
gloo ranks on this machine, over loopback or, for a rate such as ``1gbit``, as torchrun nodes of
an emulated cluster (``launch.cluster``: one network namespace per rank, tbf-shaped links).

What is timed, per (tokens, hidden) and scheme, on every rank: ``QuantCommunicator.reduce`` of
a BF16 partial [tokens, hidden] (for ``bf16`` the plain all_reduce, for the quantized schemes
quantize + encode, the collective(s), decode + fp32 sum, cast back to BF16), after a barrier.
A repeat's time is the slowest rank's; ``median_ms`` is the median over repeats after
``warmup`` untimed rounds. The schemes of one size are interleaved within each repeat (and
rotated), so a load change on this shared machine hits all of them alike; ``speedup_vs_bf16``
divides the BF16 median of the same job and size by the scheme's median.

Data and calibration: the static schemes (the paper's ``int4-static-top1/64``: static
per-feature scales, top 1/64 features in BF16) need a calibration. The bench derives it from
the data itself: every rank's partial is seeded Gaussian with a fixed set of 1/64 "consistent
outlier" features scaled by 20 (the same features on every rank, as the paper observes), and
the calibration is each rank's exact per-feature min/max of that partial (one batch, so the
EMA is the batch). So top-k picks exactly the injected features, static scales cover the data
(nothing clamps), and timing covers the paper's wire format; ``rel_error`` (vs the fp32 sum)
only checks that every path computed the sum, it is no accuracy result.

Bytes: ``bytes_per_rank`` is what one rank receives (= sends, on average) over the wire:
ring all_reduce 2 (tp - 1) / tp x the BF16 tensor; gather (tp - 1) payloads; two_shot
(tp - 1) leg-1 chunks + (tp - 1) padded leg-2 chunks. ``bits_per_value`` is the first leg's
payload bits per value (``lowbit.wire.payload``: 4.1875 for the paper's scheme at 576 features),
``leg2_bits_per_value`` the two-shot requantization leg's.

Compute: ``compute_ms`` is the same reduce through ``NoWireGroup`` (collectives that return
this rank's own data in the right shapes, moving nothing), all ranks at once, slowest rank,
median: the quantize/dequantize cost alone. ``median_ms - compute_ms`` is roughly what the
collective itself took.

Codec (``launch.kinds.codec``): ``--codec kernels`` runs the registered kernels inside the
communicators (``kernels.dispatch.Codec()``: numba on CPU, Triton on CUDA, where they implement
the scheme), ``reference`` lowbit's own torch path. Both produce lowbit.wire.payload's bytes and
sums (tested). Every record names the codec it used and the path its messages took. On CUDA (``--backend auto`` picks NCCL when every rank has a
GPU) the data lives on each rank's GPU and timings synchronize the device.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench._data import outlier_features, synthetic_partial  # noqa: F401 - tests use them from here
from bench._meta import command as meta_command, end_load, start_load
from launch.client import submit_and_watch
from launch.kinds import codec as kind_codec
from launch.kinds.codec import CODECS
from launch.kinds.collective_bench import (DEFAULT_HIDDEN, DEFAULT_PARAMS, DEFAULT_SCHEMES, DEFAULT_TOKENS,  # noqa: F401
                                           DTYPES, check_params, check_spec, job_spec)
from launch.spec import JobSpec, SpecError
from lowbit.site import ROW_PARALLEL_MODULES
from lowbit.wire import accounting

SITE_LAYER, SITE_MODULE = 0, ROW_PARALLEL_MODULES[-1]  # the MLP's down_proj


# -- the fused-path communicator ---------------------------------------------------------------
def codec_module(name: str):
    """(label, codec for ``QuantCommunicator``) for a ``params.codec`` name (``launch.kinds.codec``;
    the values older runs stored are read as what they meant)."""
    return kind_codec.make(kind_codec.codec_name({"codec": name}, "kernels"))


def timed_communicator(group, scheme: str, calibration, codec):
    """``lowbit.method.evaluate.make_communicator`` as the bench times it: no per-call records and no
    ``lowbit.counters`` (the bench times the all-reduce, not the diagnostics an evaluation records);
    with a ``codec`` (``kernels.dispatch.Codec``) its gather and two-shot legs go through the kernels
    where they implement it (the same bytes and sums as lowbit's torch path)."""
    from lowbit.method.evaluate import make_communicator
    return make_communicator(group, scheme, calibration, codec, counters=False, record=False)


# -- data (bench._data) ----------------------------------------------------------------------
def data_calibration(group, partial):
    """A Calibration whose static ranges are every rank's exact per-feature min/max of its own
    ``partial`` (one batch: the EMA is the batch), at site (0, down_proj); top-k then picks the
    synthetic outlier features."""
    import torch

    from lowbit.calibration import Calibration
    x = partial.float()
    stats = group.all_gather(torch.stack([x.amin(0), x.amax(0)]))  # [tp, 2, H]
    ema_min = stats[:, 0].unsqueeze(0).unsqueeze(0).expand(1, 2, -1, -1).contiguous()  # [L=1, M=2, tp, H]
    ema_max = stats[:, 1].unsqueeze(0).unsqueeze(0).expand(1, 2, -1, -1).contiguous()
    return Calibration(ema_min, ema_max, ema_min.unsqueeze(0).clone(), ema_max.unsqueeze(0).clone(),
                       dict(model="synthetic", source="collective-bench data", tp=group.world_size))


# -- the measurement ---------------------------------------------------------------------------
def wire_bytes(scheme, extra: dict, nbytes_bf16: int, tp: int) -> int:
    """Bytes one rank receives over the wire (``lowbit.wire.accounting.wire_bytes``; the quantized
    communicators record it per call as ``bytes_received``)."""
    if scheme.is_exact:
        return int(accounting.wire_bytes("exact", tp, nbytes_bf16))
    return int(extra.get("bytes_received", 0))


def bench_on_group(group, params: dict, link: str = "loopback", progress=None) -> list[dict]:
    """Run the benchmark on ``group`` (every rank calls it); returns the records (every rank
    gets the same list). ``progress(step, total, message)`` is called on every rank."""
    import torch

    from lowbit.site import Site
    from lowbit.comm.dist import device_for
    from lowbit.scheme import SchemeError, parse_scheme

    p = dict(DEFAULT_PARAMS, **params)
    tp, rank = group.world_size, group.rank
    device = device_for(group)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
    codec_label, codec = codec_module(p["codec"])
    site = Site(SITE_LAYER, SITE_MODULE)
    schemes = [str(parse_scheme(s)) for s in p["schemes"]]
    if "bf16" not in schemes:
        schemes = ["bf16"] + schemes  # speedups need the baseline of the same run
    sizes = [(t, h) for h in p["hidden"] for t in p["tokens"]]
    records = []
    for step, (tokens, hidden) in enumerate(sizes):
        if progress:
            progress(step, len(sizes), f"{tokens} x {hidden} at TP {tp}, {link}")
        partial = synthetic_partial(tokens, hidden, rank, p["seed"], dtype).to(device)
        calibration = data_calibration(group, partial)
        exact = group.all_reduce(partial.float())
        comms, skipped = {}, {}
        for text in schemes:
            scheme = parse_scheme(text)
            try:
                scheme.validate_for(hidden, tp)
                comms[text] = timed_communicator(group, text, calibration, codec)
            except SchemeError as exc:
                skipped[text] = str(exc)
        runnable = [s for s in schemes if s in comms]
        extras, errors = {}, {}

        def one_call(text):
            sync()
            group.barrier()
            start = time.perf_counter()
            out = comms[text].reduce(partial, site)
            sync()
            return time.perf_counter() - start, out

        for _ in range(p["warmup"]):
            round_s = 0.0
            for text in runnable:
                seconds, out = one_call(text)
                round_s += seconds
        # One untimed call per scheme for its byte counts and the check that it computed the sum.
        for text in runnable:
            out, _, extras[text] = comms[text].reduce_with_stats(partial, site)
            errors[text] = float((out.float() - exact).norm() / max(exact.norm().item(), 1e-30))
        if p["warmup"] == 0:
            round_s = sum(one_call(text)[0] for text in runnable)
        slowest = group.all_gather(torch.tensor([round_s], dtype=torch.float64, device=device)).max().item()
        repeats = int(min(p["repeats"], max(p["min_repeats"], math.floor(p["budget_s"] / max(slowest, 1e-9)))))
        times = torch.zeros(repeats, len(runnable), dtype=torch.float64)
        for r in range(repeats):
            order = runnable[r % len(runnable):] + runnable[:r % len(runnable)]
            for text in order:
                times[r, runnable.index(text)] = one_call(text)[0]
        slowest_rank = group.all_gather(times.to(device)).amax(0).cpu()  # a repeat ends with its slowest rank
        medians = {text: statistics.median(slowest_rank[:, i].tolist()) for i, text in enumerate(runnable)}
        compute = _compute_medians(group, runnable, calibration, codec, partial, site, p["compute_repeats"], sync)
        nbytes_bf16 = tokens * hidden * 2
        for text in schemes:
            scheme = parse_scheme(text)
            method = accounting.method_of(scheme)
            rec = dict(tp=tp, tokens=tokens, hidden=hidden, method=method, scheme=text, link=link,
                       backend=getattr(group, "backend", "?"), codec="torch" if scheme.is_exact else codec_label,
                       dtype=p["dtype"])
            if text in skipped:
                rec.update(median_ms=None, speedup_vs_bf16=None, bytes_per_rank=None, bits_per_value=None,
                           skipped=skipped[text])
                records.append(rec)
                continue
            i = runnable.index(text)
            extra = extras[text]
            col = slowest_rank[:, i].tolist()
            median_s = medians[text]
            bytes_rank = wire_bytes(scheme, extra, nbytes_bf16, tp)
            rec.update(median_ms=1e3 * median_s, min_ms=1e3 * min(col),
                       p90_ms=1e3 * sorted(col)[min(len(col) - 1, int(0.9 * len(col)))],
                       repeats=repeats, warmup=p["warmup"],
                       speedup_vs_bf16=medians["bf16"] / median_s if median_s > 0 else None,
                       bytes_per_rank=bytes_rank,
                       bits_per_value=16.0 if scheme.is_exact else float(extra["leg1_bits"]),
                       leg2_bits_per_value=float(extra["leg2_bits"]) if "leg2_bits" in extra else None,
                       effective_gbps=bytes_rank * 8 / median_s / 1e9 if median_s > 0 else None,
                       compute_ms=None if compute is None else 1e3 * compute[text],
                       rel_error=errors[text],
                       # the path the messages took (lowbit.comm.codec; exact schemes have none)
                       codec_path=None if scheme.is_exact else comms[text].paths.by_site().get(str(site)))
            records.append(rec)
    if progress:
        progress(len(sizes), len(sizes), f"done: {len(records)} records")
    return records


class NoWireGroup:
    """A stand-in group whose collectives move nothing: each returns this rank's own data in the
    shape the real collective would (all_gather: tp copies; all_to_all: tp copies of the chunk
    this rank keeps). A reduce through it costs the quantize/dequantize work alone."""

    backend = "none"

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor):
        return tensor * self.world_size

    def all_gather(self, tensor):
        return tensor.unsqueeze(0).expand(self.world_size, *tensor.shape).clone()

    def all_to_all(self, tensor, send_splits=None, recv_splits=None):
        if send_splits is None:
            chunk = tensor.shape[0] // self.world_size
            send_splits = [chunk] * self.world_size
        start = sum(send_splits[:self.rank])
        own = tensor[start:start + send_splits[self.rank]]
        return own.repeat(self.world_size, *([1] * (own.dim() - 1)))

    def barrier(self):
        pass


def _compute_medians(group, runnable, calibration, codec, partial, site, repeats, sync):
    """Median over ``repeats`` of the slowest rank's no-wire reduce (``NoWireGroup``) per
    scheme, all ranks at once (so they compete for the cores as in the real run); None if 0."""
    import torch
    if repeats <= 0:
        return None
    local = NoWireGroup(group.rank, group.world_size)
    comms = {text: timed_communicator(local, text, calibration, codec) for text in runnable}
    for text in runnable:
        comms[text].reduce(partial, site)  # compile / allocate outside timing
    times = torch.zeros(repeats, len(runnable), dtype=torch.float64)
    for r in range(repeats):
        for i, text in enumerate(runnable):
            sync()
            group.barrier()
            start = time.perf_counter()
            comms[text].reduce(partial, site)
            sync()
            times[r, i] = time.perf_counter() - start
    slowest = group.all_gather(times.to(partial.device)).amax(0).cpu()
    return {text: statistics.median(slowest[:, i].tolist()) for i, text in enumerate(runnable)}


def collective_bench(ctx) -> dict | None:
    """The ``collective-bench`` job kind (launch.registry): rank 0 returns the records."""
    spec = ctx.spec
    load = start_load()

    def progress(step, total, message):
        ctx.events.step(step, total, message)

    records = bench_on_group(ctx.group, dict(spec.params), spec.link, progress)
    if ctx.rank != 0:
        return None
    return dict(records=records, meta=machine_meta(dict(load=end_load(load),
                                                        link=spec.link, tp=ctx.group.world_size,
                                                        params=dict(DEFAULT_PARAMS, **spec.params))))


def machine_meta(extra: dict | None = None) -> dict:
    import torch
    return dict(extra or {}, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, processor=_cpu_model())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# -- CLI ---------------------------------------------------------------------------------------
def format_table(records: list[dict]) -> str:
    """A plain-text table of the records, one line per record."""
    head = f"{'link':>9} {'tp':>2} {'tokens':>6} {'hidden':>6} {'method':>10} {'scheme':<40} " \
           f"{'median ms':>10} {'speedup':>8} {'MB/rank':>8} {'bits':>6} {'compute ms':>10}"
    lines = [head]
    for r in records:
        if r.get("median_ms") is None:
            lines.append(f"{r['link']:>9} {r['tp']:>2} {r['tokens']:>6} {r['hidden']:>6} {r['method']:>10} "
                         f"{r['scheme']:<40} skipped: {r.get('skipped')}")
            continue
        lines.append(f"{r['link']:>9} {r['tp']:>2} {r['tokens']:>6} {r['hidden']:>6} {r['method']:>10} "
                     f"{r['scheme']:<40} {r['median_ms']:>10.2f} {r['speedup_vs_bf16']:>7.2f}x "
                     f"{r['bytes_per_rank'] / 1e6:>8.3f} {r['bits_per_value']:>6.3f} "
                     + (f"{r['compute_ms']:>10.2f}" if r.get("compute_ms") is not None else f"{'-':>10}"))
    return "\n".join(lines)


def markdown_table(records: list[dict]) -> str:
    """The docs' table: one row per (tp, tokens, hidden, scheme), one column per link:
    ``median ms (speedup vs bf16) [compute ms]``."""
    links = list(dict.fromkeys(r["link"] for r in records))
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault((r["tp"], r["tokens"], r["hidden"], r["method"], r["scheme"]), {})[r["link"]] = r
    head = ["TP", "tokens x hidden", "method", "scheme", "bits/value", "MB/rank"] + \
        [f"{link}: ms (x bf16) [compute]" for link in links]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (tp, tokens, hidden, method, scheme), by_link in rows.items():
        first = next(iter(by_link.values()))
        if first.get("median_ms") is None:
            cells = ["-", "-"] + ["skipped"] * len(links)
        else:
            cells = [f"{first['bits_per_value']:.4g}", f"{first['bytes_per_rank'] / 1e6:.3g}"]
            for link in links:
                r = by_link.get(link)
                if r is None or r.get("median_ms") is None:
                    cells.append("-")
                    continue
                compute = "" if r.get("compute_ms") is None else f" [{_ms(r['compute_ms'])}]"
                cells.append(f"{_ms(r['median_ms'])} ({r['speedup_vs_bf16']:.2f}x){compute}")
        lines.append(f"| {tp} | {tokens} x {hidden} | {method} | `{scheme}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collectives", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[3], help="TP sizes, one job each (default 3)")
    parser.add_argument("--link", nargs="+", default=["loopback"],
                        help="loopback and/or rates like 1gbit 100mbit (emulated cluster, needs root)")
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    parser.add_argument("--hidden", type=int, nargs="+", default=DEFAULT_HIDDEN)
    parser.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES, help="scheme strings (lowbit.scheme)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_PARAMS["repeats"], help="at most this many timed rounds")
    parser.add_argument("--min-repeats", type=int, default=DEFAULT_PARAMS["min_repeats"])
    parser.add_argument("--warmup", type=int, default=DEFAULT_PARAMS["warmup"])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_PARAMS["budget_s"],
                        help="seconds of timed rounds per size (more repeats where they are fast)")
    parser.add_argument("--codec", choices=CODECS, default="kernels")
    parser.add_argument("--compute-repeats", type=int, default=DEFAULT_PARAMS["compute_repeats"],
                        help="no-wire rounds for compute_ms (quantize + dequantize alone); 0: skip")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="auto: NCCL when every rank has a GPU, else gloo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write {meta, records} JSON here")
    parser.add_argument("--time-limit-s", type=float, default=3600.0, help="per job")
    parser.add_argument("--markdown", type=Path, nargs="+", metavar="F.json",
                        help="print the docs' table of earlier --out files and exit (runs nothing)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table([r for f in args.markdown for r in json.loads(f.read_text())["records"]]))
        return 0

    params = dict(tokens=args.tokens, hidden=args.hidden, schemes=args.schemes, repeats=args.repeats,
                  min_repeats=args.min_repeats, warmup=args.warmup, budget_s=args.budget_s, seed=args.seed,
                  codec=args.codec, compute_repeats=args.compute_repeats)
    specs = []
    try:
        for link in args.link:
            for tp in args.tp:
                spec = JobSpec.from_dict(job_spec(tp, link, params, args.time_limit_s, args.backend))
                problems = check_spec(spec.to_dict())  # launch.spec runs check_spec for model kinds only
                if problems:
                    raise SpecError(problems)
                specs.append(spec)
    except SpecError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    records, runs, failed = [], [], []
    load = start_load()
    for spec in specs:
        code, run_id, result = submit_and_watch(spec.to_dict(), label=f"[{spec.link} tp {spec.tp}] collective-bench")
        runs.append(dict(id=run_id, link=spec.link, tp=spec.tp, status="done" if result else "failed"))
        if result is None:
            failed.append(run_id)
            continue
        records += result["records"]
        runs[-1]["meta"] = result.get("meta")
    print(format_table(records))
    if args.out:
        command = meta_command("bench.collectives", sys.argv[1:] if argv is None else list(argv))
        out = dict(meta=machine_meta(dict(command=command, load=end_load(load), runs=runs)), records=records)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"wrote {len(records)} records to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
