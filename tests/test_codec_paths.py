"""Nothing switches codec path silently: a failing native kernel is an error under the test setting,
and in a run the result names the path each site took and the change is an event.

    .venv/bin/python -m pytest tests/test_codec_paths.py -q

The native kernels are made to fail the way numba that cannot compile for this CPU would (a
RuntimeError on good input), by monkeypatching ``kernels.native_cpu`` in this process; the run is
the evaluate job kind's body on threaded ranks (``ThreadWorld``), writing a real events.jsonl.
"""
from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest

from kernels import dispatch
from kernels import native_cpu as nc
from kernels import reference as ref
from lowbit.comm.codec import PathLog
from lowbit.scheme import QuantSpec
from tests.test_kernels import OUTLIERS, assert_same_bytes, partial

KERNELS = ("quantize_pack", "quantize_pack_counts", "unpack_dequant_sum", "unpack_dequant_sum_requant")


def _break_native(monkeypatch, after: int = 0):
    """Native kernels that fail on good input after ``after`` good calls (shared by every thread)."""
    calls = {"n": 0}

    def failing(good):
        def run(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise RuntimeError("numba cannot compile for this CPU")
            return good(*args, **kwargs)
        return run
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "_native_broken", None)
    for name in KERNELS:
        monkeypatch.setattr(nc, name, failing(getattr(nc, name)))


def test_a_failing_native_kernel_raises_under_the_test_setting(monkeypatch):
    """(a) LOWBIT_KERNELS_STRICT (set for the whole suite by tests/conftest.py): auto does not fall
    back, the failure surfaces; nothing is marked broken."""
    _break_native(monkeypatch)
    assert os.environ.get(dispatch.STRICT_ENV) == "1", "tests/conftest.py sets the strict setting for the suite"
    spec = QuantSpec(4, True, "token")
    x = partial(1200)
    with pytest.raises(dispatch.KernelFailure, match="cannot compile"):
        dispatch.quantize_pack(x, spec, OUTLIERS)
    with pytest.raises(dispatch.KernelFailure, match="cannot compile"):
        dispatch.Codec().encode(x, spec, OUTLIERS, None, None)
    assert dispatch.native_failure() is None and dispatch.backend("cpu", spec) == "native"


def test_a_failing_native_kernel_outside_the_tests_falls_back_with_a_warning_and_says_so(monkeypatch):
    """Not strict (a run): the call runs the reference (the same bytes and counts), warns, reports
    the path it took, and auto keeps the reference; an explicit native mode still raises."""
    _break_native(monkeypatch)
    monkeypatch.delenv(dispatch.STRICT_ENV, raising=False)
    spec = QuantSpec(4, True, "token")
    x = partial(1200)
    codec = dispatch.Codec()
    assert codec.path(spec, x.device) == "native"
    with pytest.warns(RuntimeWarning, match="cannot compile"):
        payload, counts, ran = codec.encode(x, spec, OUTLIERS, None, None)
    assert ran == "reference" and "cannot compile" in codec.failure()
    assert_same_bytes(payload, ref.quantize_pack_ref(x, spec, OUTLIERS))
    assert counts == {"clamped": 0, "nonfinite": 0}
    assert codec.path(spec, x.device) == "reference"  # from now on, announced as such
    monkeypatch.setenv(dispatch.ENV, "native")  # an explicit mode is obeyed: the error surfaces
    with pytest.raises(RuntimeError, match="cannot compile"):
        dispatch.quantize_pack(x, spec, OUTLIERS)


def test_a_path_log_reports_each_change_once_and_names_every_sites_paths():
    seen = []
    log = PathLog(seen.append)
    log.note("L0.o_proj", "leg1", "native", "native")
    log.note("L0.o_proj", "leg1", "native", "reference", "RuntimeError: x")  # a fallback (and a change): one event
    log.note("L0.o_proj", "leg1", "reference", "reference")
    log.note("L0.o_proj", "leg1", "native", "reference", "RuntimeError: x")  # the same fallback again: none
    log.note("L1.o_proj", "leg1", "native", "native")
    log.note("L1.o_proj", "leg1", "reference", "reference")  # a change of path from the site's last call
    log.note("L1.o_proj", "leg2", "native", "native")
    assert [(e["kind"], e["site"], e["before"], e["path"]) for e in seen] == [
        ("fallback", "L0.o_proj", "native", "reference"), ("change", "L1.o_proj", "native", "reference")]
    assert seen == log.events and seen[0]["reason"] == "RuntimeError: x"
    assert log.by_site() == {"L0.o_proj": "native, reference", "L1.o_proj": "leg1 native, reference; leg2 native"}


def test_a_run_names_the_codec_path_of_each_site_and_records_the_change_as_an_event(monkeypatch, tmp_path,
                                                                                    tiny_models):
    """(b) in a run: the evaluate job kind on threaded ranks, with the native kernels failing after
    the first forward of the quantized scheme: the result names the paths each site took (native,
    then the reference), and events.jsonl holds the codec events, each naming its site."""
    from launch.events import EventLog, read_events
    from launch.kinds import evaluate as evaluate_kind
    from launch.spec import JobSpec
    from lowbit.comm.dist import ThreadWorld
    monkeypatch.delenv(dispatch.STRICT_ENV, raising=False)
    # tiny-llama has 2 layers: 4 sites x (quantize + unpack) x 2 ranks = 16 kernel calls per forward
    _break_native(monkeypatch, after=16)
    spec = JobSpec.from_dict(dict(kind="evaluate", model="tiny-llama", tp=2, schemes=["int4-token"],
                                  calib_tokens=64, eval_tokens=64, tasks=[], items_per_task=0,
                                  params=dict(seq_len=32, batch_size=1, layer_error=False, codec="kernels")))
    events_path = tmp_path / "events.jsonl"

    def body(group):
        ctx = SimpleNamespace(spec=spec, group=group, events=EventLog(events_path, enabled=group.rank == 0),
                              paths=SimpleNamespace(run_id="codec-run", root=tmp_path, dir=tmp_path))
        return evaluate_kind.run(ctx)
    with pytest.warns(RuntimeWarning, match="cannot compile"):
        result = ThreadWorld(2).run(body)[0]
    record = next(r for r in result["records"] if r["scheme"] == "int4-token")
    paths = record["codec_paths"]
    assert len(paths) == 4, paths  # every site of the 2-layer model is named
    for site, path in paths.items():
        assert set(re.split(r", |\+", path)) <= {"native", "reference"}, (site, path)
    assert any("native" in p and "reference" in p for p in paths.values()), paths
    assert next(r for r in result["records"] if r["scheme"] == "fp32")["codec_paths"] == {}  # exact: no codec
    codec_events = [e for e in read_events(events_path) if e["stage"] == "codec"]
    assert codec_events, "the change of path is an event"
    assert all("native -> reference" in e["message"] and "int4-token" in e["message"] for e in codec_events)
    assert {e["metrics"]["site"] for e in codec_events} <= set(paths)
    from launch.store.runs import codec_changes
    assert codec_changes(read_events(events_path)) == [e["message"] for e in codec_events]  # what the Runs page shows


def test_collective_bench_records_name_the_path_their_messages_took(monkeypatch):
    """The collective bench with ``codec = kernels`` (native on this CPU) and ``reference``: each
    quantized record names the path its site's messages took; nf (no kernel) stays on the reference."""
    from bench.collectives import bench_on_group
    from lowbit.comm.dist import ThreadWorld
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "_native_broken", None)
    params = dict(repeats=1, min_repeats=1, warmup=0, budget_s=0.1, tokens=[4], hidden=[96], compute_repeats=0,
                  schemes=["int4-static-top1/64", "nf4-token"])
    for codec, int_path in (("kernels", "native"), ("reference", "reference")):
        records = ThreadWorld(2).run(lambda g: bench_on_group(g, dict(params, codec=codec)))[0]
        paths = {r["scheme"]: r["codec_path"] for r in records}
        assert paths == {"bf16": None, "int4-static-top1/64": int_path, "nf4-token": "reference"}, (codec, paths)
