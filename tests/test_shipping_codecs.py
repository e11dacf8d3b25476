"""The shipping codecs as lowbit plug-ins (issue 26): one message through ``lowbit.quant`` and through
the payload bytes is byte-equal to the independent numpy re-derivation (tests/shipping_reference.py)
on ordinary values, values above 65504, tiny blocks, NaN/Inf and mixed signs; property tests hold
each new quantizer's error bound and its NaN/Inf behaviour.

    .venv/bin/python -m pytest tests/test_shipping_codecs.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import dequantize, quantize
from lowbit.scheme import parse_scheme
from lowbit.wire.payload import decode, encode, layout
from tests import shipping_reference as R

SHAPE = (16, 576)


def same(a, b) -> bool:
    """Bitwise-equal values, NaN equal to NaN (byte-equal decoded floats)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def edge_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """bf16 values (as float64) of the edge cases the issue names."""
    rng = np.random.default_rng(seed)
    base = R.round_to(rng.standard_normal(SHAPE), "bf16")
    over = base.copy()
    over[3, 5], over[7, 100] = 70144.0, -1e30            # above fp16's 65504
    tiny = R.round_to(rng.standard_normal(SHAPE) * 1e-5, "bf16")  # under QuickReduce's reciprocal cliff
    special = base.copy()
    special[0, 0], special[1, 65], special[2, 300], special[5, 7] = np.nan, np.inf, -np.inf, np.nan
    mixed = base.copy()
    mixed[4, :64] = np.where(np.arange(64) % 2, 8.0, -8.0)  # equal magnitudes, both signs
    mixed[6, :32] = 0.0
    return dict(randn=base, over65504=over, tiny=tiny, nonfinite=special, mixed=mixed)


def lowbit_roundtrip(x: np.ndarray, scheme: str) -> np.ndarray:
    """One message quantized, written to its payload bytes, read back and decoded by lowbit."""
    spec = parse_scheme(scheme).quant
    t = torch.from_numpy(x.astype(np.float32))
    res = quantize(t, spec)
    direct = dequantize(res.codes, spec, res.scales).double().numpy()
    payload, _ = encode(t, spec)
    assert payload.numel() == layout(*x.shape, spec).total_bytes
    via_bytes = decode(payload, *x.shape, spec).double().numpy()
    assert same(direct, via_bytes)
    return via_bytes


def fi_roundtrip(x: np.ndarray) -> np.ndarray:
    q, inverse = R._fi_quantize(x.ravel().astype(np.float32), 256)
    with np.errstate(invalid="ignore", over="ignore"):
        return (q * inverse[np.arange(x.size) // 256]).reshape(x.shape)


def trt_roundtrip(x: np.ndarray) -> np.ndarray:
    groups = R._trt_groups(x.ravel().astype(np.float32))
    return R._trt_dequantize(*R._trt_quantize(groups)).ravel()[:x.size].reshape(x.shape)


CODECS = {  # scheme -> the re-derivation of one message's round trip
    **{f"qint{b}-ilv32-sqr-f16": (lambda x, b=b: R.qr_roundtrip(x, f"int{b}", True, "inf")) for b in (3, 4, 6, 8)},
    **{f"qint{b}-ilv32-sqr-f16sat": (lambda x, b=b: R.qr_roundtrip(x, f"int{b}", True, "saturate")) for b in (4, 8)},
    **{f"qint{b}-ilv32-sqr-bf16": (lambda x, b=b: R.qr_roundtrip(x, f"int{b}", False)) for b in (4, 6, 8)},
    "f8e4m3-flat256-sfi": fi_roundtrip,
    "f8e4m3-pad496-strt": trt_roundtrip,
    "f8e4m3-tensor-snone": lambda x: R.round_to(x, "e4m3", "satfinite"),  # torch 2.13's cast
    "f8e5m2-tensor-snone": lambda x: R.round_to(x, "e5m2", "inf"),
    "fp4e2m1-group32-se8m0fl": lambda x: R.mxfp4_roundtrip(x.ravel()).reshape(x.shape),
    "fp4e2m1-group16-snv": lambda x: R.nvfp4_roundtrip(x.ravel()).reshape(x.shape),
}


@pytest.mark.parametrize("case", list(edge_inputs()))
@pytest.mark.parametrize("scheme", list(CODECS))
def test_one_message_is_byte_equal_to_the_rederivation(scheme, case):
    x = edge_inputs()[case]
    assert same(lowbit_roundtrip(x, scheme), CODECS[scheme](x))


def test_an_odd_sized_message_pads_as_the_kernels_do():
    """A message that is not a multiple of the group: QuickReduce's zero-padded tile, TensorRT-LLM's
    last warp (its padding's codes are sent: 496 codes per group on the wire)."""
    x = R.round_to(np.random.default_rng(3).standard_normal((3, 170)), "bf16")
    assert same(lowbit_roundtrip(x, "qint4-ilv32-sqr-f16"), R.qr_roundtrip(x, "int4"))
    assert same(lowbit_roundtrip(x, "f8e4m3-pad496-strt"), trt_roundtrip(x))
    spec = parse_scheme("f8e4m3-pad496-strt").quant
    assert layout(3, 170, spec).total_bytes == 2 * 496 + 2 * 16   # two groups: 496 codes + a 16-byte lane each


def test_wire_bytes_are_the_kernels_bits_per_value():
    """Accounting takes bits from bytes: QuickReduce 4.5 / 6.5 / 8.5 / 3.5, FlashInfer 8.125,
    TensorRT-LLM 512 bytes per 496 values, NCCL 8, MXFP4 4.25, NVFP4 4.5 + 32 per message."""
    n = 64 * 2048
    expect = {"qint4-ilv32-sqr-f16": 4.5, "qint6-ilv32-sqr-f16": 6.5, "qint8-ilv32-sqr-f16": 8.5,
              "qint3-ilv32-sqr-f16": 3.5, "f8e4m3-flat256-sfi": 8.125, "f8e4m3-tensor-snone": 8.0,
              "fp4e2m1-group32-se8m0fl": 4.25, "fp4e2m1-group16-snv": 4.5 + 32 / n}
    for scheme, bits in expect.items():
        assert 8 * layout(64, 2048, parse_scheme(scheme).quant).total_bytes / n == pytest.approx(bits)
    assert layout(1, 496 * 4, parse_scheme("f8e4m3-pad496-strt").quant).total_bytes == 4 * 512


def test_quickreduce_edge_behaviour_in_numbers():
    """70144 with the fp16 cast: exactly its group of 32 (the even or odd half of a 64-block) decodes
    non-finite; gfx942's clamp gives 65504; NaN decodes to its group's signed extreme."""
    x = edge_inputs()["randn"].copy()
    x[0, 2] = 70144.0
    out = lowbit_roundtrip(x, "qint4-ilv32-sqr-f16")
    bad = np.flatnonzero(~np.isfinite(out))
    assert bad.tolist() == list(range(0, 64, 2))
    sat = lowbit_roundtrip(x, "qint4-ilv32-sqr-f16sat")
    assert np.isfinite(sat).all() and sat[0, 2] == 65504.0
    y = edge_inputs()["randn"].copy()
    y[0, 0] = np.nan
    group = y.ravel()[0:64:2][1:]
    extreme = group[np.argmax(np.abs(group))]
    assert lowbit_roundtrip(y, "qint8-ilv32-sqr-f16")[0, 0] == pytest.approx(extreme, rel=1e-2)  # fp16 step


# --- property tests: error bound and NaN/Inf, per new quantizer -----------------------------------

def error_bound(scheme: str, amax: np.ndarray, message_amax: float) -> np.ndarray:
    """The largest error of a value of a finite group with largest magnitude ``amax`` (per group):
    half a code step at the group's scale plus the codec's own roundings, or, for QuickReduce, the one
    step a value of the extreme's opposite sign loses at the top code (8 and -8 decode to 7 and -8)."""
    if scheme.startswith("qint"):
        qmax = 2 ** (int(scheme[4]) - 1)
        return amax / qmax * 1.01 + amax * 2.0 ** -9       # + fp16/bf16 roundings of d, s, x*s, q*d
    if scheme.startswith("f8e4m3"):
        return amax * 2.0 ** -4 * 1.01                      # e4m3: 3 mantissa bits, half a step relative
    if scheme.startswith("fp4e2m1-group32"):
        return amax / 4 * 2 * 1.01                          # FLOOR: scale down to amax/8, top step 2 x scale
    # nvfp4: e2m1 half-step 1 x (amax / 6) after the e4m3 block scale's rounding, plus its 2**-6 clamp
    return amax / 6 * 1.07 + message_amax / (448 * 6) * 2.0 ** -6 * 6


PROPERTY_SCHEMES = ["qint3-ilv32-sqr-f16", "qint4-ilv32-sqr-f16", "qint6-ilv32-sqr-bf16", "qint8-ilv32-sqr-f16",
                    "f8e4m3-flat256-sfi", "f8e4m3-pad496-strt", "fp4e2m1-group32-se8m0fl", "fp4e2m1-group16-snv"]


@pytest.mark.parametrize("scheme", PROPERTY_SCHEMES)
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31), magnitude=st.sampled_from([1e-1, 1.0, 300.0, 3e3]))
def test_error_stays_within_half_a_step_of_each_group(scheme, seed, magnitude):
    """Magnitudes stay inside every format's range (under fp16's 65504 and above QuickReduce's reciprocal
    cliff; the cliff and the overflow are the byte-equality tests' edge cases)."""
    x = R.round_to(np.random.default_rng(seed).standard_normal((4, 512)) * magnitude, "bf16")
    out = lowbit_roundtrip(x, scheme)
    size = 32 if "32" in scheme else 16 if "16" in scheme else 256 if "256" in scheme else 496
    if "ilv" in scheme:
        groups = R.qr_groups(x.size)
    else:
        groups = np.arange(-(-x.size // size) * size).reshape(-1, size) % x.size   # the last group wraps: a superset
    gx, gout = x.ravel()[groups], out.ravel()[groups]
    bound = error_bound(scheme, np.max(np.abs(gx), axis=1), float(np.max(np.abs(x))))
    assert np.all(np.max(np.abs(gout - gx), axis=1) <= bound)


@pytest.mark.parametrize("scheme", PROPERTY_SCHEMES + ["f8e4m3-tensor-snone", "f8e5m2-tensor-snone"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), where=st.integers(0, 2047), value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_nan_and_inf_do_what_the_rederivation_does(scheme, seed, where, value):
    """A NaN or an inf anywhere in the message: lowbit gives exactly the re-derivation's values (which
    groups turn non-finite and which stay finite is the system's behaviour, not lowbit's)."""
    x = R.round_to(np.random.default_rng(seed).standard_normal((4, 512)), "bf16")
    x.ravel()[where] = value
    assert same(lowbit_roundtrip(x, scheme), CODECS[scheme](x))
