"""The presets named after shipping systems run those systems' all-reduces (``lowbit.comm.recipes``): on
threaded ranks, every rank's output is byte-equal to the independent numpy re-derivation
(tests/shipping_reference.py) through both legs, on values above 65504, tiny blocks, NaN/Inf, mixed
signs and buffer tails; the bytes each rank moves to its peers are the re-derivation's; TP sizes a
system does not run at are refused with a clear error.

    .venv/bin/python -m pytest tests/test_shipping_recipes.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.comm.collectives import QuantCommunicator
from lowbit.comm.dist import ThreadWorld
from lowbit.plugins import SchemeError
from lowbit.scheme import parse_scheme
from lowbit.site import Site
from lowbit.wire import accounting
from tests import shipping_reference as R
from tests.test_shipping_codecs import same

SITE = Site(0, "o_proj")

RECIPES = {  # scheme -> the re-derivation of the whole all-reduce
    "quickreduce-int3": lambda p: R.quickreduce(p, "int3"),
    "quickreduce-int4": lambda p: R.quickreduce(p, "int4"),
    "quickreduce-int6": lambda p: R.quickreduce(p, "int6"),
    "quickreduce-int8": lambda p: R.quickreduce(p, "int8"),
    "qint4-ilv32-sqr-f16sat@quickreduce": lambda p: R.quickreduce(p, "int4", overflow="saturate"),
    "qint8-ilv32-sqr-bf16@quickreduce": lambda p: R.quickreduce(p, "int8", cast_bf16_to_fp16=False),
    "flashinfer-fp8": R.flashinfer_fp8,
    "trtllm-fp8": R.trtllm_fp8,
    "nccl-fp8e4m3": R.nccl_fp8,
    "nccl-fp8e5m2": lambda p: R.nccl_fp8(p, "e5m2"),
    "mxfp4": R.mxfp4,
    "nvfp4": R.nvfp4,
}


def reduce_all(scheme: str, partials: list[np.ndarray]) -> list[tuple[np.ndarray, int, dict]]:
    """Every rank's (output, bytes handed to collectives, call stats) on threaded ranks."""
    def body(group):
        comm = QuantCommunicator(group, scheme)
        out = comm.reduce(torch.from_numpy(partials[group.rank].astype(np.float32)), SITE)
        return out.double().numpy(), comm.calls[-1].bytes_sent, comm.calls[-1].extra
    return ThreadWorld(len(partials)).run(body)


def partials_for(case: str, tp: int, shape=(32, 576)) -> list[np.ndarray]:
    rng = np.random.default_rng(tp * 10 + len(case))
    parts = [R.round_to(rng.standard_normal(shape), "bf16") for _ in range(tp)]
    if case == "over65504":
        parts[0][3, 5], parts[-1][5, 200] = 70144.0, -1e30
        parts[1][3, 6] = 40000.0                              # the sum passes 65504 where no input does
        parts[0][3, 6] = 40000.0
    elif case == "tiny":
        parts = [p * 1e-5 for p in parts]
        parts = [R.round_to(p, "bf16") for p in parts]
    elif case == "nonfinite":
        parts[0][0, 0], parts[1][2, 300], parts[-1][5, 7] = np.nan, np.inf, -np.inf
    elif case == "mixed":
        for r, p in enumerate(parts):
            p[4, :64] = np.where(np.arange(64) % 2, 8.0, -8.0) * (r + 1)
            p[6, :32] = 0.0
    return [R.round_to(p, "bf16") for p in parts]   # what an engine holds: bf16 partials


def check(scheme: str, parts: list[np.ndarray]) -> list[dict]:
    ref, wire = RECIPES[scheme](parts)
    got = reduce_all(scheme, parts)
    for rank, (out, _, extra) in enumerate(got):
        assert same(out, ref[rank]), f"rank {rank}: {np.sum(~((out == ref[rank]) | np.isnan(out)))} values differ"
        assert extra["bytes_to_peers"] == wire["sent"][rank]
    return [g[2] for g in got]


@pytest.mark.parametrize("case", ["randn", "over65504", "tiny", "nonfinite", "mixed"])
@pytest.mark.parametrize("scheme", [s for s in RECIPES if s != "quickreduce-int3"])
@pytest.mark.parametrize("tp", [2, 4])
def test_every_rank_is_byte_equal_to_the_rederivation_through_both_legs(scheme, tp, case):
    check(scheme, partials_for(case, tp))


@pytest.mark.parametrize("case", ["randn", "over65504", "tiny"])
def test_quickreduce_int3_at_tp2_and_int4_at_tp8(case):
    check("quickreduce-int3", partials_for(case, 2))
    check("quickreduce-int4", partials_for(case, 8, shape=(8, 576)))


def test_a_message_that_is_not_a_whole_tile_is_padded_as_the_kernel_pads_it():
    """QuickReduce: 5 x 576 values in one zero-padded 16384-value tile; the padding's codes travel."""
    parts = partials_for("randn", 4, shape=(5, 576))
    check("quickreduce-int4", parts)
    check("nccl-fp8e4m3", partials_for("randn", 4, shape=(5, 100)))   # ring chunks of 128, the last short


def test_the_fp16_cast_breaks_exactly_one_group_and_the_native_path_does_not():
    """70144 on one rank at TP 2: with the default fp16 cast its interleaved group of 32 comes back
    +inf on every rank and nothing else does; gfx942's clamp and the native bf16 path stay finite."""
    parts = partials_for("randn", 2)
    parts[0][0, 2] = 70144.0
    out = reduce_all("quickreduce-int4", parts)[0][0]
    assert np.flatnonzero(~np.isfinite(out)).tolist() == list(range(0, 64, 2))
    assert np.all(np.isposinf(out.ravel()[0:64:2]))
    assert np.isfinite(reduce_all("qint4-ilv32-sqr-bf16@quickreduce", parts)[0][0]).all()
    sat = reduce_all("qint4-ilv32-sqr-f16sat@quickreduce", parts)[0][0]
    assert np.isfinite(sat).all() and sat[0, 2] == 65536.0       # bf16(65504): what SGLang #34473 saw


def test_bytes_handed_are_the_accountings():
    for scheme in RECIPES:
        tp = 2
        parts = partials_for("randn", tp, shape=(8, 576))
        leg1, leg2 = accounting.site_bytes(scheme, 8, 576, tp)
        for _, handed, extra in reduce_all(scheme, parts):
            assert handed == leg1 + leg2, scheme
            assert accounting.scheme_bits_per_value(scheme, 576, tp, 8) == pytest.approx(8 * handed / (8 * 576))


@pytest.mark.parametrize("scheme, tp, allowed", [
    ("quickreduce-int4", 3, "allowed: 2, 4, 8"), ("quickreduce-int8", 6, "allowed: 2, 4, 8"),
    ("quickreduce-int3", 4, "allowed: 2"), ("trtllm-fp8", 3, "allowed: 2, 4"), ("trtllm-fp8", 8, "allowed: 2, 4"),
    ("flashinfer-fp8", 3, "allowed: 1, 2, 4")])
def test_a_tp_the_system_does_not_run_at_is_refused_by_name(scheme, tp, allowed):
    with pytest.raises(SchemeError) as err:
        parse_scheme(scheme).validate_for(576, tp)
    assert err.value.field == "tp" and f"{tp} not allowed" in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("text, field", [
    ("int4-group32@quickreduce", "quant"), ("qint4-ilv32-sqr-f16-top1/64@quickreduce", "algo"),
    ("f8e4m3-flat256-sfp32@flashinfer", "quant"), ("int8-token@ncclring", "quant")])
def test_a_recipe_takes_its_systems_codec_only(text, field):
    with pytest.raises(SchemeError) as err:
        parse_scheme(text)
    assert err.value.field == field and "allowed" in str(err.value)


def test_flashinfer_refuses_a_message_its_kernel_refuses():
    parts = partials_for("randn", 2, shape=(1, 576))     # 576 values: a stripe that is no power of two
    with pytest.raises(ValueError, match="message size: 576 values at TP 2"):
        reduce_all("flashinfer-fp8", parts)


def test_recipes_print_and_parse_back():
    for scheme in RECIPES:
        s = parse_scheme(scheme)
        assert parse_scheme(str(s)) == s and str(s).endswith("@" + s.algo)
