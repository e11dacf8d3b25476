"""A cost model, not a measurement: alpha-beta times of the TP collectives on named interconnects,
and what low-bit communication would buy there.

    python -m lowbit.method.projection                                    # table for Llama-2-13B / Gemma-2-27B at TP 8
    python -m lowbit.method.projection --check bench/results/collectives.json   # fit to gloo runs, report the model's error

Each collective step costs ``alpha + bytes / beta`` (latency alpha, per-direction link bandwidth
beta, one link per rank, ring algorithms). For N ranks and a message of M bytes per rank:

- ring all-reduce (bf16):    2 (N-1) alpha + 2 (N-1)/N * M / beta
- gather (quantized, P bytes of payload per rank): all-gather ring, (N-1) alpha + (N-1) P / beta
- two-shot (quantized): all-to-all of P/N chunks, (N-1) alpha + (N-1)/N P / beta, then an
  all-gather of the requantized reduced chunk (P2 bytes per rank for the whole tensor):
  (N-1) alpha + (N-1)/N P2 / beta

plus the codec time on the GPU (quantize + dequantize/sum), modelled as memory-bound: the bytes
it reads and writes divided by ``codec_bw`` (a fraction of the HBM bandwidth; the Triton kernels'
CUDA figures are not yet measured in this repo, so this is an assumption and stated as one).
The compute the all-reduce competes with (to turn communication into end-to-end speedup) is
modelled with a roofline: prefill is FLOP-bound at ``mfu`` of peak, decode is bound by reading
the weights from HBM.

Interconnect numbers are public nominal figures (vendor data sheets), derated to what NCCL
typically reaches (``efficiency``); latencies are order-of-magnitude values of a small NCCL
collective step. They are inputs, printed with every table, and easy to change here.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lowbit.wire.accounting import wire_bytes


@dataclass(frozen=True)
class Interconnect:
    name: str
    beta_gbps: float      # nominal per-direction bandwidth per GPU, GB/s
    efficiency: float     # fraction reached by collectives in practice
    alpha_us: float       # per-step latency, microseconds
    source: str

    @property
    def beta(self) -> float:  # bytes / s
        return self.beta_gbps * 1e9 * self.efficiency


INTERCONNECTS = {
    "nvlink4": Interconnect("NVLink 4 (H100 SXM)", 450.0, 0.80, 1.0,
                            "NVIDIA H100 data sheet: 900 GB/s bidirectional NVLink per GPU"),
    "pcie4": Interconnect("PCIe 4.0 x16", 32.0, 0.80, 5.0, "PCI-SIG: 16 GT/s x16 = 31.5 GB/s per direction"),
    "pcie5": Interconnect("PCIe 5.0 x16", 64.0, 0.80, 5.0, "PCI-SIG: 32 GT/s x16 = 63 GB/s per direction"),
    "eth100": Interconnect("100 Gb Ethernet (RoCE)", 12.5, 0.90, 10.0, "IEEE 802.3: 100 Gbit/s line rate"),
    "ib400": Interconnect("400 Gb InfiniBand NDR", 50.0, 0.90, 5.0, "NVIDIA ConnectX-7 NDR: 400 Gbit/s"),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    params_b: float  # parameters, billions


SHAPES = {
    "llama2-13b": ModelShape("Llama-2-13B", 5120, 40, 13.0),
    "gemma2-27b": ModelShape("Gemma-2-27B", 4608, 46, 27.2),
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 30, 0.135),
}


@dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM"
    hbm_gbps: float = 3350.0     # HBM3 bandwidth, GB/s (data sheet)
    bf16_tflops: float = 989.0   # dense BF16, TFLOP/s (data sheet)
    mfu: float = 0.5             # fraction of peak FLOPs reached in prefill (assumption)
    codec_eff: float = 0.8       # codec kernels at this fraction of HBM bandwidth (the kernels' target)
    launch_us: float = 5.0       # fixed cost per codec kernel (launch + tail), microseconds (assumption)


def ring_steps(method: str, n: int) -> int:
    """Latency terms of one call: ring all-reduce and two-shot 2 (N-1) steps, all-gather N-1."""
    return (n - 1) if method == "gather" else 2 * (n - 1)


def collective_s(method: str, n: int, sent_bytes: float, alpha: float, beta: float) -> float:
    """alpha-beta time of one call that sends ``sent_bytes`` per rank (``wire_bytes``)."""
    return ring_steps(method, n) * alpha + sent_bytes / beta


def allreduce_s(n: int, message_bytes: float, alpha: float, beta: float) -> float:
    return collective_s("exact", n, wire_bytes("exact", n, message_bytes), alpha, beta)


def gather_s(n: int, payload_bytes: float, alpha: float, beta: float) -> float:
    return collective_s("gather", n, wire_bytes("gather", n, payload_bytes), alpha, beta)


def two_shot_s(n: int, payload_bytes: float, payload2_bytes: float, alpha: float, beta: float) -> float:
    """``payload2_bytes``: the requantized reduced tensor, all N chunks together (one per owner)."""
    return collective_s("two_shot", n, wire_bytes("two_shot", n, payload_bytes, payload2_bytes / n), alpha, beta)


def codec_s(n: int, values: int, bits: float, gpu: Gpu, method: str) -> float:
    """Memory-bound codec time: quantize reads bf16 and writes the payload; the receiver reads
    N payloads (gather) or one chunk's N payloads (two-shot) and writes bf16."""
    bw = gpu.hbm_gbps * 1e9 * gpu.codec_eff
    payload = values * bits / 8
    quantize = values * 2 + payload
    if method == "gather":
        dequant, kernels = n * payload + values * 2, 2
    else:  # two_shot: owner dequantizes its chunk from N ranks, requantizes (8-bit), all dequantize the gathered result
        dequant, kernels = payload + values * 2 / n + values / n + values + values * 2, 3
    return (quantize + dequant) / bw + kernels * gpu.launch_us * 1e-6


def project(shape: ModelShape, link: Interconnect, n: int, tokens: int, bits: float, gpu: Gpu = Gpu(),
            second_leg_bits: float = 8.25) -> dict:
    """Per-layer communication times and end-to-end speedup of one forward over ``tokens`` tokens."""
    values = tokens * shape.hidden
    exact = allreduce_s(n, values * 2, link.alpha_us * 1e-6, link.beta)
    gather = gather_s(n, values * bits / 8, link.alpha_us * 1e-6, link.beta) + codec_s(n, values, bits, gpu, "gather")
    two = (two_shot_s(n, values * bits / 8, values * second_leg_bits / 8, link.alpha_us * 1e-6, link.beta)
           + codec_s(n, values, bits, gpu, "two_shot"))
    # compute per layer per GPU: FLOP-bound prefill vs weight-read-bound decode, whichever is slower
    flops = 2 * shape.params_b * 1e9 * tokens / n / shape.layers
    weight_bytes = 2 * shape.params_b * 1e9 / n / shape.layers
    compute = max(flops / (gpu.bf16_tflops * 1e12 * gpu.mfu), weight_bytes / (gpu.hbm_gbps * 1e9))
    per_layer = lambda comm: compute + 2 * comm  # noqa: E731 - two all-reduces per layer
    best = min(gather, two)
    return dict(model=shape.name, link=link.name, tp=n, tokens=tokens, bits=bits,
                exact_us=exact * 1e6, gather_us=gather * 1e6, two_shot_us=two * 1e6,
                comm_speedup=exact / best, compute_us=compute * 1e6,
                e2e_speedup=per_layer(exact) / per_layer(best), comm_share_exact=2 * exact / per_layer(exact))


def crossover_tokens(shape: ModelShape, link: Interconnect, n: int, bits: float, gpu: Gpu = Gpu()) -> int | None:
    """Smallest token count (powers of two up to 64k) at which the quantized collective is faster."""
    for k in range(17):
        if project(shape, link, n, 2 ** k, bits, gpu)["comm_speedup"] > 1.0:
            return 2 ** k
    return None


def table(n: int = 8, bits: float = 4.1875, tokens=(1, 16, 256, 2048, 8192)) -> str:
    gpu = Gpu()
    lines = [f"Model (assumptions): {gpu.name}, HBM {gpu.hbm_gbps:g} GB/s, BF16 {gpu.bf16_tflops:g} TFLOP/s at "
             f"MFU {gpu.mfu:g}, codec at {gpu.codec_eff:.0%} of HBM + {gpu.launch_us:g} µs per kernel; {bits} bits/value; "
             f"TP {n}. A model, not a measurement.", "",
             "| model | link (β eff. GB/s, α µs) | tokens | bf16 all-reduce µs | best quantized µs | comm × | "
             "end-to-end × | comm share (bf16) |", "|---|---|---|---|---|---|---|---|"]
    for shape in (SHAPES["llama2-13b"], SHAPES["gemma2-27b"]):
        for key, link in INTERCONNECTS.items():
            for t in tokens:
                r = project(shape, link, n, t, bits, gpu)
                lines.append(f"| {shape.name} | {link.name} ({link.beta / 1e9:.0f}, {link.alpha_us:g}) | {t} | "
                             f"{r['exact_us']:.1f} | {min(r['gather_us'], r['two_shot_us']):.1f} | "
                             f"{r['comm_speedup']:.2f} | {r['e2e_speedup']:.3f} | {100 * r['comm_share_exact']:.0f}% |")
    lines += ["", "Crossover (smallest token count where the quantized collective wins):", ""]
    for shape in (SHAPES["llama2-13b"], SHAPES["gemma2-27b"]):
        for key, link in INTERCONNECTS.items():
            lines.append(f"- {shape.name}, {link.name}: {crossover_tokens(shape, link, n, bits, gpu) or '> 65536'} tokens")
    lines += ["", "Interconnect sources: " + "; ".join(f"{l.name}: {l.source}" for l in INTERCONNECTS.values())]
    return "\n".join(lines)


# -- checking the model against measured gloo runs -----------------------------------------------
def fit_alpha_beta(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of time = a + b * x over (x, seconds) points; returns (a, b) with a, b >= 0."""
    n = len(points)
    if n < 2:
        raise ValueError("need at least two sizes to fit alpha and beta")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    b = max(b, 1e-15)
    a = max(0.0, my - b * mx)
    return a, b


def check_against(records: list[dict]) -> list[dict]:
    """Fit alpha/beta per (link, tp) to the bf16 all-reduce records, then predict every
    record's *collective* time from its bytes per rank and report the relative error.

    Records need tp, link, method, tokens, hidden, median_ms, bytes_per_rank (what one rank sends,
    ``lowbit.wire.accounting.wire_bytes``, as the collective bench records it) and (optionally)
    codec_ms (quantize + dequantize time measured alone); without codec_ms the quantized
    methods are predicted from communication only and their error includes the codec time."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("link", "loopback"), r["tp"]), []).append(r)
    for (link, n), rows in sorted(groups.items()):
        exact = [r for r in rows if r["method"] == "exact"]
        if len(exact) < 2:
            continue
        # ring all-reduce: T = 2(N-1) alpha + [2(N-1)/N M] / beta  ->  linear in x = 2(N-1)/N M
        a, b = fit_alpha_beta([(2 * (n - 1) / n * r["tokens"] * r["hidden"] * 2, r["median_ms"] / 1e3) for r in exact])
        alpha, beta = a / (2 * (n - 1)), 1.0 / b
        for r in rows:
            if r["method"] == "exact":
                pred = allreduce_s(n, r["tokens"] * r["hidden"] * 2, alpha, beta)
            else:  # gather / two_shot: bytes_per_rank is already what one rank sends (both legs)
                pred = collective_s(r["method"], n, r["bytes_per_rank"], alpha, beta)
            pred += r.get("codec_ms", r.get("compute_ms") or 0.0) / 1e3
            out.append(dict(link=link, tp=n, method=r["method"], scheme=r.get("scheme"), tokens=r["tokens"],
                            hidden=r["hidden"], measured_ms=r["median_ms"], predicted_ms=pred * 1e3,
                            rel_error=(pred * 1e3 - r["median_ms"]) / r["median_ms"],
                            alpha_us=alpha * 1e6, beta_gbps=beta / 1e9))
    return out


def _check_report(rows: list[dict]) -> str:
    lines = ["| link | TP | method | scheme | tokens×hidden | measured ms | model ms | error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['link']} | {r['tp']} | {r['method']} | {r['scheme'] or '-'} | {r['tokens']}×{r['hidden']} | "
                     f"{r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | {100 * r['rel_error']:+.0f}% |")
    fits = {(r["link"], r["tp"]): (r["alpha_us"], r["beta_gbps"]) for r in rows}
    lines += ["", "Fitted: " + "; ".join(f"{link} TP{tp}: α={a:.0f} µs, β={b:.3f} GB/s" for (link, tp), (a, b) in fits.items())]
    big = [abs(r["rel_error"]) for r in rows if r["tokens"] * r["hidden"] >= 2048 * 576]
    if big:
        lines.append(f"Median |error| at >= 2048x576 values: {100 * sorted(big)[len(big) // 2]:.0f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--bits", type=float, default=4.1875)
    parser.add_argument("--check", default=None, help="collective bench JSON to fit and check against")
    parser.add_argument("--out", default=None, help="write the table(s) as Markdown here")
    args = parser.parse_args(argv)
    text = table(args.tp, args.bits)
    if args.check:
        data = json.loads(Path(args.check).read_text())
        records = data["records"] if isinstance(data, dict) else data
        text += "\n\nCheck against measured gloo collectives (" + args.check + "):\n\n" + _check_report(check_against(records))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
