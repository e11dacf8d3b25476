"""Quantized communicators: equal to the single-process math, exact bit accounting, errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lowbit.method.calibrate import CalibrationError
from lowbit.comm.collectives import QuantCommunicator
from lowbit.site import Site
from lowbit.comm.dist import ThreadWorld
from lowbit.scheme import SchemeError
from tests.collective_cases import SCHEMES, fake_calibration, partials, reduce_on_threads, single_process
from tests.conftest import REPO
from tests.helpers import assert_close_verbose

SITE = Site(1, "down_proj")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tp", [2, 3])
def test_quantized_reduce_matches_single_process_math(scheme, tp):
    expected = single_process(scheme, tp)
    for rank, (out, _) in enumerate(reduce_on_threads(scheme, tp)):
        # Same operations in the same order: the sums agree to the last bit; 1e-6 allows for
        # a different summation kernel on another platform.
        assert_close_verbose(out, expected, atol=1e-6, rtol=0, msg=f"{scheme} tp={tp} rank={rank}")


def test_every_rank_gets_the_same_sum():
    outs = [o for o, _ in reduce_on_threads("int4-static-top1/32", 3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_quantized_sum_is_close_to_exact_sum():
    exact = torch.stack(partials(3)).sum(0)
    for scheme, bound in [("int8-token", 0.02), ("int4-static-top1/32", 0.2)]:
        out = reduce_on_threads(scheme, 3)[0][0]
        rel = ((out - exact).norm() / exact.norm()).item()
        assert rel < bound, f"{scheme}: relative error {rel:.3f} >= {bound}"


def test_paper_scheme_sends_4_1875_bits_per_value():
    hidden, tp, tokens = 576, 3, 8
    cal = fake_calibration(tp, hidden=hidden)

    def body(group):
        comm = QuantCommunicator(group, "int4-static-top1/64", cal)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(group.rank))
        comm.reduce(x, SITE)
        return comm.calls[-1]
    call = ThreadWorld(tp).run(body)[0]
    assert call.bytes_sent * 8 / (tokens * hidden) == 4.1875
    assert call.extra["leg1_bits"] == 4.1875


def test_two_shot_with_4bit_second_leg_receives_fewer_bytes_than_gather_at_tp3():
    gather = reduce_on_threads("int4-token", 3)[0][1]
    two_shot = reduce_on_threads("int4-token@twoshot+int4-token", 3)[0][1]
    assert two_shot.extra["bytes_received"] < gather.extra["bytes_received"]
    assert two_shot.extra["leg2_bits"] > 0 and two_shot.extra["leg1_bits"] > 0


def test_per_layer_override_applies_only_to_its_layer():
    def body(group):
        comm = QuantCommunicator(group, "int4-token;L1.down_proj=bf16", None)
        x = partials(2)[group.rank]
        a = comm.reduce(x, Site(1, "down_proj"))
        b = comm.reduce(x, Site(1, "o_proj"))
        return a, b, [c.scheme for c in comm.calls]
    a, b, names = ThreadWorld(2).run(body)[0]
    exact = torch.stack(partials(2)).sum(0)
    assert names == ["bf16", "int4-token"]
    assert_close_verbose(a, exact.bfloat16().float(), atol=0.5, rtol=0.02)  # bf16 wire: ~3 significant digits
    assert not torch.allclose(b, exact, atol=1e-3)


def test_static_scheme_without_calibration_is_refused():
    with pytest.raises(CalibrationError, match="needs a calibration artifact"):
        reduce_on_threads("int4-static-top1/64", 2, calibration=None)


def test_calibration_from_another_tp_size_is_refused():
    with pytest.raises(CalibrationError, match="TP size 3"):
        reduce_on_threads("int4-token", 2, calibration=fake_calibration(3))


def test_group_size_not_dividing_two_shot_chunk_is_refused():
    with pytest.raises(SchemeError, match="group_size"):
        reduce_on_threads("int4-group64@twoshot+int8-token", 3)


def test_nonfinite_partial_does_not_poison_other_values():
    def body(group):
        x = partials(2)[group.rank].clone()
        if group.rank == 0:
            x[2, 5] = float("nan")
            x[3, 7] = float("inf")
        comm = QuantCommunicator(group, "int8-token", None)
        return comm.reduce(x, SITE), comm.calls[-1]
    out, call = ThreadWorld(2).run(body)[0]
    assert call.extra["nonfinite"] == 2
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[2, 5] = mask[3, 7] = False
    assert torch.isfinite(out[mask]).all()


@pytest.mark.slow
def test_gather_and_two_shot_over_real_gloo_equal_single_process_math(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                           str(REPO / "tests/scripts/gloo_collectives.py"), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(3):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for scheme in SCHEMES:
            # fp32 sums in the same order in both: equal up to summation-kernel differences.
            assert_close_verbose(got[scheme], single_process(scheme, 3), atol=1e-6, rtol=0,
                                 msg=f"gloo rank {rank} {scheme}")


CODEC_SCHEMES = ["int4-static-top1/64", "int2-static", "int8-token", "int3a-group16-top1/32", "int4-token-rot16",
                 "int4-token-top1/32-rot16", "int4-group16-perm", "int4-static-top1/64@twoshot+int4-token",
                 "int4-token-rot16@twoshot+int8-token",
                 # not in the kernels: these must fall back to lowbit.wire.payload and still agree
                 "nf4-static-top1/64", "int4-static-sp2", "int4-token-thr5c1/16", "int4-token-sr",
                 "nf4-token@twoshot+int8-token"]


@pytest.mark.parametrize("scheme", CODEC_SCHEMES)
def test_a_kernel_codec_gives_the_same_sums_bytes_and_counts(scheme, monkeypatch):
    """QuantCommunicator(codec=kernels.dispatch.Codec()) on the native kernels against the
    lowbit.wire.payload path, on partials with NaN, Inf and values beyond the calibrated range: the
    same fp32 sums, bytes and stats."""
    from kernels import dispatch
    monkeypatch.setenv(dispatch.ENV, "native")
    tp = 3
    cal = fake_calibration(tp)
    xs = [x.clone() for x in partials(tp)]
    xs[0][2, 5], xs[1][4, 9], xs[2][1, 11] = float("nan"), float("inf"), 1e3  # 1e3: clamped by static scales

    def body(group):
        out = {}
        for name, codec in (("payload", None), ("codec", dispatch.Codec())):
            comm = QuantCommunicator(group, scheme, cal, codec=codec)
            out[name] = (comm.reduce(xs[group.rank], SITE), comm.calls[-1])
        return out

    results = ThreadWorld(tp).run(body)
    for rank, got in enumerate(results):
        (a, call_a), (b, call_b) = got["payload"], got["codec"]
        assert_close_verbose(b, a, atol=0.0, rtol=0.0, msg=f"{scheme} rank {rank}")
        assert call_a.bytes_sent == call_b.bytes_sent
        ea, eb = call_a.extra, call_b.extra
        for key in ("leg1_bits", "leg2_bits", "bytes_received", "clamped", "nonfinite", "leg2_clamped"):
            assert ea.get(key) == eb.get(key), (scheme, key, ea.get(key), eb.get(key))
    if scheme == "int4-static-top1/64":  # the cases are really there: rank 0's NaN, rank 2's 1e3
        assert results[0]["codec"][1].extra["nonfinite"] == 1 and results[2]["codec"][1].extra["clamped"] == 1
