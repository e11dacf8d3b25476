"""Torch reference quantizers for the communicated partial sums, and the bit packer.

The Triton kernels in ``kernels/`` must match these bit for bit, so every step is spelled out
and computed in fp32 in this order. ``b`` is the bit width, ``c`` a constant computed in
Python float64 and rounded once to fp32.

==============  =========================================  ============================================
                symmetric                                  asymmetric
==============  =========================================  ============================================
range           absmax = max |x| (finite values)           lo = min x, hi = max x (finite values)
scale           absmax * c,   c = fp32(2 / (2**b - 1))     hi * c - lo * c,   c = fp32(1 / (2**b - 1))
code q          clamp(rne(x / scale), -2**(b-1),           clamp(rne((x - lo) / scale), 0, 2**b - 1)
                2**(b-1) - 1)
stored (uint8)  q + 2**(b-1)                               q
dequantized     q * scale                                  q * scale + lo   (two roundings, no FMA)
==============  =========================================  ============================================

The scale formulas are the paper's ``2*absmax/(2**b-1)`` and ``(max-min)/(2**b-1)``, written
so that they cannot overflow fp32 even for values near 3.4e38 (``2*absmax`` would).

Granularity (where ``absmax`` / ``lo`` / ``hi`` are taken):

==========  =========================================  ==========================================
static      per feature, from calibration (min/max      scales [H], fp32, never sent
            tensors [H] of this rank)
token       per row, from the row                       scales [*rows], in ``scale_dtype``
group       per ``group_size`` contiguous features      scales [*rows, H // G], in ``scale_dtype``
==========  =========================================  ==========================================

Dynamic scales are rounded to ``scale_dtype`` BEFORE quantizing, so dequantization uses
exactly the value that travels. The rounding is directed so the rounded range still covers the
data: ``lo`` rounds toward -inf, then the scale (computed from the rounded ``lo``) rounds
toward +inf. Static scales stay fp32.

Rounding: ONE rule everywhere, round half to even (``round_half_even``; ``torch.round`` is
half-to-even, as is Triton's ``rint``). The one opt-in exception is ``spec.rounding ==
"stochastic"`` (scheme suffix ``-sr``): q = floor(v + u) with u ~ U[0, 1) drawn from a generator
seeded with ``spec.rounding_seed`` (``stochastic_round``), so E[q] = v inside the code range and
the error is below one step instead of half a step. Scales, clamping, NaN (still the zero code:
floor(0 + u) = 0) and +-Inf (still the end codes) are unchanged.

Zero scale (an all-zero row/group, a constant group, a feature never active in calibration):
no division happens; every value gets q = 0, which dequantizes to exactly 0 (symmetric) or
exactly ``lo`` (asymmetric).

Non-uniform code (``spec.code == "nf"``, scheme ``nf<B>``, ``lowbit.codebook``): symmetric,
scale = absmax (c = 1, rounded to ``scale_dtype`` upward as above), the code is the index of the
codebook entry nearest ``x / scale`` (ties to the lower entry) and dequantizes to
``entry * scale``. Its signed code q = index - zero_index, so ``qrange_of`` gives
(-zero_index, 2**b - 1 - zero_index) and the stored code q - qmin is the index itself; NaN,
+-Inf, zero scales and excluded features behave exactly as for the uniform grid.

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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import codebook
from lowbit.scheme import QuantSpec

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


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest signed code q (before the unsigned offset)."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_constant(bits: int, symmetric: bool) -> float:
    """c in the scale formulas, as the fp32 value the kernels must use."""
    c = 2.0 / (2**bits - 1) if symmetric else 1.0 / (2**bits - 1)
    return torch.tensor(c, dtype=_FP32).item()


def qrange_of(spec: QuantSpec) -> tuple[int, int]:
    """Signed code range of ``spec``: the uniform grid's, or (-zero_index, top) for a codebook."""
    if spec.code == "nf":
        z = codebook.zero_index(spec.bits)
        return -z, 2**spec.bits - 1 - z
    return qrange(spec.bits, spec.symmetric)


def _constant(spec: QuantSpec) -> float:
    """c for ``spec``: a codebook spans [-1, 1], so its scale is the absmax itself."""
    return 1.0 if spec.code == "nf" else scale_constant(spec.bits, spec.symmetric)


@dataclass
class QuantResult:
    """codes: uint8, same shape as x. scales/mins: fp32 values exactly as the receiver uses them
    (dynamic ones already rounded to the scale dtype); mins is None when symmetric."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    clamped: int
    nonfinite: int


def _round_toward(t: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round fp32 ``t`` to ``dtype`` toward +inf (up) or -inf, staying finite; returns fp32.

    bf16 is the top 16 bits of fp32, so directed rounding is integer arithmetic on the bits:
    truncating drops the magnitude (toward 0); adding 0xFFFF first raises it (away from 0).
    """
    t = t.to(_FP32).contiguous()
    if dtype == _FP32:
        return t
    assert dtype == torch.bfloat16, dtype
    mag = t.abs().view(torch.int32).to(torch.int64)
    away_from_zero = (t > 0) == up
    mag = torch.where(away_from_zero, (mag + 0xFFFF) & 0x7FFF0000, mag & 0x7FFF0000)
    mag = torch.clamp(mag, max=0x7F7F0000)  # largest finite bf16: never round a finite value to inf
    out = mag.to(torch.int32).view(_FP32)
    out = torch.where(t < 0, -out, out)
    return torch.where(t == 0, t, out)


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View x [..., H] as [..., n_groups, width] for the dynamic granularities."""
    hidden = x.shape[-1]
    if spec.granularity == "token":
        return x.unsqueeze(-2)
    if hidden % spec.group_size:
        spec.validate_for(hidden)
    return x.reshape(*x.shape[:-1], hidden // spec.group_size, spec.group_size)


def static_qparams(
    spec: QuantSpec, static_min: torch.Tensor, static_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 per-feature (scales, mins) from calibrated per-feature min/max [H] of this rank."""
    lo = static_min.to(_FP32)
    hi = static_max.to(_FP32)
    c = _constant(spec)
    if spec.symmetric:
        return torch.maximum(lo.abs(), hi.abs()) * c, None
    return hi * c - lo * c, lo


def dynamic_qparams(xg: torch.Tensor, valid: torch.Tensor, spec: QuantSpec):
    """Scales (and mins) per [..., n_groups] from the valid (finite, not excluded) values."""
    c = _constant(spec)
    any_valid = valid.any(-1)
    if spec.symmetric:
        absmax = torch.where(valid, xg.abs(), 0.0).amax(-1)
        return _round_toward(absmax * c, spec.scale_dtype, up=True), None
    lo = torch.where(valid, xg, torch.inf).amin(-1)
    hi = torch.where(valid, xg, -torch.inf).amax(-1)
    lo = torch.where(any_valid, lo, 0.0)
    hi = torch.where(any_valid, hi, 0.0)
    lo = _round_toward(lo, spec.scale_dtype, up=False)
    scale = _round_toward(hi * c - lo * c, spec.scale_dtype, up=True)
    return scale, lo


def _outside_static_range(x: torch.Tensor, spec: QuantSpec, static_min: torch.Tensor,
                          static_max: torch.Tensor) -> torch.Tensor:
    """Where fp32 ``x`` lies beyond the range static scales were built for (the clamped values)."""
    if spec.symmetric:
        return x.abs() > torch.maximum(static_min.abs(), static_max.abs()).to(x.device, _FP32)
    return (x < static_min.to(x.device, _FP32)) | (x > static_max.to(x.device, _FP32))


def input_counts(x: torch.Tensor, spec: QuantSpec, static_min: torch.Tensor | None = None,
                 static_max: torch.Tensor | None = None, exclude: torch.Tensor | None = None) -> dict[str, int]:
    """``quantize``'s ``clamped`` and ``nonfinite`` counts without quantizing (for paths that
    quantize elsewhere, e.g. the fused kernels): the same definitions, excluded features left out."""
    x = x.to(_FP32)
    finite = torch.isfinite(x)
    valid = finite
    if exclude is not None and exclude.numel():
        keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
        keep[exclude] = False
        valid = finite & keep
    clamped = 0
    if spec.granularity == "static" and static_min is not None and static_max is not None:
        clamped = int((_outside_static_range(x, spec, static_min, static_max) & valid).sum())
    nonfinite = int((~finite).sum()) if valid is finite else int((~finite & keep).sum())
    return {"clamped": clamped, "nonfinite": nonfinite}


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    static_min: torch.Tensor | None = None,
    static_max: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize x [..., H] (fp32 or bf16) with ``spec``; see the module docstring for the math.

    ``static_min``/``static_max`` [H] are required for static granularity. ``exclude`` (feature
    indices, e.g. the BF16 outlier columns) are left out of dynamic ranges and counts; their
    codes are the zero code.
    """
    x = x.to(_FP32)
    hidden = x.shape[-1]
    finite = torch.isfinite(x)
    valid = finite
    if exclude is not None and exclude.numel():
        keep = torch.ones(hidden, dtype=torch.bool, device=x.device)
        keep[exclude] = False
        valid = finite & keep
    else:
        keep = None
    x_in = torch.where(torch.isnan(x), 0.0, x)  # NaN quantizes as 0.0; +-Inf stay and clamp

    if spec.granularity == "static":
        if static_min is None or static_max is None:
            raise ValueError("static granularity needs static_min and static_max (per-feature [H] tensors)")
        scales, mins = static_qparams(spec, static_min.to(x.device), static_max.to(x.device))
        scale_b, min_b = scales, mins  # [H] broadcasts over rows
        xs = x_in
        out_of_range = _outside_static_range(x, spec, static_min, static_max)
    else:
        xg = _grouped(x_in, spec)
        scales, mins = dynamic_qparams(xg, _grouped(valid, spec), spec)
        scale_b = scales.unsqueeze(-1)
        min_b = mins.unsqueeze(-1) if mins is not None else None
        xs = xg
        out_of_range = None  # ranges come from the data itself

    qmin, qmax = qrange_of(spec)
    zero_scale = scale_b == 0
    safe_scale = torch.where(zero_scale, 1.0, scale_b)
    shifted = xs if spec.symmetric else xs - min_b
    ratio = shifted / safe_scale
    if spec.code == "nf":
        q = (codebook.nearest_index(ratio, spec.bits) + qmin).to(_FP32)
    else:
        rounded = (stochastic_round(ratio, spec.rounding_seed) if spec.rounding == "stochastic"
                   else round_half_even(ratio))
        q = torch.clamp(rounded, qmin, qmax)
    q = torch.where(zero_scale, 0.0, q)
    if spec.granularity != "static":
        q = q.reshape(x.shape)
        scales = scales.squeeze(-1) if spec.granularity == "token" else scales
        mins = mins.squeeze(-1) if (mins is not None and spec.granularity == "token") else mins
    if keep is not None:
        q = torch.where(keep, q, 0.0)
    codes = (q - qmin).to(torch.uint8)

    nonfinite = int((~finite).sum()) if keep is None else int((~finite & keep).sum())
    clamped = 0
    if out_of_range is not None:
        counted = out_of_range & valid
        clamped = int(counted.sum())
    return QuantResult(codes, scales, mins, clamped, nonfinite)


def dequantize(
    codes: torch.Tensor, spec: QuantSpec, scales: torch.Tensor, mins: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 values from uint8 codes [..., H] and the scales (and mins) ``quantize`` returned."""
    if spec.code == "nf":
        q = codebook.decode_values(codes, spec.bits)
    else:
        qmin, _ = qrange(spec.bits, spec.symmetric)
        q = codes.to(_FP32) + qmin
    scales = scales.to(_FP32)
    if not spec.symmetric and mins is None:
        raise ValueError("asymmetric dequantization needs mins")
    if spec.granularity == "static":
        out = q * scales
        out = out if spec.symmetric else out + mins.to(_FP32)
    elif spec.granularity == "token":
        out = q * scales.unsqueeze(-1)
        out = out if spec.symmetric else out + mins.to(_FP32).unsqueeze(-1)
    else:
        out = _grouped(q, spec) * scales.unsqueeze(-1)
        if not spec.symmetric:
            out = out + mins.to(_FP32).unsqueeze(-1)
        out = out.reshape(codes.shape)
    return torch.clamp(out, -_FP32_MAX, _FP32_MAX)  # saturate: never inf near the fp32 ceiling


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
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> byte_shifts) & 1).reshape(-1)[: count * bits]
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream.reshape(count, bits) << shifts).sum(-1, dtype=torch.uint8)
