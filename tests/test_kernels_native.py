"""The numba CPU kernels (kernels.native_cpu) byte- and value-equal to the torch reference.

    .venv/bin/python -m pytest tests/test_kernels_native.py -q

Every width x symmetric/asymmetric x static/token/group x outliers none/top/rand on an odd shape
(7 x 200, groups of 25), the production shapes (1 token, 16 x 576, slices of 8192 x 576), bf16 and
fp16 input, degenerate input (zeros, NaN, +-Inf, values beyond the static range, the fp32
ceiling, every feature an outlier), the two-shot requantization, a hypothesis property, the
dispatcher's ``native`` backend and the communicator on top of it. Every random tensor is seeded;
failures print the first differing bytes / values. numba compiles the kernels on the first call
of a fresh checkout (~10 s) and loads them from its disk cache afterwards.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import dispatch
from kernels import native_cpu as nc
from kernels import reference as ref
from lowbit.wire.payload import layout
from lowbit.scheme import QuantSpec

from tests.helpers import assert_close_verbose
from tests.test_kernels import BAD_INPUT, H, OUTLIERS, T, assert_same_bytes, partial, spec_id, static_args

TP = 3
WIDTHS = (2, 3, 4, 5, 6, 8)


def outlier_set(kind: str, x: torch.Tensor, k: int = 3, seed: int = 0):
    """None, the top-k features by range (sorted, as calibration picks them) or k seeded random ones."""
    if kind == "none":
        return None
    if kind == "top":
        return (x.float().amax(0) - x.float().amin(0)).topk(k).indices.sort().values
    return torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))[:k]


def ranks(spec: QuantSpec, tokens: int, hidden: int, seed: int, dtype=torch.float32, tp: int = TP):
    """tp seeded partials and their static ranges (Nones for dynamic specs)."""
    xs = [partial(seed + r, tokens, hidden, dtype) for r in range(tp)]
    return xs, [static_args(spec, x) for x in xs]


def stacked(ranges):
    if ranges[0][0] is None:
        return None, None
    return torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])


def check_both(spec, xs, ranges, idx, msg="", out_dtypes=(torch.float32,)):
    """Every rank's payload equal to the reference's, then the rank-order sums equal."""
    tokens, hidden = xs[0].shape
    n_out = 0 if idx is None else idx.numel()
    lay = layout(tokens, hidden, spec, n_out)
    payloads = []
    for r, (x, (lo, hi)) in enumerate(zip(xs, ranges)):
        got = nc.quantize_pack(x, spec, idx, lo, hi)
        assert_same_bytes(got, ref.quantize_pack_ref(x, spec, idx, lo, hi), lay, f"{msg} rank {r}")
        payloads.append(got)
    payloads = torch.stack(payloads)
    mins, maxs = stacked(ranges)
    for out_dtype in out_dtypes:
        got = nc.unpack_dequant_sum(payloads, tokens, hidden, spec, idx, mins, maxs, out_dtype=out_dtype)
        want = ref.unpack_dequant_sum_ref(payloads, tokens, hidden, spec, idx, mins, maxs, out_dtype=out_dtype)
        assert got.dtype == want.dtype
        assert_close_verbose(got, want, atol=0.0, msg=f"{msg} sum {out_dtype}")
        bits = torch.int32 if out_dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(bits), want.view(bits)), f"{msg} sum {out_dtype}: equal values, other bits"
    return payloads


ALL_SPECS = [QuantSpec(b, sym, gran, {"group": 25}.get(gran)) for b in WIDTHS for sym in (True, False)
             for gran in ("static", "token", "group")]


@pytest.mark.parametrize("outliers", ["none", "top", "rand"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=spec_id)
def test_every_width_sign_granularity_and_outlier_set_matches_the_reference(spec, outliers):
    xs, ranges = ranks(spec, T, H, seed=100)
    check_both(spec, xs, ranges, outlier_set(outliers, xs[0], seed=spec.bits), spec_id(spec))


SHAPE_SPECS = [QuantSpec(4, True, "static"), QuantSpec(4, False, "group", 32), QuantSpec(8, True, "token"),
               QuantSpec(3, False, "token", scale_dtype=torch.float32), QuantSpec(2, True, "group", 64)]


@pytest.mark.parametrize("tokens", [1, 2, 9, 16, 512])
@pytest.mark.parametrize("spec", SHAPE_SPECS, ids=spec_id)
def test_production_shapes_from_one_token_to_a_prefill_slice(spec, tokens):
    """576 features with the paper's 9 (= 1/64) top outliers; 512 x 576 is a slice of 8192 x 576."""
    xs, ranges = ranks(spec, tokens, 576, seed=200 + tokens)
    idx = outlier_set("top", torch.cat(xs), k=9)
    check_both(spec, xs, ranges, idx, f"{tokens} x 576", out_dtypes=(torch.float32, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [QuantSpec(4, True, "static"), QuantSpec(5, False, "group", 40),
                                  QuantSpec(6, True, "token")], ids=spec_id)
def test_half_precision_input_matches_the_reference(spec, dtype):
    xs, ranges = ranks(spec, T, H, seed=300, dtype=dtype)
    check_both(spec, xs, ranges, OUTLIERS, str(dtype), out_dtypes=(torch.float32, torch.float16))


DEGENERATE_SPECS = [QuantSpec(4, True, "static"), QuantSpec(4, False, "static"), QuantSpec(4, True, "token"),
                    QuantSpec(3, False, "token"), QuantSpec(8, True, "group", 40), QuantSpec(2, False, "group", 25),
                    QuantSpec(6, False, "group", 20, scale_dtype=torch.float32)]


@pytest.mark.parametrize("spec", DEGENERATE_SPECS, ids=spec_id)
def test_zeros_nan_inf_clamped_and_huge_values_match_the_reference(spec):
    xs, _ = ranks(spec, T, H, seed=400)
    x = xs[0]
    x[2] = 0.0  # an all-zero row
    x[5, :40] = 0.0  # an all-zero group
    x[0, 7], x[1, 8], x[2, 9], x[3, 10] = float("nan"), float("inf"), -float("inf"), -float("nan")
    x[3, OUTLIERS[0]], x[4, OUTLIERS[1]], x[6, OUTLIERS[2]] = float("nan"), float("inf"), -float("inf")
    x[6, 100], x[6, 101] = 3.0e38, -3.4e38  # near the fp32 ceiling: scales must not overflow
    x[4, 20:26] = torch.tensor([1e3, -1e3, 1e-30, -1e-40, 2.5, -3.5])  # beyond the static range, denormal
    x[1, 40:80] = float("nan")  # a group with no finite value
    xs[1][:, :5] = float("inf")
    ranges = [static_args(spec, torch.nan_to_num(v, nan=0.0, posinf=1.0, neginf=-1.0)) for v in xs]
    if ranges[0][0] is not None:
        ranges[0][0][:10], ranges[0][1][:10] = 0.0, 0.0  # features never active in calibration: scale 0
    check_both(spec, xs, ranges, OUTLIERS, spec_id(spec), out_dtypes=(torch.float32, torch.bfloat16))
    zeros = [torch.zeros(T, H) for _ in range(TP)]  # everything zero: every scale 0
    check_both(spec, zeros, [static_args(spec, z) for z in zeros], OUTLIERS, "zeros")


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "token"), QuantSpec(4, False, "static")], ids=spec_id)
def test_every_feature_an_outlier_and_zero_tokens(spec):
    xs, ranges = ranks(spec, T, 8, seed=500)
    check_both(spec, xs, ranges, torch.arange(8).flip(0), "all outliers")
    empty = torch.zeros(0, H)
    lo, hi = (-torch.ones(H), torch.ones(H))
    payload = nc.quantize_pack(empty, spec, OUTLIERS, lo, hi)
    assert payload.shape == (0,) and payload.dtype == torch.uint8
    out = nc.unpack_dequant_sum(torch.stack([payload, payload]), 0, H, spec, OUTLIERS, torch.stack([lo, lo]),
                                torch.stack([hi, hi]), out_dtype=torch.bfloat16)
    assert out.shape == (0, H) and out.dtype == torch.bfloat16


def test_non_contiguous_input_and_sliced_payloads_match_the_reference():
    spec = QuantSpec(4, False, "group", 40)
    x = partial(600)
    want = ref.quantize_pack_ref(x, spec, OUTLIERS)
    strided = torch.zeros(T, 2 * H)[:, ::2]
    strided.copy_(x)
    for variant in (x.t().contiguous().t(), strided):
        assert_same_bytes(nc.quantize_pack(variant, spec, OUTLIERS), want, layout(T, H, spec, 3))
    padded = torch.zeros(2, want.numel() + 5, dtype=torch.uint8)
    padded[:, :want.numel()] = want
    got = nc.unpack_dequant_sum(padded[:, :want.numel()], T, H, spec, OUTLIERS)
    assert_close_verbose(got, ref.unpack_dequant_sum_ref(torch.stack([want, want]), T, H, spec, OUTLIERS))


def test_signed_zero_ranges_give_the_reference_codes_and_sums():
    """The one documented divergence: a group whose min or max is +0.0 and -0.0 at once may carry
    the other zero in its header; codes and sums stay equal."""
    spec = QuantSpec(4, False, "group", 25)
    x = partial(700).abs()
    x[0, :25] = 0.0
    x[0, 3] = -0.0
    x[1, 25:50] = -x[1, 25:50]
    x[1, 30], x[1, 31] = 0.0, -0.0
    got, want = nc.quantize_pack(x, spec), ref.quantize_pack_ref(x, spec)
    lay = layout(T, H, spec)
    assert_same_bytes(got[lay.codes.offset:], want[lay.codes.offset:], msg="codes")
    assert_close_verbose(nc.unpack_dequant_sum(got[None], T, H, spec), ref.unpack_dequant_sum_ref(want[None], T, H, spec))


TWO_SHOT = [(QuantSpec(4, True, "static"), QuantSpec(4, True, "token")),
            (QuantSpec(4, True, "static"), QuantSpec(8, True, "token")),
            (QuantSpec(3, False, "group", 16), QuantSpec(5, False, "group", 16)),
            (QuantSpec(2, True, "token"), QuantSpec(6, True, "group", 32, scale_dtype=torch.float32))]


@pytest.mark.parametrize("first,second", TWO_SHOT, ids=[f"{spec_id(a)}+{spec_id(b)}" for a, b in TWO_SHOT])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_two_shot_requant_matches_the_reference(first, second, tokens):
    width = 192  # one chunk of 576 at TP 3
    xs, ranges = ranks(first, tokens, width, seed=800 + tokens)
    xs[0][0, 5] = float("nan")
    local = torch.tensor([4, 100, 33])
    payloads = torch.stack([ref.quantize_pack_ref(x, first, local, a, b) for x, (a, b) in zip(xs, ranges)])
    mins, maxs = stacked(ranges)
    got = nc.unpack_dequant_sum_requant(payloads, tokens, width, first, local, mins, maxs, second)
    want = ref.unpack_dequant_sum_requant_ref(payloads, tokens, width, first, local, mins, maxs, second)
    assert_same_bytes(got, want, layout(tokens, width, second, 3))
    with pytest.raises(ValueError, match="dynamic"):
        nc.unpack_dequant_sum_requant(payloads, tokens, width, first, local, mins, maxs, QuantSpec(8, True, "static"))


_SPECIALS = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 3e38, -3e38, 1e-40, 0.5, -2.5])


@st.composite
def cases(draw):
    bits = draw(st.sampled_from(WIDTHS))
    sym = draw(st.booleans())
    gran = draw(st.sampled_from(["static", "token", "group"]))
    group = draw(st.sampled_from([1, 3, 8])) if gran == "group" else None
    hidden = (group or 1) * draw(st.integers(1, 12))
    tokens = draw(st.integers(1, 11))
    spec = QuantSpec(bits, sym, gran, group, scale_dtype=draw(st.sampled_from([torch.bfloat16, torch.float32])))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=g) * 10.0 ** draw(st.integers(-3, 3)) for _ in range(2)]
    for x in xs:
        for _ in range(draw(st.integers(0, 4))):
            x[draw(st.integers(0, tokens - 1)), draw(st.integers(0, hidden - 1))] = draw(_SPECIALS)
    n_out = draw(st.integers(0, hidden))
    idx = torch.randperm(hidden, generator=g)[:n_out] if n_out else None
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return spec, [x.to(dtype) for x in xs], idx


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_property_any_spec_shape_and_values_match_the_reference(case):
    spec, xs, idx = case
    ranges = [static_args(spec, torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0)) for x in xs]
    check_both(spec, xs, ranges, idx, f"{spec_id(spec)} {tuple(xs[0].shape)} {xs[0].dtype} outliers={idx}")


# -- errors, the dispatcher and the communicator ---------------------------------------------------

@pytest.mark.parametrize("case,change,error,words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_quantize_input_raises_the_reference_error(case, change, error, words):
    args = dict(x=partial(7), spec=QuantSpec(4, True, "token"), outliers=OUTLIERS, lo=-torch.ones(H), hi=torch.ones(H))
    args.update(change)
    with pytest.raises(error, match=words):
        nc.quantize_pack(args["x"], args["spec"], args["outliers"], args["lo"], args["hi"])


def test_bad_unpack_input_raises_the_reference_error():
    spec = QuantSpec(4, True, "token")
    payloads = torch.stack([ref.quantize_pack_ref(partial(r), spec, OUTLIERS) for r in range(2)])
    for bad, error, words in [((payloads.to(torch.int32), T, H, spec, OUTLIERS), TypeError, "uint8"),
                              ((payloads[:, :-1], T, H, spec, OUTLIERS), ValueError, "layout expects"),
                              ((payloads, T, H, QuantSpec(4, True, "token", code="nf"), OUTLIERS), ValueError, "nf")]:
        with pytest.raises(error, match=words):
            nc.unpack_dequant_sum(*bad)
    with pytest.raises(TypeError, match="out_dtype"):
        nc.unpack_dequant_sum(payloads, T, H, spec, OUTLIERS, out_dtype=torch.int32)


def test_dispatch_auto_runs_native_on_cpu_and_native_refuses_other_devices(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "_native_broken", None)
    for spec in (QuantSpec(4, True, "static"), QuantSpec(3, False, "group", 8), QuantSpec(8, True, "token")):
        assert dispatch.backend("cpu", spec) == "native"  # every width: there is no size rule
    assert dispatch.backend("cuda", QuantSpec(4, True, "token")) == "triton"  # CUDA keeps Triton
    monkeypatch.setenv(dispatch.ENV, "native")
    with pytest.raises(ValueError, match="CPU"):
        dispatch.backend("cuda", QuantSpec(4, True, "token"))
    spec = QuantSpec(4, True, "static")
    x = partial(900)
    lo, hi = static_args(spec, x)
    want = ref.quantize_pack_ref(x, spec, OUTLIERS, lo, hi)
    assert_same_bytes(dispatch.quantize_pack(x, spec, OUTLIERS, lo, hi), want)
    got = dispatch.unpack_dequant_sum(want[None], T, H, spec, OUTLIERS, lo[None], hi[None], out_dtype=torch.bfloat16)
    assert_close_verbose(got, ref.unpack_dequant_sum_ref(want[None], T, H, spec, OUTLIERS, lo[None], hi[None],
                                                         out_dtype=torch.bfloat16))


def test_dispatch_auto_without_numba_raises_in_tests_and_otherwise_warns_once(monkeypatch):
    """numba missing: under LOWBIT_KERNELS_STRICT (the test suite's setting) auto raises; in a run
    (not strict) one warning, then the reference for good, and the reason is kept for the events."""
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "_native_broken", None)
    monkeypatch.setitem(sys.modules, "kernels.native_cpu", None)  # import now raises ImportError
    spec = QuantSpec(4, True, "token")
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(dispatch.KernelFailure, match="numba"):
        dispatch.backend("cpu", spec)
    monkeypatch.delenv(dispatch.STRICT_ENV)
    with pytest.warns(RuntimeWarning, match="numba"):
        assert dispatch.backend("cpu", spec) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning came once
        assert dispatch.backend("cpu", spec) == "reference"
    assert dispatch.native_failure().startswith("ModuleNotFoundError")  # an ImportError, kept for the events


@pytest.mark.parametrize("scheme", ["int4-static-top1/64", "int3a-group16-top1/32", "int4-token-rot16",
                                    "int4-static-top1/64@twoshot+int4-token", "int2-static@twoshot+int8-token",
                                    "nf4-static-top1/64"])  # nf: not in the kernels, stays on lowbit.wire.payload
def test_communicator_with_the_native_codec_gives_the_payload_paths_sums_and_counts(scheme):
    from tests.collective_cases import partials, reduce_on_threads
    xs = [x.clone() for x in partials(TP)]
    xs[0][2, 5], xs[1][4, 9], xs[2][1, 11] = float("nan"), float("inf"), 1e3
    base = reduce_on_threads(scheme, TP, xs)
    native = reduce_on_threads(scheme, TP, xs, codec=dispatch.Codec("native"))
    for rank, ((a, call_a), (b, call_b)) in enumerate(zip(base, native)):
        assert_close_verbose(b, a, atol=0.0, msg=f"{scheme} rank {rank}")
        assert call_a.bytes_sent == call_b.bytes_sent
        for key in ("leg1_bits", "leg2_bits", "clamped", "nonfinite", "leg2_clamped"):
            assert call_a.extra.get(key) == call_b.extra.get(key), (scheme, key)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "static"), QuantSpec(8, False, "static"),
                                  QuantSpec(3, True, "static")], ids=spec_id)
def test_half_step_ties_and_near_ties_round_like_the_reference(spec):
    """Values at and one or two ulps around (k + 1/2) * scale: IEEE division then half-to-even
    rounding decide these codes (a reciprocal multiply or another rounding rule changes some)."""
    g = torch.Generator().manual_seed(1000)
    lo, hi = -torch.rand(H, generator=g) * 4 - 0.1, torch.rand(H, generator=g) * 4 + 0.1
    scales, mins = ref.static_tables(spec, lo, hi, H, "cpu")
    qmin, qmax = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (0, 2**spec.bits - 1)
    k = torch.randint(qmin, qmax, (64, H), generator=g).float() + 0.5
    x = k * scales + mins
    ulps = torch.randint(-2, 3, (64, H), generator=g)
    for step in (1, 2):
        x = torch.where(ulps >= step, torch.nextafter(x, torch.tensor(torch.inf)), x)
        x = torch.where(ulps <= -step, torch.nextafter(x, torch.tensor(-torch.inf)), x)
    check_both(spec, [x], [(lo, hi)], None, spec_id(spec))


@pytest.mark.parametrize("env", ["native", "reference"])
@pytest.mark.parametrize("spec", [QuantSpec(4, True, "static"), QuantSpec(3, False, "static"),
                                  QuantSpec(4, False, "group", 40)], ids=spec_id)
def test_counts_from_the_kernel_pass_equal_lowbits_input_counts(spec, env, monkeypatch):
    """quantize_pack_counts: clamped (kept finite values beyond the static range, outlier features
    left out) and nonfinite (all of x) as lowbit.quant.input_counts and the communicator count them."""
    from lowbit.quant import input_counts
    monkeypatch.setenv(dispatch.ENV, env)
    for dtype in (torch.float32, torch.bfloat16):
        x = partial(1100, dtype=dtype)
        x[0, 7], x[1, 8], x[2, 9] = float("nan"), float("inf"), -float("inf")
        x[3, OUTLIERS[0]], x[4, OUTLIERS[1]] = float("nan"), 1e6  # an outlier: nonfinite yes, clamped no
        lo, hi = static_args(spec, torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0))
        want = input_counts(x, spec, lo, hi, OUTLIERS)
        want = {"clamped": want["clamped"], "nonfinite": int((~torch.isfinite(x)).sum())}
        assert want["nonfinite"] == 4 and (spec.granularity != "static" or want["clamped"] > 0)
        for fn in (nc.quantize_pack_counts, dispatch.quantize_pack_counts):
            payload, counts = fn(x, spec, OUTLIERS, lo, hi)
            assert counts == want, (fn.__module__, dtype, counts, want)
            assert_same_bytes(payload, ref.quantize_pack_ref(x, spec, OUTLIERS, lo, hi))
