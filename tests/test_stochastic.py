"""Stochastic rounding (-sr): unbiased over seeds, within one step, the same NaN/Inf policy and
scales as round-to-nearest, reproducible per seed, and the payload layout unchanged."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.comm.collectives import QuantCommunicator
from lowbit.site import Site
from lowbit.comm.dist import ThreadWorld
from lowbit.wire.payload import encode, layout
from lowbit.codes.int import qrange
from lowbit.quant import dequantize, quantize, stochastic_round
from lowbit.scheme import QuantSpec, SchemeError, parse_scheme
from tests.collective_cases import partials
from tests.helpers import assert_close_verbose

DYNAMIC = [QuantSpec(4, True, "token"), QuantSpec(3, False, "group", 8), QuantSpec(2, True, "group", 4)]


def sr(spec: QuantSpec) -> QuantSpec:
    return replace(spec, rounding="stochastic")


def _step(spec: QuantSpec, res) -> torch.Tensor:
    """Per-value quantization step [T, H] (the scale each value used)."""
    scales = res.scales
    if spec.granularity == "token":
        return scales[:, None].expand(res.codes.shape)
    return scales.repeat_interleave(spec.group_size, -1)


rows = st.integers(1, 4)
values = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(DYNAMIC), rows, st.data())
def test_error_is_below_one_step(spec, t, data):
    x = torch.tensor(data.draw(st.lists(values, min_size=t * 16, max_size=t * 16)), dtype=torch.float32).reshape(t, 16)
    seed = data.draw(st.integers(0, 2**31))
    res = quantize(x, sr(spec), seed=seed)
    out = dequantize(res.codes, spec, res.scales, res.mins)
    step = _step(spec, res)
    # floor(v + u) is within one code of v; fp32 rounding of v = x / scale and of q * scale
    # (and + lo) adds a few ulps of the value itself.
    assert_close_verbose(out, x, atol=step * (1 + 1e-5) + 1e-6 * x.abs(), msg=str(spec))


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(DYNAMIC), st.integers(0, 10_000))
def test_unbiased_in_expectation_over_seeds(spec, base_seed):
    gen = torch.Generator().manual_seed(base_seed)
    x = torch.randn(2, 16, generator=gen) * 3
    n = 400
    total = torch.zeros_like(x)
    for k in range(n):
        res = quantize(x, sr(spec), seed=base_seed * n + k)
        total += dequantize(res.codes, spec, res.scales, res.mins)
    mean = total / n
    res = quantize(x, spec)
    step = _step(spec, res)
    # Unbiased only inside the code range: the symmetric grid puts +absmax at qmax + 1/2
    # (scale = 2 absmax / (2^b - 1)), which always clamps down; leave those values out.
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    shifted = x if spec.symmetric else x - (res.mins[:, None] if spec.granularity == "token"
                                            else res.mins.repeat_interleave(spec.group_size, -1))
    inside = (shifted / step >= qmin) & (shifted / step <= qmax)
    mean, x = torch.where(inside, mean, x), x
    # Each draw errs by a Bernoulli fraction of one step: std <= step / 2, so the mean of n draws
    # has std <= step / (2 sqrt n); 5 sigma keeps the false-alarm rate negligible over all
    # 32 values and examples, while a biased rounding (RNE's error is up to step / 2) fails.
    assert_close_verbose(mean, x, atol=5 * step / (2 * math.sqrt(n)) + 1e-5, msg=str(spec))


def test_round_to_nearest_is_biased_where_stochastic_rounding_is_not():
    spec = QuantSpec(2, True, "token")
    x = torch.tensor([[0.3, 1.0, -1.0, 0.0]])  # scale 2/3 * 1.0 -> 0.3 is 0.45 of a step
    rne = dequantize(*(lambda r: (r.codes, spec, r.scales, r.mins))(quantize(x, spec)))
    mean = torch.stack([dequantize(r.codes, spec, r.scales, r.mins) for r in
                        (quantize(x, sr(spec), seed=k) for k in range(2000))]).mean(0)
    assert rne[0, 0].item() == 0.0  # nearest rounds 0.3 down to 0 every time
    assert abs(mean[0, 0].item() - 0.3) < 0.03  # 5 sigma of 2000 Bernoulli(0.45) draws * step


def test_same_seed_same_codes_other_seed_other_codes():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(64))
    spec = QuantSpec(4, True, "group", 16)
    a, b, c = (quantize(x, sr(spec), seed=s) for s in (7, 7, 8))
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, c.codes)
    assert torch.equal(a.scales, quantize(x, spec).scales)  # rounding never changes the scales
    u = stochastic_round(torch.full((1000,), 0.25), seed=3)
    assert set(u.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("spec", DYNAMIC + [QuantSpec(4, True, "static")])
def test_nan_and_inf_follow_the_deterministic_policy(spec):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(16))
    x[0, 1], x[1, 2], x[2, 3] = float("nan"), float("inf"), float("-inf")
    kwargs = {}
    if spec.granularity == "static":
        kwargs = dict(static_min=torch.full((16,), -3.0), static_max=torch.full((16,), 3.0))
    rne = quantize(x, spec, **kwargs)
    for seed in range(5):
        res = quantize(x, sr(spec), seed=seed, **kwargs)
        qmin, qmax = qrange(spec.bits, spec.symmetric)
        zero = rne.codes[0, 1]
        if spec.symmetric:
            assert res.codes[0, 1] == zero  # NaN -> the zero code, as round-to-nearest gives it
        else:  # NaN quantizes as 0.0 would: one of the two codes around 0.0's grid position
            assert abs(int(res.codes[0, 1]) - int(zero)) <= 1
        assert res.codes[1, 2] == qmax - qmin and res.codes[2, 3] == 0  # +Inf / -Inf -> end codes
        assert res.nonfinite == rne.nonfinite == 3 and res.clamped == rne.clamped
        assert torch.equal(res.scales, rne.scales)


@pytest.mark.parametrize("spec", DYNAMIC)
def test_payload_layout_is_unchanged(spec):
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(32))
    p_rne, _ = encode(x, spec)
    p_sr, _ = encode(x, sr(spec), seed=11)
    lay = layout(5, 32, spec)
    assert p_rne.numel() == p_sr.numel() == lay.total_bytes
    assert torch.equal(p_rne[:lay.codes.offset], p_sr[:lay.codes.offset])  # scales (and mins) identical


def test_grammar_and_second_leg():
    s = parse_scheme("int4-group16-sr@twoshot+int8-token")
    assert s.stochastic and s.quant.rounding == "stochastic" and s.second.rounding == "nearest"
    assert not parse_scheme("int4-group16").stochastic and not parse_scheme("bf16").stochastic
    with pytest.raises(SchemeError, match="rounding"):
        QuantSpec(4, rounding="up")


def _reduce(scheme, tp=3, calls=2, seed=0):
    def body(group):
        comm = QuantCommunicator(group, scheme, None, seed=seed)
        x = partials(tp)[group.rank]
        return [comm.reduce(x, Site(0, "o_proj")) for _ in range(calls)], comm.calls
    return ThreadWorld(tp).run(body)


def test_communicator_is_reproducible_and_draws_fresh_noise_per_call():
    first = _reduce("int3-token-sr")
    again = _reduce("int3-token-sr")
    other_seed = _reduce("int3-token-sr", seed=1)
    outs = [o for o, _ in first]
    assert all(torch.equal(outs[0][k], o[k]) for o in outs for k in range(2))  # every rank: same sum
    assert torch.equal(first[0][0][0], again[0][0][0]) and torch.equal(first[0][0][1], again[0][0][1])
    assert not torch.equal(first[0][0][0], first[0][0][1])  # same input, new call: new noise
    assert not torch.equal(first[0][0][0], other_seed[0][0][0])
    rne_calls = _reduce("int3-token")[0][1]
    assert first[0][1][0].bytes_sent == rne_calls[0].bytes_sent  # no extra bits for -sr
