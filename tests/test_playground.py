"""Playground, Two-shot, Where it pays and Lesson (issue 18): the math in lowbit.playground checked
against independent computations with the payload codec, and the pages through AppTest on an empty
history and on fixture runs shaped like real outputs (a tiny-llama calibrate run at TP 4 made by
lowbit's own job function on threaded ranks, and a collective-bench run in its record format)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lowbit.wire import accounting
import torch
from streamlit.testing.v1 import AppTest

from launch.index import RunIndex
from launch.store.bits import bits_parts
from launch.store.calibration import load_calibration
from lowbit import playground as pg
from lowbit.analysis import spikiest_sample
from lowbit.method.calibrate import SAMPLE_TOKENS, Calibration, CalibrationError, select_outliers
from lowbit.comm.communicator import Site
from lowbit.wire.payload import decode, encode
from lowbit.method.projection import INTERCONNECTS, allreduce_s
from lowbit.rotation import rotate, unrotate
from lowbit.scheme import SchemeError, parse_scheme
from pages._controls import scheme_text
from tests.conftest import REPO
from tests.helpers import assert_page_clean

TP, LAYERS, HIDDEN = 3, 2, 192
SITE = Site(1, "down_proj")


def seeded_calibration(tp: int = TP, hidden: int = HIDDEN, seed: int = 18) -> Calibration:
    """The fields and shapes a calibrate run writes ([L, 2, tp, H] EMAs, [B, L, 2, tp, H] batches,
    [L, 2, tp, 16, H] sample); the EMA ranges are 0.6 x the sample's, so static scales clamp."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(LAYERS, 2, tp, SAMPLE_TOKENS, hidden, generator=gen)
    sample[..., [7, 50, 131]] *= 25.0  # consistent outlier features
    sample[1, 1, 0, 3, 100] = 900.0  # one massive activation
    ema_min, ema_max = 0.6 * sample.amin(3), 0.6 * sample.amax(3)
    return Calibration(ema_min, ema_max, ema_min[None].clone(), ema_max[None].clone(),
                       dict(model="test", tp=tp, gamma=0.01, layers=LAYERS, hidden=hidden), sample)


def db(x: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(float(x.double().pow(2).sum()) / float((approx.double() - x.double()).pow(2).sum()))


def independent_gather(cal: Calibration, scheme_text: str, site: Site = SITE) -> list[torch.Tensor]:
    """Each rank's partial through encode/decode with its own static range (the paper's math)."""
    s = parse_scheme(scheme_text)
    idx = select_outliers(cal, site, s.outliers, cal.hidden)
    out = []
    for r in range(cal.tp):
        x = cal.site_sample(site, r)
        smin, smax = cal.rank_range(site, r) if s.quant.granularity == "static" else (None, None)
        payload, _ = encode(x, s.quant, idx, smin, smax)
        out.append(decode(payload, x.shape[0], x.shape[1], s.quant, idx, smin, smax))
    return out


# -- lowbit.playground -----------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int4-static-top1/64", "int8-token", "int3a-group32-rand1/64", "nf4-static"])
def test_analyze_matches_the_codec_rank_by_rank_and_summed(scheme):
    cal = seeded_calibration()
    out = pg.analyze(cal, SITE.layer, SITE.module, 0, scheme)
    recon = independent_gather(cal, scheme)
    x0 = cal.site_sample(SITE, 0)
    assert out["rank"]["sqnr_db"] == pytest.approx(db(x0, recon[0]), abs=1e-9)
    exact = sum(cal.site_sample(SITE, r).double() for r in range(TP)).float()
    assert out["sum"]["sqnr_db"] == pytest.approx(db(exact, sum(recon)), abs=1e-4)
    assert out["bits"]["total"] == pytest.approx(bits_parts(scheme, HIDDEN, TP, SAMPLE_TOKENS)["bits"].sum())
    np.testing.assert_allclose(out["rank"]["feature_rms"], (recon[0] - x0).double().pow(2).mean(0).sqrt().numpy(),
                               rtol=1e-6)


def test_static_clamps_are_counted_and_marked_like_the_quantizer():
    cal = seeded_calibration()
    out = pg.analyze(cal, SITE.layer, SITE.module, 0, "int4-static")
    s = parse_scheme("int4-static")
    lo, hi = cal.rank_range(SITE, 0)
    _, stats = encode(cal.site_sample(SITE, 0), s.quant, None, lo, hi)
    assert out["rank"]["clamped"] == stats["clamped"] > 0  # EMA ranges are 0.6 x the data's
    assert out["rank"]["clamped_marked"] == stats["clamped"]
    hist = out["rank"]["histogram"]
    assert hist["clamped"].sum() == stats["clamped"]
    assert hist["inside"].sum() + hist["clamped"].sum() == SAMPLE_TOKENS * HIDDEN
    assert out["rank"]["grid"]["levels"] == [float(q) for q in range(-8, 8)]
    assert out["rank"]["grid"]["edges"] == pytest.approx((-7.5, 7.5))
    # top-k keeps 192 // 64 = 3 features, the largest calibrated ranges summed over ranks (the massive
    # activation's feature 100 among them); outlier columns are left out of the histogram
    top = pg.analyze(cal, SITE.layer, SITE.module, 0, "int4-static-top1/64")
    assert top["rank"]["histogram"]["inside"].sum() + top["rank"]["histogram"]["clamped"].sum() == \
        SAMPLE_TOKENS * (HIDDEN - 3)
    expected = set(cal.ranges()[SITE.layer, 1].sum(0).topk(3).indices.tolist())
    assert set(top["rank"]["outliers"]) == expected and 100 in expected


def test_rotation_rank_view_is_the_rotated_codec_and_the_sum_is_the_communicators():
    cal = seeded_calibration()
    out = pg.analyze(cal, SITE.layer, SITE.module, 0, "int4-token-rot64")
    q = parse_scheme("int4-token").quant
    x0 = cal.site_sample(SITE, 0)
    y = rotate(x0, 64)
    recon = unrotate(decode(encode(y, q)[0], SAMPLE_TOKENS, HIDDEN, q), 64)
    assert out["rank"]["sqnr_db"] == pytest.approx(db(x0, recon), abs=1e-6)
    plain = pg.analyze(cal, SITE.layer, SITE.module, 0, "int4-token")
    assert out["rank"]["sqnr_db"] > plain["rank"]["sqnr_db"] + 3  # the spike at rank 0 is spread
    assert out["bits"]["total"] == plain["bits"]["total"]  # rotation sends nothing


def test_two_shot_steps_bytes_and_errors():
    cal = seeded_calibration()
    steps = pg.two_shot_steps(cal, SITE.layer, SITE.module, "int4-static-top1/64@twoshot+int8-token")
    assert steps["width"] == HIDDEN // TP and steps["tp"] == TP
    links = steps["links"]
    assert len(links) == 2 * TP * (TP - 1) and all(r["sender"] != r["receiver"] for r in links)
    # phase 1: a chunk of 64 features, 16 tokens, int4 codes + 16-bit outliers of that chunk
    for j, n_out in enumerate(steps["chunk_outliers"]):
        assert steps["leg1_bytes"][j] == (64 - n_out) * SAMPLE_TOKENS * 4 // 8 + n_out * SAMPLE_TOKENS * 2
    phases = {p["step"]: p for p in steps["phases"]}
    first, final = steps["phases"][0], steps["phases"][1]
    gather = steps["phases"][3]
    # static per-feature scales quantize a chunk exactly as the whole partial: phase 1 == gather
    assert first["sqnr_db"] == pytest.approx(gather["sqnr_db"], abs=1e-6)
    exact = sum(cal.site_sample(SITE, r).double() for r in range(TP)).float()
    assert gather["sqnr_db"] == pytest.approx(db(exact, sum(independent_gather(cal, "int4-static-top1/64"))), abs=1e-4)
    assert final["sqnr_db"] <= first["sqnr_db"] + 1e-9  # requantizing adds error
    assert phases["ring all-reduce (BF16)"]["sqnr_db"] > first["sqnr_db"]
    sent = steps["sent"]
    # the requantized chunk: int8 codes, its BF16 outlier columns, a BF16 scale per token; padded to the largest
    leg2 = max((64 - n) * SAMPLE_TOKENS + n * SAMPLE_TOKENS * 2 + SAMPLE_TOKENS * 2 for n in steps["chunk_outliers"])
    assert steps["leg2_bytes"] == leg2
    own_chunk_kept = min(steps["leg1_bytes"])  # the busiest sender keeps its smallest chunk at home
    assert sent["two-shot"] == sum(steps["leg1_bytes"]) - own_chunk_kept + (TP - 1) * leg2
    gather_payload = (HIDDEN - 3) * SAMPLE_TOKENS * 4 // 8 + 3 * SAMPLE_TOKENS * 2
    assert sent["gather (int4-static-top1/64)"] == (TP - 1) * gather_payload
    assert sent["bf16 ring all-reduce"] == pytest.approx(2 * (TP - 1) / TP * SAMPLE_TOKENS * HIDDEN * 2)
    # with an int4 second leg two-shot sends less than the gather at TP 3 (int8's leg ties it here)
    four = pg.two_shot_steps(cal, SITE.layer, SITE.module, "int4-static-top1/64@twoshot+int4-token")["sent"]
    assert four["two-shot"] < four["gather (int4-static-top1/64)"]
    with pytest.raises(pg.PlaygroundError, match="^scheme: .*not two-shot"):
        pg.two_shot_steps(cal, SITE.layer, SITE.module, "int4-static")


def test_gather_stops_saving_bytes_at_large_tp_while_two_shot_does():
    rows = pg.bytes_per_rank_by_tp("int4-static-top1/64@twoshot+int4-token", 576, 1024)
    by = {(r["tp"], r["method"].split(" ")[0]): r["ratio_vs_bf16"] for r in rows}
    assert sorted({r["tp"] for r in rows}) == [2, 3, 4, 6, 8, 9, 12, 16]  # those dividing 576
    # gather: (N-1) x 4.1875 bits against 2 (N-1)/N x 16
    assert by[(8, "gather")] == pytest.approx(7 * 4.1875 / (2 * 7 / 8 * 16))
    assert by[(8, "gather")] > 1 and by[(4, "gather")] < 1
    assert all(by[(n, "two-shot")] < 0.3 for n in (2, 3, 4, 6, 8, 9, 12, 16))


def test_comm_times_follow_the_alpha_beta_formulas_and_crossovers():
    link = INTERCONNECTS["pcie4"]
    rows = pg.comm_times("pcie4", 8, 5120, ["int4-static-top1/64@twoshot+int8-token"], [1, 64, 4096], 2680.0)
    bf16 = [r for r in rows if r["scheme"] == "bf16"]
    assert bf16[1]["seconds"] == pytest.approx(allreduce_s(8, 64 * 5120 * 2, link.alpha_us * 1e-6, link.beta))
    cross = pg.crossover(rows, "int4-static-top1/64@twoshot+int8-token")
    assert cross is not None and cross["tokens"] in (64, 4096) and cross["seconds"] < cross["bf16_seconds"]
    gather = pg.comm_times("pcie4", 8, 5120, ["int4-static-top1/64"], [2 ** k for k in range(17)], 2680.0)
    assert pg.crossover(gather, "int4-static-top1/64") is None  # gather at TP 8 never wins
    for bad, field in ((dict(link_key="warp"), "link"), (dict(codec_gbps=0), "codec_gbps"), (dict(tp=1), "tp")):
        kwargs = dict(link_key="pcie4", tp=8, hidden=5120, schemes=["int8-token"], tokens_list=[1], codec_gbps=1.0)
        kwargs.update(bad)
        with pytest.raises(pg.PlaygroundError, match=f"^{field}:"):
            pg.comm_times(**kwargs)


def test_fitted_link_recovers_alpha_and_beta_from_records():
    alpha, beta = 300e-6, 0.5e9
    records = [dict(tp=4, link="loopback", method="exact", scheme="bf16", tokens=t, hidden=576,
                    bytes_per_rank=t * 576 * 2, median_ms=1e3 * allreduce_s(4, t * 576 * 2, alpha, beta))
               for t in (16, 256, 4096)]
    fit = pg.fitted_link(records, "loopback", 4)
    assert fit.alpha_us == pytest.approx(300, rel=1e-6) and fit.beta == pytest.approx(beta, rel=1e-6)
    assert pg.fitted_link(records, "loopback", 2) is None


def test_bad_inputs_name_their_field():
    cal = seeded_calibration()
    for kwargs, field in ((dict(layer=LAYERS), "layer"), (dict(module="q_proj"), "module"), (dict(rank=TP), "rank"),
                          (dict(scheme_text="int4-static-sp3"), "scheme"), (dict(scheme_text="int9-token"), "scheme"),
                          (dict(scheme_text="int4-group7"), "scheme")):
        args = dict(layer=1, module="down_proj", rank=0, scheme_text="int4-token")
        args.update(kwargs)
        with pytest.raises(pg.PlaygroundError, match=f"^{field}:"):
            pg.analyze(cal, **args)
    old = Calibration(cal.ema_min, cal.ema_max, cal.batch_min, cal.batch_max, cal.meta, None)
    with pytest.raises(CalibrationError, match="sample"):
        pg.analyze(old, 0, "o_proj", 0, "int4-token")
    with pytest.raises(SchemeError, match="^outliers:"):
        scheme_text(outliers="some")
    with pytest.raises(SchemeError, match="^k:"):
        scheme_text(k="a lot")
    with pytest.raises(pg.PlaygroundError, match="^prompt_tokens:"):
        pg.message_tokens(0)


def test_scheme_from_controls_and_counterpart():
    """pages._controls.scheme_text is the one controls-to-scheme builder (Layer error, Playground, Trade-offs)."""
    assert scheme_text() == "int4-static-top1/64"
    assert scheme_text(granularity="token", outliers="none", rotation=64, stochastic=True) == \
        "int4-token-rot64-sr"
    assert scheme_text("nf4", granularity="group", group=64, outliers="random", k="1/32") == \
        "nf4-group64-rand1/32"
    assert pg.counterpart("int4-token-rot64-sr") == "int4-static"
    assert pg.counterpart("int4-static-top1/64") == "int4-token-top1/64"


# -- pages -----------------------------------------------------------------------------------------
NEW_PAGES = ["pages/lesson.py", "pages/playground.py", "pages/two_shot.py", "pages/where_it_pays.py"]
TIMEOUT = 180
FIXTURE: dict[str, Path] = {}


def _fixture_root(base: Path) -> Path:
    """A runs root like real jobs leave it: a tiny-llama calibrate run at TP 4 (the kind's body on
    threaded ranks, 4 batches of 64 tokens: the real artifact with its 16-token sample) and the
    real collective-bench runs at TP 2 and 4 over loopback (tests/fixtures/jobs)."""
    if "root" in FIXTURE:
        return FIXTURE["root"]
    from tests.scripts.make_fixtures import FIXTURES, fixture_result, fixture_spec
    from tests.test_app_results import BENCH_RUNS, _record, _run_kind
    root = base / "playground-runs"
    root.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per rank thread: the ranks already fill the cores
    try:  # the calibrate kind's own body, as the worker runs it, on 4 threaded ranks
        _run_kind(root, "cal-tp4", dict(FIXTURES["calibrate"], tp=4, calib_tokens=256))
    finally:
        torch.set_num_threads(threads)
    for run_id, name in BENCH_RUNS.items():  # real torchrun runs at TP 2 and 4 over loopback
        _record(root, run_id, fixture_spec(name), "done", fixture_result(name))
    FIXTURE["root"] = root
    return root


@pytest.fixture
def playground_runs(tmp_path_factory, tmp_path, monkeypatch):
    root = shutil.copytree(_fixture_root(tmp_path_factory.getbasetemp()), tmp_path / "runs",
                           ignore=shutil.ignore_patterns("queue.lock", "*.tmp"))
    monkeypatch.setenv("LOWBIT_RUNS", str(root))
    return root


@pytest.fixture
def empty_runs(tmp_path, monkeypatch):
    root = tmp_path / "empty-runs"
    monkeypatch.setenv("LOWBIT_RUNS", str(root))
    return root


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT).run()
    at.switch_page(page).run()
    assert_page_clean(at)
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.get("metric") if m.label == label]
    assert found, (label, [m.label for m in at.get("metric")])
    return found[0]


def what_you_see(at: AppTest) -> int:
    return sum("What you see:" in c.value for c in at.caption)


@pytest.mark.parametrize("page", NEW_PAGES)
def test_new_pages_on_an_empty_history(empty_runs, page):
    at = open_page(page)
    assert at.title
    if page in ("pages/playground.py", "pages/two_shot.py"):
        assert at.button(key=f"{'pg' if 'play' in page else 'ts'}_capture"), "one-click capture job"
        assert "No stored partial sums" in texts(at.info)
        assert not at.get("plotly_chart")
    elif page == "pages/where_it_pays.py":  # the model needs no runs
        assert len(at.get("plotly_chart")) == 5 and what_you_see(at) == 5
    else:
        assert at.header and "Question:" in texts(at.markdown)


def test_capture_button_queues_a_small_calibrate_job(empty_runs):
    from launch.queue import cancel
    at = open_page("pages/playground.py")
    at.button(key="pg_capture").click().run()
    assert_page_clean(at)
    run_id = at.session_state["capture_run"]
    row = RunIndex(empty_runs).get(run_id)
    assert row["kind"] == "calibrate" and row["model"] == "smollm2-135m" and row["tp"] == 3
    cancel(run_id, empty_runs)
    spec = (empty_runs / run_id / "spec.json").read_text()
    assert '"calib_tokens": 128' in spec


def test_playground_shows_the_sqnr_and_bits_of_the_stored_sample(playground_runs):
    at = open_page("pages/playground.py")
    cal = load_calibration(playground_runs / "cal-tp4" / "calibration")
    layer, module, rank = spikiest_sample(cal)
    assert (at.number_input(key="pg_layer").value, at.radio(key="pg_module").value,
            at.selectbox(key="pg_rank").value) == (layer, module, rank)
    site = Site(layer, module)
    for scheme, setup in (("int4-static-top1/64", []), ("int8-token", [("selectbox", "pg_gran", "token"),
                                                                         ("radio", "pg_outliers", "none"),
                                                                         ("selectbox", "pg_bits_int", 8)])):
        for kind, key, value in setup:
            getattr(at, kind)(key=key).set_value(value)
            at.run()
        assert_page_clean(at)
        recon = independent_gather(cal, scheme, site)
        x = cal.site_sample(site, rank)
        exact = sum(cal.site_sample(site, r).double() for r in range(cal.tp)).float()
        # units in the labels (issue 29: "44.63 dB" was cut at 1280 px)
        assert metric(at, f"rank {rank} SQNR (dB)") == f"{db(x, recon[rank]):.2f}", scheme
        assert metric(at, "sum SQNR (dB)") == f"{db(exact, sum(recon)):.2f}", scheme
        bits = 4 + 16 / 64 * 1 - 4 / 64 if scheme == "int4-static-top1/64" else 8 + 16 / 64
        assert metric(at, "bits / value") == f"{bits:.4f}", scheme  # hidden 64: one BF16 feature / one scale
    assert len(at.get("plotly_chart")) == 6 and what_you_see(at) == 6


def test_playground_controls_build_the_scheme_shown(playground_runs):
    at = open_page("pages/playground.py")
    at.selectbox(key="pg_gran").set_value("token").run()
    at.toggle(key="pg_rot").set_value(True).run()
    at.checkbox(key="pg_sr").check().run()
    assert_page_clean(at)
    assert any("int4-token-top1/64-rot64-sr" in s.value for s in at.subheader), texts(at.subheader)
    at.toggle(key="pg_compare").set_value(False).run()
    assert len(at.get("plotly_chart")) == 4
    at.number_input(key="pg_layer").set_value(0).run()
    at.radio(key="pg_code").set_value("nf").run()
    assert_page_clean(at)
    assert any("nf4-token-top1/64-rot64" in s.value for s in at.subheader)


def test_playground_offers_the_floating_point_codes_with_their_bits(playground_runs):
    """The formats shipping systems send are controls too: FP4 E2M1 per group of 32 (MXFP4's code,
    here with the default bf16 scale) and FP8 E4M3, each with the bits its payload costs."""
    at = open_page("pages/playground.py")
    at.radio(key="pg_code").set_value("fp").run()
    at.selectbox(key="pg_gran").set_value("group").run()
    at.radio(key="pg_outliers").set_value("none").run()
    assert_page_clean(at)
    assert any("fp4e2m1-group32" in s.value for s in at.subheader), texts(at.subheader)
    hidden, tp = 64, 4  # the fixture's tiny-llama at TP 4
    assert metric(at, "bits / value") == f"{accounting.scheme_bits_per_value('fp4e2m1-group32', hidden, tp, 16):.4f}"
    assert metric(at, "bits / value") == f"{4 + 16 / 32:.4f}"  # 4-bit codes + a bf16 scale per 32 values
    at.selectbox(key="pg_bits_fp").set_value("fp8e4m3").run()
    assert_page_clean(at)
    assert any("fp8e4m3-group32" in s.value for s in at.subheader)
    assert metric(at, "bits / value") == f"{8 + 16 / 32:.4f}"
    assert at.checkbox(key="pg_sr").disabled  # fp codes round to nearest only


def test_two_shot_stepper_on_the_stored_sample(playground_runs):
    at = open_page("pages/two_shot.py")
    cal = load_calibration(playground_runs / "cal-tp4" / "calibration")
    layer, module, _ = spikiest_sample(cal)
    steps = pg.two_shot_steps(cal, layer, module, "int4-static-top1/64@twoshot+int8-token")
    at.radio(key="ts_step").set_value("2. Phase 1: send chunks to owners").run()
    assert metric(at, "After phase 1: SQNR of the owners' fp32 sums") == f"{steps['phases'][0]['sqnr_db']:.2f} dB"
    at.radio(key="ts_step").set_value("3. Owners sum and requantize").run()
    assert metric(at, "After requantizing with int8-token") == f"{steps['phases'][1]['sqnr_db']:.2f} dB"
    at.radio(key="ts_step").set_value("4. Phase 2: all-gather").run()
    at.radio(key="ts_step").set_value("5. Compare").run()
    assert_page_clean(at)
    assert len(at.get("plotly_chart")) == 3 and what_you_see(at) == 3
    assert "TP 4" in texts(at.caption) and "4 chunks of 16 features" in texts(at.caption)


def test_where_it_pays_draws_fitted_links_and_measured_records(playground_runs):
    at = open_page("pages/where_it_pays.py")
    at.selectbox(key="wp_tp").set_value(4).run()
    assert_page_clean(at)
    assert at.multiselect(key="wp_fits").value == ["loopback fitted (TP 4)"]
    assert len(at.get("plotly_chart")) == 6  # 5 named links + the fitted loopback
    table = at.dataframe[0].value
    assert {"link", "scheme", "tokens"} <= set(table.columns)
    at.selectbox(key="wp_tp").set_value(3).run()  # Llama-2-13B: 5120 features do not split 3 ways
    assert_page_clean(at, errors=("divisible",))
    assert "scheme: 'int4-static-top1/64@twoshot+int8-token'" in texts(at.error) and "divisible" in texts(at.error)
    at.selectbox(key="wp_model").set_value("gemma2-27b").run()  # 4608 = 3 x 1536: it does
    assert_page_clean(at)


def test_lesson_steps_and_presentation_mode(empty_runs):
    at = open_page("pages/lesson.py")
    first = at.header[0].value
    at.button(key="lesson_next").click().run()
    assert at.header[0].value != first
    at.toggle(key="present_lesson").set_value(True).run()
    assert at.session_state["presentation"] is True
    # the CSS comes from app.py; AppTest keeps the main script's elements only on the default page
    home = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    home.session_state["presentation"] = True
    home.run()
    assert any('section[data-testid="stSidebar"]' in m.value for m in home.markdown)
