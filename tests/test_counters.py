"""Per-message counters (``lowbit.counters``) count exactly the failures that were built into the input,
and the shipping recipes record them per call (first leg, ``leg2_`` second leg, ``nonfinite_out``).

    .venv/bin/python -m pytest tests/test_counters.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.counters import message_counters, range_limit
from lowbit.quant import dequantize, quantize
from lowbit.scheme import parse_scheme
from tests.test_shipping_recipes import partials_for, reduce_all


def counts(scheme: str, x: torch.Tensor) -> dict:
    spec = parse_scheme(scheme).quant
    res = quantize(x, spec)
    return message_counters(x, dequantize(res.codes, spec, res.scales), spec)


def seeded(shape=(4, 256), scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(*shape, generator=g) * scale).bfloat16().float()


def test_range_is_the_cast_or_the_format():
    assert range_limit(parse_scheme("qint4-ilv32-sqr-f16").quant) == 65504.0       # fp16 cast
    assert range_limit(parse_scheme("qint4-ilv32-sqr-bf16").quant) == float(torch.finfo(torch.bfloat16).max)
    assert range_limit(parse_scheme("f8e4m3-tensor-snone").quant) == 448.0          # unscaled e4m3
    assert range_limit(parse_scheme("f8e5m2-tensor-snone").quant) == 57344.0


def test_values_beyond_the_cast_are_counted_and_the_native_path_has_none():
    x = seeded()
    x[0, 3], x[2, 100], x[3, 7] = 70144.0, -1e30, 65504.0   # two past fp16's range, one at its top
    assert counts("qint4-ilv32-sqr-f16", x)["beyond_range_in"] == 2
    assert counts("qint4-ilv32-sqr-bf16", x)["beyond_range_in"] == 0
    assert counts("f8e4m3-tensor-snone", x)["beyond_range_in"] == 3


def test_tiny_groups_are_attenuated_on_gfx942_and_underflow_unscaled_fp8():
    """gfx942's saturated reciprocal: a group of 32 under 1e-4 keeps ~0% of its norm (docs/shipping.md);
    exactly the 3 tiny groups (the even and odd halves of block 0, and the odd half of block 5) count."""
    x = seeded((1, 1024))
    x[0, :64] *= 1e-5
    x[0, 321:384:2] *= 1e-5
    c = counts("qint8-ilv32-sqr-f16sat", x)
    assert (c["attenuated_groups"], c["underflowed_groups"], c["groups"]) == (3, 0, 32)
    assert counts("qint8-ilv32-sqr-bf16", x)["attenuated_groups"] == 0   # the native path keeps them (|d| >> eps)
    everything_tiny = seeded((1, 1024), 1e-5)                               # e4m3's smallest step is 2**-9
    assert counts("f8e4m3-tensor-snone", everything_tiny) == dict(beyond_range_in=0, attenuated_groups=1,
                                                                   underflowed_groups=1, groups=1)
    zeros = torch.zeros(1, 1024)
    assert counts("qint4-ilv32-sqr-f16", zeros)["attenuated_groups"] == 0   # no signal: nothing lost


def test_a_recipe_records_both_legs_and_its_nonfinite_outputs():
    """70144 on rank 0 at TP 2 through QuickReduce INT4 with the fp16 cast: one value beyond the cast,
    exactly 32 non-finite outputs on every rank (its interleaved group); the native path: none."""
    parts = partials_for("randn", 2)
    parts[0][0, 2] = 70144.0
    ranks = reduce_all("quickreduce-int4", parts)
    first, second = ranks[0][2], ranks[1][2]
    assert (first["beyond_range_in"], second["beyond_range_in"]) == (1, 0)
    assert first["nonfinite_out"] == second["nonfinite_out"] == 32
    padded = 2 * 16384                      # 32 x 576 = 18432 values in two zero-padded 16384-value tiles
    for extra in (first, second):
        assert extra["groups"] == padded // 32 and extra["leg2_groups"] == padded // 2 // 32  # leg 2: its half
        assert extra["attenuated_groups"] + extra["leg2_attenuated_groups"] <= 2
    native = reduce_all("qint4-ilv32-sqr-bf16@quickreduce", parts)[0][2]
    assert native["nonfinite_out"] == 0 and native["beyond_range_in"] == 0


def test_nccl_e4m3_counts_its_saturation():
    parts = partials_for("randn", 2, shape=(4, 256))
    parts[1][0, 0] = 500.0
    extra = reduce_all("nccl-fp8e4m3", parts)[1][2]
    assert (extra["beyond_range_in"], extra["clamped"], extra["groups"], extra["nonfinite_out"]) == (1, 1, 1, 0)


def test_lowbits_own_collectives_record_the_counters_too():
    """gather and two-shot: one value past fp16's range on rank 0 with lowbit's fp16 scales (int4 per
    token, -sfp16: the scale 70144 / 7.5 fits, the code does not clamp it) is not beyond the format's
    range; with the fp16 cast it is. Both legs' group counts are the messages' groups (two-shot at TP 2:
    two chunk messages of 4 x 32 values, one group each per row; leg 2 this rank's chunk)."""
    from lowbit.comm.collectives import QuantCommunicator
    from lowbit.comm.dist import ThreadWorld
    from lowbit.site import Site

    parts = partials_for("randn", 2, shape=(4, 64))
    parts[0][1, 3] = 70144.0

    def run(scheme):
        def body(group):
            comm = QuantCommunicator(group, scheme)
            comm.reduce(torch.from_numpy(parts[group.rank].astype(np.float32)), Site(0, "o_proj"))
            return comm.calls[-1].extra
        return ThreadWorld(2).run(body)
    gather = run("int4-token-sfp16")
    assert [e["beyond_range_in"] for e in gather] == [0, 0] and [e["groups"] for e in gather] == [4, 4]
    assert all(e["nonfinite_out"] == 0 for e in gather)
    cast = run("int4-token-sfp16-f16")
    # counted beyond the cast's range; lowbit's own rule clamps the cast's inf to the top code: finite output
    assert [e["beyond_range_in"] for e in cast] == [1, 0] and cast[0]["nonfinite_out"] == 0
    two = run("int4-group32@twoshot+int8-group32")
    assert [e["groups"] for e in two] == [8, 8] and [e["leg2_groups"] for e in two] == [4, 4]


@pytest.mark.parametrize("scheme,per_call,leg2", [
    ("int4-group32@twoshot+int8-group32", 3, True),  # per rank: two first-leg chunk messages and the leg-2 chunk
    ("quickreduce-int4", 3, True),                   # a shipping recipe: the same, in lowbit.comm.recipes
    ("nccl-fp8e4m3", 1, False),                      # NCCL's ring: the one fp8 tensor, no second leg
])
def test_counters_are_counted_only_where_the_calls_stats_are_kept(monkeypatch, scheme, per_call, leg2):
    """The counters decode each message again in torch (several times the kernels' own cost at
    8192 x 576): a call whose stats nobody keeps (``record=False``, timed ``reduce``) or a communicator
    built with ``counters=False`` (the benches, task scoring) skips them, in lowbit's collectives and
    in the shipping recipes alike; the sum and the bytes stay the same."""
    from lowbit.comm import collectives, recipes
    from lowbit.comm.dist import ThreadWorld
    from lowbit.site import Site

    parts = partials_for("randn", 2, shape=(4, 64))
    counted = []
    real = collectives.message_counters
    for module in (collectives, recipes):
        monkeypatch.setattr(module, "message_counters", lambda *a: counted.append(1) or real(*a))

    def run(how):
        def body(group):
            x = torch.from_numpy(parts[group.rank].astype(np.float32))
            if how == "record":
                comm = collectives.QuantCommunicator(group, scheme)
                return comm.reduce(x, Site(0, "o_proj")), comm.calls[-1].extra
            if how == "stats":
                comm = collectives.QuantCommunicator(group, scheme, record=False)
                out, _, extra = comm.reduce_with_stats(x, Site(0, "o_proj"))
                return out, extra
            if how == "unrecorded":
                comm = collectives.QuantCommunicator(group, scheme, record=False)
                return comm.reduce(x, Site(0, "o_proj")), {}
            comm = collectives.QuantCommunicator(group, scheme, record=False, counters=False)
            return comm.reduce_with_stats(x, Site(0, "o_proj"))[::2]
        counted.clear()
        results = ThreadWorld(2).run(body)
        return results, len(counted)
    (kept, n_kept), (stats, n_stats) = run("record"), run("stats")
    (unrecorded, n_unrecorded), (off, n_off) = run("unrecorded"), run("off")
    assert n_kept == n_stats == 2 * per_call
    assert n_unrecorded == n_off == 0
    assert all("groups" in e and "nonfinite_out" in e and ("leg2_groups" in e) == leg2 for _, e in kept + stats)
    assert all("groups" not in e and "nonfinite_out" not in e for _, e in off)
    for other in (stats, unrecorded, off):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(kept, other))
    assert [e["bytes_received"] for _, e in off] == [e["bytes_received"] for _, e in kept]


def test_site_counters_sum_a_runs_calls_per_site():
    from lowbit.comm.communicator import CallRecord
    from lowbit.counters import site_counters

    def call(layer, module, **extra):
        return CallRecord(layer=layer, module=module, tokens=1, hidden=8, dtype="float32", bytes_sent=0, seconds=0.0,
                          scheme="s", extra=extra)
    calls = [call(0, "o_proj", groups=4, attenuated_groups=1, clamped=2), call(0, "o_proj", groups=4, clamped=1),
             call(1, "down_proj", groups=2, nonfinite_out=3, leg2_groups=1), call(1, "down_proj", leg1_bits=16.0)]
    assert site_counters(calls) == {"L0.o_proj": dict(groups=8, attenuated_groups=1, clamped=3),
                                     "L1.down_proj": dict(groups=2, nonfinite_out=3, leg2_groups=1)}


def test_on_the_stress_model_the_counters_point_at_exactly_the_two_stress_sites():
    """stress-tiny at TP 2 (lowbit.model.stress: one site's partials above 65504, one site's under 1e-4):
    with gfx942's fp16 clamp and with NCCL's unscaled e4m3, values beyond range are counted at the overflow
    site only and underflowed groups at the tiny site only; QuickReduce's native bf16 path counts neither."""
    import copy

    from lowbit.comm.collectives import QuantCommunicator
    from lowbit.comm.dist import ThreadWorld
    from lowbit.counters import site_counters
    from lowbit.model.models import load_model
    from lowbit.model.stress import stress_spec
    from lowbit.model.tp import shard_model

    loaded, spec = load_model("stress-tiny"), stress_spec("stress-tiny")
    ids = torch.randint(0, loaded.model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(2))

    def sites(scheme):
        def body(group):
            comm = QuantCommunicator(group, scheme)
            model = shard_model(copy.deepcopy(loaded.model), group.rank, 2, comm)
            with torch.no_grad():
                model(ids)
            return site_counters(comm.calls)
        per_site = ThreadWorld(2).run(body)[0]
        return ({s for s, c in per_site.items() if c.get("beyond_range_in")},
                {s for s, c in per_site.items() if c.get("underflowed_groups")},
                {s for s, c in per_site.items() if c.get("nonfinite_out")})
    for scheme in ("qint8-ilv32-sqr-f16sat@quickreduce", "nccl-fp8e4m3"):
        assert sites(scheme) == ({str(spec.overflow_site)}, {str(spec.tiny_site)}, set()), scheme
    assert sites("qint4-ilv32-sqr-bf16@quickreduce") == (set(), set(), set())
    beyond, _, nonfinite = sites("quickreduce-int4")        # gfx950: the overflow turns the output non-finite
    assert beyond == {str(spec.overflow_site)} and str(spec.overflow_site) in nonfinite


@pytest.mark.parametrize("scheme", ["int4-group32@twoshot+int8-group32", "int4-token", "quickreduce-int4",
                                    "nccl-fp8e4m3"])
def test_a_calls_seconds_leave_out_the_time_its_counters_took(monkeypatch, scheme):
    """``comm_seconds`` (the accuracy-against-communication-time plot) sums the call records'
    ``seconds``; the counters are diagnostics, not communication, so a record leaves their time out
    and keeps it as ``counters_seconds``. A per-thread fake clock (no real time is read) advances one
    second inside each counters call and nowhere else: every record's seconds is exactly 0 and its
    ``counters_seconds`` the number of counted messages."""
    import threading
    import types

    from lowbit.comm import collectives, communicator, recipes
    from lowbit.comm.dist import ThreadWorld
    from lowbit.site import Site

    now = threading.local()
    clock = types.SimpleNamespace(perf_counter=lambda: getattr(now, "t", 0.0))
    real = collectives.message_counters

    def counted(*args):
        now.t = getattr(now, "t", 0.0) + 1.0
        now.n = getattr(now, "n", 0) + 1
        return real(*args)
    for module in (collectives, communicator, recipes):
        monkeypatch.setattr(module, "time", clock)
    for module in (collectives, recipes):
        monkeypatch.setattr(module, "message_counters", counted)
    parts = partials_for("randn", 2, shape=(4, 64))

    def body(group):
        comm = collectives.QuantCommunicator(group, scheme)
        comm.reduce(torch.from_numpy(parts[group.rank].astype(np.float32)), Site(0, "o_proj"))
        return comm.calls[-1], now.n
    for record, n_counted in ThreadWorld(2).run(body):
        assert n_counted >= 1
        assert record.seconds == 0.0 and record.extra["counters_seconds"] == float(n_counted)
