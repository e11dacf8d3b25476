"""Reference quantizers: error bounds, rounding, zero/non-finite/overflow policy, bit packing."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.codes.int import ALLOWED_BITS, qrange
from lowbit.quant import (
    dequantize,
    pack_bits,
    packed_nbytes,
    quantize,
    round_half_even,
    unpack_bits,
)
from lowbit.scheme import QuantSpec

from tests.helpers import assert_close_verbose

SPECS = [
    QuantSpec(b, sym, gran, 16 if gran == "group" else None)
    for b in ALLOWED_BITS
    for sym in (True, False)
    for gran in ("static", "token", "group")
]
FP32_EPS = 2.0**-23


def spec_id(spec):
    return str(spec)


def per_element(t: torch.Tensor | None, spec: QuantSpec, shape) -> torch.Tensor | None:
    """Broadcast scales/mins [H] / [T] / [T, H/G] to x's shape [T, H]."""
    if t is None:
        return None
    if spec.granularity == "static":
        return t.expand(shape)
    if spec.granularity == "token":
        return t.unsqueeze(-1).expand(shape)
    return t.repeat_interleave(spec.group_size, dim=-1)


def error_bound(x, res, spec):
    """scale/2 per element, plus fp32 slack: x/scale, q*scale and (asym) x-lo and q*scale+lo
    each round once at relative 2**-24 of their magnitude (<= |x| + |lo| + scale*2**b), so a
    few eps of that covers the arithmetic (observed slack is far below it)."""
    scale = per_element(res.scales, spec, x.shape)
    lo = per_element(res.mins, spec, x.shape)
    magnitude = x.abs() + scale * 2**spec.bits + (0 if lo is None else lo.abs())
    return scale / 2 + 4 * FP32_EPS * magnitude


def random_x(seed: int, tokens: int, hidden: int, dtype=torch.float32, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g) * spread
    x = x * torch.exp(torch.randn(tokens, 1, generator=g))  # rows of different magnitude
    return x.to(dtype)


def static_range(x):
    return x.float().amin(0), x.float().amax(0)


def test_round_half_even_ties_go_to_even():
    t = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 7.5, 2.4, 2.6])
    assert round_half_even(t).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0, 8.0, 2.0, 3.0]


def test_paper_int4_codes_by_hand():
    # absmax 1 -> scale fp32(2/15); x/scale = -7.5(-), -3.75, 0, 3.0, 7.5(-) -> q -7, -4, 0, 3, 7
    x = torch.tensor([[-1.0, -0.5, 0.0, 0.4, 1.0]])
    spec = QuantSpec(4, True, "static")
    res = quantize(x, spec, static_min=torch.full((5,), -1.0), static_max=torch.full((5,), 1.0))
    assert res.codes.tolist() == [[1, 4, 8, 11, 15]]  # q + 8
    assert res.scales.dtype == torch.float32 and res.scales[0].item() == torch.tensor(2 / 15).item()
    y = dequantize(res.codes, spec, res.scales)
    assert_close_verbose(y, torch.tensor([[-7, -4, 0, 3, 7]]) * res.scales[0])


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31), tokens=st.integers(1, 5), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_error_within_half_scale_for_in_range_values(spec, seed, tokens, dtype):
    x = random_x(seed, tokens, 48, dtype)
    lo, hi = static_range(x)
    res = quantize(x, spec, lo, hi)
    assert res.codes.dtype == torch.uint8 and res.codes.shape == x.shape
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    assert int(res.codes.max()) <= qmax - qmin
    assert res.clamped == 0 and res.nonfinite == 0
    y = dequantize(res.codes, spec, res.scales, res.mins)
    assert y.dtype == torch.float32
    assert_close_verbose(y, x.float(), atol=error_bound(x.float(), res, spec), msg=str(spec))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.granularity != "static"], ids=spec_id)
def test_dynamic_scales_travel_exactly_in_bf16_and_cover_the_range(spec):
    x = random_x(3, 6, 64)
    res = quantize(x, spec)
    assert torch.equal(res.scales.bfloat16().float(), res.scales)
    xg = x.reshape(6, -1, 16) if spec.granularity == "group" else x.unsqueeze(1)
    levels = 2**spec.bits - 1
    if spec.symmetric:
        absmax = xg.abs().amax(-1).reshape(res.scales.shape)
        assert bool((res.scales * levels / 2 >= absmax).all())  # rounded up, never down
    else:
        assert torch.equal(res.mins.bfloat16().float(), res.mins)
        lo = xg.amin(-1).reshape(res.scales.shape)
        hi = xg.amax(-1).reshape(res.scales.shape)
        assert bool((res.mins <= lo).all())  # min rounded toward -inf
        assert bool((res.mins + res.scales * levels >= hi * (1 - 4 * FP32_EPS)).all())


def test_fp32_scale_dtype_keeps_fp32_scales():
    spec = QuantSpec(4, True, "token", scale_dtype=torch.float32)
    x = random_x(5, 4, 32)
    res = quantize(x, spec)
    assert torch.equal(res.scales, x.abs().amax(-1) * torch.tensor(2 / 15).item())


@pytest.mark.parametrize("spec", [s for s in SPECS if s.bits in (2, 4, 8)], ids=spec_id)
def test_zero_rows_and_groups_dequantize_to_exact_zero(spec):
    x = random_x(1, 3, 32)
    x[1] = 0.0
    x[2, :16] = 0.0
    lo, hi = static_range(x)
    lo[5] = hi[5] = 0.0  # a feature never active during calibration: zero static scale
    x[:, 5] = 0.0
    res = quantize(x, spec, lo, hi)
    y = dequantize(res.codes, spec, res.scales, res.mins)
    assert not torch.isnan(y).any()
    zero_code = -qrange(spec.bits, spec.symmetric)[0]
    assert bool((res.codes[1] == zero_code).all()) or spec.granularity == "static"
    if spec.granularity == "static" and not spec.symmetric:
        # calibrated [lo, hi] need not have 0 on the grid: a zero row lands within scale/2
        assert_close_verbose(y[1], torch.zeros(32), atol=error_bound(x, res, spec)[1], msg="zero row")
    else:
        assert_close_verbose(y[1], torch.zeros(32), msg="zero row")
    if spec.symmetric or spec.granularity == "static":  # zero static scale, or 0/scale == 0
        assert_close_verbose(y[:, 5], torch.zeros(3), msg="zero feature")
    else:  # a dynamic asymmetric grid need not contain 0
        assert_close_verbose(y[:, 5], torch.zeros(3), atol=error_bound(x, res, spec)[:, 5], msg="zero feature")
    if spec.granularity == "group":
        assert_close_verbose(y[2, :16], torch.zeros(16), msg="zero group")


def test_constant_asymmetric_group_is_exact():
    spec = QuantSpec(3, False, "group", 8)
    x = torch.full((2, 16), 0.75)  # 0.75 is a bf16 value, so the min travels exactly
    res = quantize(x, spec)
    assert res.scales.eq(0).all()
    assert_close_verbose(dequantize(res.codes, spec, res.scales, res.mins), x)


@pytest.mark.parametrize("spec", SPECS[::2], ids=spec_id)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_nonfinite_values_do_not_poison_their_row(spec, seed):
    x = random_x(seed, 4, 32)
    lo, hi = static_range(x)
    clean = x.clone()
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(4 * 32, generator=g)[:6]
    specials = torch.tensor([math.nan, math.inf, -math.inf, math.nan, math.inf, -math.inf])
    x.view(-1)[pos] = specials
    res = quantize(x, spec, lo, hi)
    assert res.nonfinite == 6
    y = dequantize(res.codes, spec, res.scales, res.mins)
    assert torch.isfinite(y).all(), "non-finite inputs must decode to finite values"
    codes = res.codes.view(-1)[pos]
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    scale_at = per_element(res.scales, spec, x.shape).reshape(-1)[pos]
    live = scale_at > 0
    assert (codes[1::3][live[1::3]] == qmax - qmin).all(), "+Inf clamps to the max code"
    assert (codes[2::3][live[2::3]] == 0).all(), "-Inf clamps to the min code"
    if spec.symmetric:
        assert (y.view(-1)[pos[0::3]] == 0).all(), "NaN decodes to exactly 0"
    # every finite value keeps its bound, with scales taken over the finite values only
    finite = torch.isfinite(x)
    bound = error_bound(clean, res, spec)
    assert_close_verbose(torch.where(finite, y, 0), torch.where(finite, clean, 0), atol=bound, msg=str(spec))
    if spec.granularity != "static" and spec.symmetric:
        # NaN counts as 0 and Inf is ignored: scales equal those of the row with them zeroed
        ref = quantize(torch.where(finite, x, 0.0), spec)
        assert_close_verbose(res.scales, ref.scales, msg="scales over finite values")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_out_of_range_values_clamp_and_are_counted(bits, symmetric):
    spec = QuantSpec(bits, symmetric, "static")
    g = torch.Generator().manual_seed(bits)
    lo = -torch.rand(32, generator=g) - 0.5
    hi = torch.rand(32, generator=g) + 0.5
    x = lo + (hi - lo) * torch.rand(8, 32, generator=g)  # inside [lo, hi]
    beyond = torch.rand(8, 32, generator=g) < 0.1
    factor = 1.5 + 8 * torch.rand(8, 32, generator=g)
    edge = torch.where(torch.rand(8, 32, generator=g) < 0.5, lo, hi)
    if symmetric:
        edge = torch.where(edge < 0, -torch.maximum(-lo, hi), torch.maximum(-lo, hi))
    x = torch.where(beyond, edge * factor, x)
    x[0, 0] = math.inf  # non-finite: counted apart, not as clamped
    res = quantize(x, spec, lo, hi)
    assert res.clamped == int(beyond.sum()) - int(beyond[0, 0])
    assert res.nonfinite == 1
    y = dequantize(res.codes, spec, res.scales, res.mins)
    qmin, qmax = qrange(bits, symmetric)
    clamped_codes = res.codes[beyond]
    assert bool(((clamped_codes == 0) | (clamped_codes == qmax - qmin)).all())
    inside = ~beyond
    inside[0, 0] = False
    assert_close_verbose(y[inside], x[inside], atol=error_bound(x, res, spec)[inside])


@pytest.mark.parametrize("spec", [s for s in SPECS if s.bits in (2, 4, 8)], ids=spec_id)
@pytest.mark.parametrize("magnitude", [1e38, 3.3e38])
def test_huge_values_keep_finite_scales(spec, magnitude):
    x = random_x(7, 3, 32).clamp(-1, 1) * magnitude
    x[0, 0] = magnitude  # the largest value is exactly at the limit
    lo, hi = static_range(x)
    res = quantize(x, spec, lo, hi)
    assert torch.isfinite(res.scales).all() and (res.mins is None or torch.isfinite(res.mins).all())
    y = dequantize(res.codes, spec, res.scales, res.mins)
    assert torch.isfinite(y).all() and not torch.isnan(y).any()
    if magnitude == 1e38:  # away from the fp32 ceiling the usual bound holds
        assert_close_verbose(y, x, atol=error_bound(x, res, spec), msg=str(spec))
    elif spec.symmetric:  # the end code saturates at fp32 max: still within one step
        assert bool(((y - x).abs() <= per_element(res.scales, spec, x.shape) * 1.01).all())
    # asymmetric near the ceiling: q * scale itself may saturate; only finite output is promised


def test_bf16_input_is_quantized_as_its_fp32_value():
    spec = QuantSpec(4, True, "group", 16)
    x = random_x(2, 3, 32, torch.bfloat16)
    a, b = quantize(x, spec), quantize(x.float(), spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_exclude_leaves_features_out_of_ranges_and_counts():
    spec = QuantSpec(4, True, "token")
    x = random_x(4, 2, 32)
    x[:, 3] = 1e4  # an outlier feature that travels separately
    x[0, 7] = math.nan
    res = quantize(x, spec, exclude=torch.tensor([3, 7]))
    assert res.nonfinite == 0
    ref = quantize(torch.cat([x[:, :3], x[:, 4:7], x[:, 8:]], 1), spec)
    assert_close_verbose(res.scales, ref.scales)


# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------


def test_pack_bits_little_endian_order():
    # 2-bit codes 1, 2, 3 -> stream bits 10 01 11 (LSB first) -> byte 0b00111001
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3-bit codes 5, 6, 7 -> byte0 = 5 | 6<<3 | (7&3)<<6, byte1 = 7>>2
    assert pack_bits(torch.tensor([5, 6, 7], dtype=torch.uint8), 3).tolist() == [5 | 6 << 3 | 3 << 6, 1]
    assert pack_bits(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=15, deadline=None)
@given(count=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, count, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (count,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(count, bits) == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), codes)
    if (count * bits) % 8:  # padding bits of the last byte are zero
        used = (count * bits) % 8
        assert int(packed[-1]) >> used == 0


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_of_2d_codes_is_row_major(bits):
    codes = torch.randint(0, 2**bits, (5, 7), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    assert torch.equal(pack_bits(codes, bits), pack_bits(codes.reshape(-1), bits))


def test_pack_rejects_codes_too_wide_and_unpack_rejects_short_streams():
    with pytest.raises(ValueError, match="codes must be < 2\\*\\*3"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="bits: 9"):
        pack_bits(torch.zeros(1, dtype=torch.uint8), 9)
