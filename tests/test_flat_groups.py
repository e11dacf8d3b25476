"""The flat grouping ``flat<G>`` (lowbit.groups.flat): one scale per G values of the flattened message,
the last group shorter; and the FlashInfer / TensorRT-LLM FP8 presets it serves, at the embedded
models' shapes (smollm2-135m: hidden 576 at TP 3; gemma3-270m: hidden 640 at TP 2).

    .venv/bin/python -m pytest tests/test_flat_groups.py -q

Every expectation is re-derived here from the grouping's definition (chunks of G of the row-major
buffer), not read back from lowbit.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.groups.flat import Flat
from lowbit.quant import dequantize, quantize
from lowbit.scales import SCALES
from lowbit.scheme import QuantSpec, SchemeError, parse_scheme
from lowbit.wire import accounting
from lowbit.wire.payload import decode, encode, layout
from tests.helpers import assert_close_verbose

EMBEDDED_SHAPES = [(576, 3), (640, 2)]  # (hidden, TP) of smollm2-135m and gemma3-270m
# lowbit's flat-group schemes (what the flashinfer-fp8 / trtllm-fp8 presets expanded to before they became
# the systems' own recipes, issue 26: those refuse TP 3 as the systems do, tests/test_shipping_recipes.py)
FLAT_PRESETS = ["fp8e4m3-flat256-sfp32@twoshot+fp8e4m3-flat256-sfp32", "fp8e4m3-flat496-sfp32"]


def flat_spec(group: int, code: str = "int", bits: int = 4, scale: str = "bf16", **kw) -> QuantSpec:
    return QuantSpec(bits, True, "flat", group, scale_dtype=SCALES.get(scale).dtype, code=code, **kw)


def reference_scales(x: torch.Tensor, group: int, c: float, scale: str = "bf16") -> torch.Tensor:
    """Per group of ``group`` consecutive values of x's row-major buffer: absmax * c, rounded up to
    the scale format (an independent cut of the buffer: a Python loop over slices)."""
    flat = torch.nan_to_num(x.reshape(-1).float(), nan=0.0, posinf=0.0, neginf=0.0)
    absmax = torch.stack([flat[i:i + group].abs().amax() for i in range(0, flat.numel(), group)])
    return SCALES.get(scale)().round(absmax * c, up=True)


@pytest.mark.parametrize("text", ["int4-flat256", "int3a-flat7", "fp8e4m3-flat256-sfp32", "nf4-flat64-top1/64",
                                  "fp8e4m3-flat256-sfp32@twoshot+fp8e4m3-flat256-sfp32", "int4-flat32-rot64",
                                  "int4-static@twoshot+int8-flat100"])
def test_flat_schemes_parse_print_and_round_trip(text):
    s = parse_scheme(text)
    assert str(s) == text and parse_scheme(str(s)) == s
    assert isinstance(s.quant.grouping, Flat) or isinstance(s.second.grouping, Flat)


@pytest.mark.parametrize("text, field, allowed", [
    ("int4-flat0", "group_size", "a positive integer"),
    ("int4-flat64-perm", "permute", "allowed: group<G>"),  # -perm regroups features, not a flat buffer
    ("fp4e2m1-flat33", "group_size", "a multiple of 2"),  # fp4 groups start on a byte
    ("int4-flat", "granularity", "flat<G>"),
])
def test_bad_flat_schemes_name_the_field(text, field, allowed):
    with pytest.raises(SchemeError) as err:
        parse_scheme(text)
    assert err.value.field == field and allowed in str(err.value), str(err.value)


@pytest.mark.parametrize("tokens,width,group", [(3, 100, 64), (8, 576, 256), (8, 576, 496), (1, 5, 7), (4, 64, 16)])
def test_the_last_group_may_be_shorter_and_its_scale_is_sent(tokens, width, group):
    spec = flat_spec(group)
    n = math.ceil(tokens * width / group)
    lay = layout(tokens, width, spec)
    assert lay.scales.nbytes == 2 * n  # bf16 scales, the short group's included
    assert lay.codes.nbytes == math.ceil(tokens * width * 4 / 8)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(tokens * width))
    payload, _ = encode(x, spec)
    assert payload.numel() == lay.total_bytes
    res = quantize(x, spec)
    assert res.scales.shape == (n,)
    assert torch.equal(res.scales, reference_scales(x, group, spec.code.scale_constant))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(tokens=st.integers(1, 6), width=st.integers(1, 80), group=st.integers(1, 200), seed=st.integers(0, 2**31),
       bits=st.sampled_from([2, 3, 4, 8]))
def test_every_value_is_within_half_a_step_of_its_flat_group(tokens, width, group, seed, bits):
    spec = flat_spec(group, bits=bits)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) * torch.exp(2 * torch.randn(tokens, 1, generator=g))
    res = quantize(x, spec)
    y = dequantize(res.codes, spec, res.scales)
    step = res.scales.repeat_interleave(group)[:tokens * width].reshape(tokens, width)
    # half a step from rounding, plus a few fp32 ulps of x / scale and of q * scale
    assert_close_verbose(y, x, atol=step / 2 * (1 + 2**-20) + 4 * 2**-23 * x.abs(), msg=str(spec))
    assert res.clamped == 0 and res.nonfinite == 0


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), group=st.sampled_from([3, 16, 50]))
def test_nan_and_inf_poison_no_other_group_or_value(seed, group):
    spec = flat_spec(group, bits=4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 40, generator=g)
    clean = x.clone()
    x[0, 1], x[2, 7], x[3, 30] = math.nan, math.inf, -math.inf
    res = quantize(x, spec)
    y = dequantize(res.codes, spec, res.scales)
    assert res.nonfinite == 3 and torch.isfinite(y).all()
    assert y[0, 1] == 0.0  # NaN quantizes as 0: the zero code
    step = res.scales.repeat_interleave(group)[:160].reshape(4, 40)
    assert y[2, 7] == 7 * step[2, 7] and y[3, 30] == -8 * step[3, 30]  # +-Inf: the end codes
    # the ranges are of the finite values: equal to quantizing the cleaned message with them removed
    assert torch.equal(res.scales, reference_scales(x, group, spec.code.scale_constant))
    mask = torch.isfinite(x)
    again = quantize(torch.where(mask, x, 0.0), spec)
    assert torch.equal(y[mask], dequantize(again.codes, spec, again.scales)[mask])
    assert_close_verbose(y[mask], clean[mask], atol=step[mask] / 2 * (1 + 2**-20) + 4 * 2**-23 * clean[mask].abs())


def test_bf16_outlier_columns_keep_their_places_and_leave_the_ranges():
    spec = flat_spec(16)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    idx = torch.tensor([4, 20])
    x[:, idx] = 1e4  # would dominate their groups' scales
    res = quantize(x, spec, exclude=idx)
    kept = x.clone()
    kept[:, idx] = 0.0
    assert torch.equal(res.scales, reference_scales(kept, 16, spec.code.scale_constant))
    payload, _ = encode(x, spec, idx)
    y = decode(payload, 3, 32, spec, idx)
    assert torch.equal(y[:, idx], x[:, idx].to(torch.bfloat16).float())
    assert layout(3, 32, spec, 2).scales.nbytes == 2 * math.ceil(3 * 32 / 16)  # groups over the whole buffer


def test_e4m3_scales_and_fp_codes_take_flat_groups():
    spec = flat_spec(256, code="fp", bits=8, scale="e4m3", exp_bits=4)
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(9))
    payload, _ = encode(x, spec)
    n = math.ceil(8 * 576 / 256)
    assert payload.numel() == 4 + n + 8 * 576  # the fp32 message scale, n e4m3 scales, the fp8 codes
    res = quantize(x, spec)
    assert torch.equal(decode(payload, 8, 576, spec), dequantize(res.codes, spec, res.scales))
    scale = res.scales.repeat_interleave(256)[:8 * 576].reshape(8, 576)
    # e4m3 codes: half an ulp (2**-4 relative) for normal ratios, half the subnormal step (2**-10) of
    # the scale below 2**-6; fp32 products add a few ulps
    assert_close_verbose(decode(payload, 8, 576, spec), x, atol=x.abs() * 2**-4 + scale * 2**-10 + 4 * 2**-23 * x.abs())


def test_the_kernels_leave_flat_groups_to_the_reference_path():
    from kernels import dispatch, registry
    spec = flat_spec(256)
    assert "flat" in registry.refusal(spec, "native") and dispatch.backend("cpu", spec) == "reference"


@pytest.mark.parametrize("hidden,tp", EMBEDDED_SHAPES)
@pytest.mark.parametrize("name", FLAT_PRESETS)
def test_the_flat_presets_fit_the_embedded_models_and_their_bits_are_the_bytes_sent(name, hidden, tp):
    """Both presets validate at hidden 576 / TP 3 and 640 / TP 2 (they were refused there: 256 and 496
    divide neither), and the bytes every rank hands to the collectives are the accounting's."""
    from tests.test_accounting import handed_bytes
    s = parse_scheme(name)
    s.validate_for(hidden, tp)
    tokens = 8
    leg1, leg2 = accounting.site_bytes(s, tokens, hidden, tp)
    for handed, extra in handed_bytes(name, tp, tokens, hidden):
        assert handed == leg1 + leg2
    width = hidden // tp if s.algo == "two_shot" else hidden
    per_message = tokens * width + 4 * math.ceil(tokens * width / s.quant.group_size)  # fp8 codes + fp32 scales
    assert leg1 == (tp if s.algo == "two_shot" else 1) * per_message
    assert accounting.scheme_bits_per_value(s, hidden, tp, tokens) == pytest.approx(8 * (leg1 + leg2) / (tokens * hidden))


def test_preset_rows_show_both_flat_presets_with_their_bits_at_576():
    """At TP 2 both systems' presets run (FlashInfer 8.125 bits; TensorRT-LLM's 10 warps of 496, the last
    padded and sent whole, 512 bytes each); at TP 3 both are refused with the reason, as the systems do."""
    rows = {r["preset"]: r for r in accounting.preset_rows(576, 2, 8)}
    assert rows["flashinfer-fp8"]["note"] == "" and rows["flashinfer-fp8"]["format_bits"] == pytest.approx(8.125)
    assert rows["trtllm-fp8"]["format_bits"] == pytest.approx(10 * 512 * 8 / (8 * 576))
    at3 = {r["preset"]: r for r in accounting.preset_rows(576, 3, 8)}
    for name in ("flashinfer-fp8", "trtllm-fp8", "quickreduce-int4"):
        assert at3[name]["note"].startswith("tp: 3 not allowed") and at3[name]["format_bits"] is None


@pytest.mark.slow
@pytest.mark.parametrize("model,tp", [("smollm2-135m", 3), ("gemma3-270m", 2)])
def test_the_flat_presets_run_on_the_embedded_models(model, tp):
    """Real weights, threaded ranks: one short text through each preset at every site; finite logits
    close to the exact run's, and every call's bytes are the accounting's."""
    from lowbit.comm.dist import ThreadWorld
    from lowbit.method.evaluate import evaluate_text
    from lowbit.model.data import token_chunks
    from lowbit.model.engine import build_tp_model
    from lowbit.model.models import load_model
    from lowbit.model.models import load_config
    from lowbit.model.tp import text_config
    loaded = load_model(model)
    held = token_chunks(loaded.tokenizer, "wikipedia", "eval", 1, 32)

    def body(group):
        tpm = build_tp_model(model, group, loaded=loaded)
        return evaluate_text(tpm.model, group, held, FLAT_PRESETS, None, batch_size=1)
    text = ThreadWorld(tp).run(body)[0]
    hidden = text_config(load_config(model)).hidden_size
    for name in FLAT_PRESETS:
        r = text[name]
        assert math.isfinite(r["ppl"]) and r["kl"] < 0.05, (model, name, r["kl"])  # 8-bit codes: a small KL
        assert r["bits_per_value"] == pytest.approx(accounting.scheme_bits_per_value(name, hidden, tp, 32))
