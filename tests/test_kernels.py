"""Kernels held to their torch reference: the reference to lowbit.wire.payload, the Triton kernels (under
the Triton interpreter) to the reference, byte for byte, plus degenerate input and the dispatcher.

    .venv/bin/python -m pytest tests/test_kernels.py -q

The Triton kernels are imported with TRITON_INTERPRET=1 set before their import
(``dispatch.import_interpreted``), on small irregular shapes (7 tokens x 200 features, 3 outlier
features, groups that are not powers of two, rows whose packed codes share a byte) so the
interpreter stays fast. The numba kernels have their own file (test_kernels_native.py).
"""
from __future__ import annotations

import pytest
import torch

from kernels import dispatch
from kernels import reference as ref
from lowbit.wire.payload import decode, encode, layout
from lowbit.scheme import QuantSpec, SchemeError

from tests.helpers import assert_close_verbose

tq = dispatch.import_interpreted()

T, H = 7, 200
OUTLIERS = torch.tensor([3, 150, 77])  # unsorted on purpose: the payload keeps the caller's order


def spec_id(spec: QuantSpec) -> str:
    return str(spec) + ("-fp32scale" if spec.scale_dtype == torch.float32 else "")


def partial(seed: int, tokens: int = T, hidden: int = H, dtype=torch.float32) -> torch.Tensor:
    """A partial sum with rows of different magnitude and a few large outlier features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g) * torch.exp(torch.randn(tokens, 1, generator=g))
    if hidden > 150:
        x[:, OUTLIERS] *= 30.0
    return x.to(dtype)


def static_range(x: torch.Tensor, margin: float = 0.1):
    """A calibrated range a little narrower than the data at the top, so some values clamp."""
    lo, hi = x.float().amin(0), x.float().amax(0)
    return lo * (1 - margin), hi * (1 - margin)


def static_args(spec: QuantSpec, x: torch.Tensor):
    return static_range(x) if spec.granularity == "static" else (None, None)


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor, lay=None, msg: str = "") -> None:
    """Equal payloads; on failure name the section and the first differing offsets."""
    assert actual.dtype == torch.uint8 and actual.shape == expected.shape, \
        f"{msg} payload {actual.dtype} {tuple(actual.shape)} != {expected.dtype} {tuple(expected.shape)}"
    bad = (actual != expected).nonzero().reshape(-1)
    if bad.numel() == 0:
        return
    lines = [f"{msg} {bad.numel()} of {actual.numel()} bytes differ; first:"]
    for off in bad[:6].tolist():
        section = "?"
        if lay is not None:
            for name in ("scales", "mins", "codes", "outliers"):
                sec = getattr(lay, name)
                if sec.offset <= off < sec.end:
                    section = f"{name}+{off - sec.offset}"
        lines.append(f"  byte {off} ({section}): actual {int(actual[off])} expected {int(expected[off])}")
    raise AssertionError("\n".join(lines))


# -- the reference against lowbit.wire.payload (the owner of the layout) --------------------------------

REFERENCE_SPECS = [QuantSpec(b, sym, gran, {"group": 25}.get(gran)) for b in (2, 3, 4, 5, 6, 8)
                   for sym in (True, False) for gran in ("static", "token", "group")]


@pytest.mark.parametrize("spec", REFERENCE_SPECS, ids=spec_id)
@pytest.mark.parametrize("outliers", [None, OUTLIERS], ids=["no-outliers", "3-outliers"])
def test_reference_payload_is_lowbit_encode_and_sum_is_rank_order_decode(spec, outliers):
    tp, payloads, mins, maxs = 3, [], [], []
    for r in range(tp):
        x = partial(10 + r)
        lo, hi = static_args(spec, x)
        expected, _ = encode(x, spec, outliers, lo, hi)
        actual = ref.quantize_pack_ref(x, spec, outliers, lo, hi)
        n_out = 0 if outliers is None else outliers.numel()
        assert_same_bytes(actual, expected, layout(T, H, spec, n_out), f"rank {r}")
        payloads.append(actual)
        mins.append(lo)
        maxs.append(hi)
    static = (torch.stack(mins), torch.stack(maxs)) if spec.granularity == "static" else (None, None)
    total = torch.zeros(T, H)
    for r in range(tp):
        total = total + decode(payloads[r], T, H, spec, outliers, mins[r], maxs[r])
    got = ref.unpack_dequant_sum_ref(torch.stack(payloads), T, H, spec, outliers, *static)
    assert_close_verbose(got, total, atol=0.0, msg="same fp32 ops in the same rank order: exact")


# -- Triton kernels (interpreted) against the reference --------------------------------------------

TRITON_SPECS = [
    QuantSpec(4, True, "static"),                              # the paper
    QuantSpec(4, False, "static"),
    QuantSpec(2, True, "static"),
    QuantSpec(8, False, "static"),
    QuantSpec(4, True, "token"),
    QuantSpec(8, True, "token", scale_dtype=torch.float32),
    QuantSpec(2, False, "token"),
    QuantSpec(4, False, "group", 40),
    QuantSpec(2, True, "group", 25),                           # group not a power of two
    QuantSpec(8, False, "group", 8),
]


TRITON_CASES = [(s, OUTLIERS) for s in TRITON_SPECS] + [(s, None) for s in TRITON_SPECS[::3]]
CASE_IDS = [spec_id(s) + ("-3-outliers" if o is not None else "-no-outliers") for s, o in TRITON_CASES]


@pytest.mark.parametrize("spec,outliers", TRITON_CASES, ids=CASE_IDS)
def test_triton_quantize_pack_bytes_equal_reference(spec, outliers):
    x = partial(1)
    lo, hi = static_args(spec, x)
    n_out = 0 if outliers is None else outliers.numel()
    # K * bits % 8 != 0 with outliers at 2 and 4 bits: a byte straddles rows and programs
    assert_same_bytes(tq.quantize_pack(x, spec, outliers, lo, hi), ref.quantize_pack_ref(x, spec, outliers, lo, hi),
                      layout(T, H, spec, n_out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", [QuantSpec(4, True, "static"), QuantSpec(4, False, "group", 40)], ids=spec_id)
def test_triton_quantize_pack_of_half_inputs_equals_reference(spec, dtype):
    x = partial(2, dtype=dtype)
    lo, hi = static_args(spec, x)
    assert_same_bytes(tq.quantize_pack(x, spec, OUTLIERS, lo, hi), ref.quantize_pack_ref(x, spec, OUTLIERS, lo, hi),
                      layout(T, H, spec, 3))


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_triton_quantize_pack_is_independent_of_rows_per_program(rows):
    # 4-bit, K = 197 odd: every other row starts mid-byte; with 1 row per program every program
    # computes the scale of its halo row
    spec = QuantSpec(4, True, "token")
    x = partial(3)
    assert_same_bytes(tq.quantize_pack(x, spec, OUTLIERS, rows_per_program=rows),
                      ref.quantize_pack_ref(x, spec, OUTLIERS), layout(T, H, spec, 3))


def gathered(spec: QuantSpec, tp: int, outliers, tokens: int = T, hidden: int = H, seed: int = 20):
    """(payloads [tp, n], static mins [tp, H] or None, maxs): what every rank sent."""
    payloads, mins, maxs = [], [], []
    for r in range(tp):
        x = partial(seed + r, tokens, hidden)
        lo, hi = static_args(spec, x)
        payloads.append(ref.quantize_pack_ref(x, spec, outliers, lo, hi))
        mins.append(lo)
        maxs.append(hi)
    if spec.granularity != "static":
        return torch.stack(payloads), None, None
    return torch.stack(payloads), torch.stack(mins), torch.stack(maxs)


@pytest.mark.parametrize("spec,outliers", TRITON_CASES, ids=CASE_IDS)
def test_triton_unpack_dequant_sum_equals_reference(spec, outliers):
    payloads, mins, maxs = gathered(spec, 3, outliers)
    got = tq.unpack_dequant_sum(payloads, T, H, spec, outliers, mins, maxs)
    want = ref.unpack_dequant_sum_ref(payloads, T, H, spec, outliers, mins, maxs)
    # the kernel does the reference's fp32 ops (q * scale [+ lo], saturate, 0 + r0 + r1 + r2) in
    # the same order, and the interpreter computes in numpy fp32: equal to the last bit
    assert_close_verbose(got, want, atol=0.0, msg=str(spec))


@pytest.mark.parametrize("block_t,block_h", [(1, 128), (4, 64)])
def test_triton_unpack_dequant_sum_is_independent_of_the_tile(block_t, block_h):
    spec = QuantSpec(2, False, "group", 25)
    payloads, _, _ = gathered(spec, 2, OUTLIERS)
    got = tq.unpack_dequant_sum(payloads, T, H, spec, OUTLIERS, block_t=block_t, block_h=block_h)
    assert_close_verbose(got, ref.unpack_dequant_sum_ref(payloads, T, H, spec, OUTLIERS), atol=0.0)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_unpack_dequant_sum_writes_the_output_dtype_like_torch(out_dtype):
    spec = QuantSpec(4, True, "static")
    payloads, mins, maxs = gathered(spec, 2, OUTLIERS)
    got = tq.unpack_dequant_sum(payloads, T, H, spec, OUTLIERS, mins, maxs, out_dtype=out_dtype)
    want = ref.unpack_dequant_sum_ref(payloads, T, H, spec, OUTLIERS, mins, maxs, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    # one rounding of the same fp32 sum, to nearest even in both: identical
    assert_close_verbose(got.float(), want.float(), atol=0.0)


@pytest.mark.parametrize("first,second", [
    (QuantSpec(4, True, "static"), QuantSpec(8, True, "token")),     # the paper + default second leg
    (QuantSpec(4, True, "static"), QuantSpec(4, True, "token")),
    (QuantSpec(2, False, "group", 22), QuantSpec(4, False, "group", 11)),
], ids=lambda s: spec_id(s))
def test_triton_two_shot_requant_bytes_equal_reference(first, second):
    tokens, width = 5, 66  # one rank's chunk of a 198-feature partial at TP 3
    local = torch.tensor([40, 2])
    payloads, mins, maxs = gathered(first, 3, local, tokens, width)
    got = tq.unpack_dequant_sum_requant(payloads, tokens, width, first, local, mins, maxs, second)
    want = ref.unpack_dequant_sum_requant_ref(payloads, tokens, width, first, local, mins, maxs, second)
    assert_same_bytes(got, want, layout(tokens, width, second, 2))


# -- degenerate input -------------------------------------------------------------------------------

QUANTIZERS = {"reference": ref.quantize_pack_ref, "triton": tq.quantize_pack}
SUMMERS = {"reference": ref.unpack_dequant_sum_ref, "triton": tq.unpack_dequant_sum}


@pytest.mark.parametrize("path", QUANTIZERS)
@pytest.mark.parametrize("spec", [QuantSpec(4, True, "static"), QuantSpec(4, False, "group", 40)], ids=spec_id)
def test_zero_tokens_give_an_empty_payload_and_an_empty_sum(path, spec):
    x = torch.zeros(0, H)
    lo, hi = (-torch.ones(H), torch.ones(H)) if spec.granularity == "static" else (None, None)
    payload = QUANTIZERS[path](x, spec, OUTLIERS, lo, hi)
    assert payload.dtype == torch.uint8 and payload.shape == (0,) == (layout(0, H, spec, 3).total_bytes,)
    static = (torch.stack([lo, lo]), torch.stack([hi, hi])) if lo is not None else (None, None)
    out = SUMMERS[path](torch.stack([payload, payload]), 0, H, spec, OUTLIERS, *static, out_dtype=torch.bfloat16)
    assert out.shape == (0, H) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("path", QUANTIZERS)
@pytest.mark.parametrize("spec", [QuantSpec(4, True, "token"), QuantSpec(4, False, "group", 40),
                                  QuantSpec(8, True, "static")], ids=spec_id)
def test_all_zero_rows_have_scale_zero_and_decode_to_exact_zeros(path, spec):
    x = partial(4)
    x[2] = 0.0
    x[5, :40] = 0.0  # one all-zero group of 40 (asymmetric: lo = hi = 0)
    lo, hi = static_args(spec, x)
    if lo is not None:
        lo[:10], hi[:10] = 0.0, 0.0  # features never active in calibration: static scale 0
        x[:, :10] = 0.0
    payload = QUANTIZERS[path](x, spec, OUTLIERS, lo, hi)
    assert_same_bytes(payload, ref.quantize_pack_ref(x, spec, OUTLIERS, lo, hi), layout(T, H, spec, 3))
    static = (lo.unsqueeze(0), hi.unsqueeze(0)) if lo is not None else (None, None)
    out = SUMMERS[path](payload.unsqueeze(0), T, H, spec, OUTLIERS, *static)
    assert torch.equal(out[2], torch.zeros(H))
    if spec.granularity == "group":
        assert torch.equal(out[5, :40], torch.zeros(40))
    if lo is not None:
        assert torch.equal(out[:, :10], torch.zeros(T, 10))


@pytest.mark.parametrize("path", QUANTIZERS)
@pytest.mark.parametrize("spec", [QuantSpec(4, True, "static"), QuantSpec(4, False, "token"),
                                  QuantSpec(8, True, "group", 40)], ids=spec_id)
def test_nan_and_inf_give_the_reference_bytes_and_a_finite_sum_where_quantized(path, spec):
    x = partial(5)
    x[0, 7], x[1, 8], x[2, 9] = float("nan"), float("inf"), -float("inf")
    x[3, OUTLIERS[0]], x[4, OUTLIERS[1]] = float("nan"), float("inf")  # outliers travel as they are
    x[6, 100] = 3.0e38  # near the fp32 ceiling: scales must not overflow
    lo, hi = static_args(spec, torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0))
    payload = QUANTIZERS[path](x, spec, OUTLIERS, lo, hi)
    assert_same_bytes(payload, ref.quantize_pack_ref(x, spec, OUTLIERS, lo, hi), layout(T, H, spec, 3))
    static = (lo.unsqueeze(0), hi.unsqueeze(0)) if lo is not None else (None, None)
    out = SUMMERS[path](payload.unsqueeze(0), T, H, spec, OUTLIERS, *static)
    quantized = torch.ones(H, dtype=torch.bool)
    quantized[OUTLIERS] = False
    assert torch.isfinite(out[:, quantized]).all()
    if spec.symmetric:
        assert out[0, 7] == 0.0  # NaN quantizes as 0.0: the zero code
    assert torch.isnan(out[3, OUTLIERS[0]]) and out[4, OUTLIERS[1]] == float("inf")


@pytest.mark.parametrize("path", QUANTIZERS)
def test_non_contiguous_input_gives_the_same_payload(path):
    spec = QuantSpec(4, False, "group", 40)
    x = partial(6)
    transposed = x.t().contiguous().t()  # column-major
    strided = torch.zeros(T, 2 * H)[:, ::2]
    strided.copy_(x)
    want = ref.quantize_pack_ref(x, spec, OUTLIERS)
    for variant in (transposed, strided):
        assert not variant.is_contiguous()
        assert_same_bytes(QUANTIZERS[path](variant, spec, OUTLIERS), want, layout(T, H, spec, 3))


@pytest.mark.parametrize("path", QUANTIZERS)
def test_payloads_sliced_from_a_wider_buffer_sum_like_contiguous_ones(path):
    spec = QuantSpec(4, True, "token")
    payloads, _, _ = gathered(spec, 2, OUTLIERS)
    padded = torch.zeros(2, payloads.shape[1] + 5, dtype=torch.uint8)
    padded[:, :payloads.shape[1]] = payloads  # two-shot pads leg-2 payloads to the largest chunk
    got = SUMMERS[path](padded[:, :payloads.shape[1]], T, H, spec, OUTLIERS)
    assert_close_verbose(got, ref.unpack_dequant_sum_ref(payloads, T, H, spec, OUTLIERS), atol=0.0)


BAD_INPUT = [
    ("int dtype", dict(x=torch.ones(T, H, dtype=torch.int32)), TypeError, "dtype"),
    ("float64", dict(x=torch.ones(T, H, dtype=torch.float64)), TypeError, "dtype"),
    ("1-D", dict(x=torch.ones(H)), ValueError, "tokens, hidden"),
    ("not a tensor", dict(x=[[1.0] * H] * T), TypeError, "torch.Tensor"),
    ("group does not divide", dict(spec=QuantSpec(4, True, "group", 64)), SchemeError, "group_size"),
    ("outlier out of range", dict(outliers=torch.tensor([0, H])), ValueError, "outlier_idx"),
    ("outlier repeated", dict(outliers=torch.tensor([4, 4])), ValueError, "repeat"),
    ("static without range", dict(spec=QuantSpec(4, True, "static"), lo=None), ValueError, "static_min"),
    ("static range not finite", dict(spec=QuantSpec(4, True, "static"), lo=torch.full((H,), -float("inf"))),
     ValueError, "finite"),
    ("stochastic rounding", dict(spec=QuantSpec(4, True, "token", rounding="stochastic")), ValueError, "stochastic"),
    ("nf codebook", dict(spec=QuantSpec(4, True, "token", code="nf")), ValueError, "code 'nf'"),
    ("fp8 code", dict(spec=QuantSpec(8, True, "token", code="fp", exp_bits=4)), ValueError, "code 'fp8e4m3'"),
    ("fp4 code", dict(spec=QuantSpec(4, True, "group", 16, code="fp", exp_bits=2)), ValueError, "code 'fp4e2m1'"),
    ("fp16 scales", dict(spec=QuantSpec(4, True, "token", scale_dtype=torch.float16)), ValueError,
     "scale format 'fp16'"),
    ("e8m0 scales", dict(spec=QuantSpec(4, True, "group", 16, scale_dtype=torch.float8_e8m0fnu)), ValueError,
     "scale format 'e8m0'"),
]


@pytest.mark.parametrize("path", ["reference", "triton", "dispatch"])
@pytest.mark.parametrize("case,change,error,words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_quantize_input_raises_a_clear_error(path, case, change, error, words):
    args = dict(x=partial(7), spec=QuantSpec(4, True, "token"), outliers=OUTLIERS, lo=-torch.ones(H), hi=torch.ones(H))
    args.update(change)
    fn = {"reference": ref.quantize_pack_ref, "triton": tq.quantize_pack, "dispatch": dispatch.quantize_pack}[path]
    with pytest.raises(error, match=words):
        fn(args["x"], args["spec"], args["outliers"], args["lo"], args["hi"])


@pytest.mark.parametrize("path", ["reference", "triton", "dispatch"])
def test_bad_unpack_input_raises_a_clear_error(path):
    fn = {"reference": ref.unpack_dequant_sum_ref, "triton": tq.unpack_dequant_sum,
          "dispatch": dispatch.unpack_dequant_sum}[path]
    spec = QuantSpec(4, True, "token")
    payloads, _, _ = gathered(spec, 2, OUTLIERS)
    with pytest.raises(TypeError, match="uint8"):
        fn(payloads.to(torch.int32), T, H, spec, OUTLIERS)
    with pytest.raises(ValueError, match="layout expects"):
        fn(payloads[:, :-1], T, H, spec, OUTLIERS)
    with pytest.raises(ValueError, match="layout expects"):
        fn(payloads, T, H, spec, None)  # outliers change the layout
    with pytest.raises(TypeError, match="out_dtype"):
        fn(payloads, T, H, spec, OUTLIERS, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="code 'nf'"):  # nf codes read as a uniform grid would decode wrong
        fn(payloads, T, H, QuantSpec(4, True, "token", code="nf"), OUTLIERS)
    with pytest.raises(ValueError, match="code 'fp8e4m3'"):  # fp bit patterns read as a grid: wrong values
        fn(payloads, T, H, QuantSpec(8, True, "token", code="fp", exp_bits=4), OUTLIERS)
    with pytest.raises(ValueError, match="scale format 'e4m3'"):  # its message scale shifts every section
        fn(payloads, T, H, QuantSpec(4, True, "token", scale_dtype=torch.float8_e4m3fn), OUTLIERS)
    static = QuantSpec(4, True, "static")
    sp, mins, maxs = gathered(static, 2, OUTLIERS)
    with pytest.raises(ValueError, match=r"tp=2"):
        fn(sp, T, H, static, OUTLIERS, mins[0], maxs[0])  # one rank's range for two senders


def test_triton_refuses_bits_that_straddle_bytes_and_dispatch_routes_them_to_torch(monkeypatch):
    spec = QuantSpec(3, True, "token")
    x = partial(8)
    with pytest.raises(ValueError, match="torch path"):
        tq.quantize_pack(x, spec, OUTLIERS)
    monkeypatch.setenv(dispatch.ENV, "interpret")
    assert dispatch.backend("cpu", spec) == "reference" and dispatch.backend("cpu", QuantSpec(4, True, "token")) == \
        "interpret"
    assert_same_bytes(dispatch.quantize_pack(x, spec, OUTLIERS), ref.quantize_pack_ref(x, spec, OUTLIERS))


def test_requant_second_leg_must_be_dynamic():
    spec = QuantSpec(4, True, "token")
    payloads, _, _ = gathered(spec, 2, OUTLIERS)
    for fn in (ref.unpack_dequant_sum_requant_ref, tq.unpack_dequant_sum_requant, dispatch.unpack_dequant_sum_requant):
        with pytest.raises(ValueError, match="dynamic"):
            fn(payloads, T, H, spec, OUTLIERS, None, None, QuantSpec(8, True, "static"))


# -- the dispatcher -----------------------------------------------------------------------------------

@pytest.mark.parametrize("env,device,bits,expected", [
    ("auto", "cpu", 4, "native"),
    ("", "cpu", 3, "native"),
    ("auto", "cuda", 4, "triton"),
    ("auto", "cuda", 6, "reference"),
    ("triton", "cuda", 2, "triton"),
    ("interpret", "cpu", 8, "interpret"),
    ("interpret", "cpu", 5, "reference"),
    ("native", "cpu", 4, "native"),
    ("reference", "cuda", 4, "reference"),
])
def test_dispatch_picks_the_backend_for_device_and_bits(monkeypatch, env, device, bits, expected):
    monkeypatch.setenv(dispatch.ENV, env)
    monkeypatch.setattr(dispatch, "_native_broken", None)
    assert dispatch.backend(device, QuantSpec(bits, True, "token")) == expected


def test_dispatch_asks_the_registry_for_the_whole_spec_not_its_width(monkeypatch):
    """A spec no kernel implements (another code, scale format or rounding; a grouping no kernel
    registers) runs on the reference whatever its width; a two-shot requantization needs both legs."""
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "_native_broken", None)
    for spec in (QuantSpec(4, True, "token", code="nf"), QuantSpec(4, True, "token", scale_dtype=torch.float16),
                 QuantSpec(8, True, "token", code="fp", exp_bits=4),
                 QuantSpec(4, True, "token", rounding="stochastic")):
        assert dispatch.backend("cpu", spec) == "reference" and dispatch.backend("cuda", spec) == "reference", spec
    four, three = QuantSpec(4, True, "token"), QuantSpec(3, True, "token")
    assert dispatch.backend("cuda", four, four) == "triton" and dispatch.backend("cuda", four, three) == "reference"


def test_dispatch_rejects_an_unknown_mode_and_triton_off_cuda(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "fast")
    with pytest.raises(ValueError, match="allowed: auto, triton, interpret, native, reference"):
        dispatch.backend("cpu", QuantSpec(4, True, "token"))
    monkeypatch.setenv(dispatch.ENV, "triton")
    with pytest.raises(ValueError, match="CUDA"):
        dispatch.quantize_pack(partial(9), QuantSpec(4, True, "token"))


def test_dispatch_interpret_and_reference_modes_give_the_reference_bytes(monkeypatch):
    spec = QuantSpec(4, True, "static")
    x = partial(11)
    lo, hi = static_range(x)
    want = ref.quantize_pack_ref(x, spec, OUTLIERS, lo, hi)
    for env in ("interpret", "reference"):
        monkeypatch.setenv(dispatch.ENV, env)
        assert_same_bytes(dispatch.quantize_pack(x, spec, OUTLIERS, lo, hi), want, msg=env)
        got = dispatch.unpack_dequant_sum(want.unsqueeze(0), T, H, spec, OUTLIERS, lo.unsqueeze(0), hi.unsqueeze(0))
        assert_close_verbose(got, ref.unpack_dequant_sum_ref(want.unsqueeze(0), T, H, spec, OUTLIERS,
                                                             lo.unsqueeze(0), hi.unsqueeze(0)), atol=0.0)


def test_a_forced_codec_leaves_the_dispatcher_as_it_was_even_from_concurrent_threads(monkeypatch):
    """dispatch.Codec forces its backend per thread: rank threads calling one Codec at once must
    not leave another thread's (or the process's) choice behind."""
    import threading
    monkeypatch.delenv(dispatch.ENV, raising=False)
    codec = dispatch.Codec("reference")
    spec = QuantSpec(4, True, "token")
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    barrier = threading.Barrier(3)

    def rank():
        barrier.wait()
        for _ in range(20):
            codec.quantize_pack(x, spec)
    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = []
    inner = threading.Thread(target=lambda: seen.append(dispatch.mode()))
    inner.start()
    inner.join()
    assert dispatch.mode() == "auto" and seen == ["auto"]  # neither this thread nor a new one is left forced
