"""Every page of the app, with and without results, driven through its controls (streamlit's
AppTest: the scripts run in this process, no browser). The fixture runs are real job outputs
(tests/test_app_results.py); clicking the demo starts a real torchrun job, which the test cancels."""
from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from launch import procs
from launch.index import RunIndex
from launch.layout import RunPaths
from launch.spec import JobSpec, SpecError
from launch.store.evaluate import scheme_fields
from tests.conftest import REPO
from tests.helpers import assert_page_clean
from tests.scripts.make_fixtures import fixture_result
from tests.test_app_results import results_root, results_template  # noqa: F401 - fixtures

PAGES = ["pages/overview.py", "pages/outliers.py", "pages/layer_error.py", "pages/bits.py", "pages/tradeoffs.py",
         "pages/collectives.py", "pages/preflight.py", "pages/runs.py"]
TIMEOUT = 180  # the first run imports torch and transformers; on a busy 2-core machine that takes a while


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT).run()
    if page != PAGES[0]:
        at.switch_page(page).run()
    return at


def assert_clean(at: AppTest, errors=(), warnings=()) -> None:
    """No exception, and no error or warning element but those the test names (substrings)."""
    assert_page_clean(at, errors, warnings)


def plotly_charts(at: AppTest) -> list:
    return at.get("plotly_chart")


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.fixture
def empty_runs(tmp_path, monkeypatch):
    root = tmp_path / "empty-runs"
    monkeypatch.setenv("LOWBIT_RUNS", str(root))
    return root


@pytest.fixture
def runs_with_results(results_root, monkeypatch):  # noqa: F811 - the fixture imported above
    monkeypatch.setenv("LOWBIT_RUNS", str(results_root))
    return results_root


# -- without results -----------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_every_page_opens_on_an_empty_history_and_says_how_to_start(empty_runs, page):
    at = open_page(page)
    assert_clean(at)
    assert at.title, "every page has a title"
    if page == "pages/overview.py":
        # AppTest drops the main script's sidebar after switch_page; the browser test sees it on every page
        sidebar = texts(at.sidebar.markdown)
        assert "CPU cores" in sidebar and "Backend" in sidebar
        # the models table, found by its column: a Slurm cluster that answers (the Slurm tests' own,
        # when they ran earlier in the shuffled order) adds its partitions table before it
        (models,) = [d.value for d in at.sidebar.dataframe if "name" in d.value.columns]
        assert "smollm2-135m" in set(models["name"])
        assert at.get("plotly_chart"), "the TP layer diagram"
        assert at.button(key="demo_button")
    elif page == "pages/bits.py":  # computed from the payload layout: needs no run
        assert plotly_charts(at)
    elif page == "pages/runs.py":
        assert "No runs yet" in texts(at.info)
    else:
        assert at.info and at.get("page_link"), "an empty state with links to the demo and to Runs"
        assert not plotly_charts(at)


# -- with results --------------------------------------------------------------------------------
EXPECTED_CHARTS = {"pages/overview.py": 2, "pages/outliers.py": 5, "pages/layer_error.py": 3, "pages/bits.py": 3,
                   "pages/tradeoffs.py": 1, "pages/collectives.py": 3,
                   "pages/preflight.py": 0}  # no audit in the fixture runs: tests/test_app_preflight.py has one
# The fixture holds broken runs on purpose; Runs lists them, and its detail view opens on the
# newest, the directory without a spec: that warning, and nothing else, is expected.
EXPECTED_MESSAGES = {"pages/runs.py": dict(warnings=("spec.json is missing",))}


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_the_fixture_results(runs_with_results, page):
    at = open_page(page)
    assert_clean(at, **EXPECTED_MESSAGES.get(page, {}))
    if page == "pages/runs.py":  # a table, no chart: every run of the fixture is listed
        listed = set(at.dataframe[0].value["id"])
        assert listed == RunIndex(runs_with_results).ids() | {"orphan-dir"}, listed
    else:
        assert len(plotly_charts(at)) >= EXPECTED_CHARTS[page], page


def test_overview_shows_bytes_per_token_and_the_latest_demo(runs_with_results):
    at = open_page("pages/overview.py")
    at.selectbox(key="ov_model").set_value("tiny-llama").run()
    at.selectbox(key="ov_tp").set_value(2).run()
    assert_clean(at)
    traffic = at.dataframe[0].value.set_index("scheme")
    # tiny-llama: hidden 64, 2 all-reduces per layer, 2 bytes per BF16 value
    assert traffic.loc["bf16", "message bytes / token / layer"] == 2 * 64 * 2
    assert traffic.loc["int4-static-top1/64", "bits / value"] == 4.1875
    assert "demo-tiny" in texts(at.caption) + texts(at.success)
    demo_table = at.dataframe[1].value
    assert set(demo_table["scheme"]) == {"fp32", "bf16", "int4-static", "int4-static-rand1/64", "int4-static-top1/64"}


def test_demo_button_queues_a_real_run_shows_progress_and_cancels(empty_runs):
    at = open_page("pages/overview.py")
    at.selectbox(key="ov_model").set_value("tiny-llama").run()
    at.selectbox(key="ov_tp").set_value(2).run()
    at.button(key="demo_button").click().run()
    assert_clean(at)
    run_id = at.session_state["demo_run"]
    row = RunIndex(empty_runs).get(run_id)
    assert row["status"] in ("queued", "running") and row["model"] == "tiny-llama" and row["tp"] == 2
    assert at.get("progress"), "the demo shows its progress"
    at.button(key="demo_cancel").click().run()
    assert_clean(at)
    assert RunIndex(empty_runs).get(run_id)["status"] == "cancelled"
    # a user's cancel is news, not an error (issue 29): an info box says so, no error box
    assert "was cancelled (cancelled by user)" in texts(at.info) and not at.error, texts(at.error)
    # cancel ends every process of the run (each names the run's spec.json on its command line)
    spec = str(RunPaths(empty_runs, run_id).spec)

    def left():
        return [p for p in procs.live_pids() if spec in procs.cmdline(p)]
    deadline = time.monotonic() + 30  # a hang bound: the kill's grace period is 5 s
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(), [procs.cmdline(p) for p in left()]


def test_runs_page_shows_spec_problems_verbatim(empty_runs):
    at = open_page("pages/runs.py")
    at.selectbox(key="new_model").set_value("tiny-llama")
    at.number_input(key="new_tp").set_value(3)
    at.text_area(key="new_schemes").input("bf16\nint4-static-top1/64\nint9-token")
    at.run()
    at.button(key="new_go").click().run()
    assert_clean(at, errors=("The job was not started",))
    with pytest.raises(SpecError) as refused:
        JobSpec.from_dict(dict(kind="evaluate", model="tiny-llama", tp=3, schemes=["bf16", "int4-static-top1/64",
                                                                                    "int9-token"]))
    shown = texts(at.error)
    for field, message in refused.value.problems:
        assert f"{field}: {message}" in shown, (field, message, shown)
    assert "tp" in refused.value.fields()
    assert not RunIndex(empty_runs).list(), "a refused spec queues nothing"


def test_runs_page_bad_params_json_is_a_field_problem(empty_runs):
    at = open_page("pages/runs.py")
    at.text_input(key="new_params").input("{seq_len: 128").run()
    at.button(key="new_go").click().run()
    assert_clean(at, errors=("The job was not started",))
    assert "params: not valid JSON" in texts(at.error)


def test_runs_history_filters_details_logs_and_compare(runs_with_results):
    at = open_page("pages/runs.py")
    history = at.dataframe[0].value
    assert {"eval-tiny", "eval-failed", "eval-corrupt", "orphan-dir", "bench-tp2", "bench-tp4"} <= set(history["id"])
    # the queue started with the app recovered the run whose processes vanished
    assert history.set_index("id").loc["gen-lost", "status"] == "lost"
    at.multiselect(key="hist_status").set_value(["failed"]).run()
    assert list(at.dataframe[0].value["id"]) == ["eval-failed"]
    assert at.selectbox(key="detail_run").value == "eval-failed"
    assert "deliberate failure" in texts(at.code)  # the launcher's error and the log tail
    at.multiselect(key="hist_status").set_value(["done"]).run()
    at.text_input(key="hist_search").input("twoshot").run()
    assert list(at.dataframe[0].value["id"]) == ["eval-tiny"]
    at.selectbox(key="cmp_a").set_value("eval-tiny")
    at.selectbox(key="cmp_b").set_value("demo-tiny")
    at.run()
    assert_clean(at)
    frames = [d.value for d in at.dataframe]
    assert any("kl (A)" in f.columns and "kl (B)" in f.columns for f in frames)
    # the fields that differ: the demo preset against the evaluate fixture's spec
    assert any(set(f.get("field", [])) == {"run_id", "schemes", "eval_tokens", "tasks", "items_per_task",
                                           "time_limit_s"} for f in frames), [f.get("field") for f in frames]


def test_corrupt_and_failed_runs_never_break_a_page(runs_with_results):
    at = open_page("pages/runs.py")
    at.selectbox(key="detail_run").set_value("eval-corrupt").run()
    assert_clean(at, warnings=("result.json is not valid JSON",))
    assert "not valid JSON" in texts(at.warning) + texts(at.caption)
    at.selectbox(key="detail_run").set_value("orphan-dir").run()
    assert_clean(at, warnings=("spec.json is missing",))
    assert "spec.json is missing" in texts(at.warning)


def test_an_older_calibration_is_explained_in_words_and_a_store_bug_fails_the_page(runs_with_results, monkeypatch):
    from tests.test_app_results import _strip_samples
    for run_id in ("cal-wiki", "cal-lambada"):
        _strip_samples(runs_with_results / run_id / "calibration")
    at = open_page("pages/layer_error.py")  # its rotation panel reads the stored sample partials
    assert_clean(at, warnings=("This calibration cannot be shown: this calibration stores no sample partials",))
    assert len(at.warning) == 1
    at = open_page("pages/playground.py")
    assert_clean(at, warnings=("This calibration cannot be shown: this calibration stores no sample partials",))
    assert at.button(key="pg_capture"), "the page offers a capture with samples instead"

    def broken(cal):
        raise TypeError("a bug in the store")
    monkeypatch.setattr("launch.store.calibration.spikiest_stored_sample", broken)  # read by the page's import
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT).run()
    at.switch_page("pages/layer_error.py").run()
    assert [e.value for e in at.exception] and "a bug in the store" in str(at.exception[0].value), \
        "a bug is not an expected condition: the page must raise it, not show a warning"


def test_outliers_controls_and_the_between_sources_overlap(runs_with_results):
    at = open_page("pages/outliers.py")
    at.radio(key="cal_module").set_value("o_proj")
    at.slider(key="cal_layer").set_value(0)
    at.selectbox(key="cal_k").set_value("1/16")
    at.toggle(key="cal_log").set_value(False)
    at.run()
    assert_clean(at)
    assert "k = 4 feature(s)" in texts(at.caption)
    # wikipedia vs lambada calibrations of the same model and TP: the sources tab draws its chart
    assert at.selectbox(key="cal_peer").value
    assert len(plotly_charts(at)) == 7
    at.number_input(key="cal_feature").set_value(5).run()
    assert_clean(at)


def test_outliers_offers_a_second_source_calibration_when_there_is_one_source(runs_with_results):
    import shutil
    shutil.rmtree(runs_with_results / "cal-lambada")
    at = open_page("pages/outliers.py")
    assert_clean(at)
    assert at.button(key="cal_other_go"), "calibrate on another text from the sources tab"


def test_layer_error_filters_metric_and_scheme_builder(runs_with_results):
    at = open_page("pages/layer_error.py")
    at.selectbox(key="le_run").set_value("eval-tiny").run()
    at.multiselect(key="le_f_select").set_value(["topk"])
    at.radio(key="le_metric").set_value("SNR (dB)")
    at.run()
    assert_clean(at)
    summary = at.dataframe[0].value
    assert set(summary["scheme"]) == {"int4-static-top1/64"}
    assert set(summary["mode"]) == {"local", "accumulated"}
    at.multiselect(key="le_f_select").set_value(["none"]).run()
    schemes = set(at.dataframe[0].value["scheme"])
    assert "int4-token@twoshot+int8-token" in schemes
    assert "leg1" in set(at.dataframe[0].value["leg"])  # two-shot's first leg has its own line
    at.selectbox(key="le_gran").set_value("group").run()
    at.number_input(key="le_group").set_value(16)
    at.selectbox(key="le_select").set_value("random")
    at.run()
    assert_clean(at)
    assert any(t.value == "int4-group16-rand1/64" for t in at.text_input)


def test_layer_error_builder_offers_the_neighbouring_schemes(runs_with_results):
    def built(at):
        return [t.value for t in at.text_input if t.value]

    at = open_page("pages/layer_error.py")
    at.radio(key="le_code").set_value("nf").run()
    assert_clean(at)
    assert "nf4-static-top1/64" in built(at)  # the paper with the codebook
    at.selectbox(key="le_select").set_value("sparse").run()
    at.number_input(key="le_sp").set_value(2).run()
    assert "nf4-static-sp2" in built(at)
    at.radio(key="le_code").set_value("int").run()
    at.selectbox(key="le_gran").set_value("token").run()
    at.selectbox(key="le_select").set_value("threshold").run()
    at.number_input(key="le_thr").set_value(8.0).run()
    assert "int4-token-thr8c1/64" in built(at)
    at.selectbox(key="le_gran").set_value("group").run()
    at.number_input(key="le_group").set_value(64).run()
    at.selectbox(key="le_select").set_value("none").run()
    at.checkbox(key="le_perm").check().run()
    assert_clean(at)
    assert "int4-group64-perm" in built(at)
    fields = scheme_fields("int4-group64-perm")
    assert fields["options"] == "perm" and fields["family"] == "int4"
    assert scheme_fields("nf4-static-sp3")["select"] == "sparse"
    at.checkbox(key="le_perm").uncheck().run()
    at.radio(key="le_code").set_value("lm").run()
    at.selectbox(key="le_bits_lm").set_value(3).run()
    assert_clean(at)
    assert "lm3-group64" in built(at)  # the fitted codebook, 2-4 bits
    assert scheme_fields("lm3-group64")["family"] == "lm3"


def test_layer_error_builder_offers_fp_codes_scale_formats_and_an_fp_second_leg(runs_with_results):
    at = open_page("pages/layer_error.py")
    at.radio(key="le_code").set_value("fp").run()
    at.selectbox(key="le_bits_fp").set_value("fp4e2m1").run()
    at.selectbox(key="le_gran").set_value("group").run()
    at.number_input(key="le_group").set_value(32).run()
    at.selectbox(key="le_scale").set_value("e8m0").run()
    at.selectbox(key="le_select").set_value("none").run()
    assert_clean(at)
    built = [t.value for t in at.text_input if t.value]
    assert "fp4e2m1-group32-se8m0" in built  # lowbit's MX rendering (the mxfp4 preset before issue 26)
    at.selectbox(key="le_algo").set_value("two_shot").run()
    at.selectbox(key="le_second").set_value("same as the first leg").run()
    assert_clean(at)
    assert "fp4e2m1-group32-se8m0@twoshot+fp4e2m1-group32-se8m0" in [t.value for t in at.text_input if t.value]
    at.selectbox(key="le_bits_fp").set_value("fp8e4m3").run()
    at.selectbox(key="le_algo").set_value("gather").run()
    at.selectbox(key="le_gran").set_value("token").run()
    at.selectbox(key="le_scale").set_value("fp16").run()
    assert "fp8e4m3-token-sfp16" in [t.value for t in at.text_input if t.value]
    assert scheme_fields("fp8e4m3-token-sfp16")["family"] == "fp8e4m3"


def test_layer_error_submit_shows_problems_for_a_bad_group_size(runs_with_results):
    at = open_page("pages/layer_error.py")
    at.selectbox(key="le_model").set_value("tiny-llama").run()
    at.selectbox(key="le_gran").set_value("group").run()
    at.number_input(key="le_group").set_value(24)  # does not divide hidden 64
    at.run()
    at.button(key="le_go").click().run()
    assert_clean(at, errors=("The job was not started",))
    assert "group_size" in texts(at.error) and "24" in texts(at.error)


def test_bits_page_stacks_parts_and_rejects_a_bad_scheme(runs_with_results):
    at = open_page("pages/bits.py")
    assert at.selectbox(key="bits_model").value == "tiny-llama"  # the latest evaluate run's model
    at.text_input(key="bits_extra").input("int5-group8-top1/32").run()
    assert_clean(at)
    table = at.dataframe[0].value.set_index("scheme")
    assert table.loc["bf16", "message vs BF16"] == "1.000x"
    assert "int5-group8-top1/32" in table.index
    at.text_input(key="bits_extra").input("int9-static").run()
    assert_clean(at, errors=("int9-static: bits: 9 not allowed",))
    assert "int9-static" in texts(at.error)


def test_bits_page_stacks_every_preset_by_part(runs_with_results):
    from lowbit.scheme import PRESETS
    at = open_page("pages/bits.py")
    assert_clean(at)
    presets = next(d.value for d in at.dataframe if "preset" in d.value.columns).set_index("preset")
    assert set(presets.index) == set(PRESETS)
    assert presets.loc["mxfp4", "bits / value, one message"] == 4.25
    assert presets.loc["quickreduce-int4", "bits / value, one message"] == 4.5
    assert presets.loc["flashinfer-fp8", "hidden"] == 64  # flat groups of 256 fit tiny-llama's 64 (the last one short)
    tp = int(next(c for c in presets.columns if c.startswith("bits / value, the call at TP")).split()[-1])
    from lowbit.wire.accounting import scheme_bits_breakdown
    assert presets.loc["flashinfer-fp8", "bits / value, one message"] == pytest.approx(
        scheme_bits_breakdown("flashinfer-fp8", 64, tp)["leg 1"]["total"], abs=1e-4)  # the table rounds to 4 places


def test_tradeoffs_axes_pareto_table_and_csv(runs_with_results):
    at = open_page("pages/tradeoffs.py")
    at.multiselect(key="to_runs").set_value(["eval-tiny", "demo-tiny"])
    at.selectbox(key="to_quality").set_value("KL divergence")
    at.radio(key="to_cost").set_value("measured communication time")
    at.run()
    assert_clean(at)
    assert "On the frontier" in texts(at.caption)
    table = at.dataframe[0].value
    assert len(table) == 7 + 5 and {"kept_pct", "kept_se", "comm_ms_per_ktok"} <= set(table.columns)
    assert at.get("download_button")
    at.toggle(key="to_ref").set_value(True).run()
    assert_clean(at)


def test_tradeoffs_shows_a_sweep_and_its_answer_per_budget(runs_with_results):
    at = open_page("pages/tradeoffs.py")
    at.multiselect(key="to_runs").set_value(["sweep-tiny"]).run()
    assert_clean(at)
    assert len(plotly_charts(at)) == 1
    assert at.selectbox(key="to_quality").value == "top-1 agreement (%)"  # the sweep ran no tasks
    answer = at.dataframe[1].value
    assert list(answer["budget"]) == ["4.2", "3.5", "3.0", "2.5"] and answer["scheme"].notna().any()
    assert "Auto-tune answer: sweep-tiny" in texts(at.subheader)


def test_tradeoffs_autotune_form_queues_a_validated_sweep(empty_runs):
    from launch.queue import cancel
    at = open_page("pages/tradeoffs.py")
    at.selectbox(key="at_model").set_value("tiny-llama").run()
    at.selectbox(key="at_tp").set_value(2).run()
    at.multiselect(key="at_rot").set_value(["none", 16]).run()
    assert_clean(at)
    assert "grid scheme(s) in range" in texts(at.caption) and "int3-token-rot16" in texts(at.caption)
    at.button(key="at_go").click().run()
    assert_clean(at)
    assert not at.error, texts(at.error)
    rows = RunIndex(empty_runs).list()
    assert rows and rows[0]["kind"] == "sweep"
    cancel(rows[0]["id"], empty_runs)
    spec = json.loads((empty_runs / rows[0]["id"] / "spec.json").read_text())
    assert spec["params"]["allocate"] == [3.0, 3.5] and spec["params"]["grid"]["rotation"] == [None, 16]
    assert spec["params"]["kl_max"] == 0.3 and spec["model"] == "tiny-llama" and spec["tp"] == 2


def test_layer_error_builder_offers_rotation_and_sr_and_the_rotation_panel_plots(runs_with_results):
    at = open_page("pages/layer_error.py")
    at.selectbox(key="le_gran").set_value("token").run()
    at.selectbox(key="le_rot").set_value(16).run()
    at.checkbox(key="le_sr").check().run()
    assert_clean(at)
    assert any(t.value == "int4-token-top1/64-rot16-sr" for t in at.text_input), [t.value for t in at.text_input]
    assert len(plotly_charts(at)) == 3  # the per-layer error chart and the panel's two
    metrics = at.get("metric")
    assert len(metrics) == 3 and "->" in metrics[0].proto.body
    at.selectbox(key="rot_block").set_value(32).run()
    assert_clean(at)


def test_collectives_empty_state_button_goes_through_spec_validation(empty_runs):
    at = open_page("pages/collectives.py")
    at.button(key="cb_empty_go").click().run()
    assert_clean(at)
    from launch.queue import cancel
    rows = RunIndex(empty_runs).list()
    assert [r["kind"] for r in rows] == ["collective-bench"]
    spec = JobSpec.from_dict(json.loads((empty_runs / rows[0]["id"] / "spec.json").read_text()))  # valid as stored
    assert spec.kind == "collective-bench" and spec.tp == 3 and spec.link == "loopback"  # the form's defaults
    assert spec.params["tokens"] == [1, 256, 2048] and spec.params["hidden"] == [576]  # the classroom-sized grid
    assert cancel(rows[0]["id"], empty_runs) == "cancelled"


def test_collectives_filters(runs_with_results):
    at = open_page("pages/collectives.py")
    at.multiselect(key="cb_tp").set_value([4])
    at.run()
    assert_clean(at)
    written = fixture_result("collective-bench-tp4")["records"]  # a real TP 4 run over loopback
    shown = at.dataframe[-1].value  # the records table comes last
    assert set(shown["tp"]) == {4} and len(shown) == len(written) == 9
    # Where each quantized collective starts to pay, by hand from the run's records: the smallest
    # message from which every larger measured size is at least as fast as BF16 (none: blank).
    pays = at.dataframe[0].value.set_index("method")
    for method in ("gather", "two_shot"):
        mine = sorted((r for r in written if r["method"] == method), key=lambda r: r["tokens"])
        winning = [r for i, r in enumerate(mine) if all(s["speedup_vs_bf16"] >= 1 for s in mine[i:])]
        expected = winning[0]["tokens"] * winning[0]["hidden"] * 2 / 2**20 if winning else None
        got = pays.loc[method, "pays_from_mib"]
        assert (pd.isna(got) if expected is None else got == expected), (method, got, expected)
        assert pays.loc[method, "best_speedup"] == max(r["speedup_vs_bf16"] for r in mine)


def test_overview_offers_gemma3_at_tp2_with_its_bytes(empty_runs):
    at = open_page("pages/overview.py")
    at.selectbox(key="ov_model").set_value("gemma3-270m").run()
    assert_clean(at)
    assert at.selectbox(key="ov_tp").value == 2 and at.selectbox(key="ov_tp").options == ["1", "2", "4"]
    traffic = at.dataframe[0].value.set_index("scheme")
    # Gemma 3 270M: hidden 640, 2 all-reduces per layer, 2 bytes per BF16 value, 18 layers
    assert traffic.loc["bf16", "message bytes / token / layer"] == 2 * 640 * 2
    assert traffic.loc["bf16", "KiB / token, all 18 layers"] == round(18 * 2 * 640 * 2 / 1024, 2)


def test_scores_carry_standard_errors_and_absent_values_are_blank(runs_with_results):
    at = open_page("pages/overview.py")
    at.selectbox(key="ov_model").set_value("tiny-llama").run()
    at.selectbox(key="ov_tp").set_value(2).run()
    assert_clean(at)
    demo = at.dataframe[1].value
    assert (demo["task accuracy kept (%) ± s.e."] == "").all()  # the demo evaluates no tasks
    assert not demo.astype(str).isin(["None", "nan", "NaN"]).any().any()
    at = open_page("pages/runs.py")
    at.selectbox(key="detail_run").set_value("eval-tiny").run()
    assert_clean(at)
    scores = next(d.value for d in at.dataframe if "kept %" in d.value.columns)
    assert {"arc_easy (acc) %", "Δ arc_easy pp", "piqa (acc_norm) %", "avg %"} <= set(scores.columns)
    by_scheme = scores.set_index("scheme")
    assert by_scheme.loc["fp32", "Δ arc_easy pp"] == "" and by_scheme.loc["fp32", "kept %"] == "100.0"
    others = by_scheme.drop(index="fp32")
    assert others["arc_easy (acc) %"].str.contains(" ± ").all() and others["Δ arc_easy pp"].str.contains(" ± ").all()
    assert not scores.astype(str).isin(["None", "nan"]).any().any()
