"""The input-cast interface: what a sender does to its partial before the quantizer sees it.

Some shipping codecs do not quantize the partial they are given: QuickReduce casts bf16 partials
to fp16 first (a massive activation then overflows to inf), others read fp8 as it is. A cast
is a small frozen dataclass with a token of its own, written after the scale format
(``<code>-<gran>[-s<fmt>][-<cast>]``), that maps the fp32 partial to the fp32 values the
quantizer sees (``apply``). It costs no bits; ``lowbit.quant`` counts what it makes non-finite
like any other non-finite input.

A cast also names the arithmetic a shipping codec runs in after it (``dtype``, ``round``): QuickReduce
computes its scales, its decoded values and its sum in fp16 after the fp16 cast and in bf16 on
the native path, so its scale format (``lowbit.scales.qr``) and its recipe (``lowbit.comm.recipes``)
ask the cast how to round. ``max_finite`` is the largest magnitude the cast keeps finite and
unclamped (the audit's ``beyond_range_in``; ``lowbit.counters``).

``NoCast`` (no token) is the default: the partial as it is. A new cast is one class in one new
module of this package, registered with ``@CASTS.register``; its ``parse`` reads its token.

    PYTHONPATH=. python -c "from lowbit.casts import CASTS; print(CASTS.names())"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.plugins import Registry

CASTS = Registry("cast", "lowbit.casts")


@dataclass(frozen=True)
class Cast:
    name: ClassVar[str]
    order: ClassVar[int] = 100
    syntax: ClassVar[str] = ""  # the token as the grammar's help writes it ('' for none)
    help: ClassVar[str] = ""
    dtype: ClassVar[torch.dtype | None] = None  # the arithmetic after the cast (None: fp32, lowbit's own)

    @classmethod
    def parse(cls, text: str, pos: int):
        """(cast, end) when ``text`` holds this cast's token at ``pos`` (it starts with '-'), else None."""
        raise NotImplementedError

    @property
    def token(self) -> str:
        """The scheme suffix, '-' included ('' for none)."""
        raise NotImplementedError

    def validate(self, spec) -> None:
        """Refuse a spec this cast cannot precede (none by default)."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 values the quantizer sees, from the fp32 partial ``x``."""
        raise NotImplementedError

    def round(self, t: torch.Tensor) -> torch.Tensor:
        """fp32 ``t`` (one operation's exact-enough fp32 result) rounded once to ``dtype`` with this
        cast's overflow rule, as fp32: the arithmetic of a codec that runs after the cast."""
        return t

    @property
    def max_finite(self) -> float:
        """The largest magnitude that passes the cast finite and unclamped."""
        return float("inf")


@CASTS.register
@dataclass(frozen=True)
class NoCast(Cast):
    """The partial as it is (the default; no token)."""

    name = "none"
    order = 0

    @classmethod
    def parse(cls, text: str, pos: int):
        return None  # nothing to read: the absence of a cast token

    @property
    def token(self) -> str:
        return ""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x
