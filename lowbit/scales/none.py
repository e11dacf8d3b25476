"""No scale (``-snone``): the code holds the values as they are, and nothing about a scale travels.

NCCL's fp8 all-reduce (``ncclFloat8e4m3`` / ``ncclFloat8e5m2``, NCCL >= 2.24.3) reduces the fp8
tensor its caller cast, with no scaling at all (docs/shipping.md, "NCCL's fp8 all-reduce"): the
scale is 1 for every value, 0 bytes; the ratio is the value itself (NaN kept), decoded as the code's
value. With ``f8e4m3`` a value past 448 saturates (counted as clamped), with ``f8e5m2`` one past
57344 overflows to inf.

    PYTHONPATH=. python -c "from lowbit.scheme import parse_scheme; print(parse_scheme('f8e4m3-tensor-snone').quant)"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.plugins import SchemeError
from lowbit.scales.base import SCALES, GroupParams, ScaleFormat


@SCALES.register
@dataclass(frozen=True)
class NoScale(ScaleFormat):
    name = "none"
    order = 15
    help = "(unscaled: the values as they are, 0 bytes; NCCL's fp8 all-reduce)"
    dtype = torch.float32  # nominal: nothing is written
    symmetric_only = True
    takes_nan = True

    def validate(self, spec) -> None:
        super().validate(spec)
        if not spec.code.takes_nan:
            raise SchemeError("code", f"{spec.code} not allowed with -snone (its ratios keep NaN); allowed: f8e4m3, "
                                      "f8e5m2")

    def section_bytes(self, n_scales: int) -> int:
        return 0

    def max_scale(self, spec) -> float:
        return 1.0

    def group_params(self, xg, valid, kept, spec, header=None) -> GroupParams:
        return GroupParams(torch.ones(xg.shape[:-1], dtype=torch.float32, device=xg.device))

    def ratios(self, xg, params, spec):
        return xg, None

    def values(self, q, scales, mins, spec):
        return q

    def write(self, scales, wire, header, spec) -> list:
        return []

    def read(self, raw, shape, spec):
        return torch.ones(shape, dtype=torch.float32, device=raw.device)
