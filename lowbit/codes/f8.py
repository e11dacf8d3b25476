"""fp8 as torch's casts write it: ``f8e4m3`` (float8_e4m3fn) and ``f8e5m2`` (float8_e5m2).

The shipping fp8 all-reduces round a value to fp8 with the hardware conversion and keep what it
gives, NaN included: FlashInfer (``cvt.rn.satfinite`` after its own clamp), TensorRT-LLM (the
``__nv_fp8_e4m3(float)`` constructor, satfinite) and NCCL's fp8 all-reduce, whose input is the
caller's cast (``tensor.to(torch.float8_e4m3fn)``). Sources and versions: docs/shipping.md.

==========  ===============================================================================
code        a value v (already scaled) becomes
==========  ===============================================================================
f8e4m3      torch's float8_e4m3fn cast of v: round to nearest even; beyond 448 (inf too) it
            saturates to +-448 (torch >= 2.12, the pinned 2.13; the CUDA satfinite
            conversions do the same); NaN stays NaN (pattern 0x7F / 0xFF, decoded NaN)
f8e5m2      torch's float8_e5m2 cast: round to nearest even; past 57344 (at 61440 and beyond) it
            overflows to inf (IEEE); NaN stays NaN
==========  ===============================================================================

Decoding is torch's cast back (every pattern, NaN and inf included, decodes to what it means). So
unlike lowbit's saturating minifloats (``lowbit.codes.fp``: NaN sends the zero code, e5m2 saturates)
these codes show what the shipping kernels do to NaN and overflow. ``saturate`` is the
satfinite conversion of both formats (NCCL's ring rounds each hop's fp16 sum with it).

    PYTHONPATH=. python -c "import torch; from lowbit.codes.f8 import F8Code; c = F8Code(8, True, 4); \\
        print(c.decode(c.encode(torch.tensor([500.0, float('inf'), float('nan'), 0.3]))))"
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.codes.base import CODES, Code
from lowbit.plugins import SchemeError

F8_DTYPES = {4: torch.float8_e4m3fn, 5: torch.float8_e5m2}  # exponent bits -> torch dtype
_RE = re.compile(r"f8e(\d)m(\d)")


@CODES.register
@dataclass(frozen=True)
class F8Code(Code):
    name = "f8"
    order = 6
    syntax = "f8e4m3 | f8e5m2"
    help = "fp8 as torch's cast writes it (shipping fp8): e4m3 saturates at 448, e5m2 overflows to inf, NaN kept"
    options = ("exp_bits",)
    requantizes = True
    takes_nan = True
    exp_bits: int = 4

    @classmethod
    def parse(cls, text: str, pos: int):
        m = _RE.match(text, pos)
        if not m:
            return None
        exp_bits, man = int(m.group(1)), int(m.group(2))
        if exp_bits not in F8_DTYPES or exp_bits + man != 7:
            raise SchemeError("code", f"{m.group(0)!r} not allowed; allowed: f8e4m3, f8e5m2")
        return cls(8, True, exp_bits), m.end()

    @classmethod
    def choices(cls) -> list["F8Code"]:
        return [cls(8, True, e) for e in F8_DTYPES]

    def __str__(self) -> str:
        return f"f8e{self.exp_bits}m{7 - self.exp_bits}"

    @property
    def kind(self) -> str:
        return str(self)

    @property
    def family(self) -> str:
        return str(self)

    @property
    def dtype(self) -> torch.dtype:
        return F8_DTYPES[self.exp_bits]

    def validate(self, spec) -> None:
        if self.bits != 8 or self.exp_bits not in F8_DTYPES:
            raise SchemeError("code", f"f8 with {self.bits} bits and {self.exp_bits} exponent bits not allowed; "
                                      "allowed: f8e4m3, f8e5m2")
        if not self.symmetric:
            raise SchemeError("symmetric", "fp8 is sign-magnitude; allowed: f8e4m3, f8e5m2 without 'a'")
        super().validate(spec)

    @property
    def fp_max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def max_ratio(self) -> float:
        return self.fp_max

    def needed_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        return absmax.to(torch.float64) / self.fp_max  # with lowbit's scale formats: rounded up once

    def encode(self, ratio: torch.Tensor, *, seed: int | None = None, levels=None) -> torch.Tensor:
        self.check_levels(levels)
        return ratio.to(torch.float32).to(self.dtype).view(torch.uint8).to(torch.float32)

    def decode(self, codes: torch.Tensor, *, levels=None) -> torch.Tensor:
        return codes.to(torch.uint8).view(self.dtype).to(torch.float32)

    def saturate(self, values: torch.Tensor) -> torch.Tensor:
        """fp32 ``values`` rounded to this format, satfinite (beyond the top, inf too, to +-max; NaN kept), fp32."""
        return values.clamp(-self.fp_max, self.fp_max).to(self.dtype).to(torch.float32)

    def beyond(self, ratio: torch.Tensor, saturating_scale: bool) -> torch.Tensor | None:
        if self.exp_bits == 5:
            return None  # e5m2 overflows to inf (counted as a non-finite output), it does not clamp
        return ratio.abs() > self.fp_max

    def grid(self, levels=None) -> dict:
        values = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(self.dtype).to(torch.float32)
        finite = sorted(set(values[torch.isfinite(values)].tolist()))
        return dict(levels=finite, edges=(-self.fp_max, self.fp_max))
