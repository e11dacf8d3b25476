"""What the quantize/unpack kernels cost, next to the communication they replace.

    PYTHONPATH=. .venv/bin/python -m bench.kernels --out bench/results/kernels-cpu.json     # CPU
    PYTHONPATH=. python -m bench.kernels --out bench/results/kernels-cuda.json                # on a GPU
    PYTHONPATH=. .venv/bin/python -m bench.kernels --native --out bench/results/kernels-cpu-native.json  # numba vs torch

CUDA (the Triton kernels): for every scheme with 2/4/8-bit codes and every size from decode (1
token) to prefill (8192 tokens) at hidden 576, 4096 and 5120, the median time of
``quantize_pack`` (one rank's partial -> payload) and ``unpack_dequant_sum`` (``--tp`` gathered
payloads -> bf16 sum), their GB/s (bytes read + bytes written / time), and the GB/s of a plain
device copy moving the same number of bytes, measured in the same run: that copy is the
practical limit, ``of_copy`` = kernel GB/s / copy GB/s (target: >= 0.8 for messages >= 8 MB).

CPU (one thread): the same two operations, eager (``kernels.reference``: lowbit's torch path) and
native (``kernels.native_cpu``, numba; the first call, which compiles or loads the cache, is
excluded and reported apart), as a fraction of a bf16 ``all_reduce`` of the same [tokens, hidden]
tensor over gloo at ``--tp`` ranks on this machine (``--tp`` processes, one thread each; a repeat
ends with its slowest rank). Eager and native runs alternate so that load from other processes
hits both alike. (Results written before the torch.compile path was removed name it ``fused``.)

Data: a Gaussian partial whose 1/64 outlier features are 20x larger; static ranges are the
data's own per-feature min/max and the outliers the top-1/64 features by range (as
``bench.collectives`` builds them). Every time is a median over repeats (at least
``--min-repeats``, more while the ``--budget`` seconds per measurement last).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench._data import synthetic_partial
from bench._meta import command as meta_command, end_load, start_load

DEFAULT_TOKENS = [1, 16, 256, 2048, 8192]
DEFAULT_HIDDEN = [576, 4096, 5120]
DEFAULT_SCHEMES = ["int4-static-top1/64", "int4-group32-top1/64", "int8-token", "int2-static-top1/64"]


# -- data (bench._data) ----------------------------------------------------------------------
def site_inputs(scheme_text: str, tokens: int, hidden: int, tp: int, dtype=torch.float32, device="cpu"):
    """(quant, outlier idx, [tp partials], [tp (min, max)] or Nones) for one scheme and size."""
    from lowbit.scheme import parse_scheme
    scheme = parse_scheme(scheme_text)
    quant = scheme.quant
    xs = [synthetic_partial(tokens, hidden, rank=r, dtype=dtype).to(device) for r in range(tp)]
    idx = None
    k = scheme.outliers.count(hidden)
    if k:
        ranges = torch.stack([x.float().amax(0) - x.float().amin(0) for x in xs]).sum(0)
        idx = ranges.topk(k).indices.sort().values
    ranges = [(x.float().amin(0), x.float().amax(0)) if not quant.dynamic else (None, None) for x in xs]
    return quant, idx, xs, ranges


def _median_time(fn, sync, budget_s: float, min_repeats: int, max_repeats: int) -> tuple[float, int]:
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() < deadline):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


# -- CPU: gloo all_reduce baseline -------------------------------------------------------------
def _gloo_worker(rank: int, world: int, init_file: str, sizes, budget_s: float, min_repeats: int,
                 max_repeats: int, out_file: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = []
    for tokens, hidden in sizes:
        t = torch.randn(tokens, hidden).to(torch.bfloat16)
        for _ in range(2):
            dist.all_reduce(t)
        times = []
        deadline = time.perf_counter() + budget_s
        while True:
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a repeat ends with its slowest rank
            times.append(elapsed.item())
            # every rank must take the same decision: rank 0's clock decides
            stop = torch.tensor([len(times) >= max_repeats or (len(times) >= min_repeats
                                 and time.perf_counter() > deadline)], dtype=torch.int32)
            dist.broadcast(stop, 0)
            if stop.item():
                break
        results.append(dict(tokens=tokens, hidden=hidden, bytes=tokens * hidden * 2,
                            median_s=statistics.median(times), repeats=len(times)))
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def spawn_ranks(worker, tp: int, *args):
    """Run ``worker(rank, tp, init_file, *args, out_file)`` on ``tp`` processes (a gloo group
    through ``init_file``); returns the JSON rank 0 wrote to ``out_file``."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.spawn(worker, args=(tp, init_file, *args, out_file), nprocs=tp, join=True)
        return json.loads(Path(out_file).read_text())


def gloo_allreduce_times(sizes, tp: int, budget_s: float, min_repeats: int, max_repeats: int) -> list[dict]:
    return spawn_ranks(_gloo_worker, tp, list(sizes), budget_s, min_repeats, max_repeats)


def codec_case(text: str, tokens: int, hidden: int, tp: int):
    """One timed case of the codec benches: (quant, outlier idx, rank 0's partial, its static
    (min, max), every rank's static ranges stacked, the tp reference payloads), or None when the
    scheme's group does not divide ``hidden``."""
    from kernels import reference as ref
    quant, idx, xs, ranges = site_inputs(text, tokens, hidden, tp)
    if quant.group_size and hidden % quant.group_size:
        return None
    mins = maxs = None
    if not quant.dynamic:
        mins, maxs = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
    payloads = torch.stack([ref.quantize_pack_ref(xr, quant, idx, a, b) for xr, (a, b) in zip(xs, ranges)])
    return quant, idx, xs[0], ranges[0][0], ranges[0][1], mins, maxs, payloads


# -- CPU: eager torch path vs the native kernels -------------------------------------------------
def cpu_codec_rows(schemes, sizes, tp: int, budget_s: float, min_repeats: int, max_repeats: int,
                   log=print) -> list[dict]:
    from kernels import native_cpu
    from kernels import reference as ref
    rows = []
    for text in schemes:
        for tokens, hidden in sizes:
            case = codec_case(text, tokens, hidden, tp)
            if case is None:
                continue
            quant, idx, x, lo, hi, mins, maxs, payloads = case
            paths = {
                "eager": (lambda: ref.quantize_pack_ref(x, quant, idx, lo, hi),
                          lambda: ref.unpack_dequant_sum_ref(payloads, tokens, hidden, quant, idx, mins, maxs)),
                "native": (lambda: native_cpu.quantize_pack(x, quant, idx, lo, hi),
                           lambda: native_cpu.unpack_dequant_sum(payloads, tokens, hidden, quant, idx, mins, maxs)),
            }
            start = time.perf_counter()
            same = torch.equal(paths["native"][0](), paths["eager"][0]())
            same &= torch.equal(paths["native"][1](), paths["eager"][1]())
            compile_s = time.perf_counter() - start
            times = {(p, op): [] for p in paths for op in (0, 1)}
            deadline = time.perf_counter() + budget_s
            n = 0
            while n < max_repeats and (n < min_repeats or time.perf_counter() < deadline):
                for p in (("eager", "native") if n % 2 == 0 else ("native", "eager")):  # alternate
                    for op in (0, 1):
                        t0 = time.perf_counter()
                        paths[p][op]()
                        times[(p, op)].append(time.perf_counter() - t0)
                n += 1
            med = {k: statistics.median(v) for k, v in times.items()}
            for p in paths:
                rows.append(dict(scheme=text, tokens=tokens, hidden=hidden, path=p, repeats=n,
                                 quantize_s=med[(p, 0)], unpack_sum_s=med[(p, 1)],
                                 total_s=med[(p, 0)] + med[(p, 1)],
                                 first_call_s=compile_s if p == "native" else None,
                                 bit_identical=bool(same)))
            e, f = rows[-2], rows[-1]
            log(f"{text:24s} {tokens:5d} x {hidden:5d}  eager {1e3 * e['total_s']:9.2f} ms  "
                f"native {1e3 * f['total_s']:8.2f} ms  x{e['total_s'] / f['total_s']:.1f}  equal={same}")
    return rows


def run_cpu(args) -> dict:
    torch.set_num_threads(args.threads)
    sizes = [(t, h) for h in args.hidden for t in args.tokens]
    print(f"gloo bf16 all_reduce at TP {args.tp} ({args.tp} processes, 1 thread each) ...", flush=True)
    allreduce = gloo_allreduce_times(sizes, args.tp, args.budget, args.min_repeats, args.max_repeats)
    by_size = {(r["tokens"], r["hidden"]): r["median_s"] for r in allreduce}
    for r in allreduce:
        print(f"  {r['tokens']:5d} x {r['hidden']:5d}  {1e3 * r['median_s']:9.3f} ms", flush=True)
    rows = cpu_codec_rows(args.schemes, sizes, args.tp, args.budget, args.min_repeats, args.max_repeats,
                          log=lambda m: print(m, flush=True))
    for row in rows:
        ar = by_size[(row["tokens"], row["hidden"])]
        row["allreduce_s"] = ar
        row["fraction_of_allreduce"] = row["total_s"] / ar
        row["quantize_fraction"] = row["quantize_s"] / ar
        row["unpack_sum_fraction"] = row["unpack_sum_s"] / ar
    for e, f in zip(rows[::2], rows[1::2]):
        for key in ("quantize_s", "unpack_sum_s", "total_s"):
            f[f"speedup_{key[:-2]}"] = e[key] / f[key]
    return dict(allreduce=allreduce, codec=rows)


# -- CUDA: Triton kernels vs device copy -------------------------------------------------------
def run_cuda(args) -> list[dict]:
    from kernels import registry, triton_quant
    from lowbit.wire.payload import layout
    device = torch.device("cuda")
    sync = torch.cuda.synchronize
    rows = []
    for text in args.schemes:
        for hidden in args.hidden:
            for tokens in args.tokens:
                quant, idx, xs, ranges = site_inputs(text, tokens, hidden, args.tp, torch.bfloat16, device)
                if registry.implementation(quant, "triton") is None or (quant.group_size and hidden % quant.group_size):
                    continue  # what the Triton kernels do not implement (kernels.registry) runs no kernel here
                x, (lo, hi) = xs[0], ranges[0]
                mins = maxs = None
                if not quant.dynamic:
                    mins, maxs = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
                payloads = torch.stack([triton_quant.quantize_pack(xr, quant, idx, a, b) for xr, (a, b) in zip(xs, ranges)])
                lay = layout(tokens, hidden, quant, 0 if idx is None else idx.numel())
                kernels = {
                    "quantize_pack": (lambda: triton_quant.quantize_pack(x, quant, idx, lo, hi),
                                      x.numel() * x.element_size(), lay.total_bytes),
                    "unpack_dequant_sum": (lambda: triton_quant.unpack_dequant_sum(
                        payloads, tokens, hidden, quant, idx, mins, maxs, out_dtype=torch.bfloat16),
                        payloads.numel(), tokens * hidden * 2),
                }
                for name, (fn, read, written) in kernels.items():
                    fn()
                    t_kernel, n = _median_time(fn, sync, args.budget, args.min_repeats, args.max_repeats)
                    half = max(1, (read + written) // 2)  # a copy of `half` bytes moves read + written
                    src = torch.empty(half, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(src)
                    dst.copy_(src)
                    t_copy, _ = _median_time(lambda: dst.copy_(src), sync, args.budget, args.min_repeats,
                                             args.max_repeats)
                    gbps, copy_gbps = (read + written) / t_kernel / 1e9, 2 * half / t_copy / 1e9
                    rows.append(dict(scheme=text, tokens=tokens, hidden=hidden, kernel=name, repeats=n,
                                     bytes_read=read, bytes_written=written, median_s=t_kernel, gbps=gbps,
                                     copy_gbps=copy_gbps, of_copy=gbps / copy_gbps,
                                     message_bytes=max(read, written)))
                    print(f"{text:24s} {name:19s} {tokens:5d} x {hidden:5d}  {gbps:8.1f} GB/s  "
                          f"copy {copy_gbps:8.1f}  {100 * gbps / copy_gbps:5.1f}%", flush=True)
    return rows


# -- report ------------------------------------------------------------------------------------
def markdown_cpu(result: dict) -> str:
    lines = ["| scheme | tokens x hidden | bf16 all_reduce (ms) | eager q+u (ms) | native q+u (ms) | "
             "native / eager speedup | eager / all_reduce | native / all_reduce |",
             "|---|---|---|---|---|---|---|---|"]
    rows = result["codec"]
    for e, f in zip(rows[::2], rows[1::2]):
        lines.append(f"| {e['scheme']} | {e['tokens']} x {e['hidden']} | {1e3 * e['allreduce_s']:.2f} | "
                     f"{1e3 * e['quantize_s']:.1f} + {1e3 * e['unpack_sum_s']:.1f} | "
                     f"{1e3 * f['quantize_s']:.1f} + {1e3 * f['unpack_sum_s']:.1f} | "
                     f"{f['speedup_total']:.1f}x | {e['fraction_of_allreduce']:.2f} | {f['fraction_of_allreduce']:.2f} |")
    return "\n".join(lines)


def markdown_cuda(rows: list[dict]) -> str:
    lines = ["| scheme | kernel | tokens x hidden | MB moved | GB/s | copy GB/s | of copy |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['kernel']} | {r['tokens']} x {r['hidden']} | "
                     f"{(r['bytes_read'] + r['bytes_written']) / 1e6:.2f} | {r['gbps']:.0f} | {r['copy_gbps']:.0f} | "
                     f"{100 * r['of_copy']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    ap.add_argument("--hidden", type=int, nargs="+", default=DEFAULT_HIDDEN)
    ap.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES)
    ap.add_argument("--tp", type=int, default=None, help="ranks (CPU default 3, CUDA default 8)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for the torch path")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per measurement before stopping repeats")
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--max-repeats", type=int, default=50)
    ap.add_argument("--native", action="store_true",
                    help="CPU: numba kernels vs reference in one run, plus the tp-rank reduce "
                         "(bench.kernels_native), instead of the eager/native vs gloo table")
    from bench import kernels_native as bench_native
    bench_native.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.native and args.schemes == DEFAULT_SCHEMES:
        args.schemes = bench_native.DEFAULT_SCHEMES
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    args.tp = args.tp or (8 if device == "cuda" else 3)
    meta = dict(command=meta_command("bench.kernels", list(argv if argv is not None else sys.argv[1:])),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device,
                torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), load=start_load(),
                tp=args.tp, threads=args.threads, tokens=args.tokens, hidden=args.hidden, schemes=args.schemes)
    if device == "cuda":
        import triton
        meta.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
        result = dict(meta=meta, cuda=run_cuda(args))
        table = markdown_cuda(result["cuda"])
    elif args.native:
        result = dict(meta=meta, native=bench_native.run(args))
        table = bench_native.markdown(result["native"])
    else:
        result = dict(meta=meta, cpu=run_cpu(args))
        table = markdown_cpu(result["cpu"])
    end_load(result["meta"]["load"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
