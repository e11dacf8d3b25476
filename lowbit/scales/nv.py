"""NVFP4's two-level scale as torchao 0.18 computes it (``-snv``): an fp32 tensor scale and an e4m3 per block.

Source: torchao 0.18.0 ``torchao/prototype/mx_formats/nvfp4_tensor.py`` (``nvfp4_quantize``,
``per_tensor_amax_to_scale``, ``NVFP4Tensor.dequantize``); docs/shipping.md ("MXFP4 and NVFP4").
With ``m`` the code's largest value (e2m1: 6) and 448 the e4m3 maximum, all in fp32:

1. the tensor scale ``t = amax(message) / (448 x m)`` (one fp32 header per message, 4 bytes; a NaN
   anywhere makes it NaN; a recipe that quantizes the pieces of one buffer gives them the buffer's,
   ``message_header``);
2. per block, the e4m3 ``e = e4m3(clamp(amax(block) / m / t, 2**-6, 448))``, round to nearest even
   (one byte);
3. the ratio ``clamp(x x ((1 / t) / e), -m, m)``, rounded by the code (e2m1: nearest even);
4. decoded value ``q x (t x e)``.

Caveats kept from torchao: an all-zero message has t = 0 and every block scale NaN; a block whose
largest magnitude is far under the message's is clamped at e = 2**-6.
lowbit's own ``-se4m3`` takes a power-of-two message scale instead (``lowbit.scales.formats``).

    PYTHONPATH=. python -c "from lowbit.scheme import parse_scheme; print(parse_scheme('fp4e2m1-group16-snv').quant)"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.scales.base import SCALES, GroupParams, ScaleFormat, as_bytes, from_bytes

E4M3_MAX = 448.0
E4M3_TINY = 2.0 ** -6  # torch.finfo(float8_e4m3fn).tiny, torchao's lower clamp


@SCALES.register
@dataclass(frozen=True)
class NVFP4Scale(ScaleFormat):
    name = "nv"
    order = 14
    help = "(NVFP4 as torchao: fp32 amax / (448 x max) per message, e4m3 per block, round to nearest)"
    dtype = torch.float8_e4m3fn
    symmetric_only = True
    header = torch.float32

    def max_scale(self, spec) -> float:
        return float("inf")

    def message_header(self, x, spec):
        top = torch.tensor(E4M3_MAX * spec.code.max_ratio, dtype=torch.float32)
        return x.to(torch.float32).abs().max().reshape(()) / top  # torch.max: NaN propagates

    def group_params(self, xg, valid, kept, spec, header=None) -> GroupParams:
        t = self.message_header(torch.where(kept, xg, 0.0), spec) if header is None else header.to(torch.float32)
        top = torch.tensor(spec.code.max_ratio, dtype=torch.float32)
        block = torch.where(kept, xg.abs(), 0.0).amax(-1) / top
        e = (block / t).clamp(E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
        encode = (torch.tensor(1.0, dtype=torch.float32) / t) / e
        return GroupParams(t * e, wire=e, header=t.reshape(()), encode=encode)

    def ratios(self, xg, params, spec):
        top = spec.code.max_ratio
        ratio = (xg * params.encode.unsqueeze(-1)).clamp(-top, top)
        return torch.where(torch.isnan(ratio), 0.0, ratio), None  # NaN only where the scale is NaN too

    def values(self, q, scales, mins, spec):
        return q * scales

    def write(self, scales, wire, header, spec) -> list:
        return [as_bytes(header.reshape(1), self.header), as_bytes(wire, self.dtype)]

    def read(self, raw, shape, spec):
        head = self.header.itemsize
        t = from_bytes(raw[:head], self.header).float()
        return (from_bytes(raw[head:], self.dtype).float() * t).reshape(shape)
