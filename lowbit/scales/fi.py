"""FlashInfer's FP8 block scale (``-sfi``): fp32, amax floored at 1e-12, two divisions.

Source: flashinfer-ai/flashinfer ``flashinfer/comm/quantized_allreduce.py`` (added in b190523e,
PR #3759; unchanged at fb28d724, 0.6.18 nightly), the Triton kernel ``_fp8_blockscale_2shot_kernel``;
docs/shipping.md ("FlashInfer"). Per group, in fp32, with ``m`` the code's largest value (448 for
``f8e4m3``):

1. ``amax = max(maxNum |x|, 1e-12)`` (NaN ignored, inf counted);
2. the stored (dequantizing) scale ``amax / m`` and the quantizing scale ``m / amax``: two separate
   divisions, not one the reciprocal of the other (*assumption*: IEEE division);
3. the ratio ``clamp(x * (m / amax), -m, m)`` (NaN passes the clamp as NaN, *assumption*), which the
   code rounds (``f8e4m3``: ``cvt.rn.satfinite``);
4. decoded value ``q * (amax / m)`` in fp32 (the kernel's leg-1 sum fuses it into an FMA:
   ``lowbit.comm.recipes``).

An inf makes its group's amax inf, the quantizing scale 0 and the stored one inf: every value of the
group decodes to 0 x inf or NaN x inf, NaN. 4 bytes per scale.

    PYTHONPATH=. python -c "from lowbit.scheme import parse_scheme; print(parse_scheme('f8e4m3-flat256-sfi').quant)"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.plugins import SchemeError
from lowbit.scales.base import SCALES, GroupParams, ScaleFormat, kept_values

AMAX_FLOOR = 1e-12


@SCALES.register
@dataclass(frozen=True)
class FlashInferScale(ScaleFormat):
    name = "fi"
    order = 11
    help = "(FlashInfer: fp32 max(amax, 1e-12) / max, quantized with max / amax, clamped)"
    dtype = torch.float32
    symmetric_only = True
    takes_nan = True

    def validate(self, spec) -> None:
        super().validate(spec)
        if not spec.code.takes_nan:
            raise SchemeError("code", f"{spec.code} not allowed with -sfi (its ratios keep NaN); allowed: f8e4m3, f8e5m2")

    def group_params(self, xg, valid, kept, spec, header=None) -> GroupParams:
        use = kept_values(xg, valid, kept)
        amax = torch.where(use, xg.abs(), 0.0).amax(-1).clamp(min=torch.tensor(AMAX_FLOOR, dtype=torch.float32))
        top = torch.tensor(spec.code.max_ratio, dtype=torch.float32)
        return GroupParams(amax / top, encode=top / amax)

    def ratios(self, xg, params, spec):
        top = spec.code.max_ratio
        return (xg * params.encode.unsqueeze(-1)).clamp(-top, top), None

    def values(self, q, scales, mins, spec):
        return q * scales
