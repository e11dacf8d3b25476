"""QuickReduce's integer code ``qint<B>`` (B = 3, 4, 6, 8): the grid [-2**(B-1), 2**(B-1) - 1] as the
QuickReduce codecs clamp and round it.

Source: vLLM ``csrc/quickreduce/quick_reduce_impl.cuh`` at 0bf6342e (``CodecQ4``, ``CodecQ6``,
``CodecQ8``) and ROCm aiter ``csrc/include/quick_all_reduce.cuh`` at e4048607 (the same codecs plus
``CodecQ3``, INT3, which aiter runs at TP 2 only); docs/shipping.md reads them step by step.

With ``qmax = 2**(B-1)`` and ``w`` the value times the encoding scale (``lowbit.scales.qr``, which
maps a group's signed extreme to the lowest code):

1. ``w = minNum(maxNum(w, -qmax), qmax - 1)``: IEEE maxNum / minNum return the other operand for a
   NaN, so **a NaN becomes -qmax** (the lowest code; it then decodes to the group's signed extreme);
   +-inf become the end codes;
2. ``q = rint(w)``, ties to even (clamping first, then rounding, as the kernel does);
3. stored ``q + qmax`` in ``0 .. 2**B - 1``; decoded ``q`` (the scale format multiplies by the
   decoding scale in the codec's arithmetic).

Wire bytes are the packed B-bit codes (``lowbit.quant.pack_bits``): the same count as QuickReduce's
(INT4: 1024 bytes per 2048 values), in lowbit's bit order, not the kernel's per-thread layout.
With lowbit's own scale formats the code is a symmetric grid whose absmax maps to qmax (scale
``absmax / qmax``); its NaN policy stays.

    PYTHONPATH=. python -c "import torch; from lowbit.codes.qint import QIntCode; c = QIntCode(4); \\
        print(c.qrange, c.encode(torch.tensor([8.0, -9.0, float('nan'), 2.5])))"
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.codes.base import CODES, Code
from lowbit.plugins import SchemeError
from lowbit.quant import round_half_even

QR_BITS = (3, 4, 6, 8)  # QuickReduce's INT3 (aiter), INT4, INT6, INT8
_RE = re.compile(r"qint(\d+)")


@CODES.register
@dataclass(frozen=True)
class QIntCode(Code):
    name = "qint"
    order = 5
    syntax = "qint<B>"
    help = "QuickReduce's integer code, B in 3,4,6,8: [-2**(B-1), 2**(B-1)-1], NaN -> the lowest code"
    requantizes = True
    takes_nan = True

    @classmethod
    def parse(cls, text: str, pos: int):
        m = _RE.match(text, pos)
        return (cls(int(m.group(1))), m.end()) if m else None

    @classmethod
    def choices(cls) -> list["QIntCode"]:
        return [cls(b) for b in QR_BITS]

    def __str__(self) -> str:
        return f"qint{self.bits}"

    def validate(self, spec) -> None:
        if self.bits not in QR_BITS:
            raise SchemeError("bits", f"{self.bits!r} not allowed for qint (QuickReduce's codecs); allowed: "
                                      f"{', '.join(map(str, QR_BITS))}")
        if not self.symmetric:
            raise SchemeError("symmetric", "qint is QuickReduce's symmetric grid; allowed: qint<B> without 'a'")
        super().validate(spec)

    @property
    def qrange(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    @property
    def qmax(self) -> int:
        """2**(B-1): the magnitude of the lowest code, where a group's signed extreme lands."""
        return 2 ** (self.bits - 1)

    @property
    def scale_constant(self) -> float:
        return 1.0 / self.qmax

    @property
    def max_ratio(self) -> float:
        return float(self.qmax)

    def encode(self, ratio: torch.Tensor, *, seed: int | None = None, levels=None) -> torch.Tensor:
        self.check_levels(levels)
        lo, hi = self.qrange
        w = torch.where(torch.isnan(ratio), float(lo), ratio)  # maxNum(NaN, lo) = lo
        return round_half_even(w.clamp(lo, hi))

    def decode(self, codes: torch.Tensor, *, levels=None) -> torch.Tensor:
        return codes.to(torch.float32) + self.qrange[0]

    def grid(self, levels=None) -> dict:
        lo, hi = self.qrange
        return dict(levels=[float(q) for q in range(lo, hi + 1)], edges=(float(lo), float(hi)))
