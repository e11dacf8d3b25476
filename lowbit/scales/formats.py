"""The five built-in scale formats (``-s<fmt>``), each rounded in the covering direction (scales up,
mins down) and saturating, never inf:

==========  ========  ===========================================================================
format      bytes     rounding
==========  ========  ===========================================================================
bf16        2         the default (no token): bit arithmetic on the fp32 pattern (truncate toward
                      zero, or add 0xFFFF first to round away from it), largest finite bf16 at most
fp32        4         exact (fp codes: from float64, rounded up once)
fp16        2         rounded up to fp16, saturating at 65504: a massive activation then clamps and
                      is counted (lowbit's own fp16 scales never overflow to inf; tested)
e8m0        1         2**ceil(log2 s), exponent in [-127, 127]: OCP MX's shared exponent byte (a zero
                      scale becomes 2**-127; its codes are all zero, so it still decodes to 0)
e4m3        1 + 4/msg NVFP4's two levels: one fp32 message scale g = 2**ceil(log2(max s / 448)) for
                      the whole tensor handed to ``quantize`` (one message), then per token/group the
                      float8_e4m3fn value of s / g rounded up; the scale used is e4m3 * g (exact in
                      fp32, g a power of two; NVFP4's g is any fp32 value, so this costs up to 1 bit
                      of e4m3 range)
==========  ========  ===========================================================================

e8m0 and e4m3 have no sign (e8m0) or too little range for a min, so they take symmetric codes only.

    PYTHONPATH=. python -c "import torch; from lowbit.scales import SCALES; \\
        print(SCALES.get('e8m0')().round(torch.tensor([0.3, 5.0]), up=True))"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.scales.base import SCALES, ScaleFormat, as_bytes, from_bytes, power_of_two_up

_FP32 = torch.float32
_FP64 = torch.float64
E4M3_MAX = 448.0


@SCALES.register
@dataclass(frozen=True)
class BF16(ScaleFormat):
    name = "bf16"
    help = "(default)"
    order = 0
    dtype = torch.bfloat16

    def _round(self, t: torch.Tensor, up: bool) -> torch.Tensor:
        # bf16 is the top 16 bits of fp32: truncating drops the magnitude (toward 0), adding
        # 0xFFFF first raises it (away from 0)
        mag = t.abs().view(torch.int32).to(torch.int64)
        away_from_zero = (t > 0) == up
        mag = torch.where(away_from_zero, (mag + 0xFFFF) & 0x7FFF0000, mag & 0x7FFF0000)
        mag = torch.clamp(mag, max=0x7F7F0000)  # largest finite bf16: never round a finite value to inf
        out = mag.to(torch.int32).view(_FP32)
        out = torch.where(t < 0, -out, out)
        return torch.where(t == 0, t, out)


@SCALES.register
@dataclass(frozen=True)
class FP32(ScaleFormat):
    name = "fp32"
    order = 1
    dtype = torch.float32

    def _round(self, t: torch.Tensor, up: bool) -> torch.Tensor:
        return t


@SCALES.register
@dataclass(frozen=True)
class FP16(ScaleFormat):
    name = "fp16"
    help = "(saturates at 65504)"
    order = 2
    dtype = torch.float16
    saturates = True


@SCALES.register
@dataclass(frozen=True)
class E8M0(ScaleFormat):
    name = "e8m0"
    help = "(power of two, rounded up)"
    order = 3
    dtype = torch.float8_e8m0fnu
    symmetric_only = True
    saturates = True

    def round(self, t: torch.Tensor, up: bool) -> torch.Tensor:
        assert up, "e8m0 holds scales only (rounded up)"
        return power_of_two_up(t)  # straight from float64: no fp32 rounding first

    def max_scale(self, spec) -> float:
        return 2.0 ** 127


def message_scale(needed: torch.Tensor) -> torch.Tensor:
    """The e4m3 format's fp32 second-level scale of one message from its needed scales (float64):
    the power of two 2**ceil(log2(max / 448)) (1.0 for an all-zero message), so every needed
    scale / it is at most 448."""
    top = needed.max() if needed.numel() else needed.new_zeros(())
    g = power_of_two_up(top / E4M3_MAX)
    return torch.where(top > 0, g, torch.ones_like(g))


@SCALES.register
@dataclass(frozen=True)
class E4M3(ScaleFormat):
    name = "e4m3"
    help = "(float8 scale x one fp32 scale per message, as NVFP4)"
    order = 4
    dtype = torch.float8_e4m3fn
    symmetric_only = True
    saturates = True
    header = torch.float32  # the message scale g, first in the scales section

    def scales(self, needed: torch.Tensor):
        g = message_scale(needed.to(_FP64))
        wire = self.round(needed.to(_FP64) / g.to(_FP64), up=True)
        return wire * g, wire, g  # g a power of two: the product is exact

    def write(self, scales, wire, header, spec) -> list:
        return [as_bytes(header.reshape(1), self.header), as_bytes(wire, self.dtype)]

    def max_scale(self, spec) -> float:
        return float("inf")  # the fp32 message scale times 448

    def read(self, raw: torch.Tensor, shape: tuple, spec) -> torch.Tensor:
        head = self.header.itemsize
        g = from_bytes(raw[:head], self.header).float()
        wire = from_bytes(raw[head:], self.dtype)
        return (wire.float() * g).reshape(shape)  # as quantize: exact, g a power of two
