"""The scale-format interface: what one dynamic scale travels as (scheme suffix ``-s<fmt>``).

A scale format is asked three things: how to round a needed scale (or min) to a value it can
hold, in the direction that keeps the data covered (``round``: scales up, mins down, never to
inf); what the receiver uses and what the wire carries (``scales``: one value each, except
formats with a per-message header such as NVFP4's fp32 second level); and how many bytes that
is (``section_bytes``). The payload layout (``lowbit.wire.payload``) writes and reads the
scales section through ``write`` / ``read``, so a new format is one class in one module of
this package (registered with ``@SCALES.register``), nothing else.

    PYTHONPATH=. python -c "from lowbit.scales import SCALES; print(SCALES.names())"
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.plugins import Registry, SchemeError

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

    def write(self, scales: torch.Tensor, wire: torch.Tensor | None, header: torch.Tensor | None) -> list:
        """The scales section's bytes from ``quantize``'s result."""
        return [as_bytes(scales, self.dtype)]

    def read(self, raw: torch.Tensor, shape: tuple) -> torch.Tensor:
        """fp32 scales [shape] as the receiver uses them, from the scales section's bytes."""
        return from_bytes(raw, self.dtype).float().reshape(shape)


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
