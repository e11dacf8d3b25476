"""The results store (launch.store) on real run files, and the fixture runs the app tests use.

``build_results_template()`` makes, once per test session, a runs root with the files real jobs
write, by construction: the calibrate, evaluate (the demo's preset too) and sweep runs are the job
kinds' own bodies (``launch.registry.kind_function``, as the worker calls them) on threaded ranks
(``lowbit.comm.dist.ThreadWorld``), with their specs taken from tests/fixtures/jobs (every JobSpec
field) and their run blocks written by the worker's ``run_block``; the collective-bench runs are
the checked-in results of real torchrun runs (timings need real processes). Beside them: a failed
run with a torchrun log, a run whose result.json is corrupt, a directory without a spec and a run
whose processes vanished. ``test_fixture_runs_have_the_keys_and_types_of_real_runs`` holds the
threaded runs to the real ones (tests/scripts/make_fixtures.py made those). Tests copy the
template (``results_root``) so a queue started on one copy never touches it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from launch.events import EventLog
from launch.index import RunIndex
from launch.layout import RunPaths, write_atomic
from launch.presets import DEMO_SCHEMES, demo_spec
from launch.store.bench import collective_frame
from launch.store.bits import bits_parts, bits_per_site, traffic_per_token
from launch.store.calibration import calibration_sources, load_calibration, spikiest_stored_sample
from launch.store.evaluate import (SCHEME_NUMERIC, compare_results, compare_specs, evaluate_runs, layer_error_frame,
                                   pareto_front, scheme_frame, sweep_summary)
from launch.store.machine import model_shape, valid_tp_sizes
from launch.store.problems import ArtifactDamaged, ArtifactMissing, ArtifactOutdated, StoreProblem
from launch.store.runs import RUN_COLUMNS, load_result, load_spec, runs_frame
from launch.spec import JobSpec
from lowbit.analysis import (ema_trace_frame, feature_ranges, outlier_count, overlap_between_batches,
                             overlap_between_layers, overlap_between_ranks, overlap_between_sources, random_jaccard,
                             rotation_view, selected_features, spikiest_sample)
from lowbit.site import Site
from tests.helpers import json_shape
from tests.scripts.make_fixtures import EVAL_SCHEMES, FIXTURES, MODEL, SEQ_LEN, TP, fixture_result, fixture_spec

SECOND_SOURCE = "lambada"  # the other text for the between-sources overlap (shorter to tokenize than shakespeare)
BENCH_RUNS = {"bench-tp2": "collective-bench-tp2", "bench-tp4": "collective-bench-tp4"}  # run id -> fixture
_TEMPLATE: dict[str, Path] = {}


@contextmanager
def _runs_env(root: Path):
    old = os.environ.get("LOWBIT_RUNS")
    os.environ["LOWBIT_RUNS"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOWBIT_RUNS", None)
        else:
            os.environ["LOWBIT_RUNS"] = old


def _cpu_run_group(tp: int):
    """What the run block reads from a torchrun rank's group on this CPU machine: gloo, and the
    placement ``lowbit.comm.placement`` chooses there (the fixture's ranks are threads)."""
    from lowbit.comm.placement import choose_placement
    return SimpleNamespace(world_size=tp, backend="gloo", placement=choose_placement("gloo", 0, tp, 0))


def _record(root: Path, run_id: str, spec: dict, status: str, result: dict | None = None, error: str | None = None,
            seconds: float = 12.0, events_written: bool = False) -> RunPaths:
    """Write a run the way the launcher does: spec.json (every JobSpec field), events, result.json
    with the worker's run block (kept when the result has one), index row."""
    from launch.worker import run_block
    spec = JobSpec.trusted(dict(spec, run_id=run_id)).to_dict()
    paths = RunPaths(root, run_id)
    paths.make()
    write_atomic(paths.spec, json.dumps(spec, indent=2, sort_keys=True))
    events = EventLog(paths.events)
    if not events_written:
        events.loading(f"starting {spec.get('tp')} rank(s), backend gloo")
        for step in range(1, 4):
            events.step(step, 3, f"step {step}/3")
    if result is not None:
        block = run_block(run_id, JobSpec.trusted(spec), _cpu_run_group(spec["tp"]), seconds)
        result = dict(result, run=dict(result.get("run") or block, id=run_id))
        write_atomic(paths.result, json.dumps(result, indent=2, default=str))
    if status == "done":
        events.done(f"{spec['kind']} finished in {seconds:.1f} s")
    index = RunIndex(root)
    index.add(run_id, spec, created=time.time() - 600 + len(index.ids()))
    index.claim(run_id)
    if status != "running":
        index.finish(run_id, status, error=error, returncode=0 if status == "done" else 1,
                     result_paths=paths.result_files())
    return paths


def _run_kind(root: Path, run_id: str, spec: dict, seconds: float = 12.0) -> dict:
    """Run ``spec``'s job kind as the worker does (its registered body, a JobContext, events from
    rank 0), on threaded ranks; record the run. Returns rank 0's result."""
    from lowbit.comm.dist import ThreadWorld
    from launch.registry import kind_function
    from launch.worker import JobContext
    with _runs_env(root):  # the spec's checks find calib_from runs under the runs root
        job = JobSpec.from_dict(dict(spec, run_id=run_id))
    paths = RunPaths(root, run_id)
    paths.make()
    EventLog(paths.events).loading(f"starting {job.tp} rank(s), backend gloo")
    body = kind_function(job.kind)

    def rank(group):
        return body(JobContext(group, job, EventLog(paths.events, enabled=group.rank == 0), paths))
    result = ThreadWorld(job.tp).run(rank)[0]
    _record(root, run_id, job.to_dict(), "done", result, seconds=seconds, events_written=True)
    return result


@contextmanager
def _one_model_for_all_ranks():
    """Rank threads share one loaded model (deep-copied per rank by ``build_tp_model``) and so
    one tokenizer: lowbit.model.data caches a source's token stream per tokenizer object, and
    tokenizing a whole source once per rank would dominate the fixture's time."""
    from unittest import mock

    from launch.kinds import sweep
    from lowbit.method import calibrate, evaluate
    from lowbit.model.data import token_chunks
    from lowbit.model.engine import build_tp_model
    from lowbit.model.models import load_model
    loaded = load_model(MODEL)  # also: transformers' lazy imports happen here, not racing in the rank threads
    for source in ("wikipedia", SECOND_SOURCE):
        token_chunks(loaded.tokenizer, source, "calib", 1, 2)

    def build(name, group, *args, **kwargs):
        return build_tp_model(name, group, *args, **dict(kwargs, loaded=loaded if name == MODEL else None))

    with mock.patch.object(calibrate, "build_tp_model", build), mock.patch.object(evaluate, "build_tp_model", build), \
            mock.patch.object(sweep, "build_tp_model", build):
        yield


def _build(root: Path) -> None:
    with _one_model_for_all_ranks():
        _build_runs(root)


def demo_fixture_spec() -> dict:
    """The classroom demo's preset on tiny-llama at TP 2, on one chunk of held-out text (the
    evaluate run uses two: their numbers differ) and the fixture's calibration."""
    return demo_spec(MODEL, TP, calib_from="cal-wiki", calib_tokens=8 * SEQ_LEN, eval_tokens=SEQ_LEN,
                     params=dict(seq_len=SEQ_LEN, batch_size=2, layer_error=True, layer_error_chunks=1))


def _build_runs(root: Path) -> None:
    root.mkdir(parents=True)
    _run_kind(root, "cal-wiki", FIXTURES["calibrate"])
    _run_kind(root, f"cal-{SECOND_SOURCE}", dict(FIXTURES["calibrate"], calib_data=SECOND_SOURCE))
    _run_kind(root, "eval-tiny", dict(FIXTURES["evaluate"], calib_from="cal-wiki"), seconds=41.0)
    _run_kind(root, "demo-tiny", demo_fixture_spec(), seconds=38.0)
    _run_kind(root, "sweep-tiny", dict(FIXTURES["sweep"], calib_from="cal-wiki"), seconds=30.0)
    for run_id, name in BENCH_RUNS.items():  # real torchrun runs: the records as the bench wrote them
        _record(root, run_id, fixture_spec(name), "done", fixture_result(name))

    evaluate = dict(fixture_spec("evaluate"), calib_from="cal-wiki")
    failed = _record(root, "eval-failed", dict(evaluate, schemes=["int2-token"]), "failed",
                     error="rank 1 failed (exitcode 1): RuntimeError: deliberate failure for the app tests")
    write_atomic(failed.launcher_log, "[rank1]: Traceback (most recent call last):\n[rank1]: RuntimeError: "
                                      "deliberate failure for the app tests\n")
    corrupt = _record(root, "eval-corrupt", evaluate, "done", {"records": []})
    corrupt.result.write_text('{"records": [ {"scheme": "bf16", ')  # torn write
    (root / "orphan-dir").mkdir()  # a directory without spec.json
    _record(root, "gen-lost", fixture_spec("generate"), "running")


def build_results_template(base: Path) -> Path:
    """The fixture runs root, built once per session under ``base``."""
    import torch
    if "root" not in _TEMPLATE:
        root = base / "template-runs"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread per rank thread: the ranks already fill the cores
        try:
            _build(root)
        finally:
            torch.set_num_threads(threads)
        _TEMPLATE["root"] = root
    return _TEMPLATE["root"]


def copy_results(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns("queue.lock", "*.tmp"))
    return dest


@pytest.fixture(scope="session")
def results_template(tmp_path_factory) -> Path:
    return build_results_template(tmp_path_factory.getbasetemp())


@pytest.fixture
def results_root(results_template, tmp_path) -> Path:
    return copy_results(results_template, tmp_path / "runs")


# -- the store -----------------------------------------------------------------------------------
def test_runs_frame_lists_every_run_with_status_and_never_raises_on_bad_ones(results_root):
    frame = runs_frame(results_root)
    status = dict(zip(frame["id"], frame["status"]))
    assert status["eval-tiny"] == "done" and status["cal-wiki"] == "done"
    assert status["eval-failed"] == "failed"
    assert status["eval-corrupt"] == "corrupt"  # result.json is not JSON although the index says done
    assert status["orphan-dir"] == "corrupt"  # no spec.json
    assert status["gen-lost"] == "running"  # only a queue's recovery may call it lost
    assert frame.loc[frame["id"] == "eval-tiny", "fraction"].item() == 1.0


def test_runs_frame_of_an_empty_root_is_an_empty_frame_with_columns(tmp_path):
    frame = runs_frame(tmp_path / "none-yet")
    assert frame.empty and list(frame.columns) == RUN_COLUMNS


def test_load_result_reports_problems_instead_of_raising(results_root):
    data, problem = load_result("eval-corrupt", results_root)
    assert data is None and "not valid JSON" in problem
    data, problem = load_result("no-such-run", results_root)
    assert data is None and "missing" in problem
    data, problem = load_result("../etc", results_root)
    assert data is None and "run id" in problem


def _strip_samples(folder: Path) -> None:
    """Rewrite the artifact in ``folder`` as an older version saved it: no sample partials."""
    from lowbit.method.calibrate import Calibration
    cal = Calibration.load(folder)
    cal.sample = None
    cal.save(folder)


def test_load_calibration_names_a_missing_a_damaged_and_an_outdated_artifact(results_root):
    from safetensors.torch import load_file, save_file
    folder = results_root / "cal-wiki" / "calibration"
    cal = load_calibration(folder)
    assert spikiest_stored_sample(cal) == spikiest_sample(cal)  # lowbit.analysis's answer where samples exist

    tensors = folder / "calibration.safetensors"
    saved = tensors.read_bytes()
    tensors.write_bytes(saved[:100])  # a torn write
    with pytest.raises(ArtifactDamaged, match="cannot be read"):
        load_calibration(folder)
    every = load_file(str(_write(tensors, saved)))
    save_file({k: v for k, v in every.items() if k != "batch_min"}, str(tensors))  # another version's layout
    with pytest.raises(ArtifactOutdated, match="no tensor 'batch_min'"):
        load_calibration(folder)
    _write(tensors, saved)
    (folder / "calibration.json").unlink()
    with pytest.raises(ArtifactMissing, match="calibration.json missing"):
        load_calibration(folder)

    other = results_root / f"cal-{SECOND_SOURCE}" / "calibration"
    _strip_samples(other)
    with pytest.raises(ArtifactOutdated, match="stores no sample partials"):
        spikiest_stored_sample(load_calibration(other))
    assert all(issubclass(c, StoreProblem) for c in (ArtifactMissing, ArtifactDamaged,
                                                           ArtifactOutdated))


def test_the_runs_table_shows_an_unreadable_index_and_raises_anything_else(tmp_path, monkeypatch):
    """The index that cannot be read (a locked or damaged sqlite file, a folder without permission)
    is a row that says so; any other error is a bug and reaches the page test's gate."""
    import sqlite3

    from launch.store import runs as store_runs

    def locked(_root):
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(store_runs, "list_runs", locked)
    frame = store_runs.runs_frame(tmp_path)
    assert list(frame["status"]) == ["corrupt"] and frame["problem"][0] == "database is locked"

    def bug(_root):
        raise TypeError("a bug in the store")
    monkeypatch.setattr(store_runs, "list_runs", bug)
    with pytest.raises(TypeError, match="a bug in the store"):
        store_runs.runs_frame(tmp_path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("run_id, fixture", [("cal-wiki", "calibrate"), ("eval-tiny", "evaluate"),
                                             ("sweep-tiny", "sweep")])
def test_fixture_runs_have_the_keys_and_types_of_real_runs(results_template, run_id, fixture):
    """The runs computed on threaded ranks for the app tests against the same kind's real torchrun
    run (tests/fixtures/jobs, made by tests/scripts/make_fixtures.py with the same specs): the same
    keys and value types everywhere, the run block included. A kind whose output changes fails
    here until the fixtures are made again."""
    ours = json.loads(RunPaths(results_template, run_id).result.read_text())
    real = fixture_result(fixture)
    assert json_shape(ours) == json_shape(real), sorted(json_shape(ours) ^ json_shape(real))
    spec = json.loads(RunPaths(results_template, run_id).spec.read_text())
    assert json_shape(spec) == json_shape(fixture_spec(fixture)), sorted(json_shape(spec) ^ json_shape(fixture_spec(fixture)))


def test_every_checked_in_fixture_is_a_current_spec_of_its_kind_with_a_real_run_block():
    from launch.registry import KINDS
    from launch.spec import SpecError
    assert {FIXTURES[name]["kind"] for name in FIXTURES} == set(KINDS), "one real run of every job kind"
    for name in FIXTURES:
        spec = fixture_spec(name)
        assert set(spec) == set(JobSpec.field_names()), name  # every field, none another version dropped
        assert JobSpec.trusted(spec).to_dict() == spec, name
        try:
            JobSpec.from_dict(dict(spec, calib_from=None))  # still valid today (calib_from names a run of the script)
        except SpecError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        run = fixture_result(name)["run"]
        assert run["kind"] == spec["kind"] and run["id"] == name and run["tp"] == spec["tp"], name
        assert run["backend"] == "gloo" and run["placement"]["backend"] == "gloo", name


def test_scheme_frame_has_one_row_per_scheme_with_the_papers_bits(results_root):
    data, _ = load_result("eval-tiny", results_root)
    frame = scheme_frame(data).set_index("scheme")
    assert list(frame.index) == ["fp32", *EVAL_SCHEMES]
    assert frame.loc["fp32", "reference"] and frame.loc["fp32", "kl"] == 0.0
    # tiny-llama hidden 64: 1/64 keeps one feature, 63 x 4 + 16 bits over 64 values = 4.1875
    assert frame.loc["int4-static-top1/64", "bits_per_value"] == pytest.approx(4.1875)
    assert frame.loc["int4-static-top1/64", "select"] == "topk" and frame.loc["int4-static", "select"] == "none"
    assert frame.loc["int8-token", "kl"] < frame.loc["int4-static", "kl"]
    assert frame["kept_pct"].notna().all() and frame["kept_se"].notna().all()


def test_scheme_frame_of_a_run_without_tasks_keeps_numeric_columns(results_root):
    # The demo evaluates no tasks: its kept_pct / kept_se are missing in every row, and pages round them.
    data, _ = load_result("demo-tiny", results_root)
    frame = scheme_frame(data)
    assert frame["kept_pct"].isna().all() and frame["kept_se"].isna().all()
    for col in SCHEME_NUMERIC:
        assert frame[col].dtype == float, col
    assert frame["kept_pct"].round(1).isna().all()
    assert frame["kl"].notna().all()


def test_a_sweep_reads_like_an_evaluate_run_with_its_reference_first(results_root):
    runs = evaluate_runs(runs_frame(results_root), results_root, sweeps=True)
    assert "sweep-tiny" in set(runs["id"]) and "auto-tune" in runs.set_index("id").loc["sweep-tiny", "label"]
    assert "sweep-tiny" not in set(evaluate_runs(runs_frame(results_root), results_root)["id"])
    data, _ = load_result("sweep-tiny", results_root)
    frame = scheme_frame(data)
    assert frame.iloc[0]["scheme"] == "fp32" and frame.iloc[0]["reference"] and frame.iloc[0]["kl"] == 0.0
    assert frame.iloc[0]["ppl"] == pytest.approx(data["points"][0]["reference_ppl"])
    schemes = set(frame["scheme"])
    assert {"int8-token", "int4-token-rot16", "int2-token", "int4-static-top1/64"} <= schemes
    assert frame["kl"].notna().all() and (frame["kl"].iloc[1:] > 0).all()
    best = sweep_summary(data)
    assert set(best["budget"]) == {"4.2", "3.5", "3.0", "2.5"}
    assert best.set_index("budget").loc["4.2", "scheme"] == data["best_at"]["4.2"]


def test_scheme_frame_carries_the_threshold_overflow(results_root):
    data, _ = load_result("eval-tiny", results_root)
    thr = dict(data["records"][1], scheme="int4-token-thr6c1/64", thr_overflow=42)
    frame = scheme_frame(dict(data, records=[data["records"][0], thr])).set_index("scheme")
    assert frame.loc["int4-token-thr6c1/64", "thr_overflow"] == 42.0
    assert frame.loc["int4-token-thr6c1/64", "select"] == "threshold"
    assert frame.loc["fp32", "thr_overflow"] == 0.0  # counted for every scheme: 0 without thr


def test_measured_bits_equal_the_payload_layout_for_every_scheme(results_root):
    data, _ = load_result("eval-tiny", results_root)
    measured = scheme_frame(data).set_index("scheme")["bits_per_value"]
    for scheme in EVAL_SCHEMES:
        layout_bits = bits_parts(scheme, hidden=64, tp=TP)["bits"].sum()
        # exact: payload.layout and the communicator count the same bytes (the layout is exact at
        # these sizes: no partial byte to round, outliers split evenly over two-shot's 2 chunks)
        assert layout_bits == pytest.approx(measured[scheme], abs=1e-9), scheme


def test_bits_parts_split_payload_outliers_scales():
    parts = bits_parts("int4-static-top1/64", hidden=576, tp=3).set_index("part")["bits"]
    assert parts["payload"] == pytest.approx(567 * 4 / 576)
    assert parts["outliers"] == pytest.approx(9 * 16 / 576)
    assert parts["scales"] == 0.0 and parts["indices"] == 0.0  # static scales and indices are not sent
    token = bits_parts("int8-token", hidden=576, tp=3).set_index("part")["bits"]
    assert token["scales"] == pytest.approx(16 / 576)  # one bf16 scale per token
    two = bits_parts("int4-token@twoshot+int8-token", hidden=576, tp=3)
    assert set(two["leg"]) == {"leg 1", "leg 2"}
    assert two[two["leg"] == "leg 2"]["bits"].sum() == pytest.approx((192 * 8 + 16) / 576)


def test_traffic_per_token_counts_two_all_reduces_per_layer():
    t = traffic_per_token("bf16", hidden=576, layers=30, tp=3)
    assert t["message_bytes_per_layer"] == 2 * 576 * 2
    assert t["sent_bytes_per_layer"] == pytest.approx(2 * (3 - 1) / 3 * 2 * 576 * 2)
    paper = traffic_per_token("int4-static-top1/64", hidden=576, layers=30, tp=3)
    assert paper["message_bytes"] / t["message_bytes"] == pytest.approx(4.1875 / 16)
    mixed = bits_per_site("int4-static-top1/64;L0-3=int8-token", hidden=576, layers=30, tp=3)
    per_layer = mixed.groupby("layer")["bits"].sum() / 2
    assert per_layer[0] == pytest.approx(8 + 16 / 576) and per_layer[4] == pytest.approx(4.1875)


def test_layer_error_frame_has_local_and_accumulated_rows_and_twoshot_first_leg(results_root):
    data, _ = load_result("eval-tiny", results_root)
    frame = layer_error_frame(data)
    assert set(frame["mode"]) == {"local", "accumulated"}
    assert set(frame["module"]) == {"o_proj", "down_proj"} and set(frame["layer"]) == {0, 1}
    two = frame[frame["scheme"] == "int4-token@twoshot+int8-token"]
    assert set(two["leg"]) == {"final", "leg1"}
    assert (frame["rel_error"] >= 0).all()
    assert layer_error_frame({"layer_errors": "garbage"}).empty


def test_pareto_front_keeps_only_undominated_points():
    cost = pd.Series([16.0, 8.25, 4.1875, 4.1875, 4.0])
    quality = pd.Series([100.0, 99.0, 90.0, 80.0, 70.0])
    assert pareto_front(cost, quality).tolist() == [True, True, True, False, True]
    assert pareto_front(pd.Series([1.0, math.nan]), pd.Series([1.0, 2.0])).tolist() == [True, False]


def test_calibration_sources_find_calibrate_runs_and_the_evaluate_runs_calibration(results_root):
    sources = calibration_sources(runs_frame(results_root), results_root)
    assert set(sources["source"]) == {"wikipedia", SECOND_SOURCE}
    assert len(sources) == 2  # eval-tiny used cal-wiki's folder: listed once
    assert (sources["model"] == MODEL).all() and (sources["tp"] == TP).all()


def test_rotation_view_of_a_stored_partial(results_root):
    cal = load_calibration(results_root / "cal-wiki" / "calibration")
    layer, module, rank = spikiest_sample(cal)
    sample = cal.site_sample(Site(layer, module), rank)
    crest = sample.abs().max() / sample.pow(2).mean().sqrt()
    for m in ("o_proj", "down_proj"):  # no stored partial is spikier than the one it picked
        for other_layer in range(cal.layers):
            for r in range(TP):
                s = cal.site_sample(Site(other_layer, m), r)
                # the same float32 reductions as spikiest_sample's: 1e-6 covers their order (crests ~1-10)
                assert s.abs().max() / s.pow(2).mean().sqrt() <= crest + 1e-6
    values, tokens = rotation_view(cal, layer, module, rank, 16, "int4-token")
    tokens_n, hidden = sample.shape
    assert len(values) == 2 * tokens_n * hidden and set(values["stage"]) == {"original", "rotated (R=16)"}
    original = values[values["stage"] == "original"]["value"].to_numpy()
    assert np.allclose(original, sample.reshape(-1).numpy())
    rotated = values[values["stage"] != "original"]["value"].to_numpy().reshape(tokens_n, hidden)
    # orthogonal: norms kept. fp32 sums of 64 squares after a 16-term rotation differ ~1e-6 relative;
    # 1e-4 is 100x that, and a matrix that is not orthogonal changes norms by O(1)
    assert np.allclose((rotated ** 2).sum(1), (sample.numpy() ** 2).sum(1), rtol=1e-4)
    # max >= RMS always; 1e-6 absorbs the fp32 rounding of the mean of squares (values ~1)
    assert len(tokens) == tokens_n and (tokens["absmax"] >= tokens["rms"] - 1e-6).all()
    assert tokens[["error", "error_rotated", "rest_error", "rest_error_rotated"]].notna().all().all()
    with pytest.raises(ValueError, match="rotation block"):
        rotation_view(cal, layer, module, rank, 24, "int4-token")
    with pytest.raises(ValueError, match="quant"):
        rotation_view(cal, layer, module, rank, 16, "int4-token-rot16")


def test_outlier_frames_from_a_real_calibration(results_root):
    cal = load_calibration(results_root / "cal-wiki" / "calibration")
    ranges = feature_ranges(cal, 0, "down_proj")
    assert len(ranges) == TP * 64 and (ranges["range"] >= 0).all()
    k = outlier_count(64, Fraction(1, 16))
    assert k == 4
    chosen = selected_features(cal, 0, "down_proj", Fraction(1, 16))
    summed = ranges.groupby("feature")["range"].sum().sort_values(ascending=False)
    assert sorted(chosen) == sorted(summed.index[:4].tolist())
    batches = overlap_between_batches(cal, "down_proj", k)
    assert batches["jaccard"].between(0, 1).all() and batches["batch"].nunique() == 4
    ranks = overlap_between_ranks(cal, 0, "down_proj", k)
    assert ranks.shape == (TP, TP) and all(ranks.iloc[i, i] == 1.0 for i in range(TP))
    assert overlap_between_layers(cal, "o_proj", k).shape == (2, 2)
    other = load_calibration(results_root / f"cal-{SECOND_SOURCE}" / "calibration")
    sources = overlap_between_sources(cal, other, k)
    assert len(sources) == 2 * 2 and sources["jaccard"].between(0, 1).all()
    trace = ema_trace_frame(cal, 1, "o_proj", chosen[0])
    # the EMA starts at the first batch's range; the two are summed over ranks in other orders (fp32)
    assert len(trace) == 4 and trace["ema_range"].iloc[0] == pytest.approx(trace["batch_range"].iloc[0], rel=1e-5)
    assert random_jaccard(64, 4) == pytest.approx((16 / 64) / (8 - 16 / 64))


def test_collective_frame_reads_bench_records(results_root):
    bench = collective_frame(runs_frame(results_root), results_root)
    written = [dict(r, run_id=run_id) for run_id, name in BENCH_RUNS.items() for r in fixture_result(name)["records"]]
    assert len(bench) == len(written) == 2 * 3 * 3  # 2 TP sizes x 3 sizes x 3 schemes
    assert set(bench["method"]) == {"exact", "gather", "two_shot"}
    by_key = bench.set_index(["run_id", "tp", "tokens", "scheme"])
    for r in written:
        row = by_key.loc[(r["run_id"], r["tp"], r["tokens"], r["scheme"])]
        assert (row["median_ms"], row["bytes_per_rank"], row["method"]) == (r["median_ms"], r["bytes_per_rank"],
                                                                            r["method"])
        assert row["message_mib"] == r["tokens"] * r["hidden"] * 2 / 2**20  # the BF16 message it replaces


def test_compare_two_runs_side_by_side(results_root):
    a, _ = load_result("eval-tiny", results_root)
    b, _ = load_result("demo-tiny", results_root)
    merged = compare_results(a, b)
    assert "kl (A)" in merged and "kl (B)" in merged
    by_scheme = merged.set_index("scheme")
    assert pd.isna(by_scheme.loc["int8-token", "kl (B)"])  # not a demo scheme: only in A
    # each side holds its own run's number: the demo evaluated other text, so they differ
    kl_a = {r["scheme"]: r["kl"] for r in a["records"]}
    kl_b = {r["scheme"]: r["kl"] for r in b["records"]}
    for scheme in DEMO_SCHEMES:
        assert (by_scheme.loc[scheme, "kl (A)"], by_scheme.loc[scheme, "kl (B)"]) == (kl_a[scheme], kl_b[scheme])
    assert kl_a["int4-static-top1/64"] != kl_b["int4-static-top1/64"]
    specs = compare_specs(load_spec("eval-tiny", results_root),
                                  load_spec("demo-tiny", results_root))
    # the demo preset against the fixture's evaluate spec: its schemes, one chunk of text, no tasks, a time limit
    assert set(specs.loc[~specs["same"], "field"]) == {"run_id", "schemes", "eval_tokens", "tasks", "items_per_task",
                                                       "time_limit_s"}


def test_model_shape_and_valid_tp_sizes():
    assert model_shape(MODEL)["hidden"] == 64
    assert valid_tp_sizes(MODEL) == [1, 2, 4]
