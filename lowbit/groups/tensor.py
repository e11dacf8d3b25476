"""One group per message ``tensor`` (torchao's ``PerTensor``): every value of the message shares one scale.

With ``-snone`` (``lowbit.scales.none``) nothing about the scale travels: NCCL's fp8 all-reduce
sends the fp8 tensor as it is. With another scale format the message carries one scale.

    PYTHONPATH=. python -c "from lowbit.groups.tensor import PerTensor; print(PerTensor().n_scales(8, 576))"
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.groups.base import GROUPS, Grouping


@GROUPS.register
@dataclass(frozen=True)
class PerTensor(Grouping):
    name = "tensor"
    order = 6
    syntax = "tensor"
    help = "one dynamic scale for the whole message"

    @classmethod
    def parse(cls, text: str, pos: int):
        return (cls(), pos + 6) if text.startswith("tensor", pos) else None

    def __str__(self) -> str:
        return "tensor"

    def n_scales(self, tokens: int, width: int) -> int:
        return 1 if tokens * width else 0

    def scale_shape(self, tokens: int, width: int) -> tuple[int, ...]:
        return (self.n_scales(tokens, width),)

    def group(self, x: torch.Tensor, valid: torch.Tensor):
        return x.reshape(1, -1), valid.reshape(1, -1)

    def ungroup(self, grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return grouped.reshape(-1)[:math.prod(shape)].reshape(shape)

    def expand(self, scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return scales.reshape(-1)[:1].expand(math.prod(shape)).reshape(shape)
