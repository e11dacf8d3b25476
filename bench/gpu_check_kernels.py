# Size: ~450 lines: equality and speed of four kernels share their input builders and the timer.
"""gpu_check steps ``kernels_equal`` and ``kernel_speed`` (run by ``bench.gpu_check``).

``kernels_equal``: (1) ``tests/test_kernels.py`` and ``tests/test_rotation_kernel.py`` under
pytest with ``bench.gpu_check_plugin`` (on CUDA the Triton kernels compiled and every tensor
moved to the GPU; on the CPU the interpreter and a small subset); (2) every kernel on the
large shape (8192 x 5120 on a GPU) with NaN, +-Inf, near-fp32-max and clamped values, compared
byte for byte with ``kernels.reference`` on the same device, and for three of them with the
reference on the CPU as well (torch's NaN bit patterns differ between devices: a difference
that is only there is reported as such, not hidden).

``kernel_speed``: each kernel's bytes read + written over its median time (CUDA events around
each call, inputs rotated over enough sets to exceed the L2), against a device-to-device copy
of the same number of bytes, timed the same way in the same run. Messages are the bf16
partial [tokens, 4096] at 64 KB .. 64 MB (plus 8192 x 5120); ``fixed_cost_us`` is the median
at the smallest message (GPU time between the events, which includes the host work of the
call, and ``wall_us``: host time per call with the device synchronized).
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SPEED_HIDDEN = 4096
SPEED_TOKENS = [8, 32, 128, 512, 1024, 2048, 4096, 8192]   # bf16 [T, 4096]: 64 KB .. 64 MB
QUICK_SPEED_TOKENS = [1, 4]
QUICK_SPEED_HIDDEN = 256
SPEED_TP = 4
TARGET_OF_COPY = 0.8
TARGET_MIN_BYTES = 8 << 20
L2_ROTATE_BYTES = 256 << 20  # > 4 x the H200's 60 MB L2
LARGE = (8192, 5120)
QUICK_LARGE = (12, 256)
OUTLIER_FRACTION = 64  # top 1/64 features, as the paper's scheme


# -- data --------------------------------------------------------------------------------------
def partial(tokens: int, hidden: int, seed: int, dtype, outliers: torch.Tensor | None, device) -> torch.Tensor:
    """A partial sum with rows of different magnitude, larger outlier features, and the hard
    values: NaN and +-Inf in quantized and outlier columns, one value near the fp32 ceiling."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where it is used: 8192 x 5120 is fast there
    x = torch.randn(tokens, hidden, generator=g, device=device)
    x = x * torch.exp(torch.randn(tokens, 1, generator=g, device=device))
    if outliers is not None and outliers.numel():
        x[:, outliers.to(device)] *= 30.0
    x[0, 7], x[1 % tokens, 8], x[2 % tokens, 9] = float("nan"), float("inf"), -float("inf")
    if outliers is not None and outliers.numel() >= 2:
        x[3 % tokens, int(outliers[0])], x[4 % tokens, int(outliers[1])] = float("nan"), float("inf")
    if dtype == torch.float32:
        x[5 % tokens, min(100, hidden - 1)] = 3.0e38  # scales must not overflow
    return x.to(dtype)


def static_range(x: torch.Tensor, margin: float = 0.1):
    """Per-feature (min, max) of the finite data, narrowed by ``margin`` so some values clamp."""
    finite = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
    finite = finite.clamp(-1e6, 1e6)
    lo, hi = finite.amin(0), finite.amax(0)
    return lo * (1 - margin), hi * (1 - margin)


def outlier_idx(hidden: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + hidden)
    return torch.randperm(hidden, generator=g)[:max(1, hidden // OUTLIER_FRACTION)]  # unsorted on purpose


# -- comparisons -------------------------------------------------------------------------------
def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).reshape(-1) if t.dtype != torch.uint8 else t.reshape(-1)


def compare_bytes(got: torch.Tensor, want: torch.Tensor, lay=None) -> dict:
    """Byte equality of two tensors; the count and the first differing offsets (with the payload
    section they fall in when ``lay`` is given), and NaN-tolerant value equality for floats."""
    a, b = _as_bytes(got), _as_bytes(want)
    res = dict(bytes=int(a.numel()), equal=bool(a.shape == b.shape and torch.equal(a, b)))
    if a.shape != b.shape:
        res.update(differing=None, shape=[list(got.shape), list(want.shape)])
        return res
    bad = (a != b).nonzero().reshape(-1)
    res["differing"] = int(bad.numel())
    sections = {}
    for off in bad[:2000].tolist():
        sec = "?"
        if lay is not None:
            for name in ("scales", "mins", "codes", "outliers"):
                s = getattr(lay, name)
                if s.offset <= off < s.end:
                    sec = name
        sections[sec] = sections.get(sec, 0) + 1
    res["differing_sections"] = sections
    res["first"] = [dict(offset=o, got=int(a[o]), want=int(b[o])) for o in bad[:5].tolist()]
    if got.dtype.is_floating_point:
        ga, wb = got.detach().float().cpu(), want.detach().float().cpu()
        same = (ga == wb) | (torch.isnan(ga) & torch.isnan(wb))
        res["values_equal"] = bool(same.all())
        res["values_differing"] = int((~same).sum())
    return res


# -- kernels_equal -----------------------------------------------------------------------------
def _pytest_part(rec, device: str, quick: bool, limit_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pytest.json"
        cmd = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "tests/test_rotation_kernel.py", "-q",
               "-p", "bench.gpu_check_plugin", "-p", "no:cacheprovider", "-o", "addopts=", "--timeout", "300"]
        if quick:
            cmd += ["-k", "two_shot or rows_per_program or nan_and_inf or kernel_round_trips"]
        elif device == "cuda" and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", "4"]  # compiling every test's kernel variants is most of the time: 4 at once
        env = dict(os.environ, LOWBIT_GPU_CHECK_PYTEST_JSON=str(report), LOWBIT_GPU_CHECK_DEVICE=device,
                   PYTHONPATH=str(REPO))
        env.pop("TRITON_INTERPRET", None)  # the test files and the plugin decide per device
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, output = None, (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
                else (exc.stdout or "")
        sys.stdout.write(output[-20000:])
        data = json.loads(report.read_text()) if report.exists() else {}
    data.update(rc=rc, command=" ".join(cmd[2:]), seconds=round(time.perf_counter() - start, 3),
                timed_out=rc is None)
    if not report_ok(data):
        data["output_tail"] = output[-3000:]
    rec["pytest"] = data


def report_ok(data: dict) -> bool:
    return data.get("rc") == 0 and data.get("failed", 1) == 0 and data.get("errors", 1) == 0 \
        and data.get("passed", 0) > 0


def _triton_quant(device: str):
    from kernels import dispatch
    return dispatch.import_interpreted() if device == "cpu" else dispatch.triton_module(interpret=False)


LARGE_CASES = [  # (scheme, input dtype, also against the CPU reference)
    ("int4-static-top1/64", torch.bfloat16, True),     # the paper, as deployed (bf16 partials)
    ("int4-static-top1/64", torch.float32, False),
    ("int2-static-top1/64", torch.bfloat16, False),
    ("int8-token", torch.float32, True),
    ("int4-group128-top1/64", torch.bfloat16, True),
    ("int4a-group32", torch.float32, False),
]


def _spec_and_outliers(text: str, hidden: int):
    from lowbit.scheme import parse_scheme
    scheme = parse_scheme(text)
    k = scheme.outliers.count(hidden)
    return scheme.quant, (outlier_idx(hidden)[:k] if k else None)


def _large_part(rec, device: str, quick: bool) -> None:
    from kernels import reference as ref
    from lowbit.wire.payload import layout
    from lowbit.scheme import QuantSpec
    tq = _triton_quant(device)
    tokens, hidden = QUICK_LARGE if quick else LARGE
    tp = 4
    dev = torch.device(device)
    rows = []
    rec["large"] = rows
    cases = LARGE_CASES[:2] + LARGE_CASES[3:4] if quick else LARGE_CASES
    for text, dtype, with_cpu in cases:
        quant, idx = _spec_and_outliers(text, hidden)
        n_out = 0 if idx is None else idx.numel()
        lay = layout(tokens, hidden, quant, n_out)
        xs = [partial(tokens, hidden, 100 + r, dtype, idx, dev) for r in range(tp)]
        ranges = [static_range(x) if not quant.dynamic else (None, None) for x in xs]
        base = dict(scheme=text, dtype=str(dtype).removeprefix("torch."), tokens=tokens, hidden=hidden, tp=tp)
        # quantize_pack, every rank's partial
        payloads, eq = [], []
        for x, (lo, hi) in zip(xs, ranges):
            got = tq.quantize_pack(x, quant, idx, lo, hi)
            want = ref.quantize_pack_ref(x, quant, idx, lo, hi)
            eq.append(compare_bytes(got, want, lay))
            payloads.append(got)
        row = dict(base, kernel="quantize_pack", same_device=_merge(eq))
        if with_cpu:
            x, (lo, hi) = xs[0], ranges[0]
            cpu = ref.quantize_pack_ref(x.cpu(), quant, None if idx is None else idx, _cpu(lo), _cpu(hi))
            row["cpu_reference"] = compare_bytes(payloads[0], cpu, lay)
        rows.append(row)
        rec.save()
        # unpack_dequant_sum of the tp payloads, bf16 and fp32 out
        stacked = torch.stack(payloads)
        mins = maxs = None
        if not quant.dynamic:
            mins, maxs = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
        for out_dtype in (torch.bfloat16, torch.float32):
            got = tq.unpack_dequant_sum(stacked, tokens, hidden, quant, idx, mins, maxs, out_dtype=out_dtype)
            want = ref.unpack_dequant_sum_ref(stacked, tokens, hidden, quant, idx, mins, maxs, out_dtype=out_dtype)
            row = dict(base, kernel="unpack_dequant_sum", out_dtype=str(out_dtype).removeprefix("torch."),
                       same_device=compare_bytes(got, want))
            if with_cpu and out_dtype == torch.float32:
                cpu = ref.unpack_dequant_sum_ref(stacked.cpu(), tokens, hidden, quant, idx, _cpu(mins), _cpu(maxs))
                row["cpu_reference"] = compare_bytes(got, cpu)
            rows.append(row)
        rec.save()
        del stacked, payloads
    # two-shot requantization: one rank's chunk (hidden / tp features) of tp leg-1 payloads
    width = hidden // tp
    first, second = QuantSpec(4, True, "static"), QuantSpec(8, True, "token")
    local = outlier_idx(width)[:max(1, width // OUTLIER_FRACTION)]
    chunks = [partial(tokens, width, 200 + r, torch.float32, local, dev) for r in range(tp)]
    ranges = [static_range(c) for c in chunks]
    payloads = torch.stack([ref.quantize_pack_ref(c, first, local, lo, hi) for c, (lo, hi) in zip(chunks, ranges)])
    mins, maxs = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
    got = tq.unpack_dequant_sum_requant(payloads, tokens, width, first, local, mins, maxs, second)
    want = ref.unpack_dequant_sum_requant_ref(payloads, tokens, width, first, local, mins, maxs, second)
    rows.append(dict(scheme="int4-static-top1/64@twoshot+int8-token", dtype="float32", tokens=tokens, hidden=width,
                     tp=tp, kernel="unpack_dequant_sum_requant",
                     same_device=compare_bytes(got, want, layout(tokens, width, second, local.numel()))))
    rec.save()
    # block Hadamard: a different summation order than the reference's matmul, so the bound is
    # a few ulps of the row's magnitude (tests/test_rotation_kernel.py's), plus the equal share
    from kernels.hadamard import block_hadamard, block_hadamard_ref
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(7)).mul(5).to(dev)
    for block in ((64,) if quick else (64, 128)):
        for inverse in (False, True):
            got = block_hadamard(x, block, inverse)
            want = block_hadamard_ref(x, block, inverse)
            diff = (got - want).abs()
            bound = 4e-7 * block ** 0.5 * x.abs().amax(-1, keepdim=True)
            rows.append(dict(kernel="block_hadamard", block=block, inverse=inverse, tokens=tokens, hidden=hidden,
                             dtype="float32", max_abs_diff=float(diff.max()), within_bound=bool((diff <= bound).all()),
                             bound_rule="4e-7 * sqrt(block) * max|row|",
                             bit_equal_fraction=float((got == want).float().mean()),
                             same_device=dict(equal=bool(torch.equal(got, want)))))
    rec.save()


def _cpu(t):
    return None if t is None else t.cpu()


def _merge(results: list[dict]) -> dict:
    """One comparison record for several ranks' payloads."""
    return dict(equal=all(r["equal"] for r in results), ranks=len(results),
                differing=sum(r.get("differing") or 0 for r in results),
                differing_sections={k: sum(r.get("differing_sections", {}).get(k, 0) for r in results)
                                    for r in results for k in r.get("differing_sections", {})},
                first=next((r["first"] for r in results if r.get("first")), []))


def kernels_equal_step(rec, out, device: str, quick: bool) -> None:
    limit = float(rec["limit_s"] or 120)
    _pytest_part(rec, device, quick, max(20.0, 0.55 * limit))
    rec.save()
    _large_part(rec, device, quick)
    large = rec["large"]
    kernel_rows = [r for r in large if r["kernel"] != "block_hadamard"]
    cpu_payloads = [r["cpu_reference"] for r in large if "cpu_reference" in r and r["kernel"] == "quantize_pack"]
    cpu_sums = [r["cpu_reference"] for r in large if "cpu_reference" in r and r["kernel"] == "unpack_dequant_sum"]
    rec["checks"] = dict(
        pytest_passed=report_ok(rec["pytest"]),
        large_bytes_equal_same_device=all(r["same_device"]["equal"] for r in kernel_rows),
        # payload bytes and sum values against the reference run on the CPU (a sum's NaN bit
        # pattern may differ between devices: values_equal treats NaN == NaN)
        cpu_reference_payload_bytes_equal=all(c["equal"] for c in cpu_payloads) if cpu_payloads else None,
        cpu_reference_sum_values_equal=all(c.get("values_equal") for c in cpu_sums) if cpu_sums else None,
        hadamard_within_bound=all(r["within_bound"] for r in large if r["kernel"] == "block_hadamard"),
    )
    rec["checks"]["all"] = bool(rec["checks"]["pytest_passed"] and rec["checks"]["large_bytes_equal_same_device"]
                                and rec["checks"]["hadamard_within_bound"])


# -- kernel_speed --------------------------------------------------------------------------------
class Timer:
    """Median time of ``fn(i)`` (i cycles over input sets): CUDA events around each call on a
    GPU, perf_counter with nothing to synchronize on the CPU; plus host wall time per call."""

    def __init__(self, device: str, budget_s: float, min_reps: int, max_reps: int):
        self.cuda = device == "cuda"
        self.budget_s, self.min_reps, self.max_reps = budget_s, min_reps, max_reps

    def __call__(self, fn, sets: int) -> dict:
        for i in range(3):  # warm up (compilation, allocator, first-call library set-up)
            fn(i % sets)
        self._sync()
        times = []
        deadline = time.perf_counter() + self.budget_s
        wall_start = time.perf_counter()
        n = 0
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.max_reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.max_reps)]
        while n < self.max_reps and (n < self.min_reps or time.perf_counter() < deadline):
            if self.cuda:
                starts[n].record()
                fn(n % sets)
                ends[n].record()
            else:
                t0 = time.perf_counter()
                fn(n % sets)
                times.append(time.perf_counter() - t0)
            n += 1
        self._sync()
        wall = (time.perf_counter() - wall_start) / n
        if self.cuda:
            times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts[:n], ends[:n])]
        return dict(median_s=statistics.median(times), min_s=min(times), reps=n, wall_s=wall)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def _sets_for(nbytes: int, device: str) -> int:
    return max(1, min(32, -(-L2_ROTATE_BYTES // max(1, nbytes)))) if device == "cuda" else 1


SPEED_SCHEMES = ["int4-static-top1/64", "int8-token"]


def kernel_speed_step(rec, out, device: str, quick: bool) -> None:
    from kernels import reference as ref
    from lowbit.wire.payload import layout
    from lowbit.scheme import QuantSpec
    dev = torch.device(device)
    impl = "triton" if device == "cuda" else "reference (torch, CPU)"
    codec = _triton_quant(device) if device == "cuda" else _RefCodec
    if device == "cuda":
        from kernels.hadamard import block_hadamard
    else:
        from kernels.hadamard import block_hadamard_ref as block_hadamard
    timer = Timer(device, budget_s=0.05 if quick else 0.15, min_reps=3 if quick else 20, max_reps=10 if quick else 100)
    hidden = QUICK_SPEED_HIDDEN if quick else SPEED_HIDDEN
    sizes = [(t, hidden) for t in (QUICK_SPEED_TOKENS if quick else SPEED_TOKENS)] + ([] if quick else [LARGE])
    rec["impl"], rec["tp"], rec["rows"] = impl, SPEED_TP, []
    copy_cache: dict[int, dict] = {}

    def copy_time(nbytes: int) -> dict:
        """A device copy of nbytes/2 bytes: reads + writes nbytes, as the kernel's count."""
        if nbytes not in copy_cache:
            half = max(1, nbytes // 2)
            sets = _sets_for(nbytes, device)
            src = [torch.empty(half, dtype=torch.uint8, device=dev).random_(0, 255) for _ in range(sets)]
            dst = [torch.empty_like(s) for s in src]
            copy_cache[nbytes] = dict(timer(lambda i: dst[i].copy_(src[i]), sets), moved=2 * half)
        return copy_cache[nbytes]

    def add(kernel, scheme, tokens, hid, read, written, t):
        c = copy_time(read + written)
        moved = read + written
        gbps = moved / t["median_s"] / 1e9
        copy_gbps = c["moved"] / c["median_s"] / 1e9
        rec["rows"] = rec["rows"] + [dict(
            kernel=kernel, scheme=scheme, tokens=tokens, hidden=hid, message_bytes=tokens * hid * 2,
            bytes_read=read, bytes_written=written, bytes_moved=moved, median_us=1e6 * t["median_s"],
            min_us=1e6 * t["min_s"], wall_us=1e6 * t["wall_s"], reps=t["reps"], gbps=gbps,
            copy_median_us=1e6 * c["median_s"], copy_gbps=copy_gbps, of_copy=gbps / copy_gbps)]
        print(f"{kernel:27s} {scheme:24s} {tokens:5d} x {hid:5d} {moved / 1e6:9.2f} MB "
              f"{1e6 * t['median_s']:9.1f} us {gbps:8.1f} GB/s  copy {copy_gbps:8.1f}  {100 * gbps / copy_gbps:5.1f}%",
              flush=True)

    for tokens, hid in sizes:
        for text in SPEED_SCHEMES:
            quant, idx = _spec_and_outliers(text, hid)
            n_out = 0 if idx is None else idx.numel()
            lay = layout(tokens, hid, quant, n_out)
            sets = _sets_for(tokens * hid * 2 + lay.total_bytes, device)
            xs = [partial(tokens, hid, 300 + i, torch.bfloat16, idx, dev) for i in range(sets)]
            rng = [static_range(x) if not quant.dynamic else (None, None) for x in xs]
            t = timer(lambda i: codec.quantize_pack(xs[i], quant, idx, *rng[i]), sets)
            add("quantize_pack", text, tokens, hid, tokens * hid * 2, lay.total_bytes, t)
            payloads = torch.stack([codec.quantize_pack(xs[0], quant, idx, *rng[0])] * SPEED_TP)
            usets = _sets_for(payloads.numel() + tokens * hid * 2, device)
            pays = [payloads.clone() for _ in range(usets)]
            mins = maxs = None
            if not quant.dynamic:
                mins, maxs = torch.stack([rng[0][0]] * SPEED_TP), torch.stack([rng[0][1]] * SPEED_TP)
            t = timer(lambda i: codec.unpack_dequant_sum(pays[i], tokens, hid, quant, idx, mins, maxs,
                                                         out_dtype=torch.bfloat16), usets)
            add("unpack_dequant_sum", text, tokens, hid, payloads.numel(), tokens * hid * 2, t)
            xs = pays = payloads = None  # free the device memory before the next size (the timers' lambdas read these names)
        # two-shot leg 1 -> leg 2 on one rank's chunk of width hid / tp
        width = hid // SPEED_TP
        first, second = QuantSpec(4, True, "static"), QuantSpec(8, True, "token")
        local = outlier_idx(width)[:max(1, width // OUTLIER_FRACTION)]
        chunk = partial(tokens, width, 400, torch.float32, local, dev)
        lo, hi = static_range(chunk)
        one = ref.quantize_pack_ref(chunk, first, local, lo, hi)
        pl = torch.stack([one] * SPEED_TP)
        rsets = _sets_for(pl.numel(), device)
        pls = [pl.clone() for _ in range(rsets)]
        mins, maxs = torch.stack([lo] * SPEED_TP), torch.stack([hi] * SPEED_TP)
        out_bytes = layout(tokens, width, second, local.numel()).total_bytes
        t = timer(lambda i: codec.unpack_dequant_sum_requant(pls[i], tokens, width, first, local, mins, maxs, second),
                  rsets)
        add("unpack_dequant_sum_requant", "int4-static-top1/64@twoshot+int8-token", tokens, width, pl.numel(),
            out_bytes, t)
        # block Hadamard, fp32 in and out
        hsets = _sets_for(tokens * hid * 8, device)
        hx = [torch.randn(tokens, hid, device=dev) for _ in range(hsets)]
        t = timer(lambda i: block_hadamard(hx[i], 64), hsets)
        add("block_hadamard", "rot64", tokens, hid, tokens * hid * 4, tokens * hid * 4, t)
        hx = None  # free the device memory before the next size
        rec.save()
    rows = rec["rows"]
    by_kernel = {}
    for r in rows:
        k = by_kernel.setdefault(r["kernel"], dict(min_of_copy_at_8mb=None, rows=0))
        k["rows"] += 1
        if r["bytes_moved"] >= TARGET_MIN_BYTES:
            k["min_of_copy_at_8mb"] = min(r["of_copy"], k["min_of_copy_at_8mb"] or float("inf"))
    fixed = {}
    for r in rows:  # each kernel and scheme at its smallest message
        key = f"{r['kernel']}:{r['scheme']}"
        if key not in fixed or r["message_bytes"] < fixed[key]["message_bytes"]:
            fixed[key] = dict(median_us=round(r["median_us"], 2), wall_us=round(r["wall_us"], 2),
                              message_bytes=r["message_bytes"], bytes_moved=r["bytes_moved"])
    rec["fixed_cost_us"] = fixed
    rec["by_kernel"] = by_kernel
    met = {k: None if v["min_of_copy_at_8mb"] is None else v["min_of_copy_at_8mb"] >= TARGET_OF_COPY
           for k, v in by_kernel.items()}
    rec["target"] = dict(of_copy=TARGET_OF_COPY, min_bytes_moved=TARGET_MIN_BYTES, met=met)
    judged = [v for v in met.values() if v is not None]
    rec["checks"] = dict(measured=bool(rows), target_met_all=all(judged) if device == "cuda" and judged else None)


class _RefCodec:
    """The torch reference with the kernels' API (the CPU-safe mode has no compiled Triton)."""

    @staticmethod
    def quantize_pack(*a, **k):
        from kernels import reference as ref
        return ref.quantize_pack_ref(*a, **k)

    @staticmethod
    def unpack_dequant_sum(*a, **k):
        from kernels import reference as ref
        return ref.unpack_dequant_sum_ref(*a, **k)

    @staticmethod
    def unpack_dequant_sum_requant(*a, **k):
        from kernels import reference as ref
        return ref.unpack_dequant_sum_requant_ref(*a, **k)
