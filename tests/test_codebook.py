"""The nf<B> codebook: its shape, nearest-entry rule and tie rule, error bound, non-finite policy."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.codebook import boundaries, codebook, max_gap, nearest_index, zero_index
from lowbit.wire.payload import decode, encode, layout
from lowbit.quant import dequantize, quantize
from lowbit.scheme import QuantSpec, parse_scheme
from tests.helpers import assert_codebook_error_bound, scale_per_element

NF_SPECS = [QuantSpec(b, True, gran, 16 if gran == "group" else None, code="nf")
            for b in (3, 4) for gran in ("static", "token", "group")]


@pytest.mark.parametrize("bits", [3, 4])
def test_codebook_is_sorted_with_exact_zero_and_unit_ends(bits):
    c = codebook(bits)
    assert c.dtype == torch.float32 and c.numel() == 2**bits
    assert torch.all(c[1:] > c[:-1]), c
    assert c[0] == -1.0 and c[-1] == 1.0 and c[zero_index(bits)] == 0.0
    # one more positive level than negative ones (NF4-style)
    assert int((c > 0).sum()) == 2 ** (bits - 1) and int((c < 0).sum()) == 2 ** (bits - 1) - 1
    # denser near zero than near the ends: the point of a normal-quantile code
    gaps = c[1:] - c[:-1]
    assert gaps[zero_index(bits)] < gaps[-1] and gaps[zero_index(bits) - 1] < gaps[0]
    assert max_gap(bits) == pytest.approx(float(gaps.max()))


@pytest.mark.parametrize("bits", [3, 4])
def test_nearest_index_is_the_argmin_and_ties_go_to_the_lower_entry(bits):
    c = codebook(bits)
    v = torch.linspace(-1.3, 1.3, 5001)
    brute = (v[:, None] - c[None, :]).abs().argmin(1)  # argmin picks the first (lower) on ties
    got = nearest_index(v, bits)
    dist_got = (v - c[got]).abs()
    dist_brute = (v - c[brute]).abs()
    assert torch.equal(dist_got, dist_brute), "nearest_index must pick a nearest entry"
    mids = boundaries(bits)
    assert torch.equal(nearest_index(mids, bits), torch.arange(2**bits - 1)), "a midpoint goes to the lower entry"
    inf = torch.tensor([-math.inf, math.inf, -5.0, 5.0])
    assert nearest_index(inf, bits).tolist() == [0, 2**bits - 1, 0, 2**bits - 1]


@pytest.mark.parametrize("spec", NF_SPECS, ids=str)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), tokens=st.integers(1, 6), spread=st.sampled_from([1e-3, 1.0, 300.0]))
def test_nf_error_is_within_half_the_largest_gap_times_scale(spec, seed, tokens, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g) * spread
    res = assert_codebook_error_bound(x, spec, x.amin(0) - 0.01, x.amax(0) + 0.01, max_gap(spec.bits))
    assert res.clamped == 0 and res.nonfinite == 0
    assert int(res.codes.max()) < 2**spec.bits


@pytest.mark.parametrize("spec", NF_SPECS, ids=str)
def test_nf_nan_and_inf_do_not_poison_other_values(spec):
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(32))
    clean = x.clone()
    x[0, 1], x[1, 2], x[2, 3] = math.nan, math.inf, -math.inf
    lo, hi = clean.amin(0) - 0.5, clean.amax(0) + 0.5
    res = quantize(x, spec, lo, hi)
    y = dequantize(res.codes, spec, res.scales)
    assert res.nonfinite == 3
    assert torch.isfinite(y).all()
    assert y[0, 1] == 0.0, "NaN decodes to the exact zero entry"
    scale = scale_per_element(res, spec, x.shape)
    assert y[1, 2] == scale[1, 2] and y[2, 3] == -scale[2, 3], "+-Inf take the end entries"
    mask = torch.isfinite(x)
    ref = quantize(torch.where(mask, x, 0.0), spec, lo, hi)
    # dynamic ranges ignore non-finite values, so every finite value decodes as without them
    assert torch.equal(y[mask], dequantize(ref.codes, spec, ref.scales)[mask])


def test_nf_zero_group_decodes_to_zero():
    spec = QuantSpec(4, True, "group", 16, code="nf")
    x = torch.zeros(2, 32)
    x[1, 20] = 3.0
    res = quantize(x, spec)
    y = dequantize(res.codes, spec, res.scales)
    assert torch.equal(y[0], torch.zeros(32)) and torch.equal(y[1, :16], torch.zeros(16))
    assert y[1, 20] == 3.0, "the absmax value maps to the +1 entry exactly"


@pytest.mark.parametrize("text", ["nf4-static-top1/64", "nf3-group64", "nf4-token", "nf4-group32"])
@settings(max_examples=5, deadline=None)
@given(tokens=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_nf_payload_round_trips_and_bytes_equal_layout(text, tokens, seed):
    scheme = parse_scheme(text)
    hidden = 576
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    idx = torch.arange(0, hidden, 64) if scheme.outliers.select != "none" else None
    lo, hi = x.amin(0) - 0.1, x.amax(0) + 0.1
    payload, _ = encode(x, scheme.quant, idx, lo, hi)
    n_out = 0 if idx is None else idx.numel()
    assert payload.numel() == layout(tokens, hidden, scheme.quant, n_out).total_bytes
    y = decode(payload, tokens, hidden, scheme.quant, idx, lo, hi)
    res = quantize(x, scheme.quant, lo, hi, exclude=idx)
    ref = dequantize(res.codes, scheme.quant, res.scales)
    keep = torch.ones(hidden, dtype=torch.bool)
    if idx is not None:
        keep[idx] = False
        assert torch.equal(y[:, idx], x[:, idx].bfloat16().float())
    assert torch.equal(y[:, keep], ref[:, keep])


def test_nf4_paper_variant_costs_the_paper_bits():
    assert layout(8, 576, parse_scheme("nf4-static-top1/64").quant, 9).bits_per_value["total"] == 4.1875
    assert layout(8, 576, parse_scheme("nf3-group64").quant).bits_per_value["total"] == 3 + 16 / 64
