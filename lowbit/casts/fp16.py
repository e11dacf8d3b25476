"""The bf16 -> fp16 input cast of vLLM's QuickReduce (``-f16``; ``-f16sat`` with gfx942's clamp).

Source: vLLM ``csrc/quickreduce/quick_reduce_impl.cuh`` at 0bf6342e (the two-shot kernel's
``cast_bf2half``: each bf16 value goes through fp32 to fp16 with ``__float22half2_rn``, round to
nearest even) and ``csrc/quickreduce/base.h`` at 1e8e8604 (``set_fp16_ovfl``); vLLM's
``VLLM_ROCM_QUICK_REDUCE_CAST_BF16_TO_FP16`` defaults to true (``vllm/envs.py``). docs/shipping.md
has the details.

==========  ===========================================================================================
token       what a value beyond fp16's 65504 becomes (here and in every fp16 operation after the cast)
==========  ===========================================================================================
``-f16``    inf (IEEE): what gfx950 (MI350/355) and every GPU other than gfx942 do, and what users
            reported (vLLM #55345, SGLang #34473): the value's whole QuickReduce group decodes to inf/NaN
``-f16sat`` +-65504: gfx942 (MI300), where the kernel sets MODE.FP16_OVFL; a true inf stays inf
            (*assumption*, as docs/shipping.md: the bit also clamps the fp32 -> fp16 conversion)
==========  ===========================================================================================

After the cast the codec computes in fp16 (``dtype``, ``round``): QuickReduce's scale rule
(``lowbit.scales.qr``) and its fp16 sum (``lowbit.comm.recipes``) round every operation here.
The partial is expected as the engine holds it, bf16 (the recipes round lowbit's fp32 partials to
bf16 first); on an fp32 partial the cast rounds once, fp32 -> fp16.

    PYTHONPATH=. python -c "import torch; from lowbit.casts.fp16 import F16Cast; \\
        print(F16Cast().apply(torch.tensor([70144.0, 1.0])), F16Cast(True).apply(torch.tensor([70144.0])))"
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.casts.base import CASTS, Cast

FP16_MAX = float(torch.finfo(torch.float16).max)
_TOKEN = re.compile(r"-f16(sat)?(?=[-@]|$)")


@CASTS.register
@dataclass(frozen=True)
class F16Cast(Cast):
    name = "f16"
    order = 1
    syntax = "-f16 | -f16sat"
    help = ("the partial cast to fp16 and the codec's arithmetic in fp16 (QuickReduce's default): past 65504 "
            "-f16 gives inf (gfx950), -f16sat clamps to 65504 (gfx942's FP16_OVFL)")
    dtype = torch.float16
    saturate: bool = False

    @classmethod
    def parse(cls, text: str, pos: int):
        m = _TOKEN.match(text, pos)
        return (cls(m.group(1) is not None), m.end()) if m else None

    @property
    def token(self) -> str:
        return "-f16sat" if self.saturate else "-f16"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.round(x)

    def round(self, t: torch.Tensor) -> torch.Tensor:
        r = t.to(torch.float16).to(torch.float32)  # round to nearest even; IEEE overflow gives inf
        if self.saturate:  # FP16_OVFL: a finite result past the top clamps, a true inf (or NaN) stays
            r = torch.where(torch.isinf(r) & torch.isfinite(t), torch.copysign(torch.tensor(FP16_MAX), t), r)
        return r

    @property
    def max_finite(self) -> float:
        return FP16_MAX
