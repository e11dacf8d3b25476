"""The kernels' common host side and their torch reference: the bytes and values every kernel must
reproduce, taken straight from the definition.

    PYTHONPATH=. python -c "import torch; from kernels.reference import quantize_pack_ref; \\
        from lowbit.scheme import QuantSpec; print(quantize_pack_ref(torch.randn(3, 64), QuantSpec(4, True, 'token')))"

The reference IS lowbit's torch path: ``quantize_pack_ref`` is ``lowbit.wire.payload.encode`` (the
one owner of the byte layout, over ``lowbit.quant``'s quantizer) and ``unpack_dequant_sum_ref``
the fp32 rank-order sum of ``decode``, with the kernels' API and checks in front: the same
TypeError / ValueError for bad input as every kernel (checked here, before any kernel runs, by
``check_input`` / ``prepare_*``), and a refusal for what no kernel implements
(``kernels.registry.refusal``: the nf / fp / lm codes, fp16 / e8m0 / e4m3 scales, stochastic
rounding). The numba kernels (``kernels.native_cpu``) and the Triton kernels
(``kernels.triton_quant``) are held byte-equal to it; there is no second torch copy of the codec.

The host-side helpers shared by the kernels live here too: the kept / outlier feature split
(``features``), the static scale tables (``static_tables``) and the layout checks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kernels import registry
from lowbit.quant import static_qparams
from lowbit.scheme import QuantSpec
from lowbit.wire.payload import decode, encode, layout

_FP32 = torch.float32
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = INPUT_DTYPES


@dataclass(frozen=True)
class Features:
    """Which features are quantized (``keep``, ascending) and which travel in BF16 (``outliers``,
    in the caller's order), plus ``colmap`` [H] int32: kept position k >= 0, or -(j+1) for
    outlier j. ``kept_runs``: the kept features as maximal runs ``(start, stop)`` of consecutive
    indices (host ints, for paths that copy slices instead of gathering). Built once on the host;
    every path takes the tensors as index tensors."""

    keep: torch.Tensor
    outliers: torch.Tensor
    colmap: torch.Tensor
    kept_runs: tuple[tuple[int, int], ...] = ()

    @property
    def n_outliers(self) -> int:
        return self.outliers.numel()


def features(hidden: int, outlier_idx: torch.Tensor | None, device) -> Features:
    """Split ``hidden`` features into kept and outlier ones; raise ValueError on a bad index list.

    Cached per (hidden, index list, device): every message of a site has the same split, and
    building it is a dozen small torch ops (~30 us, as much as a whole decode-step kernel).
    The returned tensors are shared between calls: read them, never write them."""
    if outlier_idx is None:
        outlier_idx = torch.empty(0, dtype=torch.int64)
    listed = tuple(torch.as_tensor(outlier_idx).reshape(-1).to(torch.int64).cpu().tolist())
    return _features(hidden, listed, torch.device(device))


@functools.lru_cache(maxsize=512)
def _features(hidden: int, listed: tuple[int, ...], device: torch.device) -> Features:
    outlier_idx = torch.tensor(listed, dtype=torch.int64)
    if outlier_idx.numel() and (int(outlier_idx.min()) < 0 or int(outlier_idx.max()) >= hidden):
        raise ValueError(f"outlier_idx must lie in 0..{hidden - 1}")
    if outlier_idx.unique().numel() != outlier_idx.numel():
        raise ValueError("outlier_idx must not repeat a feature")
    colmap = torch.zeros(hidden, dtype=torch.int64)
    keep_mask = torch.ones(hidden, dtype=torch.bool)
    keep_mask[outlier_idx] = False
    keep = keep_mask.nonzero().reshape(-1)
    colmap[keep] = torch.arange(keep.numel())
    colmap[outlier_idx] = -1 - torch.arange(outlier_idx.numel())
    runs, start = [], 0
    for o in sorted(outlier_idx.tolist()) + [hidden]:
        if o > start:
            runs.append((start, o))
        start = o + 1
    return Features(keep.to(device), outlier_idx.to(device), colmap.to(torch.int32).to(device), tuple(runs))


def check_input(x: torch.Tensor, quant: QuantSpec) -> None:
    """Clear errors for what no path can quantize."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; allowed: float32, bfloat16, float16 (a partial sum)")
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    if not isinstance(quant, QuantSpec):
        raise TypeError(f"quant must be a QuantSpec, got {type(quant).__name__}")
    if getattr(quant, "rounding", "nearest") != "nearest":
        raise ValueError(f"rounding {quant.rounding!r}: the kernels round to nearest (half to even); "
                         "stochastic rounding stays on lowbit.quant's torch path")
    check_code(quant)
    quant.validate_for(x.shape[1])


def check_code(quant: QuantSpec) -> None:
    """Refuse what no kernel implements (``kernels.registry``): treating another code's codes or
    another scale format's bytes as the int grid's would decode wrong values without an error."""
    reason = registry.refusal(quant, "reference")
    if reason is not None:
        raise ValueError(reason)


def check_out_dtype(out_dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype {out_dtype} not allowed; allowed: float32, bfloat16, float16")


def check_out(out, tokens: int, hidden: int, out_dtype, device) -> None:
    """``out`` (where a sum is written; None: a new tensor) must be [tokens, hidden] of ``out_dtype``
    on the payloads' device; a view (e.g. a column slice of a wider output) is fine."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != (tokens, hidden) or out.dtype != out_dtype or out.device != torch.device(device):
        raise ValueError(f"out must be [{tokens}, {hidden}] {out_dtype} on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")


def check_second(second, second_min=None, second_max=None) -> None:
    """The two-shot leg 2 spec: dynamic, or static with the reduced sum's calibrated range
    (``second_min`` / ``second_max``; a run's calibration artifact has it: ``Calibration.sum_range``)."""
    if not isinstance(second, QuantSpec) or (not second.dynamic and (second_min is None or second_max is None)):
        raise ValueError(f"second must be a dynamic QuantSpec (token or group), or a static one with second_min and "
                         f"second_max (the reduced sum's calibrated range), got {second!r}")
    check_code(second)


def static_tables(quant: QuantSpec, static_min, static_max, hidden: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (scales, mins) [..., H] from calibrated ranges via ``quant.static_qparams``; mins are
    zeros when symmetric (never read then)."""
    if static_min is None or static_max is None:
        raise ValueError("static granularity needs static_min and static_max (per-feature tensors)")
    static_min = torch.as_tensor(static_min).to(device)
    static_max = torch.as_tensor(static_max).to(device)
    if static_min.shape[-1] != hidden or static_max.shape != static_min.shape:
        raise ValueError(f"static_min/static_max must be [..., {hidden}], got "
                         f"{tuple(static_min.shape)} and {tuple(static_max.shape)}")
    if not (torch.isfinite(static_min).all() and torch.isfinite(static_max).all()):
        raise ValueError("static_min/static_max must be finite (a calibrated range)")
    scales, mins = static_qparams(quant, static_min, static_max)
    if mins is None:
        mins = torch.zeros_like(scales)
    return scales.contiguous(), mins.to(_FP32).contiguous()


def prepare_quantize(x, quant, outlier_idx, static_min, static_max):
    """Host-side checks and index tables shared by every quantize path.
    Returns (features, static scales, static mins, layout)."""
    check_input(x, quant)
    tokens, hidden = x.shape
    feats = features(hidden, outlier_idx, x.device)
    lay = layout(tokens, hidden, quant, feats.n_outliers)
    return (feats, *_one_sender_tables(quant, static_min, static_max, hidden, x.device), lay)


def _one_sender_tables(quant: QuantSpec, static_min, static_max, hidden: int, device):
    """fp32 (scales, mins) [H] of one sender: its static tables, or zeros for dynamic scales."""
    if quant.dynamic:
        zeros = torch.zeros(hidden, dtype=_FP32, device=device)
        return zeros, zeros
    scales, mins = static_tables(quant, static_min, static_max, hidden, device)
    if scales.dim() != 1:
        raise ValueError(f"static_min/static_max of one rank must be [{hidden}], got {tuple(scales.shape)}")
    return scales, mins


def prepare_second(tokens: int, hidden: int, feats: Features, second: QuantSpec, second_min, second_max, device):
    """Host-side checks and tables of a two-shot second leg: (scales, mins [H], its layout)."""
    check_second(second, second_min, second_max)
    second.validate_for(hidden)
    return (*_one_sender_tables(second, second_min, second_max, hidden, device),
            layout(tokens, hidden, second, feats.n_outliers))


def prepare_unpack(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs):
    """Host-side checks and index tables shared by every unpack path."""
    if not isinstance(payloads, torch.Tensor) or payloads.dtype != torch.uint8 or payloads.dim() != 2:
        raise TypeError("payloads must be a uint8 tensor [tp, nbytes] (one payload per rank)")
    if not isinstance(quant, QuantSpec):
        raise TypeError(f"quant must be a QuantSpec, got {type(quant).__name__}")
    check_code(quant)
    quant.validate_for(hidden)
    tp = payloads.shape[0]
    feats = features(hidden, outlier_idx, payloads.device)
    lay = layout(tokens, hidden, quant, feats.n_outliers)
    if payloads.shape[1] != lay.total_bytes:
        raise ValueError(f"payloads have {payloads.shape[1]} bytes per rank; layout expects {lay.total_bytes}")
    if not quant.dynamic:
        scales, mins = static_tables(quant, static_mins, static_maxs, hidden, payloads.device)
        if scales.shape != (tp, hidden):
            raise ValueError(f"static_mins/static_maxs must be [tp={tp}, {hidden}], got {tuple(scales.shape)}")
    else:
        scales = mins = torch.zeros(tp, hidden, dtype=_FP32, device=payloads.device)
    return feats, scales, mins, lay


def quantize_pack_ref(x, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None) -> torch.Tensor:
    """One rank's payload of x [T, H]: ``lowbit.wire.payload.encode(...)[0]`` behind the kernels' checks."""
    return quantize_pack_counts_ref(x, quant, outlier_idx, static_min, static_max)[0]


def quantize_pack_counts_ref(x, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None):
    """(payload, {"clamped", "nonfinite"}): ``encode``'s payload and counts (clamped: kept finite
    values beyond the static range; nonfinite: all of x) behind the kernels' checks."""
    feats, _, _, _ = prepare_quantize(x, quant, outlier_idx, static_min, static_max)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), {"clamped": 0, "nonfinite": 0}
    payload, stats = encode(x, quant, feats.outliers if feats.n_outliers else None, static_min, static_max)
    return payload, {"clamped": stats["clamped"], "nonfinite": stats["nonfinite"]}


def unpack_dequant_sum_ref(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx=None,
                           static_mins=None, static_maxs=None, out_dtype=torch.float32,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H] in ``out_dtype``: fp32 zeros + decode(payloads[0]) + decode(payloads[1]) + ..., in
    rank order (``lowbit.comm.collectives``' gather sum), then one cast. ``static_mins``/``maxs`` are
    [tp, H], each rank's calibrated range. ``out``: where to write it (a view is fine); returned."""
    feats, _, _, _ = prepare_unpack(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs)
    check_out_dtype(out_dtype)
    check_out(out, tokens, hidden, out_dtype, payloads.device)
    if out is not None:
        return out.copy_(unpack_dequant_sum_ref(payloads, tokens, hidden, quant, outlier_idx, static_mins,
                                                static_maxs, out_dtype))
    if tokens == 0:
        return torch.zeros(0, hidden, dtype=out_dtype, device=payloads.device)
    idx = feats.outliers if feats.n_outliers else None
    acc = torch.zeros(tokens, hidden, dtype=_FP32, device=payloads.device)
    for r in range(payloads.shape[0]):  # rank order, as the collectives sum
        acc += decode(payloads[r], tokens, hidden, quant, idx, None if static_mins is None else static_mins[r],
                      None if static_maxs is None else static_maxs[r])
    return acc.to(out_dtype)


def unpack_dequant_sum_requant_counts_ref(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx,
                                          static_mins, static_maxs, second: QuantSpec, second_min=None,
                                          second_max=None):
    """The two-shot owner step, leg 1 -> leg 2: the fp32 rank-order sum of the payloads,
    requantized with the ``second`` spec (dynamic, or static with the reduced sum's calibrated
    range ``second_min`` / ``second_max`` [H]) and the same outlier features; returns (the new
    payload, its {"clamped", "nonfinite"} counts, as ``quantize_pack_counts_ref`` counts them)."""
    check_second(second, second_min, second_max)
    reduced = unpack_dequant_sum_ref(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs)
    return quantize_pack_counts_ref(reduced, second, outlier_idx, second_min, second_max)


def unpack_dequant_sum_requant_ref(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx,
                                   static_mins, static_maxs, second: QuantSpec, second_min=None,
                                   second_max=None) -> torch.Tensor:
    """``unpack_dequant_sum_requant_counts_ref``'s payload."""
    return unpack_dequant_sum_requant_counts_ref(payloads, tokens, hidden, quant, outlier_idx, static_mins,
                                                 static_maxs, second, second_min, second_max)[0]


# the registry's entry points (``kernels.registry.KernelBackend``); the ``_ref`` names are the ones tests compare with
quantize_pack = quantize_pack_ref
quantize_pack_counts = quantize_pack_counts_ref
unpack_dequant_sum = unpack_dequant_sum_ref
unpack_dequant_sum_requant = unpack_dequant_sum_requant_ref
unpack_dequant_sum_requant_counts = unpack_dequant_sum_requant_counts_ref
