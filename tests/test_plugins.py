"""A new code, scale format or input cast is one class in one module: registered, the grammar parses
and prints it, the quantizer runs it, the layout counts it and the kernels leave it alone, with no
edit anywhere else (lowbit.codes.base says how; lowbit/groups/flat.py is the real grouping added
that way).

    .venv/bin/python -m pytest tests/test_plugins.py -q

The parts below are written here, as a new module would be, and taken out of their registries
after each test.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from lowbit.casts.base import CASTS, Cast
from lowbit.codes.base import CODES, Code
from lowbit.plugins import SchemeError
from lowbit.quant import dequantize, quantize, round_half_even
from lowbit.scales.base import SCALES, ScaleFormat, float_toward
from lowbit.scheme import QuantSpec, parse_scheme
from lowbit.wire.payload import encode, layout
from tests.helpers import assert_close_verbose


@dataclass(frozen=True)
class TernaryCode(Code):
    """Codes -1, 0, +1 in 2 bits, scale = absmax: a code with its own token and its own check."""

    name = "tern"
    syntax = "tern"
    help = "ternary code, -1 / 0 / +1 times the absmax"

    @classmethod
    def parse(cls, text, pos):
        return (cls(2), pos + 4) if text.startswith("tern", pos) else None

    def __str__(self):
        return "tern"

    def validate(self, spec):
        if self.bits != 2:
            raise SchemeError("bits", f"{self.bits!r} not allowed for tern; allowed: 2")
        super().validate(spec)

    @property
    def qrange(self):
        return -1, 1

    def encode(self, ratio, *, seed=None, levels=None):
        return torch.clamp(round_half_even(ratio), -1, 1)

    def decode(self, codes, *, levels=None):
        return codes.to(torch.float32) - 1

    def grid(self, levels=None):
        return dict(levels=[-1.0, 0.0, 1.0], edges=(-1.0, 1.0))


@dataclass(frozen=True)
class E5M2Scale(ScaleFormat):
    """float8_e5m2 scales (1 byte each, wide range), rounded up and saturating."""

    name = "e5m2"
    dtype = torch.float8_e5m2
    symmetric_only = True
    saturates = True

    def _round(self, t, up):
        return float_toward(t, self.dtype, up)


@dataclass(frozen=True)
class Fp16Cast(Cast):
    """The sender casts its fp32 partial to fp16 first (values past 65504 become inf, as vLLM's cast)."""

    name = "fp16"
    syntax = "-cfp16"
    help = "the partial cast to fp16 first (overflows to inf)"

    @classmethod
    def parse(cls, text, pos):
        return (cls(), pos + 6) if re.match(r"-cfp16(?=[-@]|$)", text[pos:]) else None

    @property
    def token(self):
        return "-cfp16"

    def apply(self, x):
        return x.to(torch.float16).to(torch.float32)


@pytest.fixture
def plugged():
    """The three parts registered as if their modules had been dropped into the packages."""
    for registry, cls in ((CODES, TernaryCode), (SCALES, E5M2Scale), (CASTS, Fp16Cast)):
        registry.register(cls)
    yield
    for registry, cls in ((CODES, TernaryCode), (SCALES, E5M2Scale), (CASTS, Fp16Cast)):
        registry.unregister(cls.name)


def test_a_new_code_parses_quantizes_and_is_counted(plugged):
    s = parse_scheme("tern-group8")
    assert str(s) == "tern-group8" and isinstance(s.quant.code, TernaryCode)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    res = quantize(x, s.quant)
    y = dequantize(res.codes, s.quant, res.scales)
    assert set(y.div(res.scales.repeat_interleave(8, -1)).unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert_close_verbose(y, x, atol=res.scales.repeat_interleave(8, -1) / 2 * (1 + 2**-20))  # half a step: absmax / 2
    payload, _ = encode(x, s.quant)
    assert payload.numel() == layout(4, 32, s.quant).total_bytes == 4 * 4 * 2 + 4 * 32 * 2 // 8
    with pytest.raises(SchemeError, match="rounding"):
        parse_scheme("tern-token-sr")  # the base Code refuses stochastic rounding unless a code allows it
    from kernels import dispatch
    assert dispatch.backend("cpu", s.quant) == "reference"  # no kernel_key: lowbit's torch path


def test_a_new_scale_format_and_a_new_cast_are_parsed_printed_and_applied(plugged):
    s = parse_scheme("int4-token-se5m2-cfp16")
    assert str(s) == "int4-token-se5m2-cfp16" and parse_scheme(str(s)) == s
    assert layout(3, 16, s.quant).scales.nbytes == 3  # one e5m2 byte per token
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    x[1, 4] = 1e6  # past fp16's 65504: the cast makes it inf
    res = quantize(x, s.quant)
    assert res.nonfinite == 1 and torch.isfinite(res.scales).all()
    with pytest.raises(SchemeError, match="e5m2 not allowed with an asymmetric code"):
        QuantSpec(4, False, "token", scale=E5M2Scale())  # the base format's check: no sign for the mins
    with pytest.raises(SchemeError, match="scale_format"):
        parse_scheme("int4-static-se5m2")  # static scales never travel: the grouping says so
