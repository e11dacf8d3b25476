"""The throughput job's body on threaded ranks: every scheme timed in the same run with the
kernels codec inside the communicators, bits per value from the bytes sent, the size gate's
messages counted as BF16, and the result naming its codec."""
from __future__ import annotations

import math
from types import SimpleNamespace

from bench.throughput import throughput_job
from launch.layout import RunPaths
from launch.spec import JobSpec
from lowbit.comm.dist import ThreadWorld
from lowbit.wire import accounting


class _Events:
    def loading(self, *a, **k):
        pass

    def step(self, *a, **k):
        pass


def test_throughput_job_times_every_scheme_with_the_kernels_codec(tmp_path, monkeypatch, tiny_models):
    from lowbit.model import engine
    import bench.throughput as bt
    loaded = tiny_models["tiny-llama"]
    monkeypatch.setattr(bt, "build_tp_model", lambda name, group: engine.build_tp_model(name, group, loaded=loaded))
    schemes = ["bf16", "int4-token", "int4-token@min1M"]  # tiny-llama's messages are all under 1 MiB: gated
    spec = JobSpec(kind="throughput", model="tiny-llama", tp=2, schemes=schemes, calib_tokens=256, eval_tokens=256,
                   params=dict(prompt_tokens=16, new_tokens=3, rounds=1))

    def body(group):
        ctx = SimpleNamespace(group=group, spec=spec, events=_Events(), paths=RunPaths(tmp_path, "tp-job"),
                              rank=group.rank)
        return throughput_job(ctx)
    result = ThreadWorld(2).run(body)[0]
    assert result["codec"] == "kernels.dispatch" and result["link"] == "loopback"
    records = {r["scheme"]: r for r in result["records"]}
    assert list(records) == schemes
    assert records["bf16"]["bits_per_value"] == 16.0
    # tiny-llama's hidden 64: 4-bit codes + a bf16 scale per token of 64 values, exact in binary
    assert records["int4-token"]["bits_per_value"] == 4 + 16 / 64
    assert records["int4-token"]["bits_per_value"] == accounting.scheme_bits_per_value("int4-token", 64, 2)
    assert records["int4-token@min1M"]["bits_per_value"] == 16.0  # every message went as exact BF16
    for r in records.values():
        # what was timed: 16 prompt tokens, 3 new ones (the first comes with the prefill: 2 decode steps)
        assert (r["prompt_tokens"], r["new_tokens"]) == (16, 3)
        assert math.isfinite(r["prefill_tokens_per_s"]) and r["prefill_tokens_per_s"] > 0
        assert math.isfinite(r["decode_tokens_per_s"]) and r["decode_tokens_per_s"] > 0
        assert len(r["prefill_comm_share"]) == 2 and all(0 < s <= 1 for s in r["prefill_comm_share"])
    assert records["bf16"]["prefill_speedup"] == records["bf16"]["decode_speedup"] == 1.0  # the baseline
