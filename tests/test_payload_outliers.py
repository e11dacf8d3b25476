"""Per-message outliers in the payload: sparse values (sp<n>) and dynamic thresholds (thr<T>c<K>).

Kept values are BF16-exact, the rest within the quantizer's bound of the remaining range,
NaN/Inf never poison other values, message sizes are fixed and equal the layout, and the
indices are counted in the bits per value.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.codebook import max_gap
from lowbit.wire.payload import UNUSED_SLOT, decode, encode, layout, scheme_layout, sparse_picks, threshold_select
from lowbit.quant import dequantize, quantize
from lowbit.scheme import QuantSpec, parse_scheme
from tests.helpers import assert_close_verbose

HIDDEN = 576
FP32_EPS = 2.0**-23
SPECS = [QuantSpec(4, True, "token"), QuantSpec(4, False, "group", 32), QuantSpec(3, True, "group", 64),
         QuantSpec(4, True, "token", code="nf")]


def spiky(seed: int, tokens: int, hidden: int = HIDDEN, spikes: int = 3) -> torch.Tensor:
    """Gaussian rows with a few token x feature spikes 1000x the typical value (DESIGN.md)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    for t in range(tokens):
        cols = torch.randperm(hidden, generator=g)[:spikes]
        x[t, cols] = 1000.0 * (torch.rand(spikes, generator=g) + 0.5)
    return x


# -- sparse values ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=str)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31), tokens=st.integers(1, 6), n=st.integers(1, 5))
def test_sparse_values_are_bf16_exact_and_the_rest_within_the_remaining_range_bound(spec, seed, tokens, n):
    x = spiky(seed, tokens, spikes=min(n, 3))
    payload, stats = encode(x, spec, sparse=n)
    lay = layout(tokens, HIDDEN, spec, sparse=n)
    assert payload.numel() == lay.total_bytes
    assert stats["sparse"] == tokens * n and stats["clamped"] == 0
    y = decode(payload, tokens, HIDDEN, spec, sparse=n)
    picks = sparse_picks(x, n)
    taken = torch.zeros_like(x, dtype=torch.bool).scatter(1, picks, True)
    assert torch.equal(y[taken], x[taken].bfloat16().float()), "picked values travel as bf16(x)"
    # the others: exactly the quantizer on x with the picks zeroed (their scales never see a spike)
    rest = x.scatter(1, picks, 0.0)
    res = quantize(rest, spec)
    ref = dequantize(res.codes, spec, res.scales, res.mins)
    assert torch.equal(y[~taken], ref[~taken])
    # and so within the quantizer's bound (scale/2, nf: half the largest gap x scale) ...
    scale = res.scales.unsqueeze(-1).expand_as(x) if spec.granularity == "token" else \
        res.scales.repeat_interleave(spec.group_size, -1)
    half = scale * (max_gap(spec.bits) / 2 if spec.code.name == "nf" else 0.5)
    lo = 0 if res.mins is None else res.mins.repeat_interleave(spec.group_size, -1).abs()
    bound = half + 4 * FP32_EPS * (x.abs() + lo + 16 * scale)  # fp32 rounding of x/scale, q*scale(+lo)
    assert_close_verbose(y[~taken], x[~taken], atol=bound[~taken], msg=str(spec))
    # ... where the scale comes from the remaining range: the spikes did not widen it
    grouped = rest.reshape(tokens, -1, HIDDEN if spec.granularity == "token" else spec.group_size)
    if spec.symmetric:
        span = grouped.abs().amax(-1) * (1.0 if spec.code.name == "nf" else 2 / (2**spec.bits - 1))
    else:
        span = (grouped.amax(-1) - grouped.amin(-1).clamp(max=0) + grouped.amin(-1).abs() * 2**-7) / (2**spec.bits - 1)
    # bf16 scales round up by at most 2**-7 relative (asymmetric: lo rounds down first)
    assert (res.scales.reshape(span.shape) <= span * (1 + 2**-6) + 1e-30).all()


def test_sparse_picks_rank_nan_then_inf_then_magnitude_ties_by_lower_column():
    x = torch.tensor([[1.0, -5.0, 5.0, math.inf, 0.0, math.nan, -math.inf]])
    assert sparse_picks(x, 7).tolist() == [[5, 3, 6, 1, 2, 0, 4]]


def test_sparse_nan_and_inf_travel_as_themselves_and_poison_nothing():
    spec = QuantSpec(4, True, "token")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(81))
    x[0, 3], x[1, 9] = math.nan, -math.inf
    payload, stats = encode(x, spec, sparse=2)
    y = decode(payload, 2, 64, spec, sparse=2)
    assert math.isnan(y[0, 3]) and y[1, 9] == -math.inf
    assert stats["nonfinite"] == 2
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 3] = mask[1, 9] = False
    assert torch.isfinite(y[mask]).all()
    assert (y - x)[mask].abs().max() < x[mask].abs().max() / 7 * 1.01, "the row scale is not blown up"


def test_sparse_with_static_scales_counts_no_clamp_for_taken_spikes():
    spec = QuantSpec(4, True, "static")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(95))
    lo, hi = x.amin(0) - 0.1, x.amax(0) + 0.1
    x[1, 5] = 8192.0  # (exact in bf16) beyond the calibrated range, but taken out as a sparse value
    payload, stats = encode(x, spec, None, lo, hi, sparse=1)
    assert stats["clamped"] == 0
    y = decode(payload, 3, 64, spec, None, lo, hi, sparse=1)
    assert y[1, 5] == 8192.0 and torch.isfinite(y).all()
    _, unsparse = encode(x, spec, None, lo, hi)
    assert unsparse["clamped"] == 1


@pytest.mark.parametrize("text, bits", [
    ("int4-static-sp3", 4 + 3 * 32 / 576),     # 4.1667: codes + 3 x (uint16 index + bf16 value) per token
    ("int4-token-sp2", 4 + 16 / 576 + 2 * 32 / 576),
    ("int4-token-sp3", 4 + 16 / 576 + 3 * 32 / 576),  # 4.1944
    ("nf4-static-sp3", 4 + 3 * 32 / 576),
])
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_sparse_bits_at_hidden_576_count_indices(text, bits, tokens):
    scheme = parse_scheme(text)
    bpv = scheme_layout(scheme, tokens, HIDDEN).bits_per_value
    assert bpv["total"] == pytest.approx(bits, abs=1e-12)
    assert bpv["indices"] == pytest.approx(scheme.sparse * 16 / HIDDEN)
    assert bpv["outliers"] == pytest.approx(scheme.sparse * 16 / HIDDEN)
    assert abs(bpv["total"] - 4.1875) <= 0.1, "matched to the paper's bits within 0.1"


# -- dynamic threshold ----------------------------------------------------------------------------
def test_threshold_selects_features_over_t_largest_first_and_counts_overflow():
    x = torch.zeros(3, 16)
    x[0, 2], x[1, 7], x[2, 11], x[0, 12] = 10.0, -20.0, 7.0, 6.0
    chosen, overflow = threshold_select(x, 6.0, 2)  # 12 is not over 6 (strictly greater)
    assert chosen.tolist() == [2, 7] and overflow == 1  # 11 (7.0) is over T but did not fit
    chosen, overflow = threshold_select(x, 6.0, 5)
    assert chosen.tolist() == [2, 7, 11] and overflow == 0
    x[1, 0] = math.nan
    chosen, _ = threshold_select(x, 6.0, 1)
    assert chosen.tolist() == [0], "a non-finite feature counts as exceeding and goes first"


@pytest.mark.parametrize("spec", SPECS + [QuantSpec(4, True, "static")], ids=str)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31), tokens=st.integers(1, 5), capacity=st.integers(1, 6))
def test_threshold_columns_are_bf16_exact_and_message_size_is_fixed(spec, seed, tokens, capacity):
    x = spiky(seed, tokens, spikes=2)
    lo, hi = x.amin(0) - 0.1, x.amax(0) + 0.1
    payload, stats = encode(x, spec, None, lo, hi, threshold=50.0, capacity=capacity)
    lay = layout(tokens, HIDDEN, spec, capacity=capacity)
    assert payload.numel() == lay.total_bytes, "fixed size whatever the number selected"
    chosen, overflow = threshold_select(x, 50.0, capacity)
    assert stats["thr_selected"] == chosen.numel() and stats["thr_overflow"] == overflow
    assert chosen.numel() + overflow == int((x.abs().amax(0) > 50).sum())
    y = decode(payload, tokens, HIDDEN, spec, None, lo, hi, capacity=capacity)
    assert torch.equal(y[:, chosen], x[:, chosen].bfloat16().float())
    rest = torch.ones(HIDDEN, dtype=torch.bool)
    rest[chosen] = False
    res = quantize(x, spec, lo, hi, exclude=chosen if chosen.numel() else None)
    ref = dequantize(res.codes, spec, res.scales, res.mins)
    assert torch.equal(y[:, rest], ref[:, rest]), "the others decode exactly as the quantizer excluding the set"
    slots = payload[lay.thr_index.offset:lay.thr_index.end].to(torch.int64).reshape(-1, 2)
    slots = slots[:, 0] | (slots[:, 1] << 8)
    assert slots[:chosen.numel()].tolist() == chosen.tolist()
    assert (slots[chosen.numel():] == UNUSED_SLOT).all(), "unused slots carry the sentinel"


def test_threshold_nan_column_travels_in_bf16_and_does_not_widen_the_scale():
    spec = QuantSpec(4, True, "token")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(162))
    x[1, 4] = math.nan
    x[0, 9] = 2.0**20
    payload, stats = encode(x, spec, threshold=100.0, capacity=2)
    y = decode(payload, 2, 64, spec, capacity=2)
    assert stats["thr_selected"] == 2 and stats["thr_overflow"] == 0
    assert math.isnan(y[1, 4]) and y[0, 9] == 2.0**20
    rest = torch.ones(64, dtype=torch.bool)
    rest[[4, 9]] = False
    step = x[:, rest].abs().amax(1, keepdim=True) * 2 / 15
    assert ((y - x)[:, rest].abs() <= step * 0.51).all()


@pytest.mark.parametrize("tokens", [1, 8, 1024])
def test_threshold_bits_count_the_index_list_once_per_message(tokens):
    scheme = parse_scheme("int4-token-thr6c1/128")  # C = 4 at hidden 576
    bpv = scheme_layout(scheme, tokens, HIDDEN).bits_per_value
    assert bpv["indices"] == pytest.approx(4 * 16 / (tokens * HIDDEN))
    assert bpv["outliers"] == pytest.approx(4 * 16 / HIDDEN)
    assert bpv["payload"] == 4.0, "codes for all H features: fixed size"
    assert bpv["total"] == pytest.approx(4 + 16 / 576 + 64 / 576 + 64 / (tokens * 576))
    assert abs(bpv["total"] - 4.1875) <= 0.1


def test_decode_rejects_a_corrupt_index():
    spec = QuantSpec(8, True, "token")
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(188))
    payload, _ = encode(x, spec, sparse=1)
    lay = layout(2, 32, spec, sparse=1)
    payload[lay.sparse_index.offset] = 200
    with pytest.raises(ValueError, match="sparse index names a column >= hidden size 32"):
        decode(payload, 2, 32, spec, sparse=1)
    payload, _ = encode(x * 100, spec, threshold=1.0, capacity=1)
    lay = layout(2, 32, spec, capacity=1)
    payload[lay.thr_index.offset] = 40
    with pytest.raises(ValueError, match="thr index list names a feature >= hidden size 32"):
        decode(payload, 2, 32, spec, capacity=1)


def test_layout_refuses_two_outlier_mechanisms():
    with pytest.raises(ValueError, match="at most one"):
        layout(2, 64, QuantSpec(4, True, "token"), 2, sparse=1)
