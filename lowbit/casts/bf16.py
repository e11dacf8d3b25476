"""The native bf16 path of a shipping codec (``-bf16``): values stay bf16, the codec computes in bf16.

vLLM's QuickReduce runs its bf16 kernels when ``VLLM_ROCM_QUICK_REDUCE_CAST_BF16_TO_FP16=0``
(vLLM ``csrc/quickreduce/quick_reduce_impl.cuh`` at 0bf6342e: each operation computed in fp32 and
rounded to bf16, round to nearest even; docs/shipping.md). The cast rounds the partial to bf16 (the
identity on a partial the engine already holds in bf16) and names bf16 as the arithmetic of what
follows (``round``): QuickReduce's scale rule with its bf16 epsilon (``lowbit.scales.qr``) and its
bf16 sum (``lowbit.comm.recipes``). Values past bf16's largest finite value become inf.

    PYTHONPATH=. python -c "import torch; from lowbit.casts.bf16 import BF16Cast; print(BF16Cast().apply(torch.tensor([1.00390625, 70144.3])))"
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.casts.base import CASTS, Cast

_TOKEN = re.compile(r"-bf16(?=[-@]|$)")


@CASTS.register
@dataclass(frozen=True)
class BF16Cast(Cast):
    name = "bf16"
    order = 2
    syntax = "-bf16"
    help = "the partial in bf16 and the codec's arithmetic in bf16 (QuickReduce's native path)"
    dtype = torch.bfloat16

    @classmethod
    def parse(cls, text: str, pos: int):
        m = _TOKEN.match(text, pos)
        return (cls(), m.end()) if m else None

    @property
    def token(self) -> str:
        return "-bf16"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.round(x)

    def round(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).to(torch.float32)  # round to nearest even; overflow gives inf

    @property
    def max_finite(self) -> float:
        return float(torch.finfo(torch.bfloat16).max)
