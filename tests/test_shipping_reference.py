"""The numpy re-derivations of shipping quantized all-reduces (tests/shipping_reference.py) hold
the rules their sources state: hand-worked examples, torch's and torchao's own casts and
quantizers, and the edge inputs users reported (values above 65504, tiny blocks, NaN/Inf,
mixed signs, buffer tails). Sources and versions: docs/shipping.md.

    .venv/bin/python -m pytest tests/test_shipping_reference.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import shipping_reference as R


def bf16(x) -> np.ndarray:
    return R.round_to(x, "bf16")


def same(a, b) -> bool:
    """Bitwise-equal values, NaN equal to NaN (what "byte-equal" means for decoded floats)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def seeded(seed: int, shape=(64, 576), scale: float = 1.0) -> np.ndarray:
    return bf16(np.random.default_rng(seed).standard_normal(shape) * scale)


def rel_l2(out, ref) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# --- the rounding helper every emulation uses ---------------------------------------------------

@pytest.mark.parametrize("fmt, dtype, overflow", [
    ("fp16", torch.float16, "inf"), ("bf16", torch.bfloat16, "inf"),
    ("e4m3", torch.float8_e4m3fn, "satfinite"),    # torch 2.13 saturates e4m3fn casts (inf too)
    ("e5m2", torch.float8_e5m2, "inf")])
def test_round_to_matches_torch_casts(fmt, dtype, overflow):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000) * 10.0 ** rng.integers(-12, 9, 200_000)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 70144, 448, 464, 464.01, 480,
                57344, 61439, 61440, 6e-8, 2.98e-8, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 1e-40]
    x = np.concatenate([x, specials]).astype(np.float32).astype(np.float64)
    expected = torch.tensor(x, dtype=torch.float32).to(dtype).to(torch.float64).numpy()
    assert same(R.round_to(x, fmt, overflow), expected)


def test_round_to_overflow_modes_on_fp16():
    x = np.array([70144.0, -70144.0, np.inf, 65519.0, 65520.0])
    assert same(R.round_to(x, "fp16", "inf"), [np.inf, -np.inf, np.inf, 65504, np.inf])
    # MODE.FP16_OVFL: a finite overflow clamps, a true inf stays inf
    assert same(R.round_to(x, "fp16", "saturate"), [65504, -65504, np.inf, 65504, 65504])
    assert same(R.round_to(x, "fp16", "satfinite"), [65504, -65504, 65504, 65504, 65504])
    assert same(R.round_to([500.0, np.inf], "e4m3", "nan"), [np.nan, np.nan])   # torch <= 2.11 e4m3fn


# --- QuickReduce --------------------------------------------------------------------------------

def test_quickreduce_groups_interleave_even_and_odd_positions():
    groups = R.qr_groups(128)
    assert groups.shape == (4, 32)
    assert list(groups[0]) == list(range(0, 64, 2))      # block 0, low fp16 halves
    assert list(groups[1]) == list(range(1, 64, 2))      # block 0, high halves
    assert list(groups[2]) == list(range(64, 128, 2))


def test_quickreduce_int4_codec_by_hand():
    # One 64-value block. Even positions: 8, 1, -8, 2.5, -3, 0.75, then zeros; odd positions: 0.5.
    # Even group: max 8, min -8. The extreme is the max only if |max| > |min| strictly, so here
    # it is -8: decoding scale d = fp16(-8 * -1/8) = 1, encoding = 1 / fp16(1 + 2**-24) = 1.
    #   8 -> 8 -> clamp to 7 -> 7 (the positive end loses a step); -8 -> code 0 -> -8 (exact);
    #   1 -> 1; 2.5 -> rint 2 (ties to even); -3 -> -3; 0.75 -> rint 1 -> 1
    # Odd group: all 0.5, max == min, extreme 0.5: d = fp16(0.5 * -1/8) = -0.0625, encoding -16,
    #   0.5 * -16 = -8 -> code 0 -> -8 * -0.0625 = 0.5 exactly. A contiguous group of 32 would
    #   have put 8 and 0.5 under one scale.
    x = np.zeros(64)
    x[0:12:2] = [8.0, 1.0, -8.0, 2.5, -3.0, 0.75]
    x[1::2] = 0.5
    out = R.qr_roundtrip(x, "int4")
    assert list(out[0:12:2]) == [7.0, 1.0, -8.0, 2.0, -3.0, 1.0]
    assert np.all(out[1::2] == 0.5)
    # Strictly larger positive extreme: 8 and -7 -> extreme 8, d = -1, encoding -1:
    #   8 -> -8 -> code 0 -> -8 * -1 = 8 (exact); -7 -> 7 -> code 15 -> 7 * -1 = -7
    y = np.zeros(64)
    y[0:4:2] = [8.0, -7.0]
    assert list(R.qr_roundtrip(y, "int4")[0:4:2]) == [8.0, -7.0]


def test_quickreduce_int8_codec_by_hand():
    # extreme -8 (min wins the tie), d = fp16(-8 * -1/128) = 0.0625, encoding 16:
    #   8 -> 128 -> clamp 127 -> 127 * 0.0625 = 7.9375; 2.5 -> 40 -> 2.5; fp16(0.3) = 0.2998 ->
    #   * 16 = 4.797 -> rint 5 -> 0.3125
    x = np.zeros(64)
    x[0:8:2] = [8.0, -8.0, 2.5, 0.3]
    assert list(R.qr_roundtrip(R.round_to(x, "fp16"), "int8")[0:8:2]) == [7.9375, -8.0, 2.5, 0.3125]


def test_quickreduce_70144_with_the_fp16_cast_gives_one_group_of_32_nonfinite_values():
    # 70144 (a bf16 value) casts to fp16 inf. Its group: extreme inf, d = -inf, encoding -0;
    # inf * -0 = NaN -> clamped to -8 (maxNum) -> code 0 -> -8 * -inf = +inf; the finite values
    # -> code 8 -> 0 * -inf = NaN. Summed with the other rank: 1 inf + 31 NaN; leg 2 requantizes
    # that group (max ignores NaN: inf) the same way and every value decodes to +inf.
    partials = [seeded(1), seeded(2)]
    partials[0][3, 10] = 70144.0
    outputs, _ = R.quickreduce(partials, "int4", cast_bf16_to_fp16=True, overflow="inf")
    bad = np.flatnonzero(~np.isfinite(outputs[0]))
    position = 3 * 576 + 10
    group = R.qr_groups(64)[position % 2] + position // 64 * 64
    assert sorted(bad) == sorted(group)                    # exactly its group of 32: even positions
    assert np.all(outputs[0].ravel()[group] == np.inf)
    for out in outputs[1:]:
        assert same(out, outputs[0])


def test_quickreduce_70144_saturates_on_gfx942_and_is_kept_on_the_bf16_path():
    partials = [seeded(1), seeded(2)]
    partials[0][3, 10] = 70144.0
    saturated, _ = R.quickreduce(partials, "int4", overflow="saturate")
    assert np.isfinite(saturated[0]).all()
    assert saturated[0][3, 10] == 65536.0                  # bf16 of the fp16 max 65504 (as SGLang 34473 saw)
    native, _ = R.quickreduce(partials, "int4", cast_bf16_to_fp16=False)
    assert np.isfinite(native[0]).all()
    # bf16 int4: the value is its group's extreme, so it decodes exactly on leg 1; after the
    # bf16 sum and leg 2 it stays within one int4 step of its group (extreme / 8)
    assert abs(native[0][3, 10] - (70144.0 + partials[1][3, 10])) <= 70144.0 / 8


def test_quickreduce_tiny_blocks_cross_the_reciprocal_cliff():
    # randn * 1e-5: a group's extreme e ~ 3e-5, d = e/8 ~ 4e-6 (an fp16 subnormal), 1/d ~ 2.6e5
    # > 65504. IEEE overflow (gfx950): encoding = inf, every nonzero value clamps to an end code
    # and decodes to about +-e (the error exceeds the signal). FP16_OVFL (gfx942): encoding =
    # 65504, |x * 65504| < 2, codes 0 or +-1: the block is attenuated towards 0.
    partials = [seeded(3, scale=1e-5), seeded(4, scale=1e-5)]
    exact = partials[0] + partials[1]
    inflated, _ = R.quickreduce(partials, "int4", overflow="inf")
    assert 2.0 < rel_l2(inflated[0], exact) < 3.5          # measured 2.65; the port: 2.6
    attenuated, _ = R.quickreduce(partials, "int8", overflow="saturate")
    # attenuated: the output keeps under a tenth of the input's norm (see docs/shipping.md)
    assert np.linalg.norm(attenuated[0]) < 0.1 * np.linalg.norm(exact)   # measured 0.016
    native, _ = R.quickreduce(partials, "int4", cast_bf16_to_fp16=False)
    assert rel_l2(native[0], exact) < 0.2                  # measured 0.129: no cliff in bf16


def test_quickreduce_bf16_epsilon_flips_small_groups_with_a_positive_extreme():
    # Native bf16 INT8 (no cast): the epsilon 0x33D7 (1.0e-7) is added to the SIGNED decoding
    # scale. Group 1.0014e-5, 3.9935e-6, -2.9951e-6 (bf16 of 1e-5, 4e-6, -3e-6): extreme
    # +1.0014e-5, d = -1.0014e-5 / 128 = -7.823e-8, d + eps = +2.19e-8: the sign flips, the
    # encoding scale is +4.57e7, every value clamps to an end code (127 or -128) and decodes to
    # bf16(127 * d) = -9.954e-6 or -128 * d = +1.0014e-5: each value comes back with the other sign.
    # With a negative extreme, d + eps only shrinks: the group is attenuated instead (to ~44 %).
    x = np.zeros(64)
    x[0:6:2] = bf16([1e-5, 4e-6, -3e-6])
    out = R.qr_roundtrip(x, "int8", cast_bf16_to_fp16=False)[0:6:2]
    assert np.all(np.sign(out) == -np.sign(x[0:6:2]))
    assert out[0] == out[1] == -bf16(127 * x[0] / 128) and out[2] == x[0]
    x[0:6:2] = bf16([-1e-5, 4e-6, -3e-6])
    out = R.qr_roundtrip(x, "int8", cast_bf16_to_fp16=False)[0:6:2]
    assert np.all(np.sign(out) == np.sign(x[0:6:2])) and np.linalg.norm(out) < 0.5 * np.linalg.norm(x[0:6:2])


def test_quickreduce_nan_becomes_its_groups_extreme_and_inf_poisons_the_group():
    # NaN: ignored by max/min; NaN * encoding = NaN -> clamped to the low end -> decodes to the
    # group's signed extreme: a finite value where the input had none.
    x = np.zeros(64)
    x[0:6:2] = [np.nan, 4.0, -1.0]
    out = R.qr_roundtrip(x, "int4")
    assert out[0] == 4.0 and out[2] == 4.0 and out[4] == -1.0
    # -inf: extreme -inf, d = +inf, encoding +0, every value of the group becomes non-finite
    x[0] = -np.inf
    out = R.qr_roundtrip(x, "int4")
    assert (~np.isfinite(out[0:64:2])).sum() == 32 and np.isfinite(out[1:64:2]).all()


def test_quickreduce_tail_is_zero_padded_and_sizes_are_gated():
    # 16392 values = one tile + 8: the second tile reads zeros beyond the buffer, so the last 8
    # values are quantized exactly as if they were alone (zeros never change a group's extreme).
    rng = np.random.default_rng(5)
    partials = [bf16(rng.standard_normal(16392)) for _ in range(2)]
    whole, wire = R.quickreduce(partials, "int6")
    tail, _ = R.quickreduce([p[-8:] for p in partials], "int6")
    assert same(whole[0][-8:], tail[0])
    assert wire["leg1"][0] == 2 * 1 * 4 * 1664             # 2 tiles x 1 peer x 4 atoms x 1664 bytes
    with pytest.raises(ValueError, match="multiple of 8"):
        R.quickreduce([np.zeros(12)] * 2)
    with pytest.raises(ValueError, match="world size: 3"):
        R.quickreduce([np.zeros(64)] * 3)
    with pytest.raises(ValueError, match="runs at 2"):
        R.quickreduce([np.zeros(64)] * 4, "int3")


@pytest.mark.parametrize("code, bits", [("int3", 3.5), ("int4", 4.5), ("int6", 6.5), ("int8", 8.5)])
def test_quickreduce_bits_per_value_per_leg(code, bits):
    # at TP 2 each rank sends the half of every tile its peer owns, on each leg
    _, wire = R.quickreduce([np.zeros(2 * R.QR_TILE)] * 2, code)
    assert 8 * wire["leg1"][0] / R.QR_TILE == bits


def test_quickreduce_min_size_gate_follows_vllm():
    assert not R.quickreduce_used(1 << 20, 4, "int4")      # fp16 kernels at TP 4: INT4 from 2 MiB
    assert R.quickreduce_used(2 << 20, 4, "int4")
    assert not R.quickreduce_used(8 << 20, 8, "int4", cast_bf16_to_fp16=False)   # bf16 TP 8: 2 GiB
    assert not R.quickreduce_used((2 << 20) + 8, 4, "int4")                       # not 16-byte aligned


# --- FlashInfer ---------------------------------------------------------------------------------

def test_flashinfer_group_by_hand():
    # Rank 0's first group of 256: 8.0, 0.3 (bf16 0.30078125), zeros. amax 8, quant scale
    # 448/8 = 56: 0.30078125 * 56 = 16.84 -> e4m3 (step 2 in [16, 32)) 16 -> 16 * fp32(8/448)
    # = 0.2857143; rank 1 sends zeros. Leg 2 finds amax 8 again: 0.2857143 * 56 = 16 (exact) ->
    # the same value; bf16(0.2857143) = 0.28515625 (146 / 512).
    p0 = np.zeros(4096)
    p0[:2] = [8.0, bf16(0.3)]
    outputs, _ = R.flashinfer_fp8([p0, np.zeros(4096)])
    for out in outputs:
        assert out[0] == 8.0 and out[1] == 0.28515625


def test_flashinfer_owner_keeps_its_own_stripe_unrequantized():
    partials = [seeded(6, (8192,)), seeded(7, (8192,))]
    outputs, wire = R.flashinfer_fp8(partials)
    exact = partials[0] + partials[1]
    owner = (np.arange(8192) // 4096) % 2                  # stripes of 4096 values, round robin
    for k, out in enumerate(outputs):
        own, other = owner == k, owner != k
        assert rel_l2(out[own], exact[own]) < rel_l2(out[other], exact[other])   # one fp8 leg vs two
    assert not same(outputs[0], outputs[1])                # ranks do not agree bit for bit
    assert 8 * (wire["leg1"][0] + wire["leg1"][1]) / 8192 == 8.125   # fp8 + fp32 per 256


def test_flashinfer_inf_makes_its_group_of_256_nan_and_tails_are_short_groups():
    partials = [seeded(8, (8192,)), seeded(9, (8192,))]
    partials[1][300] = np.inf                              # group 1: positions 256..511
    outputs, _ = R.flashinfer_fp8(partials)
    for out in outputs:
        assert np.flatnonzero(~np.isfinite(out)).tolist() == list(range(256, 512))
    # 4104 values: the last group holds 8; its scale comes from those 8 only
    rng = np.random.default_rng(10)
    tail = [bf16(np.concatenate([rng.standard_normal(4096) * 1000, rng.standard_normal(8) * 1e-3])) for _ in range(2)]
    outputs, _ = R.flashinfer_fp8(tail)
    exact = tail[0] + tail[1]
    # each fp8 rounding errs by <= 1/28 of its group's amax (half a step of 32 at 448); two legs
    amax = np.abs(tail[0][-8:]).max() + np.abs(tail[1][-8:]).max()
    assert np.all(np.abs(outputs[0][-8:] - exact[-8:]) <= amax / 8)
    with pytest.raises(ValueError, match="powers of two"):
        R.flashinfer_fp8([np.zeros(1000)] * 2)             # 1000 values: block 1000 is no power of two


# --- TensorRT-LLM -------------------------------------------------------------------------------

def test_trtllm_groups_restart_at_each_rank_shard():
    # TP 2, 1024 values: shard 0 = [0, 512) with groups [0, 496) and [496, 512); shard 1 starts a
    # new group at 512. A 1000 at 500 and 0.001s at 512..519 are in different groups, so the small
    # values survive (a flat 496-grouping would put them with the 1000 and flush them to 0).
    p0 = np.zeros(1024)
    p0[500] = 1000.0
    p0[512:520] = bf16(np.linspace(1e-3, 2e-3, 8))
    outputs, wire = R.trtllm_fp8([p0, np.zeros(1024)])
    # two e4m3 roundings (3 mantissa bits: <= 1/16 of the value each) -> within a quarter
    assert np.all(np.abs(outputs[0][512:520] - p0[512:520]) <= p0[512:520] / 4)
    assert outputs[0][500] == 1000.0 or abs(outputs[0][500] - 1000.0) <= 1000.0 / 8
    assert wire["leg1"][0] == 2 * 512                      # 2 groups of (496 fp8 + scale + pad) = 512 B
    with pytest.raises(ValueError, match="multiple of 32"):
        R.trtllm_fp8([np.zeros(1000)] * 2)


def test_trtllm_inf_sends_its_group_unscaled_and_stays_finite():
    # amax = inf -> scale 448 / inf = 0 -> "no scaling": values go to fp8 as they are
    # (satfinite: inf -> 448, 1e-3 -> 1e-3 rounded to e4m3, 1e5 -> 448)
    p0 = np.zeros(1024)
    p0[:3] = [np.inf, 1e5, bf16(1e-3)]
    outputs, _ = R.trtllm_fp8([p0, np.zeros(1024)])
    assert np.isfinite(outputs[0]).all()
    assert outputs[0][0] == 448.0 and outputs[0][1] == 448.0


def test_trtllm_tp8_runs_three_quantizations_and_all_ranks_agree():
    partials = [seeded(20 + r, (4096,)) for r in range(8)]
    outputs, _ = R.trtllm_fp8(partials)
    exact = sum(partials)
    assert all(same(o, outputs[0]) for o in outputs)
    four, _ = R.trtllm_fp8(partials[:4])                   # two-shot: two quantizations
    assert rel_l2(outputs[0], exact) < 0.1                  # fp8 with per-496 scales (measured ~0.05)
    assert rel_l2(four[0], sum(partials[:4])) < 0.1


# --- NCCL fp8 -----------------------------------------------------------------------------------

def test_nccl_ring_order_decides_where_the_sum_saturates():
    # TP 3, 48 values: chunks of 16; chunk c is reduced starting at rank c + 1.
    # e4m3 values: 300 -> 288, -200 -> -192 (ties to even). Position 0 (chunk 0): ranks 1, 2, 0:
    # 288 - 192 = 96, + 288 = 384. Position 32 (chunk 2): ranks 0, 1, 2: 288 + 288 = 576 ->
    # fp16 576 -> satfinite 448, - 192 = 256. An fp32 accumulator gives 384 for both.
    p = [np.zeros(48) for _ in range(3)]
    for pos in (0, 32):
        p[0][pos], p[1][pos], p[2][pos] = 300.0, 300.0, -200.0
    ring, wire = R.nccl_fp8(p)
    assert ring[0][0] == 384.0 and ring[0][32] == 256.0
    fp32, _ = R.nccl_fp8(p, accumulate="fp32")
    assert fp32[0][0] == 384.0 and fp32[0][32] == 384.0
    assert wire["sent"] == [64] * 3                        # 2 (W - 1) chunks of 16 bytes


def test_nccl_casts_decide_what_overflow_does():
    p = [np.array([1000.0, np.inf] + [0.0] * 14), np.zeros(16)]
    e4m3, _ = R.nccl_fp8(p)                                # torch 2.13 e4m3fn cast saturates
    assert e4m3[0][:2].tolist() == [448.0, 448.0]
    old, _ = R.nccl_fp8(p, cast="torch-2.11")              # older torch: NaN
    assert np.isnan(old[0][:2]).all()
    e5m2, _ = R.nccl_fp8([np.array([57344.0] * 16), np.array([57344.0] * 16)], fmt="e5m2")
    assert np.all(e5m2[0] == 57344.0)                      # fp16 sum overflows to inf, satfinite -> max


# --- MXFP4 / NVFP4 against torchao --------------------------------------------------------------

def _wide(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 256, generator=g) * torch.exp(torch.randn(32, 256, generator=g) * 4)
    x[0, :8] = torch.tensor([0.0, 1e-30, 3e38, -2.0, 6.0, 5.0, 7.0, -0.0])
    x[1, :32] = 0.0
    x[2, 3], x[3, 40], x[4, 70] = float("inf"), float("-inf"), float("nan")
    return x.bfloat16()


def test_mxfp4_roundtrip_equals_torchao():
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx  # heavy optional dependency
    x = _wide(11)
    scale, data = to_mx(x, torch.float4_e2m1fn_x2, 32)
    expected = to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32).numpy()
    assert same(R.mxfp4_roundtrip(x.float().numpy()).reshape(expected.shape), expected)


@pytest.mark.parametrize("per_tensor", [True, False])
def test_nvfp4_roundtrip_equals_torchao(per_tensor):
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale  # heavy optional
    x = _wide(12)
    x[2, 3], x[3, 40], x[4, 70] = 5.0, -3.0, 1.0           # one non-finite value would make the tensor scale inf
    scale = per_tensor_amax_to_scale(x.float().abs().max()) if per_tensor else None
    expected = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale).dequantize(torch.float32).numpy()
    assert same(R.nvfp4_roundtrip(x.float().numpy(), per_tensor).reshape(expected.shape), expected)


def test_nvfp4_single_level_flushes_tiny_blocks_and_mx_keeps_them():
    # One level: the e4m3 block scale is clamped at 2**-6, so a block with amax 6e-5 gets
    # x / 2**-6 < 0.004 -> every code 0. MX's e8m0 scale goes down to 2**-127.
    x = seeded(13, (1024,), scale=1e-5)
    assert np.all(R.nvfp4_roundtrip(x, per_tensor=False) == 0)
    assert rel_l2(R.nvfp4_roundtrip(x, per_tensor=True), x) < 0.2
    assert rel_l2(R.mxfp4_roundtrip(x), x) < 0.3


def test_mx_and_nvfp4_two_shot_bits():
    partials = [seeded(14, (4096,)), seeded(15, (4096,))]
    _, mx = R.mxfp4(partials)
    _, nv = R.nvfp4(partials, per_tensor=False)
    assert 8 * mx["leg1"][0] / 2048 == 4.25                # e2m1 + e8m0 per 32, half the message to 1 peer
    assert 8 * nv["leg1"][0] / 2048 == 4.5                 # e2m1 + e4m3 per 16
