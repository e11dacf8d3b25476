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
