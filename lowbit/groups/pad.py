"""Padded flat groups ``pad<G>``: G consecutive values of the message, the last group zero-padded and sent whole.

TensorRT-LLM's low-precision all-reduce (``customLowPrecisionAllReduceKernels.cu`` at 1a43c7d6;
docs/shipping.md, "TensorRT-LLM") quantizes a warp's 496 values (31 lanes x 16 fp8) at a time; the
last warp of a shard reads zeros past its end and still sends all 31 lanes. So the groups are those
of ``flat<G>`` (``lowbit.groups.flat``) and the codes of the padding travel too (``padding``):
a message of n values sends ceil(n / G) x G codes.

    PYTHONPATH=. python -c "from lowbit.groups.pad import Padded; g = Padded(496); print(g, g.n_scales(1, 1000), g.padding(1, 1000))"
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.groups.base import GROUPS
from lowbit.groups.flat import Flat


@GROUPS.register
@dataclass(frozen=True)
class Padded(Flat):
    name = "pad"
    prefix = "pad"
    order = 5
    syntax = "pad<G>"
    help = "as flat<G>, but the last group is zero-padded to G and its padding's codes are sent (TensorRT-LLM)"
    group_size: int = 496

    def padding(self, tokens: int, width: int) -> int:
        return self.n_scales(tokens, width) * self.group_size - tokens * width
