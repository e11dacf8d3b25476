"""Who owns which values of the flat buffer in a shipping all-reduce, and the bytes that follows.

The shipping quantized all-reduces (docs/shipping.md) cut the flat message (T x H values, row-major)
among the ranks their own way, not lowbit's column chunks; ``lowbit.comm.recipes`` runs them and
``lowbit.wire.accounting`` counts their bytes from the same owner sets, so both read this one module.

===============  ===============================================================================
algo             owner of position p of an n-value message at TP W (``owners``)
===============  ===============================================================================
``quickreduce``  tiles of 16384 values (the message zero-padded to whole tiles: the padding's codes
                 travel); in each tile rank r owns the contiguous 16384 / W values from r x 16384 / W
``flashinfer``   stripes of 4096 values (16384 above 32 Mi values), round robin; groups of 256 from
                 the buffer's start never straddle two stripes
``trtllm``       the contiguous 1/W shards
``flat2shot``    the contiguous 1/W shards (lowbit's two-shot on the flat buffer, for MX / NVFP4)
``ncclring``     ring chunks of ceil(ceil(n / W) / 16) x 16 values (only for the ring's bytes)
===============  ===============================================================================

    PYTHONPATH=. python -c "from lowbit.wire.recipes import owners; print([o.numel() for o in owners('quickreduce', 20000, 4)])"
"""
from __future__ import annotations

import torch

QR_TILE = 16384  # QuickReduce: 256 threads x 8 atoms x 8 values per workgroup
FI_BLOCK, FI_BLOCK_LARGE, FI_LARGE = 4096, 16384, 33554432  # FlashInfer's stripe, above 32 Mi values
RECIPE_ALGOS = ("quickreduce", "flashinfer", "trtllm", "flat2shot", "ncclring")


def padded_length(algo: str, n: int) -> int:
    """Values one rank encodes for an n-value message (QuickReduce pads to whole tiles)."""
    return -(-n // QR_TILE) * QR_TILE if algo == "quickreduce" else n


def flashinfer_block(n: int, tp: int, group: int) -> int:
    """FlashInfer's stripe length for an n-value message, or ValueError where the kernel refuses it."""
    if n % 8:
        raise ValueError(f"message size: {n} values; FlashInfer's quantized all-reduce needs a multiple of 8")
    group = min(group, n)
    block = max(min(FI_BLOCK if n <= FI_LARGE else FI_BLOCK_LARGE, n), group)

    def pow2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0
    if block % group or block % tp or not (pow2(block) and pow2(group) and pow2(block // group)):
        raise ValueError(f"message size: {n} values at TP {tp}: FlashInfer needs its stripe ({block}) and group "
                         f"({group}) to be powers of two, the stripe a multiple of the group and of TP; allowed: "
                         "more than 4096 values at a power-of-two TP, or a power-of-two message")
    return block


def owners(algo: str, n: int, tp: int, group: int = 256) -> list[torch.Tensor]:
    """Positions (int64, ascending) of the padded flat buffer that each rank owns: its message's values."""
    m = padded_length(algo, n)
    pos = torch.arange(m)
    if algo == "quickreduce":
        owner = (pos % QR_TILE) // (QR_TILE // tp)
    elif algo == "flashinfer":
        owner = (pos // flashinfer_block(n, tp, group)) % tp
    elif algo in ("trtllm", "flat2shot"):
        unit = tp * (16 if algo == "trtllm" else group)  # TensorRT-LLM: 16-value vectors; flat2shot: whole groups
        if n % unit:
            raise ValueError(f"message size: {n} values at TP {tp}; {algo} cuts it into {tp} equal shards of whole "
                             f"{unit // tp}-value units; allowed: a multiple of {unit}")
        owner = pos // (n // tp)
    elif algo == "ncclring":
        chunk = -(-(-(-n // tp)) // 16) * 16
        owner = pos // chunk
    else:
        raise ValueError(f"algo: {algo!r}; allowed: {', '.join(RECIPE_ALGOS)}")
    return [torch.nonzero(owner == j).flatten() for j in range(tp)]


def ring_bytes(n: int, tp: int, rank: int, itemsize: int = 1) -> int:
    """Bytes rank ``rank`` sends in NCCL's ring all-reduce (reduce-scatter + all-gather: 2 (W - 1) chunks)."""
    sizes = [o.numel() for o in owners("ncclring", n, tp)]
    return itemsize * (2 * n - sizes[rank] - sizes[(rank + 1) % tp])
