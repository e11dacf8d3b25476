"""Torch reference of each fused kernel: the bytes and values every other path must reproduce.

    PYTHONPATH=. python -c "import torch; from kernels.reference import quantize_pack_ref; \\
        from lowbit.scheme import QuantSpec; print(quantize_pack_ref(torch.randn(3, 64), QuantSpec(4, True, 'token')))"

The semantics are those of ``lowbit.wire.payload.encode`` / ``decode`` (the one owner of the byte
layout) and ``lowbit.quant`` (the one owner of the rounding rule and of the dynamic-scale
rounding). This module re-expresses them as straight tensor programs, with no host
synchronisation (no ``int(tensor)``, no data-dependent shapes), so that

* ``torch.compile`` can fuse each op into a few loops (the CPU production path, see
  ``kernels.dispatch``), and
* the Triton kernels (``kernels.triton_quant``) have a step-by-step fp32 recipe to follow.

The tests hold these functions byte-equal to ``payload.encode`` and value-equal to the rank-order
sum of ``payload.decode``. What is taken from ``lowbit`` rather than restated here: the layout
offsets (``payload.layout``), the code range (``quant.code.qrange``), the static scales
(``quant.static_qparams``), the dynamic scales with their directed bf16 rounding
(``quant.dynamic_qparams``), the rounding rule (``quant.round_half_even``) and, for 3/5/6-bit
codes, the bit packer (``quant.pack_bits``/``unpack_bits``). For 2/4/8 bits a byte holds whole
codes, so packing is ``sum_j code[cpb*n + j] << (bits*j)`` over the flattened code stream (cpb =
codes per byte): the same little-endian stream as ``pack_bits``, without its 8x bit expansion.

Memory traffic of the eager version at T x H fp32 input (what fusion removes): quantize reads x
about 6 times and writes ~5 temporaries of T x H fp32; the unpack writes a [tp, T, H] fp32
dequantized tensor before summing it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.wire.payload import OUTLIER_DTYPE as _OUTLIER_DTYPE, PayloadLayout, layout
from lowbit.quant import dynamic_qparams, pack_bits, round_half_even, static_qparams, unpack_bits
from lowbit.scheme import QuantSpec

_FP32 = torch.float32
_FP32_MAX = torch.finfo(torch.float32).max
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = INPUT_DTYPES
WHOLE_BYTE_BITS = (2, 4, 8)  # widths whose codes never straddle a byte


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
    """The kernels implement the uniform grid with bf16/fp32 scales only; the nf and fitted lm codebooks, the fp
    codes and the fp16/e8m0/e4m3 scale formats stay on lowbit.quant's path (treating their codes
    or scale bytes as the grid's would decode wrong values without an error)."""
    if quant.code.kernel_key != "int":
        raise ValueError(f"code {quant.code.kind!r}: the kernels implement the uniform int grid only; allowed: int "
                         "(the nf and fitted lm codebooks and the fp codes fp8e4m3, fp8e5m2, fp6e2m3, fp6e3m2, "
                         "fp4e2m1 stay "
                         "on lowbit.quant's torch path)")
    if quant.scale.name not in ("bf16", "fp32"):
        raise ValueError(f"scale format {quant.scale_format!r}: the kernels write bf16 or fp32 scales only; "
                         "allowed: bf16, fp32 (fp16, e8m0 and e4m3 scales stay on lowbit.quant's torch path)")


def check_out_dtype(out_dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype {out_dtype} not allowed; allowed: float32, bfloat16, float16")


def check_second(second) -> None:
    """The two-shot leg 2 spec: dynamic only (no calibration exists for the reduced sum)."""
    if not isinstance(second, QuantSpec) or not second.dynamic:
        raise ValueError(f"second must be a dynamic QuantSpec (token or group), got {second!r}")
    check_code(second)


def inverse_order(feats: Features) -> torch.Tensor:
    """int64 [H]: column h of ``cat([kept columns, outlier columns], 1)`` holding feature h."""
    kept = feats.keep.numel()
    cm = feats.colmap.to(torch.int64)
    return torch.where(cm >= 0, cm, kept - 1 - cm)


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


def _group_of_kept(quant: QuantSpec, feats: Features, hidden: int) -> torch.Tensor:
    """Index into a row's dynamic scales [n_groups] for each kept feature."""
    if quant.granularity != "group":
        return torch.zeros_like(feats.keep)
    return feats.keep // quant.group_size


def _pack_whole_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (any shape, < 2**bits) -> the ``pack_bits`` stream, for bits in 2/4/8."""
    flat = codes.reshape(-1)
    if bits == 8:
        return flat
    cpb = 8 // bits
    pad = (-flat.numel()) % cpb
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=flat.device)
    return (flat.reshape(-1, cpb).to(torch.int32) << shifts).sum(-1).to(torch.uint8)


def _unpack_whole_bytes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``_pack_whole_bytes`` over the last dim of ``packed`` [..., nbytes]."""
    if bits == 8:
        return packed[..., :count]
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def _quantize_pack_core(x, keep, outliers, group_of_kept, scales_static, mins_static, quant: QuantSpec,
                        lay: PayloadLayout) -> torch.Tensor:
    """Tensor-only body of ``quantize_pack_ref`` (what ``torch.compile`` sees)."""
    tokens, hidden = x.shape
    x32 = x.to(_FP32)
    x_in = torch.where(torch.isnan(x32), 0.0, x32)  # NaN quantizes as 0.0; +-Inf clamp
    qmin, qmax = quant.code.qrange
    parts = []
    if quant.granularity == "static":
        scale_k, min_k = scales_static[keep], mins_static[keep]  # [K], broadcast over rows
    else:
        keep_mask = torch.ones(hidden, dtype=torch.bool, device=x.device)
        keep_mask[outliers] = False
        valid = torch.isfinite(x32) & keep_mask
        width = hidden if quant.granularity == "token" else quant.group_size
        scales, mins = dynamic_qparams(x_in.reshape(tokens, -1, width), valid.reshape(tokens, -1, width), quant)
        parts.append(scales.to(quant.scale_dtype).reshape(-1).view(torch.uint8))
        if not quant.symmetric:
            parts.append(mins.to(quant.scale_dtype).reshape(-1).view(torch.uint8))
        scale_k = scales[:, group_of_kept]  # [T, K]
        min_k = mins[:, group_of_kept] if mins is not None else None
    xs = x_in[:, keep]
    zero_scale = scale_k == 0
    safe_scale = torch.where(zero_scale, 1.0, scale_k)
    shifted = xs if quant.symmetric else xs - min_k
    q = torch.clamp(round_half_even(shifted / safe_scale), qmin, qmax)
    q = torch.where(zero_scale, 0.0, q)
    codes = (q - qmin).to(torch.uint8)
    if quant.bits in WHOLE_BYTE_BITS:
        parts.append(_pack_whole_bytes(codes, quant.bits))
    else:
        parts.append(pack_bits(codes, quant.bits))
    parts.append(x[:, outliers].to(_OUTLIER_DTYPE).reshape(-1).view(torch.uint8))
    return torch.cat(parts)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy at storage offset 0: sections are unaligned, a dtype view needs both."""
    return t.clone(memory_format=torch.contiguous_format)


def _dequant_sum_core(payloads, keep, outliers, group_of_kept, scales_static, mins_static, quant: QuantSpec,
                      lay: PayloadLayout, out_dtype: torch.dtype) -> torch.Tensor:
    """Tensor-only body of ``unpack_dequant_sum_ref``: decode every rank, sum in fp32 in rank order."""
    tp = payloads.shape[0]
    tokens, hidden, n_out = lay.tokens, lay.hidden, lay.n_outliers
    kept = hidden - n_out
    qmin, _ = quant.code.qrange
    packed = payloads[:, lay.codes.offset:lay.codes.end]
    if quant.bits in WHOLE_BYTE_BITS:
        codes = _unpack_whole_bytes(packed, quant.bits, tokens * kept)
    else:
        codes = torch.stack([unpack_bits(packed[r], quant.bits, tokens * kept) for r in range(tp)])
    q = codes.reshape(tp, tokens, kept).to(_FP32) + qmin
    if quant.granularity == "static":
        scale_k = scales_static[:, keep].unsqueeze(1)  # [tp, 1, K]
        min_k = mins_static[:, keep].unsqueeze(1)
    else:
        n_groups = 1 if quant.granularity == "token" else hidden // quant.group_size
        def section(sec):
            raw = _fresh(payloads[:, sec.offset:sec.end]).view(quant.scale_dtype)
            return raw.to(_FP32).reshape(tp, tokens, n_groups)[:, :, group_of_kept]
        scale_k = section(lay.scales)
        min_k = None if quant.symmetric else section(lay.mins)
    deq = q * scale_k
    if not quant.symmetric:
        deq = deq + min_k
    deq = torch.clamp(deq, -_FP32_MAX, _FP32_MAX)  # dequantize saturates (quant.dequantize)
    full = torch.empty(tp, tokens, hidden, dtype=_FP32, device=payloads.device)
    full[:, :, keep] = deq
    if n_out:
        out_bytes = _fresh(payloads[:, lay.outliers.offset:lay.outliers.end])
        full[:, :, outliers] = out_bytes.view(_OUTLIER_DTYPE).reshape(tp, tokens, n_out).to(_FP32)
    acc = torch.zeros(tokens, hidden, dtype=_FP32, device=payloads.device)
    for r in range(tp):  # rank order, as the collectives sum
        acc = acc + full[r]
    return acc.to(out_dtype)


def prepare_quantize(x, quant, outlier_idx, static_min, static_max):
    """Host-side checks and index tables shared by every quantize path.
    Returns (features, group_of_kept, static scales, static mins, layout)."""
    check_input(x, quant)
    tokens, hidden = x.shape
    feats = features(hidden, outlier_idx, x.device)
    lay = layout(tokens, hidden, quant, feats.n_outliers)
    if quant.granularity == "static":
        scales, mins = static_tables(quant, static_min, static_max, hidden, x.device)
        if scales.dim() != 1:
            raise ValueError(f"static_min/static_max of one rank must be [{hidden}], got {tuple(scales.shape)}")
    else:
        scales = mins = torch.zeros(hidden, dtype=_FP32, device=x.device)
    return feats, _group_of_kept(quant, feats, hidden), scales, mins, lay


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
    if quant.granularity == "static":
        scales, mins = static_tables(quant, static_mins, static_maxs, hidden, payloads.device)
        if scales.shape != (tp, hidden):
            raise ValueError(f"static_mins/static_maxs must be [tp={tp}, {hidden}], got {tuple(scales.shape)}")
    else:
        scales = mins = torch.zeros(tp, hidden, dtype=_FP32, device=payloads.device)
    return feats, _group_of_kept(quant, feats, hidden), scales, mins, lay


def quantize_pack_ref(x, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None) -> torch.Tensor:
    """One rank's payload of x [T, H]: the same bytes as ``lowbit.wire.payload.encode(...)[0]``."""
    feats, gk, scales, mins, lay = prepare_quantize(x, quant, outlier_idx, static_min, static_max)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device)  # layout of 0 tokens: 0 bytes
    return _quantize_pack_core(x, feats.keep, feats.outliers, gk, scales, mins, quant, lay)


def unpack_dequant_sum_ref(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx=None,
                           static_mins=None, static_maxs=None, out_dtype=torch.float32) -> torch.Tensor:
    """[T, H] in ``out_dtype``: fp32 zeros + decode(payloads[0]) + decode(payloads[1]) + ..., in
    rank order (``lowbit.comm.collectives``' gather sum), then one cast. ``static_mins``/``maxs`` are
    [tp, H], each rank's calibrated range."""
    feats, gk, scales, mins, lay = prepare_unpack(payloads, tokens, hidden, quant, outlier_idx, static_mins,
                                                  static_maxs)
    check_out_dtype(out_dtype)
    if tokens == 0:
        return torch.zeros(0, hidden, dtype=out_dtype, device=payloads.device)
    return _dequant_sum_core(payloads, feats.keep, feats.outliers, gk, scales, mins, quant, lay, out_dtype)


def unpack_dequant_sum_requant_ref(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx,
                                   static_mins, static_maxs, second: QuantSpec) -> torch.Tensor:
    """Two-shot leg 1 -> leg 2: the fp32 rank-order sum of the payloads, requantized with the
    dynamic ``second`` spec and the same outlier features; returns the new payload."""
    check_second(second)
    reduced = unpack_dequant_sum_ref(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs)
    return quantize_pack_ref(reduced, second, outlier_idx)
