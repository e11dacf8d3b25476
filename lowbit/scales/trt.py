"""TensorRT-LLM's low-precision all-reduce scale (``-strt``): the fp32 encoding scale, sent in a 16-byte lane.

Source: NVIDIA/TensorRT-LLM ``cpp/tensorrt_llm/kernels/communicationKernels/customLowPrecisionAllReduceKernels.cu``
at 1a43c7d6 (header at 222c4a95); the guide "Low-Precision-AllReduce"
(``AllReduceStrategy.LOWPRECISION``, for PCIe systems); docs/shipping.md ("TensorRT-LLM"). A warp
quantizes 496 values (31 lanes x 16 fp8) and lane 32 carries the scale, so a group is 512 bytes:
the scale takes a 16-byte lane slot (``section_bytes``). Per group, in fp32, with ``m`` the code's
largest value (448):

1. ``amax = maxNum |x|`` starting from 0 (NaN ignored, inf counted);
2. ``s = m / amax``, or 0 when amax is 0; ``s`` travels;
3. the ratio ``x * s`` (``x`` itself when s = 0: "no scaling"); the code rounds it (``f8e4m3``:
   ``__nv_fp8_e4m3(float)``, satfinite);
4. decoded value ``q / s`` (``q`` when s = 0) (*assumption*: IEEE division, no fast math).

An inf gives ``s = m / inf = 0``: its group travels unscaled, inf and every value past 448 saturate
to 448, values under the e4m3 subnormal step vanish, and the result stays finite.

    PYTHONPATH=. python -c "from lowbit.scheme import parse_scheme; print(parse_scheme('f8e4m3-pad496-strt').quant)"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.plugins import SchemeError
from lowbit.scales.base import SCALES, GroupParams, ScaleFormat, kept_values

LANE_BYTES = 16  # the scale's slot: one lane's 16-byte vector


@SCALES.register
@dataclass(frozen=True)
class TensorRTScale(ScaleFormat):
    name = "trt"
    order = 12
    help = "(TensorRT-LLM: fp32 max / amax sent in a 16-byte lane, decoded by division; amax 0 or inf: unscaled)"
    dtype = torch.float32
    symmetric_only = True
    saturates = True  # an unscaled group (an inf in it) saturates values past the code's top
    takes_nan = True

    def validate(self, spec) -> None:
        super().validate(spec)
        if not spec.code.takes_nan:
            raise SchemeError("code", f"{spec.code} not allowed with -strt (its ratios keep NaN); allowed: f8e4m3, "
                                      "f8e5m2")

    def section_bytes(self, n_scales: int) -> int:
        return n_scales * LANE_BYTES

    def write(self, scales, wire, header, spec) -> list:
        lanes = torch.zeros(scales.numel(), LANE_BYTES, dtype=torch.uint8, device=scales.device)
        lanes[:, :4] = scales.to(torch.float32).contiguous().reshape(-1, 1).view(torch.uint8)
        return [lanes.reshape(-1)]

    def read(self, raw, shape, spec):
        return raw.reshape(-1, LANE_BYTES)[:, :4].clone().reshape(-1).view(torch.float32).reshape(shape)

    def max_scale(self, spec) -> float:
        return float("inf")  # the scale is m / amax: any finite amax has one

    def group_params(self, xg, valid, kept, spec, header=None) -> GroupParams:
        use = kept_values(xg, valid, kept)
        amax = torch.where(use, xg.abs(), 0.0).amax(-1)
        top = torch.tensor(spec.code.max_ratio, dtype=torch.float32)
        s = torch.where(amax != 0, top / torch.where(amax != 0, amax, 1.0), 0.0)
        return GroupParams(s, encode=s)

    def ratios(self, xg, params, spec):
        s = params.encode.unsqueeze(-1)
        return torch.where(s != 0, xg * s, xg), None

    def values(self, q, scales, mins, spec):
        return torch.where(scales != 0, q / torch.where(scales != 0, scales, 1.0), q)
