"""The Pre-flight page (pages/preflight.py) on a real audit run: verdicts, fixes, sites, the two
downloads, and a bad input refused by its field before anything is queued.

    .venv/bin/python -m pytest tests/test_app_preflight.py -q -p no:randomly

The audit run is the ``audit`` kind's own body on threaded ranks (``_run_kind``, as the fixture
runs of tests/test_app_results.py) with the spec of the real torchrun fixture run
(tests/fixtures/jobs/audit), whose result's keys and types it must have: the stress model and two
plain scheme strings, int4 with fp16 scales, which cannot hold the stress model's overflow site
(7 x 65504 is its largest value), and int8 with fp32 scales, which can.
"""
from __future__ import annotations

import json

import pytest

from launch.index import RunIndex
from launch.store.audit import fix_frame, site_frame, verdict_frame
from launch.store.machine import model_shape
from lowbit.method.audit import runnable_presets
from lowbit.method.audit_report import markdown
from tests.test_app import assert_clean, open_page, texts
from tests.helpers import json_shape
from tests.scripts.make_fixtures import fixture_result, fixture_spec
from tests.test_app_results import _run_kind

RUN = "audit-stress"
SPEC = {k: v for k, v in fixture_spec("audit").items() if k != "run_id"}
FORMATS = SPEC["schemes"]


@pytest.fixture(scope="module")
def audit_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-runs")
    report = _run_kind(root, RUN, SPEC)
    return root, report


@pytest.fixture
def audit_runs_env(audit_root, monkeypatch):
    root, report = audit_root
    monkeypatch.setenv("LOWBIT_RUNS", str(root))
    return root, report


def test_the_store_lays_out_the_report(audit_root):
    root, report = audit_root
    verdicts = verdict_frame(report)
    assert list(verdicts["format"]) == ["bf16", *FORMATS]
    int4 = verdicts.set_index("format").loc[FORMATS[0]]
    assert int4["verdict"] != "safe" and "L0.down_proj" in int4["flagged_sites"]  # the stress model's overflow site
    sites = site_frame(report)
    assert len(sites) == 3 * 4  # bf16 and two formats, four sites each; fix candidates' sites left out
    flagged = sites[sites["flagged"] != ""]
    assert set(flagged["site"]) == {"L0.down_proj"} and set(flagged["format"]) == {FORMATS[0]}
    assert (flagged["beyond_range_in"] > 0).all()
    assert sites.loc[sites["format"] == "bf16", "groups"].eq(0).all()
    assert sites["leg2_groups"].isna().all()  # one-leg formats: the second leg is empty, never 0
    fixes = fix_frame(report)
    assert not fixes.empty and set(fixes["format"]) == {FORMATS[0]}
    assert (root / RUN / "audit.md").read_text() == markdown(report)
    real = fixture_result("audit")  # the torchrun run: same keys and value types, same verdicts
    ours = json.loads((root / RUN / "result.json").read_text())
    assert json_shape(ours) == json_shape(real), sorted(json_shape(ours) ^ json_shape(real))
    assert [f["verdict"] for f in report["formats"]] == [f["verdict"] for f in real["formats"]]


def frame_with(at, column: str):
    """The page's one table with ``column`` (verdicts: fix; sites: site; fixes: kind)."""
    (frame,) = [d.value for d in at.dataframe if column in d.value.columns]
    return frame


def test_preflight_page_shows_the_audit_and_downloads_json_and_markdown(audit_runs_env):
    root, report = audit_runs_env
    at = open_page("pages/preflight.py")
    assert_clean(at)
    assert "stress-tiny at TP 2" in texts(at.header)
    shown = frame_with(at, "fix")
    assert list(shown["format"]) == ["bf16", *FORMATS]
    assert list(shown["verdict"]) == [f["verdict"] for f in report["formats"]]
    assert set(frame_with(at, "site")["site"]) == {"L0.down_proj"}  # only flagged, by default
    assert len(at.get("plotly_chart")) == 1
    downloads = {b.proto.label: b for b in at.get("download_button")}
    assert set(downloads) == {"Download the report (JSON)", "Download the report (Markdown)"}
    at.toggle(key="pf_only_flagged").set_value(False).run()
    assert_clean(at)
    assert len(frame_with(at, "site")) == 3 * 4


def test_preflight_page_bad_model_folder_names_the_field_and_queues_nothing(audit_runs_env, tmp_path):
    root, _ = audit_runs_env
    before = RunIndex(root).ids()
    at = open_page("pages/preflight.py")
    at.text_input(key="pf_folder").input(str(tmp_path / "no-such-model")).run()
    at.button(key="pf_go").click().run()
    assert_clean(at, errors=("The job was not started",))
    shown = texts(at.error)
    assert "`model: " in shown and "is not an existing directory" in shown
    at.text_input(key="pf_folder").input("").run()
    at.text_input(key="pf_extra").input("quickreduce-int5").run()
    at.button(key="pf_go").click().run()
    offered, left_out = runnable_presets(model_shape("smollm2-135m")["hidden"], 3)  # the form's default model and TP
    assert f"`schemes[{len(offered)}]: " in texts(at.error) and "quickreduce-int4" in texts(at.error)
    captions = " ".join(c.value for c in at.caption)
    assert "quickreduce-int4" in left_out and "Not offered at this model and TP size" in captions
    assert "`quickreduce-int4` (tp: 3 not allowed" in captions
    assert RunIndex(root).ids() == before, "a refused spec queues nothing"
