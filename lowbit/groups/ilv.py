"""QuickReduce's interleaved groups ``ilv<G>``: the even and the odd positions of each aligned block of 2G.

Source: vLLM ``csrc/quickreduce/quick_reduce_impl.cuh`` at 0bf6342e and ``base.h`` at 1e8e8604
(docs/shipping.md, "QuickReduce", Layout): eight consecutive threads form a quantization group, and
each thread's 8 fp16 values sit in four 32-bit words whose low and high halves are reduced
separately. So in every aligned block of 64 values of the message's flat buffer, **the 32 even
positions share one scale and the 32 odd positions another**; neighbouring values never share one.

==========  =====================================================================================
message     the T x W values one rank sends, row-major, cut into blocks of 2G from its start
groups      block b: group 2b = its even positions, group 2b + 1 = its odd positions
padding     a last block shorter than 2G is filled with zeros that are not part of the message
            (no code or scale of them travels; QuickReduce's recipe pads whole 16384-value tiles
            itself, ``lowbit.comm.recipes``)
scales      2 per block, in group order
==========  =====================================================================================

    PYTHONPATH=. python -c "from lowbit.groups.ilv import Interleaved; g = Interleaved(32); print(g, g.n_scales(1, 128))"
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.groups.base import GROUPS, SizedGrouping


@GROUPS.register
@dataclass(frozen=True)
class Interleaved(SizedGrouping):
    name = "ilv"
    prefix = "ilv"
    order = 4
    syntax = "ilv<G>"
    help = "QuickReduce's groups: the even and the odd positions of each aligned block of 2G values (any width)"
    group_size: int = 32

    def _blocks(self, count: int) -> int:
        return math.ceil(count / (2 * self.group_size))

    def n_scales(self, tokens: int, width: int) -> int:
        return 2 * self._blocks(tokens * width)

    def scale_shape(self, tokens: int, width: int) -> tuple[int, ...]:
        return (self.n_scales(tokens, width),)

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        pad = self._blocks(t.numel()) * 2 * self.group_size - t.numel()
        return torch.cat([t.reshape(-1), t.new_zeros(pad)])

    def group(self, x: torch.Tensor, valid: torch.Tensor):
        g = self.group_size
        return (self._pad(x).reshape(-1, g, 2).transpose(1, 2).reshape(-1, g),
                self._pad(valid).reshape(-1, g, 2).transpose(1, 2).reshape(-1, g))

    def ungroup(self, grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        g = self.group_size
        return grouped.reshape(-1, 2, g).transpose(1, 2).reshape(-1)[:math.prod(shape)].reshape(shape)

    def expand(self, scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        per_group = scales.reshape(-1, 1).expand(-1, self.group_size)
        return self.ungroup(per_group, shape)
