"""The normal-quantile codebook ``nf<B>`` (NF4-style, QLoRA): an index into the fixed table of
``lowbit.codebook`` (B in 3, 4).

Symmetric: scale = absmax (c = 1, rounded up to the scale format like any scale), the code is the
index of the entry nearest ``x / scale`` (ties to the lower entry) and decodes to
``entry * scale``. Its signed code q = index - zero_index, so ``qrange`` is
(-zero_index, 2**B - 1 - zero_index) and the stored code q - qmin is the index itself; NaN,
+-Inf, zero scales and excluded features behave exactly as for the uniform grid (NaN and
all-zero groups decode to the exact zero entry).

    PYTHONPATH=. python -c "from lowbit.codes.nf import NfCode; print(NfCode(4).grid()['levels'][:3])"
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit import codebook
from lowbit.codes.base import CODES, Code, check_codebook

_RE = re.compile(r"nf(\d+)(a?)")


@CODES.register
@dataclass(frozen=True)
class NfCode(Code):
    name = "nf"
    order = 1
    syntax = "nf<B>"
    help = "normal-quantile codebook (NF-style), B in 3,4; symmetric"
    guide = """\
nf<B> (non-uniform code, as NF4 in QLoRA): the code is an index into a fixed codebook of
2**B values in [-1, 1] (lowbit.codebook: normal quantiles with an exact zero), scaled
by the absmax of the feature (static) / token / group. "Static per layer/module" means the
codebook is a constant: it never changes per message or per site; a different code at one
site is a per-site override (;L28.down_proj=nf3-token). Symmetric only; rounds to the
nearest entry; no stochastic rounding; never the two-shot second leg (that is int or fp)."""

    @classmethod
    def parse(cls, text: str, pos: int):
        m = _RE.match(text, pos)
        return (cls(int(m.group(1)), m.group(2) != "a"), m.end()) if m else None

    @classmethod
    def choices(cls) -> list["NfCode"]:
        return [cls(b) for b in codebook.CODEBOOK_BITS]

    def __str__(self) -> str:
        return f"nf{self.bits}{'' if self.symmetric else 'a'}"

    def validate(self, spec) -> None:
        check_codebook(self, spec, "nf", codebook.CODEBOOK_BITS, "the nf codebook is symmetric around an exact zero; "
                                                                 "allowed: nf<B> without 'a'")

    @property
    def qrange(self) -> tuple[int, int]:
        z = codebook.zero_index(self.bits)
        return -z, 2**self.bits - 1 - z

    def encode(self, ratio: torch.Tensor, *, seed: int | None = None, levels=None) -> torch.Tensor:
        self.check_levels(levels)
        return (codebook.nearest_index(ratio, self.bits) + self.qrange[0]).to(torch.float32)

    def decode(self, codes: torch.Tensor, *, levels=None) -> torch.Tensor:
        return codebook.decode_values(codes, self.bits)

    def grid(self, levels=None) -> dict:
        return dict(levels=codebook.codebook(self.bits).tolist(), edges=(-1.0, 1.0))
