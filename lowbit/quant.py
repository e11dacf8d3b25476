"""The quantizer driver: one ``quantize`` / ``dequantize`` pair for every code, grouping and scale
format (torchao's ``choose_qparams`` / ``quantize`` / ``dequantize`` trio), plus the bit packer.

The Triton and numba kernels in ``kernels/`` must match these bit for bit, so every step is
spelled out and computed in fp32 in this order. The driver never asks which code, grouping or
scale format it runs; it asks them (``lowbit.codes``, ``lowbit.groups``, ``lowbit.scales``):

1. the input cast (``spec.cast``; none by default) maps the partial to the fp32 values quantized;
2. ranges: static scales per feature from calibration (``static_qparams``: the code's
   ``static_scale`` of max(|min|, |max|), or ``hi * c - lo * c`` and ``lo`` when asymmetric, fp32,
   never sent); dynamic ones per group of ``spec.grouping`` (``dynamic_qparams``) over finite,
   not excluded values: the code's ``needed_scale`` of the absmax, rounded by the scale format
   BEFORE quantizing, so dequantization uses exactly the value that travels. The rounding is
   directed so the rounded range still covers the data: ``lo`` rounds toward -inf, then the
   scale (computed from the rounded ``lo``) toward +inf;
3. the ratio ``v = x / scale`` (``(x - lo) / scale`` when asymmetric), IEEE division;
4. the code's ``encode`` of v (nearest, or stochastic with the call's ``seed``; an lm code
   against the call's ``levels``); stored as q - qmin (``code.qrange``);
5. ``dequantize``: the code's ``decode`` times the scale (``+ lo``: two roundings, no FMA),
   saturated to the finite fp32 range.

The uniform grid's formulas are in ``lowbit.codes.int``; the codebooks, minifloats and fitted
tables in ``lowbit.codes.nf`` / ``fp`` / ``lm``; the groupings' table in ``lowbit.groups.rows``
(and ``lowbit.groups`` for the others); the scale formats' in ``lowbit.scales.formats``.

Rounding: ONE rule everywhere, round half to even (``round_half_even``; ``torch.round`` is
half-to-even, as is Triton's ``rint``). The one opt-in exception is ``spec.rounding ==
"stochastic"`` (scheme suffix ``-sr``): q = floor(v + u) with u ~ U[0, 1) drawn from a generator
seeded with the call's ``seed`` (``stochastic_round``; a per-call argument, never a spec field:
the communicator derives one per rank, site and call), so E[q] = v inside the code range and
the error is below one step instead of half a step. Scales, clamping, NaN (still the zero code:
floor(0 + u) = 0) and +-Inf (still the end codes) are unchanged.

Zero scale (an all-zero row/group, a constant group, a feature never active in calibration):
no division happens; every value gets q = 0, which dequantizes to exactly 0 (symmetric) or
exactly ``lo`` (asymmetric).

Dynamic clamping: with a code that saturates (fp) or a scale format that does (fp16, e8m0,
e4m3), ``clamped`` also counts valid values whose ratio fell beyond the code range (only a
saturated scale makes that happen; ``Code.beyond``).

Non-finite policy: non-finite inputs never poison other values.
  * dynamic ranges are computed over finite values only;
  * NaN quantizes as if it were 0.0 (symmetric: the zero code, dequantizes to exactly 0);
  * +Inf / -Inf clamp to the largest / smallest code;
  * the number of non-finite inputs is returned as ``nonfinite``.
Overflow: scales never overflow (see the formulas). For |x| <= 1e38 every finite value keeps
the scale/2 bound; nearer the fp32 ceiling (3.4e38) the end codes of the grid (or the
asymmetric ``q * scale`` before ``+ lo``) can exceed fp32, so ``dequantize`` saturates its
result to the finite fp32 range: outputs are never inf or NaN, only less exact there.
Clamping: ``clamped`` counts finite values outside the range the scale was built for (for
static scales, values beyond this rank's calibrated range; for dynamic scales normally 0).
Excluded features (``exclude``, the BF16 outlier columns) take no part in ranges or counts.

    PYTHONPATH=. python -c "import torch; from lowbit.quant import quantize; from lowbit.scheme import QuantSpec; \\
        print(quantize(torch.randn(2, 8), QuantSpec(4, True, 'token')).codes)"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_FP32 = torch.float32
_FP32_MAX = torch.finfo(torch.float32).max


def round_half_even(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties to even (2.5 -> 2, 3.5 -> 4): torch.round's rule."""
    return torch.round(t)


def stochastic_round(t: torch.Tensor, seed: int) -> torch.Tensor:
    """floor(t + u), u ~ U[0, 1) from a generator seeded with ``seed`` (same seed, same draws).

    Unbiased: E[result] = t for finite t. NaN stays NaN and +-Inf stay +-Inf (callers clamp).
    """
    gen = torch.Generator(device=t.device).manual_seed(int(seed))
    u = torch.rand(t.shape, generator=gen, device=t.device, dtype=_FP32)
    return torch.floor(t + u)


@dataclass
class QuantResult:
    """codes: uint8, same shape as x. scales/mins: fp32 values exactly as the receiver uses them
    (dynamic ones already rounded to the scale format; shaped as ``spec.grouping.scale_shape``);
    mins is None when symmetric."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    clamped: int
    nonfinite: int
    # a scale format with a per-message header (e4m3): ``scales`` = wire_scales * message_scale (the
    # values the receiver uses); wire_scales the format's values (as fp32), message_scale the header
    wire_scales: torch.Tensor | None = None
    message_scale: torch.Tensor | None = None


def static_qparams(spec, static_min: torch.Tensor, static_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 per-feature (scales, mins) from calibrated per-feature min/max [H] of this rank."""
    lo = static_min.to(_FP32)
    hi = static_max.to(_FP32)
    if spec.symmetric:
        return spec.code.static_scale(torch.maximum(lo.abs(), hi.abs())), None
    c = spec.code.scale_constant
    return hi * c - lo * c, lo


def uniform_ratios(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """lowbit's ratio v = (x - lo) / scale (NaN quantizes as 0.0; +-Inf stay and clamp), and where
    the scale is zero (every value of such a group takes the zero code): (ratio, zero_scale)."""
    x = torch.where(torch.isnan(x), 0.0, x)
    zero_scale = scale == 0
    shifted = x if lo is None else x - lo
    return shifted / torch.where(zero_scale, 1.0, scale), zero_scale


def uniform_values(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
    """lowbit's decoded value q * scale (+ lo: two roundings, no FMA), saturated to the finite fp32
    range (never inf near the fp32 ceiling)."""
    out = q * scale
    if lo is not None:
        out = out + lo
    return torch.clamp(out, -_FP32_MAX, _FP32_MAX)


def dynamic_qparams(xg: torch.Tensor, valid: torch.Tensor, spec):
    """Scales (and mins) per [..., n_groups] of ``xg`` [..., n_groups, group] from the valid
    (finite, not excluded) values, as the receiver uses them (e4m3: the product with the
    message scale): the scale format's rule (``ScaleFormat.group_params``)."""
    params = spec.scale.group_params(xg, valid, valid | ~torch.isfinite(xg), spec)
    return params.scales, params.mins


def outside_static_range(x: torch.Tensor, spec, static_min: torch.Tensor, static_max: torch.Tensor) -> torch.Tensor:
    """Where fp32 ``x`` lies beyond the range static scales were built for (the clamped values)."""
    if spec.symmetric:
        return x.abs() > torch.maximum(static_min.abs(), static_max.abs()).to(x.device, _FP32)
    return (x < static_min.to(x.device, _FP32)) | (x > static_max.to(x.device, _FP32))


def _valid(x: torch.Tensor, exclude: torch.Tensor | None):
    """(finite, valid = finite and not excluded, keep mask [H] or None)."""
    finite = torch.isfinite(x)
    if exclude is None or not exclude.numel():
        return finite, finite, None
    keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
    keep[exclude] = False
    return finite, finite & keep, keep


def input_counts(x: torch.Tensor, spec, static_min: torch.Tensor | None = None,
                 static_max: torch.Tensor | None = None, exclude: torch.Tensor | None = None) -> dict[str, int]:
    """``quantize``'s ``clamped`` and ``nonfinite`` counts without quantizing (for paths that
    quantize elsewhere, e.g. the kernels): the same definitions, excluded features left out."""
    x = x.to(_FP32)
    finite, valid, keep = _valid(x, exclude)
    clamped = 0
    if not spec.dynamic and static_min is not None and static_max is not None:
        clamped = int((outside_static_range(x, spec, static_min, static_max) & valid).sum())
    nonfinite = int((~finite).sum()) if keep is None else int((~finite & keep).sum())
    return {"clamped": clamped, "nonfinite": nonfinite}


def quantize(x: torch.Tensor, spec, static_min: torch.Tensor | None = None, static_max: torch.Tensor | None = None,
             exclude: torch.Tensor | None = None, *, seed: int = 0, levels=None,
             header: torch.Tensor | None = None) -> QuantResult:
    """Quantize x [..., H] (fp32 or bf16) with ``spec``; see the module docstring for the steps.

    ``static_min``/``static_max`` [H] are required for static granularity. ``exclude`` (feature
    indices, e.g. the BF16 outlier columns) are left out of dynamic ranges and counts; their
    codes are the zero code. Per call: ``seed`` draws stochastic rounding's uniforms (only with
    ``spec.rounding == "stochastic"``), ``levels`` is an lm code's fitted table, ``header`` the
    per-message header of the buffer this message was cut from (``ScaleFormat.message_header``).
    """
    x = spec.cast.apply(x.to(_FP32))
    finite, valid, keep = _valid(x, exclude)
    code, grouping = spec.code, spec.grouping

    wire = None
    if not grouping.dynamic:
        if static_min is None or static_max is None:
            raise ValueError("static granularity needs static_min and static_max (per-feature [H] tensors)")
        scales, mins = static_qparams(spec, static_min.to(x.device), static_max.to(x.device))
        ratio, zero_scale = uniform_ratios(x, scales, mins)  # [H] broadcasts over rows
        out_of_range = outside_static_range(x, spec, static_min, static_max)
    else:
        kept = torch.ones_like(valid) if keep is None else keep.expand(x.shape)
        xs, valid_g = grouping.group(x, valid)
        _, kept_g = grouping.group(x, kept)  # padding is never kept
        params = spec.scale.group_params(xs, valid_g, kept_g, spec, header)
        scales, mins, wire, header = params.scales, params.mins, params.wire, params.header
        ratio, zero_scale = spec.scale.ratios(xs, params, spec)
        out_of_range = None  # ranges come from the data itself

    qmin, _ = code.qrange
    beyond = code.beyond(ratio, spec.scale.saturates)  # dynamic: valid values the (saturated) scale could not fit
    q = code.encode(ratio, seed=seed if spec.rounding == "stochastic" else None, levels=levels)
    if zero_scale is not None:
        q = torch.where(zero_scale, 0.0, q)
    if grouping.dynamic:
        q = grouping.ungroup(q, x.shape)
        beyond = None if beyond is None else grouping.ungroup(beyond, x.shape)
        scales = grouping.squeeze(scales)
        mins = None if mins is None else grouping.squeeze(mins)
        wire = None if wire is None else grouping.squeeze(wire)
    if keep is not None:
        q = torch.where(keep, q, 0.0)
    codes = (q - qmin).to(torch.uint8)

    nonfinite = int((~finite).sum()) if keep is None else int((~finite & keep).sum())
    clamped = 0
    if out_of_range is not None:
        clamped = int((out_of_range & valid).sum())
    elif beyond is not None:
        clamped = int((beyond & valid).sum())
    return QuantResult(codes, scales, mins, clamped, nonfinite, wire, header)


def dequantize(codes: torch.Tensor, spec, scales: torch.Tensor, mins: torch.Tensor | None = None, *,
               levels=None) -> torch.Tensor:
    """fp32 values from uint8 codes [..., H] and the scales (and mins) ``quantize`` returned
    (``levels``: an lm code's fitted table, per call)."""
    q = spec.code.decode(codes, levels=levels)
    if not spec.symmetric and mins is None:
        raise ValueError("asymmetric dequantization needs mins")
    lo = None if spec.symmetric else spec.grouping.expand(mins.to(_FP32), codes.shape)
    scale = spec.grouping.expand(scales.to(_FP32), codes.shape)
    if not spec.dynamic:  # static scales are lowbit's fp32 ones, whatever the format
        return uniform_values(q, scale, lo)
    return spec.scale.values(q, scale, lo, spec)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits, padded only in the last byte."""
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (each < 2**bits) into a 1-D uint8 bit stream.

    Little-endian bit order: code i occupies stream bits [i*bits, (i+1)*bits), its least
    significant bit first, and stream bit j is bit (j % 8) of byte j // 8. Any width 1..8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: {bits} not allowed; allowed: 1..8")
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {flat.dtype}")
    if bits < 8 and flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"codes must be < 2**{bits}; max is {int(flat.max())}")
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: a byte holds whole codes, the same stream without the bit expansion
        per_byte = 8 // bits
        pad = (-flat.numel()) % per_byte
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=flat.device)
        return (flat.reshape(-1, per_byte).to(torch.int32) << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (stream.reshape(-1, 8) << byte_shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` codes of a packed stream, 1-D uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: {bits} not allowed; allowed: 1..8")
    need = packed_nbytes(count, bits)
    if packed.numel() < need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    packed = packed.reshape(-1)[:need]
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:  # whole codes per byte (see pack_bits)
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(-1)[:count].to(torch.uint8)
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> byte_shifts) & 1).reshape(-1)[: count * bits]
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream.reshape(count, bits) << shifts).sum(-1, dtype=torch.uint8)
