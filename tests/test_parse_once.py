"""A job turns its scheme strings into a plan once: the evaluate kind on every rank parses each
string (and the fp32 reference) exactly once, and the worker does not validate the spec again."""
from __future__ import annotations

import threading
from collections import Counter
from types import SimpleNamespace

from launch.layout import RunPaths
from launch.spec import JobSpec
from lowbit.comm.dist import ThreadWorld
from lowbit.scheme import grammar

SCHEMES = ["bf16", "int8-token", "int4-group16@twoshot+int4-group8", "int4-token-rot16", "int4-token-sp2;L1=int8-token"]


class _Events:
    """The JobContext's event log, silent (the test reads only the result)."""

    def loading(self, *a, **k):
        pass

    def emit(self, *a, **k):
        pass

    def step(self, *a, **k):
        pass

    def plan(self, *a, **k):  # the stages a kind announces before it starts (launch.events)
        pass


def test_evaluate_kind_parses_each_scheme_once_per_rank(tmp_path, monkeypatch, tiny_models):
    from launch.kinds import evaluate as kind
    from lowbit.method import evaluate as method_evaluate
    spec = JobSpec(kind="evaluate", model="tiny-llama", tp=2, schemes=SCHEMES, calib_tokens=64, eval_tokens=64,
                   tasks=[], items_per_task=0, params=dict(seq_len=32, batch_size=2, layer_error=True,
                                                           layer_error_chunks=1))
    parses: Counter = Counter()
    real = grammar.parse_scheme_map

    def spy(text):
        parses[(threading.get_ident(), text)] += 1
        return real(text)
    monkeypatch.setattr(grammar, "parse_scheme_map", spy)
    loaded = tiny_models["tiny-llama"]
    build = method_evaluate.build_tp_model
    monkeypatch.setattr(method_evaluate, "build_tp_model", lambda name, group: build(name, group, loaded=loaded))

    def body(group):
        ctx = SimpleNamespace(group=group, spec=spec, events=_Events(), paths=RunPaths(tmp_path, "eval-spy"),
                              rank=group.rank)
        return kind.run(ctx)
    result = ThreadWorld(2).run(body)[0]
    assert [r["scheme"] for r in result["records"]] == ["fp32", *SCHEMES]
    threads = {t for t, _ in parses}
    assert len(threads) == 2  # both ranks parsed (their own plan), nobody else did
    for thread in threads:
        mine = {text: n for (t, text), n in parses.items() if t == thread}
        assert mine == {text: 1 for text in ["fp32", *SCHEMES]}, mine


def test_worker_trusts_the_submitted_spec(tmp_path, monkeypatch):
    """``JobSpec.load_trusted`` (the worker's read) runs no validation: no config load, no scheme parse."""
    import launch.spec as spec_module
    spec = JobSpec(kind="evaluate", model="tiny-llama", tp=2, schemes=["int4-static-top1/64"], calib_tokens=256,
                   eval_tokens=256)
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    calls = []
    monkeypatch.setattr(spec_module, "_field_problems", lambda *a, **k: calls.append(a) or [])
    monkeypatch.setattr(grammar, "parse_scheme_map", lambda text: calls.append(text))
    loaded = JobSpec.load_trusted(path)
    assert loaded.to_dict() == spec.to_dict() and calls == []


def test_minauto_is_resolved_once_per_job_from_the_newest_bench_records(tmp_path, monkeypatch):
    """@minauto becomes the crossover of the newest collective-bench records of the spec's link
    and TP size: the smallest measured size from which the quantized collective is at least as
    fast at every larger size; the job keeps where the number came from."""
    import pandas as pd

    from launch.kinds import method
    from launch.store import bench as store_bench
    rows = []
    for tokens, speedup in ((16, 0.5), (256, 1.2), (2048, 0.9), (8192, 1.4), (16384, 2.0)):
        rows.append(dict(tp=2, tokens=tokens, hidden=576, method="gather", scheme="int4-static-top1/64",
                         speedup_vs_bf16=speedup, bits_per_value=4.1875, link="100mbit", source="fixture", order=0))
    monkeypatch.setattr(method, "gate_records", lambda root=None: pd.DataFrame(rows))
    spec = JobSpec(kind="evaluate", model="tiny-llama", tp=2, link="loopback", calib_tokens=64, eval_tokens=64,
                   schemes=["int8-token"], params=dict(seq_len=32))
    ctx = SimpleNamespace(spec=SimpleNamespace(**dict(spec.to_dict(), link="100mbit",
                                                      schemes=["int4-static-top1/64@minauto;L1=int8-token"])),
                          group=SimpleNamespace(world_size=2), paths=RunPaths(tmp_path, "eval-gate"))
    plan = method.plan(ctx)
    gated = plan["int4-static-top1/64@minauto;L1=int8-token"].default
    assert gated.min_message == 8192 * 576 * 2  # 2048 tokens lose, so the crossover is the next size up
    assert ctx.gates == {"int4-static-top1/64@minauto": dict(bytes=8192 * 576 * 2, source="fixture: "
                                                             "int4-static-top1/64 on 100mbit at TP 2")}
    none_win = [dict(r, speedup_vs_bf16=0.5) for r in rows]
    assert store_bench.gate_crossover(gated, "100mbit", 2, pd.DataFrame(none_win))[0] == store_bench.MAX_MIN_MESSAGE
    assert store_bench.gate_crossover(gated, "1gbit", 2, pd.DataFrame(rows))[0] is None


def test_minauto_without_records_is_refused_at_submit_with_the_field_named(monkeypatch):
    import pandas as pd
    import pytest

    from launch.kinds import method
    from launch.spec import SpecError
    monkeypatch.setattr(method, "gate_records", lambda root=None: pd.DataFrame(
        columns=["tp", "tokens", "hidden", "method", "scheme", "speedup_vs_bf16", "bits_per_value", "link",
                 "source", "order"]))
    with pytest.raises(SpecError, match=r"schemes\[0\].*@minauto needs a measured crossover.*bench.collectives"):
        JobSpec(kind="evaluate", model="tiny-llama", tp=2, link="100mbit", schemes=["int4-token@minauto"],
                calib_tokens=256, eval_tokens=256)
