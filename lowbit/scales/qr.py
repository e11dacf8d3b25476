"""QuickReduce's scale rule (``-sqr``): a group's signed extreme maps to the lowest code, in fp16 (or bf16).

Source: vLLM ``csrc/quickreduce/quick_reduce_impl.cuh`` at 0bf6342e and ``base.h`` at 1e8e8604 (the
group max, the packed arithmetic), ROCm aiter ``csrc/include/quick_all_reduce.cuh`` at e4048607;
docs/shipping.md ("QuickReduce") reads them step by step. Per group, with the code's
``qmax = 2**(B-1)`` (``lowbit.codes.qint``) and every operation rounded once to the kernel's dtype
(the input cast's: ``-f16`` / ``-f16sat`` fp16, ``-bf16`` bf16; ``lowbit.casts``):

1. ``wmax`` = maxNum over the group, ``wmin`` = minNum (NaN ignored, inf counted);
2. the signed extreme ``e = wmax`` if ``|wmax| > |wmin|`` (strictly), else ``wmin``;
3. decoding scale ``d = rnd(e * (-1 / qmax))`` (the extreme lands on the lowest code, whatever its
   sign; a value of the other sign and the same magnitude clips one step short), sent in the
   kernel's dtype (2 bytes);
4. encoding scale ``s = rnd(1 / rnd(d + eps))``, eps = 2**-24 in fp16 (``0x0001``), bf16 ``0x33D7``
   (about 1.0e-7);
5. ratio ``rnd(x * s)`` (NaN stays: the code sends it to the lowest code), decoded value
   ``rnd(q * d)``.

*Assumption* (as docs/shipping.md): the reciprocal is correctly rounded. Computing each operation in
fp32 and rounding to fp16 gives the correctly rounded fp16 result (24 >= 2 x 11 + 2 bits: double
rounding is innocuous), so this equals the kernel's fp16 arithmetic; the bf16 kernels compute in
fp32 and round to bf16, as here. Overflow follows the cast: ``-f16`` inf (so 1/d of a tiny group is
inf, the reciprocal cliff of SGLang #40084), ``-f16sat`` +-65504 (gfx942).

    PYTHONPATH=. python -c "from lowbit.scheme import parse_scheme; print(parse_scheme('qint4-ilv32-sqr-f16').quant)"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.plugins import SchemeError
from lowbit.scales.base import SCALES, GroupParams, ScaleFormat, as_bytes, from_bytes, kept_values

# the epsilon added to the decoding scale before the reciprocal, as the bit pattern of the kernel's dtype
_EPSILON_BITS = {torch.float16: 0x0001, torch.bfloat16: 0x33D7}


def epsilon(dtype: torch.dtype) -> float:
    """The kernel's epsilon: fp16 0x0001 (2**-24), bf16 0x33D7 (about 1.0e-7)."""
    return float(torch.tensor(_EPSILON_BITS[dtype], dtype=torch.int16).view(dtype).to(torch.float32))


@SCALES.register
@dataclass(frozen=True)
class QuickReduceScale(ScaleFormat):
    name = "qr"
    order = 10
    help = "(QuickReduce: the signed extreme to the lowest code, 1 / (d + eps), in the cast's fp16 / bf16)"
    dtype = torch.float16  # 2 bytes; the values travel in the cast's dtype (fp16 or bf16)
    symmetric_only = True
    saturates = True  # a value of the extreme's opposite sign can pass the top code: counted as clamped
    takes_nan = True

    def validate(self, spec) -> None:
        super().validate(spec)
        if spec.cast.dtype not in _EPSILON_BITS:
            raise SchemeError("cast", "-sqr computes in the kernel's dtype, which the input cast names; allowed: "
                                      "-f16, -f16sat (fp16) or -bf16 (the native bf16 path)")
        lo, hi = spec.code.qrange
        if not spec.code.takes_nan or lo != -(hi + 1):
            raise SchemeError("code", f"{spec.code} not allowed with -sqr (it maps a group's extreme to the lowest "
                                      "code -2**(B-1) and needs a code that sends NaN there itself); allowed: qint<B>")

    def max_scale(self, spec) -> float:
        return float(torch.finfo(spec.cast.dtype).max)

    def group_params(self, xg, valid, kept, spec, header=None) -> GroupParams:
        rnd = spec.cast.round
        use = kept_values(xg, valid, kept)
        wmax = torch.where(use, xg, -torch.inf).amax(-1)
        wmin = torch.where(use, xg, torch.inf).amin(-1)
        extreme = torch.where(wmax.abs() > wmin.abs(), wmax, wmin)
        extreme = torch.where(use.any(-1), extreme, torch.nan)  # every value NaN: maxNum gives NaN
        qmax = -spec.code.qrange[0]
        d = rnd(extreme * (-1.0 / qmax))
        s = rnd(1.0 / rnd(d + epsilon(spec.cast.dtype)))
        return GroupParams(d, wire=d, encode=s)

    def ratios(self, xg, params, spec):
        return spec.cast.round(xg * params.encode.unsqueeze(-1)), None

    def values(self, q, scales, mins, spec):
        return spec.cast.round(q * scales)

    def write(self, scales, wire, header, spec) -> list:
        return [as_bytes(scales, spec.cast.dtype)]

    def read(self, raw, shape, spec):
        return from_bytes(raw, spec.cast.dtype).float().reshape(shape)
