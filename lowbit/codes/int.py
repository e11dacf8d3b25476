"""The uniform grid ``int<B>[a]``: 2**B evenly spaced levels, symmetric (scale only) or asymmetric
('a': scale and min). The paper's code, and the one the kernels implement.

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

The scale formulas are the paper's ``2*absmax/(2**b-1)`` and ``(max-min)/(2**b-1)``, written so
that they cannot overflow fp32 even for values near 3.4e38 (``2*absmax`` would). ``c`` is computed
in Python float64 and rounded once to fp32 (the kernels use the same fp32 value). Rounding is
round half to even, or with ``-sr`` stochastic: q = floor(v + u), u ~ U[0, 1) from the call's seed
(``lowbit.quant.stochastic_round``).

    PYTHONPATH=. python -c "from lowbit.codes.int import IntCode; c = IntCode(4); print(c, c.qrange, c.scale_constant)"
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.codes.base import CODES, Code
from lowbit.plugins import SchemeError
from lowbit.quant import round_half_even, stochastic_round

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
_RE = re.compile(r"int(\d+)(a?)")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest signed code q of the uniform grid (before the unsigned offset)."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_constant(bits: int, symmetric: bool) -> float:
    """c in the scale formulas, as the fp32 value the kernels must use."""
    c = 2.0 / (2**bits - 1) if symmetric else 1.0 / (2**bits - 1)
    return torch.tensor(c, dtype=torch.float32).item()


@CODES.register
@dataclass(frozen=True)
class IntCode(Code):
    name = "int"
    order = 0
    syntax = "int<B>[a]"
    help = "uniform grid, B in 2,3,4,5,6,8; 'a' = asymmetric (scale + min)"
    roundings = ("nearest", "stochastic")
    requantizes = True
    kernel_key = "int"
    asymmetric = True

    @classmethod
    def parse(cls, text: str, pos: int):
        m = _RE.match(text, pos)
        return (cls(int(m.group(1)), m.group(2) != "a"), m.end()) if m else None

    @classmethod
    def choices(cls) -> list["IntCode"]:
        return [cls(b) for b in ALLOWED_BITS]

    def __str__(self) -> str:
        return f"int{self.bits}{'' if self.symmetric else 'a'}"

    def validate(self, spec) -> None:
        if self.bits not in ALLOWED_BITS:
            raise SchemeError("bits", f"{self.bits!r} not allowed; allowed: {', '.join(map(str, ALLOWED_BITS))}")
        super().validate(spec)

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bits, self.symmetric)

    @property
    def scale_constant(self) -> float:
        return scale_constant(self.bits, self.symmetric)

    @property
    def max_ratio(self) -> float:
        return 1.0 / self.scale_constant  # absmax / scale: 7.5 for int4 (15 for int4a's range)

    def encode(self, ratio: torch.Tensor, *, seed: int | None = None, levels=None) -> torch.Tensor:
        self.check_levels(levels)
        rounded = round_half_even(ratio) if seed is None else stochastic_round(ratio, seed)
        qmin, qmax = self.qrange
        return torch.clamp(rounded, qmin, qmax)

    def decode(self, codes: torch.Tensor, *, levels=None) -> torch.Tensor:
        return codes.to(torch.float32) + self.qrange[0]

    def grid(self, levels=None) -> dict:
        qmin, qmax = self.qrange
        c = self.scale_constant
        edges = (-1.0 / c, 1.0 / c) if self.symmetric else (0.0, 1.0 / c)  # absmax / scale = 1 / c
        return dict(levels=[float(q) for q in range(qmin, qmax + 1)], edges=edges)
