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

``check_recipe`` / ``check_recipe_tp`` hold what each system accepts (its codec, its TP sizes); the
scheme (``lowbit.scheme.spec``) asks them.

    PYTHONPATH=. python -c "from lowbit.wire.recipes import owners; \\
        print([o.numel() for o in owners('quickreduce', 20000, 4)])"
"""
from __future__ import annotations

import torch

from lowbit.plugins import SchemeError

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


def check_recipe(scheme) -> None:
    """A shipping recipe sends its codec as it is: no lowbit extras, and the codec its system uses."""
    extras = (scheme.outliers.select != "none", scheme.rotation is not None, scheme.sparse,
              scheme.threshold is not None, scheme.permute, scheme.stochastic, not scheme.quant.dynamic)
    if any(extras):
        raise SchemeError("algo", f"@{scheme.algo} runs its system's codec as it is; allowed: no outliers, "
                                  "-perm, -rot, -sr or static scales")
    need = {"quickreduce": ("qr", "the QuickReduce codec qint<B>-ilv32-sqr-<cast>"),
            "flashinfer": ("fi", "FlashInfer's f8e4m3-flat256-sfi"),
            "trtllm": ("trt", "TensorRT-LLM's f8e4m3-pad496-strt"),
            "ncclring": ("none", "an unscaled fp8 tensor, f8e4m3-tensor-snone or f8e5m2-tensor-snone")}
    if scheme.algo in need and scheme.quant.scale.name != need[scheme.algo][0]:
        raise SchemeError("quant", f"{scheme.quant} not allowed with @{scheme.algo}; allowed: {need[scheme.algo][1]}")


def check_recipe_tp(scheme, tp: int) -> None:
    """The TP sizes a shipping recipe runs at (QuickReduce's dispatch throws at any other)."""
    allowed = {"quickreduce": (2, 4, 8), "trtllm": (2, 4), "flashinfer": (1, 2, 4, 8, 16, 32, 64)}.get(scheme.algo)
    if scheme.algo == "quickreduce" and scheme.quant.code.bits == 3:
        allowed = (2,)  # INT3: aiter's dispatch, TP 2 only
    if allowed is not None and tp not in allowed:
        why = {"quickreduce": "QuickReduce's kernel runs at world sizes 2, 4 and 8 only (INT3: 2); "
                              "vLLM csrc/quickreduce/quick_reduce.h, aiter quick_all_reduce.cuh",
               "trtllm": "TensorRT-LLM's low-precision all-reduce runs at 2, 4 and 8; TP 8's hierarchical "
                         "path is not emulated",
               "flashinfer": "FlashInfer's stripes of 4096 go round robin: a power-of-two TP"}[scheme.algo]
        raise SchemeError("tp", f"{tp} not allowed for {scheme} ({why}); allowed: {', '.join(map(str, allowed))}")
