"""The shipping quantized all-reduces as they compute (``@quickreduce``, ``@flashinfer``, ``@trtllm``,
``@ncclring``, ``@flat2shot``): each system's owner layout, sum order and arithmetic, second leg.

Every step, sources and assumptions: docs/shipping.md; the independent re-derivations the tests hold
these to: tests/shipping_reference.py. A recipe takes one rank's partial as the engine holds it
(bf16: lowbit's fp32 partial is rounded to bf16 first), flattens it row-major, and runs:

==============  ==============================================================================
algo            legs (the codec is the scheme's quantizer, the same on both legs)
==============  ==============================================================================
quickreduce     vLLM QuickReduce (``quick_reduce_impl.cuh`` at 0bf6342e, aiter at e4048607): each
                rank encodes every owner's part of each 16384-value tile (zero-padded); the owner
                decodes the W messages and sums them in the cast's dtype, rank 0 first, one
                rounding per add; it encodes the sum, every rank decodes every owner's part.
                TP 2, 4, 8 only (INT3: TP 2 only)
flashinfer      FlashInfer ``quantized_allreduce.py`` (b190523e .. fb28d724): stripes of 4096 round
                robin; the owner sums ``q x scale + acc`` as one fp32 FMA per rank, rank order; it
                keeps its own sum, the others decode its requantized stripe
trtllm          TensorRT-LLM ``customLowPrecisionAllReduceKernels.cu`` (1a43c7d6), TP 2 / 4: the
                owner of shard j sums in fp32 from rank j on, requantizes; everyone decodes.
                TP 8 (the hierarchical NUMA path) is not emulated: refused
ncclring        NCCL >= 2.24.3 ``ncclAllReduce`` on fp8 (``reduce_kernel.h``): the caller's cast to
                fp8, then the ring: the reduction of chunk c starts at rank c + 1, each hop adds in
                fp16 and rounds back to fp8 satfinite. Emulated with one all-gather of the fp8
                tensors; the bytes counted are the ring's
flat2shot       lowbit's two-shot on the flat buffer's contiguous 1/W shards with an fp32 sum (MX /
                NVFP4 as torchao rounds them); leg 1 quantizes the whole partial with one header
                (NVFP4's tensor scale), leg 2 each shard with its own
==============  ==============================================================================

The output is rounded to bf16, as the kernels write it. The call's stats: ``clamped`` /
``nonfinite`` of leg 1 and ``leg2_clamped``, bytes per leg from the payloads (``lowbit.wire``), and
``lowbit.counters``' per-message counters of leg 1 (this rank's messages) and, as ``leg2_*``, of its
requantized sum, with ``nonfinite_out`` of its output and ``counters_seconds``, the time they
took (the call record's ``seconds`` leaves it out: it is not communication). ``counters=False``
(the communicator's, when nobody keeps the call's stats or it was built with ``counters=False``)
leaves them out, as ``QuantCommunicator`` does for its own collectives: counting decodes every
message again in torch.

    PYTHONPATH=. python -c "from lowbit.comm.dist import ThreadWorld; from lowbit.comm.recipes import run_recipe; \\
        from lowbit.scheme import parse_scheme; import torch; s = parse_scheme('quickreduce-int4'); \\
        w = ThreadWorld(2); \\
        print(w.run(lambda g: run_recipe(g, torch.randn(4, 576), s)[0].abs().max()))"
"""
from __future__ import annotations

import time

import torch

from lowbit.comm.dist import Group
from lowbit.counters import add_counters, message_counters
from lowbit.scheme import Scheme
from lowbit.wire.accounting import wire_bytes
from lowbit.wire.payload import decode, decode_terms, encode, layout
from lowbit.wire.recipes import owners, padded_length, ring_bytes

_FP32 = torch.float32


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(_FP32)


def _encode(values: torch.Tensor, quant, header=None) -> tuple[torch.Tensor, dict]:
    return encode(values.reshape(1, -1), quant, header=header)


def _decode(payload: torch.Tensor, count: int, quant) -> torch.Tensor:
    return decode(payload, 1, count, quant).reshape(-1)


def _sum_in_dtype(quant, rows: list[torch.Tensor], rank: int) -> torch.Tensor:
    """QuickReduce: the decoded messages added in rank order, each add rounded to the cast's dtype."""
    total = torch.zeros_like(rows[0])
    for row in rows:
        total = quant.cast.round(total + row)
    return total


def _sum_fp32_from_owner(quant, rows: list[torch.Tensor], rank: int) -> torch.Tensor:
    """TensorRT-LLM: fp32, starting with the owner's own message."""
    total = torch.zeros_like(rows[0])
    for i in range(len(rows)):
        total = total + rows[(rank + i) % len(rows)]
    return total


def _sum_fp32(quant, rows: list[torch.Tensor], rank: int) -> torch.Tensor:
    total = torch.zeros_like(rows[0])
    for row in rows:
        total = total + row
    return total


def run_recipe(group: Group, partial: torch.Tensor, scheme: Scheme, counters: bool = True
               ) -> tuple[torch.Tensor, int, dict]:
    """(this rank's reduced [T, H] in bf16 values as fp32, bytes it handed to collectives, stats);
    ``counters``: add ``lowbit.counters``' counters and ``nonfinite_out`` to the stats."""
    quant, algo, tp, rank = scheme.quant, scheme.algo, group.world_size, group.rank
    x = _bf16(partial.reshape(-1).to(_FP32))
    n = x.numel()
    if algo == "ncclring":
        return _nccl_ring(group, x, quant, partial.shape, counters)
    m = padded_length(algo, n)
    if m != n:
        x = torch.cat([x, x.new_zeros(m - n)])
    own = owners(algo, n, tp, quant.group_size or 1)
    header = quant.scale.message_header(quant.cast.apply(x), quant) if algo == "flat2shot" else None
    payloads, clamped, nonfinite, counts, spent = [], 0, 0, {}, 0.0
    for j in range(tp):
        p, st = _encode(x[own[j]], quant, header)
        payloads.append(p)
        clamped += st["clamped"]
        nonfinite += st["nonfinite"]
        if counters:
            start = time.perf_counter()
            add_counters(counts, message_counters(x[own[j]].reshape(1, -1), _decode(p, own[j].numel(), quant)
                                                  .reshape(1, -1), quant))
            spent += time.perf_counter() - start
    splits = [p.numel() for p in payloads]
    received = group.all_to_all(torch.cat(payloads), splits, [splits[rank]] * tp).reshape(tp, -1)
    count = own[rank].numel()
    if algo == "flashinfer":  # the decode fused into the sum: acc = q x scale + acc, one fp32 rounding
        total = torch.zeros(count, dtype=torch.float64)
        for r in range(tp):
            q, s = decode_terms(received[r], 1, count, quant)
            total = (q.double().reshape(-1) * s.double().reshape(-1) + total).to(_FP32).double()
        total = total.to(_FP32)
    else:
        rows = [_decode(received[r], count, quant) for r in range(tp)]
        add = {"quickreduce": _sum_in_dtype, "trtllm": _sum_fp32_from_owner}.get(algo, _sum_fp32)
        total = add(quant, rows, rank)
    p2, st2 = _encode(total, quant)
    sizes2 = [layout(1, o.numel(), quant).total_bytes for o in own]
    padded = torch.zeros(max(sizes2), dtype=torch.uint8)
    padded[:p2.numel()] = p2
    gathered = group.all_gather(padded)
    out = torch.empty(m, dtype=_FP32)
    for j in range(tp):
        out[own[j]] = _decode(gathered[j, :sizes2[j]], own[j].numel(), quant)
    if counters:
        start = time.perf_counter()
        add_counters(counts, message_counters(total.reshape(1, -1), out[own[rank]].reshape(1, -1), quant), "leg2_")
        spent += time.perf_counter() - start
    if algo == "flashinfer":
        out[own[rank]] = total  # the owner keeps its own sum: no second rounding of its stripe
    result = _bf16(out[:n])
    if counters:
        start = time.perf_counter()
        counts["nonfinite_out"] = int((~torch.isfinite(result)).sum())
        counts["counters_seconds"] = spent + time.perf_counter() - start
    leg1, leg2 = sum(splits), max(sizes2)
    stats = dict(clamped=clamped, nonfinite=nonfinite, leg2_clamped=st2["clamped"], leg2_nonfinite=st2["nonfinite"],
                 # what the kernel moves to its peers: the others' parts, then its own sum to each peer
                 bytes_to_peers=leg1 - splits[rank] + (tp - 1) * sizes2[rank],
                 leg1_bits=8.0 * leg1 / n, leg2_bits=8.0 * leg2 * tp / n, leg1_bytes=leg1, leg2_bytes=leg2,
                 bytes_received=int(wire_bytes("two_shot", tp, leg1, leg2)), codec_path="reference",
                 codec_path2="reference", **counts)
    return result.reshape(partial.shape), leg1 + leg2, stats


def _nccl_ring(group: Group, x: torch.Tensor, quant, shape, counters: bool) -> tuple[torch.Tensor, int, dict]:
    """NCCL's ring on the caller's fp8 tensors (see the module docstring)."""
    tp, n = group.world_size, x.numel()
    payload, st = _encode(x, quant)
    start = time.perf_counter()
    counts = message_counters(x.reshape(1, -1), _decode(payload, n, quant).reshape(1, -1), quant) if counters else {}
    spent = time.perf_counter() - start
    q = torch.stack([_decode(p, n, quant) for p in group.all_gather(payload)])  # [W, n] fp8 values
    chunk_of = torch.zeros(n, dtype=torch.long)
    for j, o in enumerate(owners("ncclring", n, tp)):
        chunk_of[o] = j
    pos = torch.arange(n)
    acc = q[(chunk_of + 1) % tp, pos]
    for k in range(2, tp + 1):
        acc = quant.code.saturate((acc + q[(chunk_of + k) % tp, pos]).to(torch.float16).float())  # fp16 add, satfinite
    handed = payload.numel()  # the fp8 tensor handed to ncclAllReduce
    stats = dict(clamped=st["clamped"], nonfinite=st["nonfinite"], leg1_bits=8.0 * handed / n,
                 bytes_to_peers=ring_bytes(n, tp, group.rank),  # the ring's chunks, exactly
                 bytes_received=int(wire_bytes("exact", tp, handed)), codec_path="reference", **counts)
    if counters:
        start = time.perf_counter()
        stats["nonfinite_out"] = int((~torch.isfinite(acc)).sum())
        stats["counters_seconds"] = spent + time.perf_counter() - start
    return acc.reshape(shape), handed, stats
