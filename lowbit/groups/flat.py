"""The flat grouping ``flat<G>``: one dynamic scale per G values of the flattened message.

FlashInfer's quantized all-reduce and TensorRT-LLM's low-precision all-reduce scale the flat
buffer, not the rows: G consecutive values of the message in memory order share a scale,
whatever the hidden size. So G need not divide the hidden size (256 and 496 divide neither
576 nor 640), and the last group of a message may be shorter.

==========  ====================================================================================
message     the T x W values one rank sends (gather: its partial; two-shot: one chunk), row-major
groups      values [g*G, (g+1)*G) of that buffer, g = 0 .. ceil(T*W / G) - 1; the last one holds
            the remaining T*W - (n-1)*G values (fewer than G when G does not divide T*W)
scales      ceil(T*W / G) per message, one per group, all sent (the short group's too: counted in
            the bytes), in the scale format
outliers    BF16 columns keep their places in the buffer and take no part in their group's range
==========  ====================================================================================

    PYTHONPATH=. python -c "from lowbit.groups.flat import Flat; g = Flat(256); print(g, g.n_scales(8, 576))"
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.groups.base import GROUPS, SizedGrouping


@GROUPS.register
@dataclass(frozen=True)
class Flat(SizedGrouping):
    name = "flat"
    prefix = "flat"
    order = 3
    syntax = "flat<G>"
    help = "one dynamic scale per G values of the flattened message (any width; the last group may be shorter)"
    group_size: int = 256

    def n_scales(self, tokens: int, width: int) -> int:
        return math.ceil(tokens * width / self.group_size)

    def scale_shape(self, tokens: int, width: int) -> tuple[int, ...]:
        return (self.n_scales(tokens, width),)

    def group(self, x: torch.Tensor, valid: torch.Tensor):
        n = math.ceil(x.numel() / self.group_size)
        pad = n * self.group_size - x.numel()  # the short last group's missing values: zero, never valid
        xg = torch.cat([x.reshape(-1), x.new_zeros(pad)]).reshape(n, self.group_size)
        vg = torch.cat([valid.reshape(-1), valid.new_zeros(pad)]).reshape(n, self.group_size)
        return xg, vg

    def ungroup(self, grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return grouped.reshape(-1)[:math.prod(shape)].reshape(shape)

    def expand(self, scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return scales.reshape(-1).repeat_interleave(self.group_size)[:math.prod(shape)].reshape(shape)
