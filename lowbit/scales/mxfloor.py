"""MX's shared exponent as torchao 0.18 rounds it by default (``-se8m0fl``): floor, not round-up.

Source: torchao 0.18.0 (the pinned version), ``torchao/prototype/mx_formats/mx_tensor.py``
(``to_mx`` with ``ScaleCalculationMode.FLOOR``, ``get_fp_scale``, ``to_dtype``); docs/shipping.md
("MXFP4 and NVFP4"). Per group (MX's block of 32), with ``emax`` the exponent of the code's largest
power of two (e2m1: 6 = 1.5 x 2**2, emax 2; e4m3: 448, emax 8):

1. ``amax = max |x|`` (torch.amax: a NaN makes it NaN);
2. the e8m0 byte: the fp32 exponent field of amax minus 127, minus ``emax``, clamped to
   [-127, 128], plus 127; NaN gives 255. So the scale is ``2**(floor(log2 amax) - emax)``: values
   up to 2**(emax+1) x the scale map above the code's top and saturate;
3. the ratio ``x / max(2**(byte - 127), 2**-126)`` (torchao clamps the divisor to the smallest normal;
   byte 255 divides by inf), rounded by the code (e2m1: to nearest even, saturating at 6);
4. decoded value ``q x 2**(byte - 127)`` in fp32 (2**-127 for byte 0; NaN for byte 255).

lowbit's own ``-se8m0`` rounds the scale up instead (``lowbit.scales.formats``), as torchao's RCEIL.

    PYTHONPATH=. python -c "from lowbit.scheme import parse_scheme; print(parse_scheme('fp4e2m1-group32-se8m0fl').quant)"
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.scales.base import SCALES, GroupParams, ScaleFormat, from_bytes

E8M0_BIAS = 127
MIN_NORMAL = 2.0 ** -126


@SCALES.register
@dataclass(frozen=True)
class E8M0Floor(ScaleFormat):
    name = "e8m0fl"
    order = 13
    help = "(MX's shared exponent as torchao 0.18's default FLOOR: 2**(floor(log2 amax) - emax))"
    dtype = torch.float8_e8m0fnu
    symmetric_only = True
    saturates = True

    def max_scale(self, spec) -> float:
        return 2.0 ** 127

    def group_params(self, xg, valid, kept, spec, header=None) -> GroupParams:
        amax = torch.where(kept, xg.abs(), 0.0).amax(-1).to(torch.float32)  # NaN propagates
        emax = math.frexp(spec.code.max_ratio)[1] - 1
        field = (amax.view(torch.int32) >> 23) & 0xFF
        biased = (field - E8M0_BIAS - emax).clamp(-E8M0_BIAS, E8M0_BIAS + 1) + E8M0_BIAS
        biased = torch.where(torch.isnan(amax), 255, biased)
        scales = biased.to(torch.uint8).view(torch.float8_e8m0fnu).to(torch.float32)  # 2**(b - 127), NaN at 255
        divisor = torch.clamp((biased.to(torch.int32) << 23).view(torch.float32), min=MIN_NORMAL)
        return GroupParams(scales, wire=biased.to(torch.uint8), encode=divisor)

    def ratios(self, xg, params, spec):
        ratio = xg / params.encode.unsqueeze(-1)
        return torch.where(torch.isnan(ratio), 0.0, ratio), None  # NaN only where the scale is NaN too

    def values(self, q, scales, mins, spec):
        return q * scales

    def write(self, scales, wire, header, spec) -> list:
        return [wire.contiguous().reshape(-1)]

    def read(self, raw, shape, spec):
        return from_bytes(raw, torch.float8_e8m0fnu).float().reshape(shape)
