"""Floating-point codes ``fp<B>e<E>m<M>``: saturating minifloats, as FP8 / MX / NVFP4 hardware formats.

Symmetric, scale = absmax / fmt_max (fmt_max the format's largest value: 448, 57344, 7.5, 28, 6),
computed in float64 and rounded UP to the scale format, so every finite value satisfies
|x / scale| <= fmt_max; static scales are fp32, from the calibrated absmax the same way. The code
of v = x / scale is the format's bit pattern of v rounded to nearest, ties to even, saturating at
+-fmt_max (never inf, never NaN): fp8 through torch's ``float8_e4m3fn`` / ``float8_e5m2`` casts of
the clamped value (they round to nearest even), fp6/fp4 by ``fp_round`` (exponent from ``frexp``,
then rounding to a multiple of the binade's step; exact in fp32). Stored: the sign bit on top, then
exponent, then mantissa (e2m1: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 are codes 0..7);
``lowbit.quant.pack_bits`` puts fp4 codes 2 per byte (first code in the low nibble), so a group of
fp4 / fp6 codes starts on a whole byte (2 per byte, 4 per 3 bytes). Decoding is a table of the
``2**B`` values. NaN sends the zero code; +-Inf the largest codes of its sign; a ratio beyond
fmt_max (only a saturated scale makes one) is counted as clamped.

    PYTHONPATH=. python -c "from lowbit.codes.fp import FpCode; c = FpCode(4, exp_bits=2); print(c, c.fp_max, c.grid())"
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from lowbit.codes.base import CODES, Code
from lowbit.plugins import SchemeError
from lowbit.quant import round_half_even
from lowbit.scales.base import fp64_to_fp32_toward

_FP32 = torch.float32
_FP64 = torch.float64
# (bits, exponent bits) -> largest finite value. Saturating: no inf; e4m3 is float8_e4m3fn (no inf,
# its one NaN pattern never produced), e5m2 is float8_e5m2 without its inf/NaN patterns, the 6-
# and 4-bit ones are OCP MX's FP6/FP4 (no inf/NaN).
FP_FORMATS = {(8, 4): 448.0, (8, 5): 57344.0, (6, 2): 7.5, (6, 3): 28.0, (4, 2): 6.0}
FP_GROUP_MULTIPLE = {4: 2, 6: 4, 8: 1}  # codes per byte boundary
_TORCH_FP8 = {(8, 4): torch.float8_e4m3fn, (8, 5): torch.float8_e5m2}
_RE = re.compile(r"fp(\d+)e(\d+)m(\d+)(a?)")


def fp_code_text(bits: int, exp_bits: int) -> str:
    return f"fp{bits}e{exp_bits}m{bits - 1 - exp_bits}"


def fp_round(v: torch.Tensor, bits: int, exp_bits: int) -> torch.Tensor:
    """fp32 ``v`` rounded to the nearest value of the saturating minifloat (1 sign, ``exp_bits``
    exponent, ``bits - 1 - exp_bits`` mantissa bits, bias 2**(exp_bits-1) - 1, no inf/NaN codes
    except e4m3's top pattern, which the clamp never reaches); ties to even; +-Inf and values
    beyond the largest go to +-max. ``v`` must hold no NaN. Written from the format's definition,
    independent of torch's float8 casts (the tests compare the two on fp8)."""
    man = bits - 1 - exp_bits
    bias = 2 ** (exp_bits - 1) - 1
    fmax = FP_FORMATS[(bits, exp_bits)]
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
    fmax = FP_FORMATS[(bits, exp_bits)]
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
    fmax = FP_FORMATS[(bits, exp_bits)]
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


@CODES.register
@dataclass(frozen=True)
class FpCode(Code):
    name = "fp"
    order = 2
    syntax = "fp<B>e<E>m<M>"
    help = "saturating minifloat: fp8e4m3, fp8e5m2, fp6e2m3, fp6e3m2, fp4e2m1"
    guide = """\
fp<B>e<E>m<M> (floating-point codes, as FP8 / MX / NVFP4 hardware formats): sign, E exponent
and M mantissa bits; scale = absmax / the format's largest value (448, 57344, 7.5, 28, 6) per
token / group (dynamic) or per feature (static, from calibration); round to nearest, ties to
even; values beyond the largest clamp to it (never inf; counted as clamped); NaN sends the
zero code. fp4 packs 2 codes per byte and fp6 4 per 3 bytes, so groups are multiples of 2 / 4.
Symmetric only, no -sr. No kernel implements fp codes: they stay on lowbit.quant's torch path."""
    options = ("exp_bits",)
    requantizes = True
    exp_bits: int = 0  # mantissa = bits - 1 - exp_bits

    @classmethod
    def parse(cls, text: str, pos: int):
        m = _RE.match(text, pos)
        if not m:
            return None
        bits, exp_bits = int(m.group(1)), int(m.group(2))
        if int(m.group(3)) != bits - 1 - exp_bits:
            raise SchemeError("code", f"{m.group(0)!r} not allowed: 1 sign + {exp_bits} exponent + {m.group(3)} "
                                      f"mantissa bits is not {bits}; allowed: {allowed_formats()}")
        return cls(bits, m.group(4) != "a", exp_bits), m.end()

    @classmethod
    def choices(cls) -> list["FpCode"]:
        return [cls(b, True, e) for b, e in FP_FORMATS]

    def __str__(self) -> str:
        return fp_code_text(self.bits, self.exp_bits) + ("" if self.symmetric else "a")

    @property
    def kind(self) -> str:
        return fp_code_text(self.bits, self.exp_bits)  # fp8e4m3 and fp8e5m2 are different codes

    @property
    def family(self) -> str:
        return self.kind

    def validate(self, spec) -> None:
        if (self.bits, self.exp_bits) not in FP_FORMATS:
            raise SchemeError("code", f"{fp_code_text(self.bits, self.exp_bits)!r} not allowed; "
                                      f"allowed: {allowed_formats()}")
        if not self.symmetric:
            raise SchemeError("symmetric", "fp codes are sign-magnitude around an exact zero; allowed: "
                                           "fp<B>e<E>m<M> without 'a'")
        super().validate(spec)

    def rounding_refusal(self) -> str:
        return "fp codes round to nearest, ties to even; allowed: 'nearest' (no -sr with fp<B>e<E>m<M>)"

    @property
    def fp_max(self) -> float:
        """The format's largest finite value (its saturation point)."""
        return FP_FORMATS[(self.bits, self.exp_bits)]

    @property
    def group_multiple(self) -> int:
        return FP_GROUP_MULTIPLE[self.bits]

    @property
    def max_ratio(self) -> float:
        return self.fp_max

    def needed_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        return absmax.to(_FP64) / self.fp_max  # float64: the scale format rounds it up once

    def static_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        return fp64_to_fp32_toward(self.needed_scale(absmax), up=True)

    def encode(self, ratio: torch.Tensor, *, seed: int | None = None, levels=None) -> torch.Tensor:
        self.check_levels(levels)
        return fp_encode(ratio, self.bits, self.exp_bits).to(_FP32)

    def decode(self, codes: torch.Tensor, *, levels=None) -> torch.Tensor:
        return fp_decode(codes, self.bits, self.exp_bits)

    def beyond(self, ratio: torch.Tensor, saturating_scale: bool) -> torch.Tensor:
        return ratio.abs() > self.fp_max

    def grid(self, levels=None) -> dict:
        values = sorted(set(fp_table(self.bits, self.exp_bits).tolist()))  # one zero
        return dict(levels=values, edges=(-self.fp_max, self.fp_max))


def allowed_formats() -> str:
    return ", ".join(fp_code_text(b, e) for b, e in FP_FORMATS)
