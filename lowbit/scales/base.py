"""The scale-format interface: what one dynamic scale travels as (scheme suffix ``-s<fmt>``).

A scale format is asked three things: how to round a needed scale (or min) to a value it can
hold, in the direction that keeps the data covered (``round``: scales up, mins down, never to
inf); what the receiver uses and what the wire carries (``scales``: one value each, except
formats with a per-message header such as NVFP4's fp32 second level); and how many bytes that
is (``section_bytes``). The payload layout (``lowbit.wire.payload``) writes and reads the
scales section through ``write`` / ``read``, so a new format is one class in one module of
this package (registered with ``@SCALES.register``), nothing else.

A format also owns the *scale rule* of its dynamic groups, which ``lowbit.quant`` asks in three
steps; the defaults are lowbit's uniform rule, and the shipping systems' formats override them
(``lowbit.scales.qr`` QuickReduce, ``fi`` FlashInfer, ``trt`` TensorRT-LLM, ``mxfloor`` /
``nv`` torchao's MXFP4 / NVFP4, ``none`` unscaled):

==================  ==========================================================================
``group_params``    per group: the scale the receiver decodes with, the mins, the wire values,
                    the message header and the multiplier the sender encodes with (default:
                    absmax x the code's constant over the finite values, rounded up)
``ratios``          the values the code rounds (default: NaN -> 0, (x - lo) / scale, a zero scale
                    gives 0); a format whose code keeps NaN passes it through
``values``          decoded values from the signed code values and the scales (default:
                    q x scale (+ lo), saturated to the finite fp32 range)
``message_header``  the header of a whole buffer, when a recipe quantizes the pieces of one buffer
                    with one header (torchao's NVFP4 tensor scale); None: each message its own
==================  ==========================================================================

    PYTHONPATH=. python -c "from lowbit.scales import SCALES; print(SCALES.names())"
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from lowbit.plugins import Registry, SchemeError
from lowbit.quant import uniform_ratios, uniform_values

SCALES = Registry("scale_format", "lowbit.scales")
GUIDE = """\
-s<fmt> (scale format): what each dynamic scale costs (fp32 32 bits, bf16/fp16 16, e8m0/e4m3 8,
plus 32 bits per message for e4m3's fp32 scale); rounded so the scale still covers the data
(upward; mins downward), saturating at the format's largest value (fp16: 65504). Static scales
never travel: -s<fmt> needs a dynamic granularity; e8m0/e4m3 need a symmetric code."""
_FP32 = torch.float32
_FP64 = torch.float64
FP32_MAX = torch.finfo(torch.float32).max
_TOKEN = re.compile(r"-s([a-z][a-z0-9]*)")


def fp64_to_fp32_toward(t: torch.Tensor, up: bool) -> torch.Tensor:
    """float64 ``t`` rounded to fp32 toward +inf (up) or -inf, saturating at the fp32 max."""
    t = t.clamp(-FP32_MAX, FP32_MAX)
    r = t.to(_FP32)
    wrong = r.to(_FP64) < t if up else r.to(_FP64) > t
    target = torch.full_like(r, torch.inf if up else -torch.inf)
    return torch.where(wrong, torch.nextafter(r, target), r).clamp(-FP32_MAX, FP32_MAX)


def power_of_two_up(t: torch.Tensor, min_exp: int = -127, max_exp: int = 127) -> torch.Tensor:
    """Non-negative ``t`` (fp32/fp64) to the next power of two 2**k, k in [min_exp, max_exp]; fp32
    (zero becomes 2**min_exp)."""
    m, e = torch.frexp(t.to(_FP64))
    k = torch.where(m == 0.5, e - 1, e)  # an exact power of two stays; anything else rounds up
    k = torch.where(t > 0, k, torch.full_like(k, min_exp)).clamp(min_exp, max_exp)
    return torch.ldexp(torch.ones_like(t, dtype=_FP64), k).to(_FP32)


def float_toward(t: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """fp32 ``t`` to a small float ``dtype`` (fp16, float8_e4m3fn) toward +inf (up) or -inf,
    saturating at its largest finite value (never inf); returns fp32. One ulp step on the
    sign-magnitude bits fixes a round-to-nearest cast that landed on the wrong side."""
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


def as_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, as its flat little-endian bytes."""
    return t.to(dtype).contiguous().reshape(-1).view(torch.uint8)


def from_bytes(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A section's bytes reinterpreted as ``dtype`` (copied first: sections are unaligned)."""
    return raw.clone().view(dtype)


class GroupParams(NamedTuple):
    """One message's dynamic scales per group [..., n_groups] (``ScaleFormat.group_params``)."""

    scales: torch.Tensor  # fp32: what the receiver decodes with
    mins: torch.Tensor | None = None  # fp32 mins (asymmetric codes)
    wire: torch.Tensor | None = None  # the values that travel when they are not ``scales`` in the format's dtype
    header: torch.Tensor | None = None  # the per-message header (e4m3, nv)
    encode: torch.Tensor | None = None  # fp32 multiplier the sender encodes with (None: it divides by ``scales``)


def kept_values(xg: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Where a shipping rule looks for a group's extremes: every value of the message it kept (not a
    BF16 outlier, not padding), infinities included, NaN left out (the IEEE maxNum / minNum the
    kernels use ignore NaN)."""
    return kept & ~torch.isnan(xg)


@dataclass(frozen=True)
class ScaleFormat:
    """One dynamic scale format. Subclasses set the class attributes and ``_round``."""

    name: ClassVar[str]
    order: ClassVar[int] = 100
    dtype: ClassVar[torch.dtype]
    help: ClassVar[str] = ""  # a few words after the name in the grammar's help
    symmetric_only: ClassVar[bool] = False  # it has no sign (or no zero): asymmetric mins cannot travel in it
    # rounding a large needed scale saturates at the format's top, so ratios can leave the code range
    # (``lowbit.quant`` then counts them as clamped)
    saturates: ClassVar[bool] = False
    header: ClassVar[torch.dtype | None] = None  # one value of this dtype per message, first in the section
    takes_nan: ClassVar[bool] = False  # its ratios keep NaN: the code must map it (``Code.takes_nan``)

    def __str__(self) -> str:
        return self.name

    @property
    def token(self) -> str:
        """The scheme suffix (``-s<fmt>``); the default format prints none."""
        return "" if self == default_scale() else f"-s{self.name}"

    def round(self, t: torch.Tensor, up: bool) -> torch.Tensor:
        """fp32 (or float64) ``t`` to a value of this format, toward +inf (up) or -inf, finite; fp32."""
        if t.dtype == _FP64:
            t = fp64_to_fp32_toward(t, up)
        return self._round(t.to(_FP32).contiguous(), up)

    def _round(self, t: torch.Tensor, up: bool) -> torch.Tensor:
        """fp32 ``t`` to this format's ``dtype`` (a small float: fp16, float8) toward +-inf, saturating."""
        return float_toward(t, self.dtype, up)

    def scales(self, needed: torch.Tensor):
        """(scales the receiver uses, wire values or None, message header or None) from the
        needed scales (fp32 or float64): by default each rounded up on its own."""
        return self.round(needed, up=True), None, None

    def validate(self, spec) -> None:
        if self.symmetric_only and not spec.symmetric:
            allowed = sorted((c for c in SCALES.classes() if not c.symmetric_only), key=lambda c: -c.dtype.itemsize)
            raise SchemeError("scale_dtype", f"{self.name} not allowed with an asymmetric code (its mins need a sign "
                                             f"and a zero); allowed: {', '.join(c.name for c in allowed)}")

    def section_bytes(self, n_scales: int) -> int:
        """Bytes of a scales section holding ``n_scales`` scales (the header included)."""
        head = self.header.itemsize if self.header is not None and n_scales else 0
        return head + n_scales * self.dtype.itemsize

    def mins_bytes(self, n_mins: int) -> int:
        """Bytes of a mins section (asymmetric codes): the mins travel in the scales' dtype."""
        return n_mins * self.dtype.itemsize

    def write(self, scales: torch.Tensor, wire: torch.Tensor | None, header: torch.Tensor | None, spec) -> list:
        """The scales section's bytes from ``quantize``'s result."""
        return [as_bytes(scales, self.dtype)]

    def read(self, raw: torch.Tensor, shape: tuple, spec) -> torch.Tensor:
        """fp32 scales [shape] as the receiver uses them, from the scales section's bytes."""
        return from_bytes(raw, self.dtype).float().reshape(shape)

    def max_scale(self, spec) -> float:
        """The largest scale this format holds (what ``lowbit.counters`` takes as the format's range)."""
        return float(torch.finfo(self.dtype).max)

    # -- the scale rule (see the module docstring) -----------------------------------------------
    def group_params(self, xg: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor, spec,
                     header: torch.Tensor | None = None) -> GroupParams:
        """Scales per group of ``xg`` [..., n_groups, group] (NaN and inf as they are); ``valid``:
        finite and kept, ``kept``: in the message (not a BF16 outlier, not padding); ``header``:
        a header the caller fixed for the buffer this message was cut from (``message_header``)."""
        if spec.symmetric:
            absmax = torch.where(valid, xg.abs(), 0.0).amax(-1)
            scales, wire, head = self.scales(spec.code.needed_scale(absmax))
            return GroupParams(scales, None, wire, head)
        c = spec.code.scale_constant
        any_valid = valid.any(-1)
        lo = torch.where(valid, xg, torch.inf).amin(-1)
        hi = torch.where(valid, xg, -torch.inf).amax(-1)
        lo = torch.where(any_valid, lo, 0.0)
        hi = torch.where(any_valid, hi, 0.0)
        lo = self.round(lo, up=False)
        return GroupParams(self.round(hi * c - lo * c, up=True), lo)

    def ratios(self, xg: torch.Tensor, params: GroupParams, spec) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the values the code rounds, where a zero scale forces the zero code or None)."""
        lo = None if params.mins is None else params.mins.unsqueeze(-1)
        return uniform_ratios(xg, params.scales.unsqueeze(-1), lo)

    def values(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, spec) -> torch.Tensor:
        """Decoded fp32 values from signed code values ``q`` and the scales (and mins) per value."""
        return uniform_values(q, scales, mins)

    def message_header(self, x: torch.Tensor, spec) -> torch.Tensor | None:
        """The header of a whole buffer ``x`` (the quantizer's values), for a recipe that encodes its
        pieces with one header; None: the format has none, or each message computes its own."""
        return None


def default_scale() -> ScaleFormat:
    """bf16: the format a scheme string without ``-s<fmt>`` means."""
    return SCALES.get("bf16")()


def parse(text: str, pos: int):
    """``-s<fmt>`` at ``pos``: (format, end), or None (also for ``-sr`` and ``-sp<n>``, which share
    the prefix); a name no format has is a SchemeError listing the formats."""
    m = _TOKEN.match(text, pos)
    if not m or m.group(1) == "r" or re.fullmatch(r"p\d+", m.group(1)):
        return None
    fmt = m.group(1)
    if fmt not in SCALES.names():
        raise SchemeError("scale_format", f"{fmt!r} not allowed; allowed: {', '.join(SCALES.names())} (-s<fmt>)")
    return SCALES.get(fmt)(), m.end()


def by_dtype(dtype: torch.dtype) -> ScaleFormat:
    """The format whose scales are ``dtype`` values (the Python API's ``scale_dtype=``)."""
    for cls in SCALES.classes():
        if cls.dtype == dtype:
            return cls()
    name = str(dtype).removeprefix("torch.")
    raise SchemeError("scale_dtype", f"{name} not allowed; allowed: {', '.join(SCALES.names())}")
