"""A class on the app (issue 29), through streamlit's AppTest: viewer mode (no enabled job button
without the teacher's token, a forged cancel refused on the server, the teacher's link can), the
class ceiling, out-of-range numbers refused with the field named (never replaced), the Lesson
keeping its step across pages, one demo at a time, a cancel shown as news, no "None" cells, and the
progress bar that never goes back.

A job "running" here is a sleeping process registered in the index the way the queue registers
a torchrun (its spec path on its command line), so the app's queue re-attaches it and nothing
heavy runs; the fixture kills it afterwards.

    .venv/bin/python -m pytest tests/test_app_classroom.py -q
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from streamlit.testing.v1 import AppTest

from launch.__main__ import main as launch_main
from launch.ceiling import CEILING, ceiling_problems, class_spec
from launch.events import EventLog, progress, read_events
from launch.index import RunIndex
from launch.presets import capture_spec, demo_spec
from launch.spec import JobSpec
from launch.submit import write_spec
from tests.conftest import REPO
from tests.test_app import (EXPECTED_MESSAGES, TIMEOUT, assert_clean, empty_runs, open_page,  # noqa: F401
                            runs_with_results, texts)
from tests.test_app_results import BENCH_RUNS, results_root, results_template  # noqa: F401 - fixtures

TOKEN = "class-token-29"
# Every button that starts or cancels a job, by key (pages/*.py): none may be enabled for a viewer.
JOB_BUTTON = re.compile(r"^(demo_button|demo_cancel|new_go|cancel_.+|le_go|cal_.+_go|at_go|cb_.+_go|.+_capture)$")
ALL_PAGES = ["pages/overview.py", "pages/lesson.py", "pages/playground.py", "pages/two_shot.py",
             "pages/where_it_pays.py", "pages/outliers.py", "pages/layer_error.py", "pages/bits.py",
             "pages/tradeoffs.py", "pages/collectives.py", "pages/runs.py"]


@pytest.fixture
def class_mode(monkeypatch):
    monkeypatch.setenv("LOWBIT_TEACHER_TOKEN", TOKEN)
    monkeypatch.delenv("LOWBIT_VIEWER_JOBS", raising=False)


def sleeping_run(root, spec: dict) -> tuple[str, subprocess.Popen]:
    """A run the index says is running, whose 'process group' is a sleep naming its spec path."""
    job, paths = write_spec(JobSpec.from_dict(spec), root)
    index = RunIndex(root)
    index.add(job.run_id, job.to_dict())
    index.claim(job.run_id)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(paths.spec)],
                            start_new_session=True)
    index.set_process(job.run_id, proc.pid, proc.pid)
    EventLog(paths.events).plan(["text"])
    return job.run_id, proc


@pytest.fixture
def running_job(empty_runs):
    """A running tiny demo-shaped evaluate run (never computes anything: a sleep)."""
    run_id, proc = sleeping_run(empty_runs, demo_spec(model="tiny-llama", tp=2))
    yield run_id
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def as_teacher(page: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.query_params["teacher"] = TOKEN
    at.run()
    if page != "pages/overview.py":
        at.switch_page(page).run()
    return at


def forge_click(button):
    """What a hand-made websocket message does: the button's trigger sent although the browser shows
    it disabled (AppTest's own click() refuses a disabled button, as a browser does)."""
    button._value = True
    return button


def _cancel_script():
    import os

    from pages import _ui
    _ui.cancel_run(os.environ["LOWBIT_TEST_RUN"])


def cancel_from_a_session(run_id: str, monkeypatch) -> AppTest:
    """A session that calls the app's cancel with no button at all: the server-side check alone."""
    monkeypatch.setenv("LOWBIT_TEST_RUN", run_id)
    return AppTest.from_function(_cancel_script, default_timeout=TIMEOUT).run()


def job_buttons(at: AppTest) -> dict[str, bool]:
    """key -> disabled, for every job button on the page (sidebar included)."""
    return {b.key: b.disabled for b in at.button if b.key and JOB_BUTTON.match(b.key)}


# -- viewer mode -----------------------------------------------------------------------------------
@pytest.mark.parametrize("page", ALL_PAGES)
def test_a_viewer_finds_no_enabled_job_button_on_any_page(results_root, class_mode, monkeypatch, page):  # noqa: F811
    monkeypatch.setenv("LOWBIT_RUNS", str(results_root))
    at = open_page(page)
    assert_clean(at, **EXPECTED_MESSAGES.get(page, {}))
    enabled = [key for key, disabled in job_buttons(at).items() if not disabled]
    assert not enabled, enabled
    # an enabled button that is not a job button: nothing that starts, queues, evaluates or cancels
    for b in at.button:
        if not b.disabled:
            assert not re.search(r"\b(run|start|queue|evaluate|capture|cancel)\b", str(b.label), re.I), b.label


def test_a_viewer_on_an_empty_history_gets_disabled_capture_and_demo_buttons(empty_runs, class_mode):
    for page, key in (("pages/overview.py", "demo_button"), ("pages/playground.py", "pg_capture"),
                      ("pages/two_shot.py", "ts_capture"), ("pages/outliers.py", "cal_empty_go"),
                      ("pages/collectives.py", "cb_empty_go")):
        at = open_page(page)
        assert_clean(at)
        assert at.button(key=key).disabled, (page, key)
        assert "Viewer mode" in texts(at.caption), page  # the one-line reason under the button


def test_a_forged_cancel_from_a_viewer_is_refused_and_the_teacher_link_can(running_job, empty_runs, class_mode,
                                                                           monkeypatch):
    at = open_page("pages/runs.py")
    button = at.button(key=f"cancel_{running_job}")
    assert button.disabled
    forge_click(button).run()  # streamlit drops a disabled widget's forged value ...
    assert_clean(at)
    assert RunIndex(empty_runs).get(running_job)["status"] == "running"
    forge_click(at.button(key="new_go")).run()
    assert len(RunIndex(empty_runs).list()) == 1, "a forged start queues nothing"
    forged = cancel_from_a_session(running_job, monkeypatch)  # ... and the app's cancel refuses by itself
    assert "Viewer mode" in texts(forged.error)
    assert RunIndex(empty_runs).get(running_job)["status"] == "running"

    teacher = as_teacher("pages/runs.py")
    assert "teacher" not in teacher.query_params, "the token leaves the address bar once checked"
    assert not teacher.button(key=f"cancel_{running_job}").disabled
    teacher.button(key=f"cancel_{running_job}").click().run()
    assert_clean(teacher)
    assert RunIndex(empty_runs).get(running_job)["status"] == "cancelled"
    # the cancelled run's details: news (info), not an error
    teacher.selectbox(key="detail_run").set_value(running_job).run()
    assert "Cancelled (cancelled by user)" in texts(teacher.info)
    assert not teacher.error, texts(teacher.error)


def test_a_wrong_teacher_token_leaves_a_viewer(empty_runs, class_mode):
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.query_params["teacher"] = "not-the-token"
    at.run()
    assert_clean(at, warnings=("token does not match: this browser is a viewer",))
    assert at.button(key="demo_button").disabled
    assert "does not match" in texts(at.sidebar.warning)


def test_without_a_token_everyone_may_start_jobs(empty_runs, monkeypatch):
    monkeypatch.delenv("LOWBIT_TEACHER_TOKEN", raising=False)
    at = open_page("pages/overview.py")
    assert not at.button(key="demo_button").disabled


def test_ceiling_mode_viewers_start_small_jobs_only_and_cancel_only_their_own(running_job, empty_runs, class_mode,
                                                                               monkeypatch):
    monkeypatch.setenv("LOWBIT_VIEWER_JOBS", "ceiling")
    at = open_page("pages/runs.py")
    at.selectbox(key="new_model").set_value("tiny-llama")
    at.number_input(key="new_eval_tokens").set_value(10_000_000)
    at.run()
    at.button(key="new_go").click().run()
    assert_clean(at, errors=("The job was not started",))
    shown = texts(at.error)
    assert "eval_tokens: at most 4,096 for a job started by a class viewer" in shown and "10,000,000" in shown
    assert len(RunIndex(empty_runs).list()) == 1, "refused: nothing queued"
    assert at.button(key=f"cancel_{running_job}").disabled  # someone else's job: this session owns none
    assert "started by someone else" in texts(cancel_from_a_session(running_job, monkeypatch).error)
    assert RunIndex(empty_runs).get(running_job)["status"] == "running"


def test_the_class_ceiling_bounds_a_job_to_the_demo_budget_and_names_each_field():
    assert ceiling_problems(demo_spec()) == [] and ceiling_problems(capture_spec()) == []
    assert CEILING["time_limit_s"] == demo_spec()["time_limit_s"]
    big = dict(kind="evaluate", eval_tokens=10_000_000, calib_tokens=4097, items_per_task=51, tp=8)
    assert [f for f, _ in ceiling_problems(class_spec(big))] == ["calib_tokens", "eval_tokens", "items_per_task", "tp"]
    assert class_spec(dict(kind="evaluate"))["time_limit_s"] == CEILING["time_limit_s"]  # none named: the class's
    assert [f for f, _ in ceiling_problems(dict(kind="evaluate"))] == ["time_limit_s"]  # JobSpec's 3600 s default
    assert class_spec(dict(kind="evaluate", time_limit_s=3600.0))["time_limit_s"] == 3600.0  # named: kept, refused


# -- out-of-range numbers: refused with the field named, never replaced --------------------------------
@pytest.mark.parametrize("key, value, field", [("new_eval_tokens", -100, "eval_tokens"), ("new_tp", 65, "tp"),
                                               ("new_tp", -3, "tp")])
def test_runs_form_refuses_an_out_of_range_number_with_its_field_and_value(empty_runs, key, value, field):
    at = open_page("pages/runs.py")
    at.selectbox(key="new_model").set_value("tiny-llama")
    at.number_input(key=key).set_value(value)
    at.run()
    assert at.number_input(key=key).value == value, "the typed value stays as typed"
    at.button(key="new_go").click().run()
    assert_clean(at, errors=("The job was not started",))
    assert re.search(rf"{field}: must be between \S+ and \S+, got {value}\b", texts(at.error)), texts(at.error)
    assert not RunIndex(empty_runs).list(), "nothing started"


def test_layer_error_refuses_negative_evaluation_tokens(empty_runs):
    at = open_page("pages/layer_error.py")
    at.selectbox(key="le_model").set_value("tiny-llama").run()
    at.number_input(key="le_tokens").set_value(-5).run()
    assert "eval_tokens: must be at least 1, got -5" in texts(at.error)  # under the field, before any click
    at.button(key="le_go").click().run()
    assert_clean(at, errors=("eval_tokens: must be at least 1, got -5", "The job was not started"))
    assert "The job was not started" in texts(at.error) and "got -5" in texts(at.error)
    assert texts(at.error).count("eval_tokens:") == 2, texts(at.error)  # under the field, once in the refusal
    assert not RunIndex(empty_runs).list()


def test_autotune_refuses_a_negative_kl_floor(empty_runs):
    at = open_page("pages/tradeoffs.py")
    at.selectbox(key="at_model").set_value("tiny-llama").run()
    at.number_input(key="at_kl").set_value(-1.0).run()
    at.button(key="at_go").click().run()
    assert_clean(at, errors=("params.kl_max: must be at least 0, got -1", "The job was not started"))
    assert "params.kl_max: must be at least 0, got -1" in texts(at.error)
    assert texts(at.error).count("params.kl_max:") == 2, texts(at.error)  # under the field, once in the refusal
    assert not RunIndex(empty_runs).list()


def test_a_5000_character_scheme_is_not_echoed_in_full(empty_runs):
    at = open_page("pages/runs.py")
    at.selectbox(key="new_model").set_value("tiny-llama")
    at.text_area(key="new_schemes").input("bf16\n" + "int4-" * 1000)
    at.run()
    at.button(key="new_go").click().run()
    assert_clean(at, errors=("The job was not started",))
    shown = texts(at.error)
    assert "schemes[1]" in shown and "characters ..." in shown
    assert len(shown) < 1200, len(shown)  # was two full copies, about 10,000 characters


# -- the Lesson, the demo, cancel, cells ------------------------------------------------------------
def test_the_lesson_keeps_its_step_across_pages(empty_runs):
    at = open_page("pages/lesson.py")
    at.button(key="lesson_next").click().run()
    at.button(key="lesson_next").click().run()
    title = at.header[0].value
    assert "step 3 of 8" in at.get("progress")[0].proto.text
    at.switch_page("pages/playground.py").run()
    at.switch_page("pages/outliers.py").run()
    at.switch_page("pages/lesson.py").run()
    assert_clean(at)
    assert at.header[0].value == title and "step 3 of 8" in at.get("progress")[0].proto.text
    at.button(key="lesson_prev").click().run()
    assert "step 2 of 8" in at.get("progress")[0].proto.text


def test_the_demo_button_waits_while_a_demo_runs(running_job, empty_runs):
    at = open_page("pages/overview.py")
    assert_clean(at)
    button = at.button(key="demo_button")
    assert button.disabled and running_job in texts(at.caption)
    assert at.get("progress"), "the running demo's progress, whoever started it"
    forge_click(button).run()  # refused here too
    assert len(RunIndex(empty_runs).list()) == 1


def test_tables_have_no_none_cells_and_random_weights_are_named(runs_with_results):
    at = open_page("pages/tradeoffs.py")
    at.multiselect(key="to_runs").set_value(["eval-tiny", "demo-tiny"]).run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert not table.isna().any().any() and not table.astype(str).isin(["None", "nan"]).any().any()
    assert "random weights" in texts(at.caption)
    at = open_page("pages/where_it_pays.py")
    crossing = at.dataframe[0].value
    assert not crossing.isna().any().any() and (crossing["tokens"] == "").any(), crossing
    at = open_page("pages/runs.py")
    assert not at.dataframe[0].value["problem"].isna().any()


# -- progress and the CLI ----------------------------------------------------------------------------
def test_progress_with_a_plan_never_goes_back(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.plan(["calibrate", "text", "layer-error"])
    log.loading("loading")
    shown = [progress(read_events(log.path))[0]]
    for stage, total in (("text", 4), ("layer-error", 8)):  # the calibration was cached: skipped
        for step in range(1, total + 1):
            log.emit(stage, "", step, total)
            shown.append(progress(read_events(log.path))[0])
    log.emit("tasks", "a stage outside the plan", 1, 9)  # (a sweep's per-point text): moves no bar
    shown.append(progress(read_events(log.path))[0])
    assert shown == sorted(shown), shown
    assert shown[-1] == pytest.approx(1.0) and shown[4] == pytest.approx(2 / 3)  # text done: 2 of 3 stages
    assert "(stage 3 of 3)" in progress(read_events(log.path))[1]


def test_cli_submit_of_a_spec_that_is_not_utf8_exits_2_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_RUNS", str(tmp_path / "runs"))
    spec = tmp_path / "latin1.json"
    spec.write_bytes(json.dumps(dict(kind="generate", prompt="caf_")).encode().replace(b"_", b"\xe9"))
    assert launch_main(["submit", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "spec:" in err and "not UTF-8" in err and "0xe9" in err and "Traceback" not in err



def test_collectives_with_one_message_size_draws_bars_not_lone_dots(runs_with_results):
    for run_id in BENCH_RUNS:  # the fixture's collective-bench runs (TP 2 and TP 4), each cut to one size
        result = runs_with_results / run_id / "result.json"
        data = json.loads(result.read_text())
        data["records"] = [r for r in data["records"] if r["tokens"] == 256]
        assert data["records"], run_id
        result.write_text(json.dumps(data))
    at = open_page("pages/collectives.py")
    assert_clean(at)
    assert "one message size" in texts(at.info)
    for chart in at.get("plotly_chart")[:3]:  # time, speedup, bytes
        traces = json.loads(chart.proto.spec)["data"]
        assert traces and all(t["type"] == "bar" for t in traces if t.get("x") != [None]), traces
