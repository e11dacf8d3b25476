"""The fused two-shot owner step (``kernels.native_cpu.unpack_dequant_sum_requant_counts``: unpack,
fp32 sum, requantize, pack in one pass) byte-equal to the torch reference, and the sums written in
place into a column slice of the output.

    .venv/bin/python -m pytest tests/test_kernels_owner_step.py -q

Odd shapes (token counts around the kernel's 8-row packing block, a chunk width that no group
of 16 divides only on the first leg, a single group, kept-feature runs broken by outliers),
dynamic and static second legs (with values beyond the reduced sum's calibrated range, so the
clamped count is exercised), degenerate input (all zeros, NaN and +-Inf in coded and in BF16
columns, the fp32 ceiling), both legs decoded, and the communicator on the native codec taking
the fused step once per call. Every random tensor is seeded; failures print the first differing
bytes.
"""
from __future__ import annotations

import pytest
import torch

from kernels import dispatch
from kernels import native_cpu as nc
from kernels import reference as ref
from lowbit.scheme import QuantSpec
from lowbit.wire.payload import layout

from tests.helpers import assert_close_verbose
from tests.test_kernels import assert_same_bytes, spec_id, static_args
from tests.test_kernels_native import TP, ranks, stacked

WIDTH = 192  # one chunk of 576 features at TP 3

PAIRS = [(QuantSpec(4, True, "static"), QuantSpec(4, True, "token")),  # the paper's scheme, int4 second leg
         (QuantSpec(4, True, "static"), QuantSpec(8, True, "static")),  # static second leg (calibrated sum range)
         (QuantSpec(3, False, "group", 16), QuantSpec(5, False, "group", 16)),
         (QuantSpec(2, True, "token"), QuantSpec(6, True, "group", 32, scale_dtype=torch.float32)),
         (QuantSpec(5, False, "static"), QuantSpec(3, False, "static")),
         (QuantSpec(8, True, "group", 64), QuantSpec(2, False, "token", scale_dtype=torch.float32))]
PAIR_IDS = [f"{spec_id(a)}+{spec_id(b)}" for a, b in PAIRS]


def leg1(first: QuantSpec, tokens: int, width: int, local, seed: int, xs=None):
    """tp leg-1 payloads of one chunk (the reference's bytes) of seeded partials or of ``xs``, with
    each sender's static range (its finite min/max), and the partials."""
    if xs is None:
        xs = ranks(first, tokens, width, seed)[0]
    ranges = [static_args(first, torch.nan_to_num(x, 0.0, 1.0, -1.0)) for x in xs]
    payloads = torch.stack([ref.quantize_pack_ref(x, first, local, a, b) for x, (a, b) in zip(xs, ranges)])
    return payloads, stacked(ranges), xs


def sum_range(second: QuantSpec, xs, shrink: float = 0.8):
    """A static second leg's calibrated range of the reduced sum, ``shrink``-ed so some values clamp;
    Nones for a dynamic second leg."""
    if second.dynamic:
        return None, None
    total = torch.nan_to_num(sum(x.float() for x in xs), 0.0, 1.0, -1.0)
    return shrink * total.amin(0), shrink * total.amax(0)


def check_owner_step(first, second, payloads, mins, maxs, tokens, width, local, lo2=None, hi2=None, msg=""):
    """The fused step's payload and counts equal the reference's (sum, then quantize_pack_counts),
    and both legs decode to the same values."""
    got, got_counts = nc.unpack_dequant_sum_requant_counts(payloads, tokens, width, first, local, mins, maxs, second,
                                                           lo2, hi2)
    want, want_counts = ref.unpack_dequant_sum_requant_counts_ref(payloads, tokens, width, first, local, mins, maxs,
                                                                  second, lo2, hi2)
    n_out = 0 if local is None else len(local)
    assert_same_bytes(got, want, layout(tokens, width, second, n_out), msg)
    assert got_counts == want_counts, (msg, got_counts, want_counts)
    batch = (None, None) if lo2 is None else (lo2[None], hi2[None])
    leg2 = nc.unpack_dequant_sum(got[None], tokens, width, second, local, *batch)
    assert_close_verbose(leg2, ref.unpack_dequant_sum_ref(want[None], tokens, width, second, local, *batch),
                         atol=0.0, msg=f"{msg} leg 2 decoded")
    return got_counts


@pytest.mark.parametrize("first,second", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("tokens", [1, 7, 8, 9, 33])  # around and across the 8-row packing block
def test_owner_step_bytes_and_counts_equal_the_reference(first, second, tokens):
    local = torch.tensor([4, 100, 33, 34, 191])  # runs of kept features broken at both ends and in the middle
    payloads, (mins, maxs), xs = leg1(first, tokens, WIDTH, local, seed=1200 + tokens)
    lo2, hi2 = sum_range(second, xs)
    counts = check_owner_step(first, second, payloads, mins, maxs, tokens, WIDTH, local, lo2, hi2,
                              f"{tokens} tokens")
    if not second.dynamic and tokens >= 7:
        assert counts["clamped"] > 0  # the shrunk range clamps: the count is exercised, not just zero


@pytest.mark.parametrize("first,second", [(QuantSpec(4, False, "group", 25), QuantSpec(6, True, "group", 25)),
                                          (QuantSpec(4, True, "static"), QuantSpec(4, False, "static")),
                                          (QuantSpec(3, True, "token"), QuantSpec(8, False, "token"))],
                         ids=lambda s: spec_id(s))
@pytest.mark.parametrize("width,outliers", [(75, None), (75, [0, 74]), (25, [12]), (3, [1])])
def test_odd_chunk_widths_a_single_group_and_no_outliers(first, second, width, outliers):
    """75 = 3 groups of 25; 25 is one group; 3 features (group specs need 25: token/static only)."""
    if any(s.group_size and width % s.group_size for s in (first, second)):  # the reference's error
        for fn in (nc.unpack_dequant_sum_requant_counts, ref.unpack_dequant_sum_requant_counts_ref):
            with pytest.raises(ValueError, match="group"):
                fn(torch.zeros(TP, 64, dtype=torch.uint8), 5, width, first, None, None, None, second)
        return
    local = None if outliers is None else torch.tensor(outliers)
    payloads, (mins, maxs), xs = leg1(first, 11, width, local, seed=1300 + width)
    check_owner_step(first, second, payloads, mins, maxs, 11, width, local, *sum_range(second, xs),
                     f"width {width}")


@pytest.mark.parametrize("first,second", PAIRS, ids=PAIR_IDS)
def test_degenerate_input_zeros_nan_inf_and_the_fp32_ceiling(first, second):
    """NaN / Inf in coded features decode as 0 / clamp; in the BF16 outlier columns they reach the
    sum, its BF16 outlier bytes and its nonfinite count; values near the fp32 ceiling saturate."""
    tokens, local = 13, torch.tensor([10, 11, 150])
    xs, _ = ranks(first, tokens, WIDTH, seed=1400)
    xs[0][0, 5], xs[1][1, 6], xs[2][2, 7] = float("nan"), float("inf"), -float("inf")
    xs[0][3, 10], xs[1][4, 11], xs[2][4, 150] = float("nan"), float("inf"), -float("inf")  # outlier columns
    xs[0][5, 150], xs[1][5, 150] = float("inf"), -float("inf")  # inf - inf = NaN in the sum
    xs[0][6, 20], xs[1][6, 20], xs[2][6, 21] = 3.0e38, 3.0e38, -3.4e38
    for x in xs:
        x[8] = 0.0  # an all-zero row of the sum
        x[9, :64] = 0.0  # an all-zero group
    payloads, (mins, maxs), _ = leg1(first, tokens, WIDTH, local, seed=1400, xs=xs)
    lo2, hi2 = sum_range(second, xs)
    counts = check_owner_step(first, second, payloads, mins, maxs, tokens, WIDTH, local, lo2, hi2, "degenerate")
    assert counts["nonfinite"] >= 3  # the three non-finite outlier sums at least
    zeros = torch.zeros(tokens, WIDTH)
    payloads, (mins, maxs), _ = leg1(first, tokens, WIDTH, local, seed=1401, xs=[zeros] * TP)
    lo2, hi2 = (None, None) if second.dynamic else (torch.zeros(WIDTH), torch.zeros(WIDTH))
    counts = check_owner_step(first, second, payloads, mins, maxs, tokens, WIDTH, local, lo2, hi2, "zeros")
    assert counts == {"clamped": 0, "nonfinite": 0}


def test_zero_tokens_and_bad_second_legs_give_the_reference_results():
    first, second = QuantSpec(4, True, "token"), QuantSpec(8, True, "static")
    empty = torch.zeros(TP, 0, dtype=torch.uint8)
    for fn in (nc.unpack_dequant_sum_requant_counts, ref.unpack_dequant_sum_requant_counts_ref):
        payload, counts = fn(empty, 0, WIDTH, first, None, None, None, QuantSpec(4, True, "token"))
        assert payload.numel() == 0 and counts == {"clamped": 0, "nonfinite": 0}
        with pytest.raises(ValueError, match="second_min and second_max"):  # static without the sum's range
            fn(empty, 0, WIDTH, first, None, None, None, second)
        with pytest.raises(ValueError, match="nf"):
            fn(empty, 0, WIDTH, first, None, None, None, QuantSpec(4, True, "token", code="nf"))


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "static"), QuantSpec(4, False, "group", 32),
                                  QuantSpec(8, True, "token")], ids=spec_id)
@pytest.mark.parametrize("path", ["native", "reference"])
def test_a_sum_written_into_a_column_slice_leaves_the_other_columns(spec, path, monkeypatch):
    """The two-shot leg-2 decode writes each owner's chunk into its columns of the whole output."""
    monkeypatch.setenv(dispatch.ENV, path)
    payloads, (mins, maxs), _ = leg1(spec, 9, WIDTH, torch.tensor([3, 50]), seed=1500)
    want = ref.unpack_dequant_sum_ref(payloads, 9, WIDTH, spec, torch.tensor([3, 50]), mins, maxs)
    whole = torch.full((9, TP * WIDTH), -7.0)
    got = dispatch.unpack_dequant_sum(payloads, 9, WIDTH, spec, torch.tensor([3, 50]), mins, maxs,
                                      out=whole[:, WIDTH:2 * WIDTH])
    assert got.data_ptr() == whole[:, WIDTH:].data_ptr()
    assert torch.equal(whole[:, WIDTH:2 * WIDTH].view(torch.int32), want.view(torch.int32))
    assert (whole[:, :WIDTH] == -7.0).all() and (whole[:, 2 * WIDTH:] == -7.0).all()
    with pytest.raises(ValueError, match="out must be"):
        dispatch.unpack_dequant_sum(payloads, 9, WIDTH, spec, torch.tensor([3, 50]), mins, maxs,
                                    out=whole[:, :WIDTH - 1])


@pytest.mark.parametrize("scheme", ["int4-static-top1/64@twoshot+int4-token", "int4-static-top1/64@twoshot+int8-static",
                                    "int3a-group16@twoshot+int4-group16"])
def test_the_communicator_takes_the_fused_step_once_per_call_with_the_reference_sums(scheme, monkeypatch):
    from tests.collective_cases import partials, reduce_on_threads
    xs = [x.clone() for x in partials(TP)]
    xs[0][2, 5], xs[1][4, 9] = float("nan"), float("inf")
    calls = []
    fused = nc.unpack_dequant_sum_requant_counts

    def counted(*args, **kwargs):
        calls.append(args[1:3])
        return fused(*args, **kwargs)
    monkeypatch.setattr(nc, "unpack_dequant_sum_requant_counts", counted)
    base = reduce_on_threads(scheme, TP, xs)
    native = reduce_on_threads(scheme, TP, xs, codec=dispatch.Codec("native"))
    assert len(calls) == TP  # one owner step per rank, no separate sum and requantization
    for rank, ((a, call_a), (b, call_b)) in enumerate(zip(base, native)):
        assert_close_verbose(b, a, atol=0.0, msg=f"{scheme} rank {rank}")
        for key in ("leg1_bits", "leg2_bits", "clamped", "nonfinite", "leg2_clamped", "bytes_received"):
            assert call_a.extra.get(key) == call_b.extra.get(key), (scheme, key)
        assert (call_b.extra["codec_path"], call_b.extra["codec_path2"]) == ("native", "native")
