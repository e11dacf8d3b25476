# Size: ~585 lines: the int, nf, lm and fp quantizers share the scale rules, the clamp counts and the bit packer.
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

Fitted codebook (``spec.code == "lm"``, scheme ``lm<B>[s]``): as ``nf`` (scale = absmax, c = 1,
nearest entry, ties to the lower entry) against the table ``spec.levels`` that
``lowbit.method.fitted_codebook`` fitted for this site and sender; the stored code is the entry's
index (``qrange_of``: 0 .. 2**b - 1). A fitted table has no exact zero, so NaN decodes to the
entry nearest 0 times the scale (still finite, still touching nothing else); a zero scale still
decodes to exactly 0. Quantizing or decoding an ``lm`` spec without its table is an error.

Floating-point codes (``spec.code == "fp"``, scheme ``fp<B>e<E>m<M>``): symmetric, scale =
absmax / fmt_max (fmt_max the format's largest value: 448, 57344, 7.5, 28, 6), computed in
float64 and rounded UP to the scale format, so every finite value satisfies |x / scale| <= fmt_max;
static scales are fp32, from the calibrated absmax the same way. The code of v = x / scale is
the format's bit pattern of v rounded to nearest, ties to even, saturating at +-fmt_max (never
inf, never NaN): fp8 through torch's ``float8_e4m3fn`` / ``float8_e5m2`` casts of the clamped
value (they round to nearest even), fp6/fp4 by ``fp_round`` (exponent from ``frexp``, then
rounding to a multiple of the binade's step; exact in fp32). Stored: the sign bit on top,
then exponent, then mantissa (e2m1: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 are codes 0..7);
``pack_bits`` puts fp4 codes 2 per byte (first code in the low nibble). Decoding is a table of
the ``2**B`` values. NaN sends the zero code; +-Inf the largest codes of its sign.

Scale formats (``spec.scale_dtype``, scheme ``-s<fmt>``), all rounded in the covering direction
(scale up, min down) and saturating, never inf:

==========  ==================================================================================
bf16, fp32  as above (fp32: from float64 for fp codes)
fp16        rounded up to fp16, saturating at 65504 (a massive activation then clamps, counted)
e8m0        2**ceil(log2 s), exponent clamped to [-127, 127]: one exponent byte per scale
            (a zero scale becomes 2**-127; its codes are all zero, so it still decodes to 0)
e4m3        NVFP4's two levels: one fp32 message scale g = 2**ceil(log2(max s / 448)) for the
            whole tensor handed to ``quantize`` (one message), then per token/group the
            float8_e4m3fn value of s / g rounded up; the scale used is e4m3 * g (exact in fp32,
            g being a power of two; NVFP4's g is any fp32 value, so this costs up to 1 bit
            of e4m3 range)
==========  ==================================================================================

Dynamic clamping: with fp codes or the fp16 / e8m0 / e4m3 scale formats, ``clamped`` also counts
valid values whose ratio x / scale fell beyond the code range (only a saturated scale makes that
happen).

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

import functools

from lowbit import codebook
from lowbit.scheme import FP_FORMATS as FP_MAX, KERNEL_SCALE_DTYPES, QuantSpec

_FP32 = torch.float32
_FP64 = torch.float64
_FP32_MAX = torch.finfo(torch.float32).max
_E8M0 = torch.float8_e8m0fnu
_E4M3 = torch.float8_e4m3fn
_TORCH_FP8 = {(8, 4): torch.float8_e4m3fn, (8, 5): torch.float8_e5m2}
_E8M0_MIN_EXP, _E8M0_MAX_EXP = -127, 127
E4M3_MAX = 448.0


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
    if spec.code in ("fp", "lm"):  # fp: the format's bit patterns (+0 is code 0); lm: the entry's index
        return 0, 2**spec.bits - 1
    return qrange(spec.bits, spec.symmetric)


# -- floating-point codes -------------------------------------------------------------------------
def fp_round(v: torch.Tensor, bits: int, exp_bits: int) -> torch.Tensor:
    """fp32 ``v`` rounded to the nearest value of the saturating minifloat (1 sign, ``exp_bits``
    exponent, ``bits - 1 - exp_bits`` mantissa bits, bias 2**(exp_bits-1) - 1, no inf/NaN codes
    except e4m3's top pattern, which the clamp never reaches); ties to even; +-Inf and values
    beyond the largest go to +-max. ``v`` must hold no NaN. Written from the format's definition,
    independent of torch's float8 casts (the tests compare the two on fp8)."""
    man = bits - 1 - exp_bits
    bias = 2 ** (exp_bits - 1) - 1
    fmax = FP_MAX[(bits, exp_bits)]
    a = v.to(_FP32).abs().clamp(max=fmax)
    _, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1): the binade's exponent is e - 1
    binade = torch.clamp(e - 1, min=1 - bias)  # below the smallest normal: the subnormal step
    step = torch.ldexp(torch.ones_like(a), binade - man)
    r = torch.clamp(round_half_even(a / step) * step, max=fmax)
    return torch.where(torch.signbit(v), -r, r)  # the sign survives rounding to zero, as in the casts



def fp_encode(v: torch.Tensor, bits: int, exp_bits: int, via_torch: bool = True) -> torch.Tensor:
    """uint8 bit patterns (sign | exponent | mantissa) of fp32 ``v`` rounded to the format
    (saturating; NaN must be mapped away first). ``via_torch=False`` builds fp8 patterns from
    ``fp_round`` too (the tests hold both equal)."""
    fmax = FP_MAX[(bits, exp_bits)]
    clamped = v.to(_FP32).clamp(-fmax, fmax)
    if via_torch and (bits, exp_bits) in _TORCH_FP8:  # torch's casts round to nearest even: exact here
        return clamped.to(_TORCH_FP8[(bits, exp_bits)]).view(torch.uint8)
    r = fp_round(clamped, bits, exp_bits)
    man = bits - 1 - exp_bits
    bias = 2 ** (exp_bits - 1) - 1
    a = r.abs()
    _, e = torch.frexp(a)
    binade = torch.clamp(e - 1, min=1 - bias)
    sig = torch.ldexp(a, man - binade).to(torch.int64)  # integer significand, implicit bit included
    normal = sig >= 2**man
    field = torch.where(normal, binade + bias, torch.zeros_like(binade)).to(torch.int64)
    code = (field << man) | (sig - torch.where(normal, 2**man, 0))
    sign = (torch.signbit(r)).to(torch.int64) << (bits - 1)
    return (code | sign).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def fp_table(bits: int, exp_bits: int) -> torch.Tensor:
    """fp32 value of each of the ``2**bits`` codes (e4m3's NaN pattern 0x7F/0xFF, never sent,
    decodes to +-448 so a corrupt code cannot poison a sum; e5m2's inf/NaN patterns likewise to +-max)."""
    man = bits - 1 - exp_bits
    bias = 2 ** (exp_bits - 1) - 1
    fmax = FP_MAX[(bits, exp_bits)]
    codes = torch.arange(2**bits, dtype=torch.int64)
    sign = (codes >> (bits - 1)) & 1
    field = (codes >> man) & (2**exp_bits - 1)
    frac = (codes & (2**man - 1)).to(_FP64)
    value = torch.where(field == 0, frac * 2.0 ** (1 - bias - man),
                        (1 + frac / 2**man) * torch.exp2((field - bias).to(_FP64)))
    value = torch.clamp(value, max=fmax)
    return torch.where(sign == 1, -value, value).to(_FP32)


def fp_decode(codes: torch.Tensor, bits: int, exp_bits: int) -> torch.Tensor:
    return fp_table(bits, exp_bits).to(codes.device)[codes.long()]


def _constant(spec: QuantSpec) -> float:
    """c for ``spec``: a codebook spans [-1, 1], so its scale is the absmax itself (fp codes
    divide by fmt_max in float64 instead: ``_fp_needed``)."""
    return 1.0 if spec.code in ("nf", "lm") else scale_constant(spec.bits, spec.symmetric)


def fitted_table(spec: QuantSpec) -> torch.Tensor:
    """The fp32 table of an ``lm`` spec; a clear error when the communicator has not set it."""
    if spec.levels is None:
        raise ValueError(f"levels: {spec} has no fitted table; allowed: an lm spec whose levels were fitted on a "
                         "calibration (lowbit.method.fitted_codebook.site_tables; a QuantCommunicator does it)")
    return torch.tensor(spec.levels, dtype=_FP32)


def _fp_needed(absmax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """float64 absmax / fmt_max: the smallest scale that fits absmax into the fp code."""
    return absmax.to(_FP64) / spec.fp_max


@dataclass
class QuantResult:
    """codes: uint8, same shape as x. scales/mins: fp32 values exactly as the receiver uses them
    (dynamic ones already rounded to the scale dtype); mins is None when symmetric."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    clamped: int
    nonfinite: int
    # e4m3 scales only: ``scales`` = wire_scales * message_scale (the values the receiver uses);
    # wire_scales are the float8_e4m3fn values (as fp32), message_scale the fp32 0-d second level.
    wire_scales: torch.Tensor | None = None
    message_scale: torch.Tensor | None = None


def _fp64_to_fp32_toward(t: torch.Tensor, up: bool) -> torch.Tensor:
    """float64 ``t`` rounded to fp32 toward +inf (up) or -inf, saturating at the fp32 max."""
    t = t.clamp(-_FP32_MAX, _FP32_MAX)
    r = t.to(_FP32)
    wrong = r.to(_FP64) < t if up else r.to(_FP64) > t
    target = torch.full_like(r, torch.inf if up else -torch.inf)
    return torch.where(wrong, torch.nextafter(r, target), r).clamp(-_FP32_MAX, _FP32_MAX)


def _round_float_toward(t: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """fp32 ``t`` to fp16 / float8_e4m3fn toward +inf (up) or -inf, saturating at the format's
    largest finite value (never inf); returns fp32. One ulp step on the sign-magnitude bits fixes
    a round-to-nearest cast that landed on the wrong side."""
    fmax = float(torch.finfo(dtype).max)
    tc = t.clamp(-fmax, fmax)
    r = tc.to(dtype)
    rf = r.to(_FP32)
    wrong = rf < tc if up else rf > tc
    if not bool(wrong.any()):
        return rf
    nbits = 8 * dtype.itemsize
    raw = r.view(torch.uint8 if nbits == 8 else torch.int16).to(torch.int64) & (2**nbits - 1)
    sign_bit = 1 << (nbits - 1)
    negative = (raw & sign_bit) != 0
    mag = raw & (sign_bit - 1)
    # up from a positive / down from a negative value: magnitude + 1; the other way: magnitude - 1;
    # from zero: the smallest subnormal of the wanted sign
    grow = (rf > 0) == up
    new_negative = torch.where(rf == 0, torch.tensor(not up), negative)
    new_mag = torch.where(rf == 0, torch.ones_like(mag), torch.where(grow, mag + 1, mag - 1))
    fixed = (new_mag | torch.where(new_negative, sign_bit, 0)).to(torch.int64)
    if nbits == 8:
        fixed_f = fixed.to(torch.uint8).view(dtype).to(_FP32)
    else:
        fixed_f = torch.where(fixed >= 2**15, fixed - 2**16, fixed).to(torch.int16).view(dtype).to(_FP32)
    return torch.where(wrong, fixed_f, rf).clamp(-fmax, fmax)


def _round_e8m0_up(t: torch.Tensor) -> torch.Tensor:
    """Non-negative ``t`` (fp32/fp64) to the next power of two 2**k, k in [-127, 127]; fp32."""
    m, e = torch.frexp(t.to(_FP64))
    k = torch.where(m == 0.5, e - 1, e)  # an exact power of two stays; anything else rounds up
    k = torch.where(t > 0, k, torch.full_like(k, _E8M0_MIN_EXP)).clamp(_E8M0_MIN_EXP, _E8M0_MAX_EXP)
    return torch.ldexp(torch.ones_like(t, dtype=_FP64), k).to(_FP32)


def _round_toward(t: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round fp32 (or float64) ``t`` to ``dtype`` toward +inf (up) or -inf, staying finite; returns fp32.

    bf16 is the top 16 bits of fp32, so directed rounding is integer arithmetic on the bits:
    truncating drops the magnitude (toward 0); adding 0xFFFF first raises it (away from 0).
    fp16 / e4m3 saturate at their largest value (``_round_float_toward``); e8m0 rounds up to a
    power of two (scales only: never negative).
    """
    if dtype == _E8M0:
        assert up, "e8m0 holds scales only (rounded up)"
        return _round_e8m0_up(t)
    if t.dtype == _FP64:
        t = _fp64_to_fp32_toward(t, up)
    t = t.to(_FP32).contiguous()
    if dtype == _FP32:
        return t
    if dtype in (torch.float16, _E4M3):
        return _round_float_toward(t, dtype, up)
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
    if spec.code == "fp":
        absmax = torch.maximum(lo.abs(), hi.abs())
        return _fp64_to_fp32_toward(_fp_needed(absmax, spec), up=True), None
    c = _constant(spec)
    if spec.symmetric:
        return torch.maximum(lo.abs(), hi.abs()) * c, None
    return hi * c - lo * c, lo


def message_scale(needed: torch.Tensor) -> torch.Tensor:
    """The e4m3 format's fp32 second-level scale of one message from its needed scales (float64):
    the power of two 2**ceil(log2(max / 448)) (1.0 for an all-zero message), so every needed
    scale / it is at most 448."""
    top = needed.max() if needed.numel() else needed.new_zeros(())
    g = _round_e8m0_up(top / E4M3_MAX)
    return torch.where(top > 0, g, torch.ones_like(g))


def _scales_from_needed(needed: torch.Tensor, spec: QuantSpec):
    """(scales used, wire_scales, message_scale) from the needed scales (fp32 or float64)."""
    if spec.scale_dtype != _E4M3:
        return _round_toward(needed, spec.scale_dtype, up=True), None, None
    g = message_scale(needed.to(_FP64))
    wire = _round_toward(needed.to(_FP64) / g.to(_FP64), _E4M3, up=True)
    return wire * g, wire, g  # g a power of two: the product is exact


def _dynamic_qparams_full(xg: torch.Tensor, valid: torch.Tensor, spec: QuantSpec):
    """(scales, mins, wire_scales, message_scale) per [..., n_groups]; see ``dynamic_qparams``."""
    c = _constant(spec)
    any_valid = valid.any(-1)
    if spec.symmetric:
        absmax = torch.where(valid, xg.abs(), 0.0).amax(-1)
        needed = _fp_needed(absmax, spec) if spec.code == "fp" else absmax * c
        scales, wire, g = _scales_from_needed(needed, spec)
        return scales, None, wire, g
    lo = torch.where(valid, xg, torch.inf).amin(-1)
    hi = torch.where(valid, xg, -torch.inf).amax(-1)
    lo = torch.where(any_valid, lo, 0.0)
    hi = torch.where(any_valid, hi, 0.0)
    lo = _round_toward(lo, spec.scale_dtype, up=False)
    scale = _round_toward(hi * c - lo * c, spec.scale_dtype, up=True)
    return scale, lo, None, None


def dynamic_qparams(xg: torch.Tensor, valid: torch.Tensor, spec: QuantSpec):
    """Scales (and mins) per [..., n_groups] from the valid (finite, not excluded) values, as the
    receiver uses them (e4m3: the product with the message scale)."""
    scales, mins, _, _ = _dynamic_qparams_full(xg, valid, spec)
    return scales, mins


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

    wire = g = None
    if spec.granularity == "static":
        if static_min is None or static_max is None:
            raise ValueError("static granularity needs static_min and static_max (per-feature [H] tensors)")
        scales, mins = static_qparams(spec, static_min.to(x.device), static_max.to(x.device))
        scale_b, min_b = scales, mins  # [H] broadcasts over rows
        xs = x_in
        out_of_range = _outside_static_range(x, spec, static_min, static_max)
    else:
        xg = _grouped(x_in, spec)
        scales, mins, wire, g = _dynamic_qparams_full(xg, _grouped(valid, spec), spec)
        scale_b = scales.unsqueeze(-1)
        min_b = mins.unsqueeze(-1) if mins is not None else None
        xs = xg
        out_of_range = None  # ranges come from the data itself

    qmin, qmax = qrange_of(spec)
    zero_scale = scale_b == 0
    safe_scale = torch.where(zero_scale, 1.0, scale_b)
    shifted = xs if spec.symmetric else xs - min_b
    ratio = shifted / safe_scale
    beyond = None  # dynamic: valid values the (saturated) scale could not fit
    if spec.code == "fp":
        beyond = ratio.abs() > spec.fp_max
    elif spec.scale_dtype not in KERNEL_SCALE_DTYPES:
        beyond = (ratio < qmin - 0.5) | (ratio > qmax + 0.5)
    if spec.code == "fp":
        q = fp_encode(ratio, spec.bits, spec.exp_bits).to(_FP32)
    elif spec.code == "nf":
        q = (codebook.nearest_index(ratio, spec.bits) + qmin).to(_FP32)
    elif spec.code == "lm":
        q = codebook.nearest_index(ratio, spec.bits, fitted_table(spec).to(ratio.device)).to(_FP32)
    else:
        rounded = (stochastic_round(ratio, spec.rounding_seed) if spec.rounding == "stochastic"
                   else round_half_even(ratio))
        q = torch.clamp(rounded, qmin, qmax)
    q = torch.where(zero_scale, 0.0, q)
    if spec.granularity != "static":
        q = q.reshape(x.shape)
        if beyond is not None:
            beyond = beyond.reshape(x.shape)
        scales = scales.squeeze(-1) if spec.granularity == "token" else scales
        mins = mins.squeeze(-1) if (mins is not None and spec.granularity == "token") else mins
        if wire is not None and spec.granularity == "token":
            wire = wire.squeeze(-1)
    if keep is not None:
        q = torch.where(keep, q, 0.0)
    codes = (q - qmin).to(torch.uint8)

    nonfinite = int((~finite).sum()) if keep is None else int((~finite & keep).sum())
    clamped = 0
    if out_of_range is not None:
        counted = out_of_range & valid
        clamped = int(counted.sum())
    elif beyond is not None:
        clamped = int((beyond & valid).sum())
    return QuantResult(codes, scales, mins, clamped, nonfinite, wire, g)


def dequantize(
    codes: torch.Tensor, spec: QuantSpec, scales: torch.Tensor, mins: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 values from uint8 codes [..., H] and the scales (and mins) ``quantize`` returned."""
    if spec.code == "nf":
        q = codebook.decode_values(codes, spec.bits)
    elif spec.code == "lm":
        q = codebook.decode_values(codes, spec.bits, fitted_table(spec))
    elif spec.code == "fp":
        q = fp_decode(codes, spec.bits, spec.exp_bits)
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
