"""CPU codec benchmark of the numba kernels against the torch reference, in one run.

    PYTHONPATH=. .venv/bin/python -m bench.kernels --native --out bench/results/kernels-cpu-native.json
    PYTHONPATH=. .venv/bin/python -m bench.kernels_native --tokens 8192 --hidden 576 --out test-output/n.json

Two measurements, one thread per process (``bench.kernels`` runs them for ``--native``):

* ``codec``: one process; for every scheme and size, ``quantize_pack`` (one rank's fp32 partial
  -> payload) and ``unpack_dequant_sum`` (``--tp`` payloads -> fp32 sum) on ``native``
  (``kernels.native_cpu``) and ``reference`` (eager; results written before the torch.compile path
  was removed also have ``compiled``), the paths alternating within each repeat so load from other
  processes hits all alike. Per path and
  op: the median time, GB/s (bytes read + written / time) and ``of_copy``: that over the GB/s of
  a plain copy of the same [tokens, hidden] tensor in bf16, measured in the same repeat.
  ``bit_identical``: the path's payload and sum equal the reference's.
* ``reduce``: ``--tp`` processes at once (they compete for the cores as ranks do), each running
  the compute of one ``QuantCommunicator`` reduce with no wire: gather = quantize its partial +
  sum the tp payloads; two-shot = quantize its tp chunks + sum the tp leg-1 payloads of its chunk
  + requantize that sum with the second spec + decode the tp leg-2 chunks. A repeat's time is the
  slowest rank's (gloo all_reduce MAX of the times, outside the timed region); median over repeats.

Next to every wall-clock median (``*_s``) is the median thread CPU time (``*_cpu_s``, the slowest
rank's for the reduce): on a shared machine the wall time also counts the time the process waited
for a core, the CPU time mostly not (caches and memory bandwidth are still shared).

Every row records ``load``: the 1/5/15-minute load averages before it ran (``bench._meta``'s block).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import kernels as bench_kernels
from bench._meta import start_load
from bench.kernels import codec_case, site_inputs, spawn_ranks

PATHS = ("native", "reference")
DEFAULT_SCHEMES = ["int4-static-top1/64", "int4-group32-top1/64", "int8-token", "int3a-token"]
DEFAULT_REDUCE = ["int4-static-top1/64", "int4-static-top1/64@twoshot+int4-token",
                  "int4-static-top1/64@twoshot+int8-token"]


def codec_fns(path: str):
    """(quantize_pack, unpack_dequant_sum) of a path."""
    if path == "native":
        from kernels import native_cpu as m
        return m.quantize_pack, m.unpack_dequant_sum
    from kernels import reference as r
    return r.quantize_pack_ref, r.unpack_dequant_sum_ref


def codec_rows(schemes, sizes, tp: int, paths, min_repeats: int, max_repeats: int, budget_s: float,
               log=print) -> list[dict]:
    from kernels import reference as ref
    rows = []
    for text in schemes:
        for tokens, hidden in sizes:
            case = codec_case(text, tokens, hidden, tp)
            if case is None:
                continue
            load = start_load()
            quant, idx, x, lo, hi, mins, maxs, payloads = case
            want_sum = ref.unpack_dequant_sum_ref(payloads, tokens, hidden, quant, idx, mins, maxs)
            ops, first_call, same = {}, {}, {}
            for p in paths:
                q, u = codec_fns(p)
                ops[p] = (lambda q=q: q(x, quant, idx, lo, hi),
                          lambda u=u: u(payloads, tokens, hidden, quant, idx, mins, maxs))
                start = time.perf_counter()
                same[p] = bool(torch.equal(ops[p][0](), payloads[0]) and torch.equal(ops[p][1](), want_sum))
                first_call[p] = time.perf_counter() - start
            src = x.to(torch.bfloat16)
            dst = torch.empty_like(src)
            times = {(p, op): [] for p in paths for op in (0, 1)}
            cpu = {(p, op): [] for p in paths for op in (0, 1)}
            copies = []
            deadline = time.perf_counter() + budget_s
            n = 0
            while n < max_repeats and (n < min_repeats or time.perf_counter() < deadline):
                order = paths if n % 2 == 0 else paths[::-1]
                for p in order:
                    for op in (0, 1):
                        t0, c0 = time.perf_counter(), time.thread_time()
                        ops[p][op]()
                        times[(p, op)].append(time.perf_counter() - t0)
                        cpu[(p, op)].append(time.thread_time() - c0)
                t0 = time.perf_counter()
                dst.copy_(src)
                copies.append(time.perf_counter() - t0)
                n += 1
            copy_s = statistics.median(copies)
            copy_gbps = 2 * src.numel() * src.element_size() / copy_s / 1e9
            q_bytes = x.numel() * x.element_size() + payloads.shape[1]
            u_bytes = payloads.numel() + tokens * hidden * 4
            for p in paths:
                qs, us = statistics.median(times[(p, 0)]), statistics.median(times[(p, 1)])
                rows.append(dict(scheme=text, tokens=tokens, hidden=hidden, tp=tp, path=p, repeats=n,
                                 quantize_s=qs, unpack_sum_s=us, total_s=qs + us,
                                 quantize_cpu_s=statistics.median(cpu[(p, 0)]),
                                 unpack_sum_cpu_s=statistics.median(cpu[(p, 1)]),
                                 quantize_gbps=q_bytes / qs / 1e9, unpack_sum_gbps=u_bytes / us / 1e9,
                                 copy_bf16_s=copy_s, copy_gbps=copy_gbps,
                                 quantize_of_copy=q_bytes / qs / 1e9 / copy_gbps,
                                 unpack_sum_of_copy=u_bytes / us / 1e9 / copy_gbps,
                                 first_call_s=first_call[p], bit_identical=same[p], load=load))
            line = "  ".join(f"{r['path']} {1e3 * r['quantize_s']:7.2f}+{1e3 * r['unpack_sum_s']:7.2f} ms"
                             for r in rows[-len(paths):])
            log(f"{text:24s} {tokens:5d} x {hidden:5d}  {line}  copy {1e3 * copy_s:.2f} ms  load {load['start'][0]}")
    return rows


# -- the reduce at tp ranks ---------------------------------------------------------------------
def reduce_step(path: str, text: str, tokens: int, hidden: int, tp: int, rank: int):
    """A no-argument function running rank ``rank``'s codec work of one reduce (module docstring)."""
    from lowbit.scheme import parse_scheme
    q, u = codec_fns(path)
    scheme = parse_scheme(text)
    quant, idx, xs, ranges = site_inputs(text, tokens, hidden, tp)
    idx = torch.empty(0, dtype=torch.long) if idx is None else idx
    static = not quant.dynamic
    mins = torch.stack([r[0] for r in ranges]) if static else None
    maxs = torch.stack([r[1] for r in ranges]) if static else None
    if scheme.algo == "gather":
        payloads = torch.stack([q(x, quant, idx, a, b) for x, (a, b) in zip(xs, ranges)])
        x, (lo, hi) = xs[rank], ranges[rank]
        return lambda: (q(x, quant, idx, lo, hi), u(payloads, tokens, hidden, quant, idx, mins, maxs))
    width = hidden // tp
    cols = [slice(j * width, (j + 1) * width) for j in range(tp)]
    local = [idx[(idx >= c.start) & (idx < c.stop)] - c.start for c in cols]
    rng = lambda r, c: (ranges[r][0][c], ranges[r][1][c]) if static else (None, None)  # noqa: E731
    own = cols[rank]
    leg1 = torch.stack([q(xs[r][:, own].contiguous(), quant, local[rank], *rng(r, own)) for r in range(tp)])
    smins, smaxs = (mins[:, own], maxs[:, own]) if static else (None, None)
    second = scheme.second
    leg2 = []
    for j in range(tp):  # every owner's leg-2 payload, from the true reduced chunk j
        chunk = torch.stack([q(xs[r][:, cols[j]].contiguous(), quant, local[j], *rng(r, cols[j])) for r in range(tp)])
        red = u(chunk, tokens, width, quant, local[j], *((mins[:, cols[j]], maxs[:, cols[j]]) if static else (None, None)))
        leg2.append(q(red, second, local[j]))
    x = xs[rank]

    def step():
        for j in range(tp):
            q(x[:, cols[j]].contiguous(), quant, local[j], *rng(rank, cols[j]))
        reduced = u(leg1, tokens, width, quant, local[rank], smins, smaxs)
        q(reduced, second, local[rank])
        for j in range(tp):
            u(leg2[j][None], tokens, width, second, local[j])
    return step


def _reduce_worker(rank: int, world: int, init_file: str, cases, min_repeats: int, max_repeats: int,
                   budget_s: float, out_file: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = []
    for path, text, tokens, hidden in cases:
        load = start_load()
        start = time.perf_counter()
        step = reduce_step(path, text, tokens, hidden, world, rank)
        step()  # compile / load the kernels outside timing
        setup_s = time.perf_counter() - start
        times, cpu_times = [], []
        deadline = time.perf_counter() + budget_s
        while True:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            step()
            elapsed = torch.tensor([time.perf_counter() - t0, time.thread_time() - c0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank
            times.append(elapsed[0].item())
            cpu_times.append(elapsed[1].item())
            stop = torch.tensor([len(times) >= max_repeats or (len(times) >= min_repeats
                                 and time.perf_counter() > deadline)], dtype=torch.int32)
            dist.broadcast(stop, 0)
            if stop.item():
                break
        results.append(dict(path=path, scheme=text, tokens=tokens, hidden=hidden, tp=world, repeats=len(times),
                            median_s=statistics.median(times), min_s=min(times), setup_s=setup_s,
                            cpu_median_s=statistics.median(cpu_times),
                            load=load))
        if rank == 0:
            r = results[-1]
            print(f"reduce {path:9s} {text:40s} {tokens:5d} x {hidden:5d}  {1e3 * r['median_s']:8.2f} ms "
                  f"(min {1e3 * r['min_s']:.2f}, cpu {1e3 * r['cpu_median_s']:.2f}, {r['repeats']} repeats)  load {load['start'][0]}", flush=True)
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def reduce_rows(cases, tp: int, min_repeats: int, max_repeats: int, budget_s: float) -> list[dict]:
    return spawn_ranks(_reduce_worker, tp, list(cases), min_repeats, max_repeats, budget_s)


def run(args) -> dict:
    """The ``native`` section of a ``bench.kernels`` result (``args``: its CPU options)."""
    torch.set_num_threads(1)
    sizes = [(t, h) for h in args.hidden for t in args.tokens]
    codec = codec_rows(args.schemes, sizes, args.tp, args.paths, args.min_repeats, args.max_repeats, args.budget,
                       log=lambda m: print(m, flush=True))
    cases = [(p, text, t, h) for text in args.reduce_schemes for (t, h) in args.reduce_sizes for p in args.reduce_paths]
    reduce = reduce_rows(cases, args.tp, args.min_repeats, args.max_repeats, args.budget) if cases else []
    return dict(codec=codec, reduce=reduce)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="codec paths to compare")
    ap.add_argument("--reduce-schemes", nargs="+", default=DEFAULT_REDUCE)
    ap.add_argument("--reduce-sizes", nargs="+", default=[(8192, 576)], type=lambda s: tuple(map(int, s.split("x"))),
                    help="TOKENSxHIDDEN sizes of the tp-rank reduce")
    ap.add_argument("--reduce-paths", nargs="+", choices=PATHS, default=["native", "reference"])


def markdown(result: dict) -> str:
    lines = ["| scheme | tokens x hidden | path | quantize ms (of copy) [cpu ms] | unpack+sum ms (of copy) [cpu ms] "
             "| identical | load |", "|---|---|---|---|---|---|---|"]
    for r in result["codec"]:
        lines.append(f"| {r['scheme']} | {r['tokens']} x {r['hidden']} | {r['path']} | "
                     f"{1e3 * r['quantize_s']:.3f} ({100 * r['quantize_of_copy']:.0f}%) [{1e3 * r['quantize_cpu_s']:.3f}] | "
                     f"{1e3 * r['unpack_sum_s']:.3f} ({100 * r['unpack_sum_of_copy']:.0f}%) [{1e3 * r['unpack_sum_cpu_s']:.3f}] | "
                     f"{r['bit_identical']} | {r['load']['start'][0]} |")
    if result["reduce"]:
        lines += ["", "| reduce (tp ranks at once, slowest) | tokens x hidden | path | median ms | cpu ms | load |",
                  "|---|---|---|---|---|---|"]
        for r in result["reduce"]:
            lines.append(f"| {r['scheme']} | {r['tokens']} x {r['hidden']} | {r['path']} | "
                         f"{1e3 * r['median_s']:.2f} | {1e3 * r['cpu_median_s']:.2f} | {r['load']['start'][0]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return bench_kernels.main(["--native", "--device", "cpu"] + list(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
