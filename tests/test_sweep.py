"""The auto-tune sweep: candidates from a grid and from allocation, Pareto frontier, floor,
resumable points, and the "sweep" job kind's parameter checks."""
from __future__ import annotations

import json

import pytest

from lowbit.method.calibrate import run_calibration
from lowbit.model.data import token_chunks
from lowbit.comm.dist import ThreadWorld
from lowbit.model.engine import build_tp_model
from lowbit.scheme import parse_scheme_map
from launch.kinds.sweep import check_params
from lowbit.method.sweep import PAPER, grid_schemes, pareto_frontier, point_key, run_sweep, summarize

MODEL, TP = "tiny-llama", 2


def test_grid_keeps_valid_schemes_inside_the_budget_range():
    grid = dict(bits=[2, 3, 4, 8], granularity=["static", "token", "group32"], rotation=[None, 64])
    got = grid_schemes(grid, 576, 3, 2.5, 4.2)
    assert "int3-token-rot64" in got and "int4-static" in got and "int4-group32-rot64" not in got  # 4.5 bits
    assert "int2-token" not in got  # 2.03 bits: below the range
    assert not any(s.startswith("int4-static-rot") for s in got)  # rotation needs dynamic scales
    assert got == list(dict.fromkeys(got))


def test_grid_crosses_the_code_and_drops_what_the_codebook_cannot_do():
    grid = dict(code=["int", "nf"], bits=[2, 3, 4], granularity=["token", "group64"], rotation=[None, 64],
                rounding=["nearest", "stochastic"])
    got = grid_schemes(grid, 576, 3, 2.0, 4.3)
    assert {"nf4-token-rot64", "nf3-group64-rot64", "int3-group64-rot64", "int4-token-sr"} <= set(got)
    assert not any(s.startswith("nf2") for s in got)  # the codebook has 3 and 4 bits
    assert not any(s.startswith("nf") and s.endswith("-sr") for s in got)  # it rounds to the nearest entry
    assert grid_schemes(dict(bits=[4], granularity=["token"]), 576, 3, 2.0, 4.3) == ["int4-token"]  # int by default


def test_grid_takes_whole_codes_and_the_fitted_codebook():
    grid = dict(code=["lm", "lm4s", "fp4e2m1", "nf"], bits=[2, 3, 4], granularity=["token", "group64"],
                rotation=[None, 64])
    got = grid_schemes(grid, 576, 3, 2.0, 4.3)
    assert {"lm2-token-rot64", "lm3-group64-rot64", "lm4-token", "lm4s-group64-rot64", "fp4e2m1-token-rot64",
            "fp4e2m1-group64", "nf3-token"} <= set(got)
    assert len([s for s in got if s.startswith("fp4e2m1")]) == 4  # a whole code ignores the bits axis
    assert len([s for s in got if s.startswith("lm4s")]) == 4 and not any(s.startswith("nf2") for s in got)


def test_pareto_frontier_drops_dominated_points():
    pts = [dict(scheme=s, bits_per_value=b, kl=k) for s, b, k in
           [("a", 4.0, 0.10), ("b", 3.0, 0.30), ("c", 3.5, 0.40), ("d", 2.5, 0.90), ("e", 4.0, 0.20)]]
    assert [p["scheme"] for p in pareto_frontier(pts)] == ["d", "b", "a"]
    summary = summarize(pts, dict(budget_min=2.0, budget_max=4.5, kl_max=0.35, kept_min=None,
                                  report_at=[4.2, 3.2, 2.0]))
    assert summary["best"] == "b"  # the cheapest frontier point with KL <= 0.35
    assert summary["best_at"] == {"4.2": "a", "3.2": "b", "2.0": None}


@pytest.fixture(scope="module")
def setup(tiny_models):
    tok = tiny_models[MODEL].tokenizer
    calib = list(token_chunks(tok, "wikipedia", "calib", 2, 32).split(2))
    held = token_chunks(tok, "wikipedia", "eval", 2, 32)
    return calib, held


def _sweep(tiny_models, setup, points_dir, params):
    calib, held = setup

    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        cal = run_calibration(tp.model, group, calib, meta=dict(model=MODEL))
        return run_sweep(tp, group, params, cal, held, None, points_dir)
    return ThreadWorld(TP).run(body)[0]


def test_sweep_returns_a_frontier_and_resumes_without_recomputing(tiny_models, setup, tmp_path):
    params = dict(schemes=["int8-token"], grid=dict(bits=[2, 4], granularity=["token"], rotation=[None, 16]),
                  budget_min=2.0, budget_max=8.5, allocate=[3.0], kl_max=1.0,
                  allocate_candidates=["int2-token-rot16", "int4-token-rot16"], batch_size=2)
    first = _sweep(tiny_models, setup, tmp_path / "points", params)
    names = [p["scheme"] for p in first["points"]]
    assert PAPER in names and "int8-token" in names and "int2-token-rot16" in names
    allocated = [p for p in first["points"] if p["allocated_for"] == 3.0]
    assert len(allocated) == 1 and allocated[0]["nominal_bits"] <= 3.0
    # measured from bytes, not only nominal; 1e-9 is the float rounding of bytes * 8 / values
    assert allocated[0]["bits_per_value"] <= 3.0 + 1e-9
    assert first["evaluated"] == len(names) and first["reused"] == 0
    for p in first["points"]:
        assert (tmp_path / "points" / f"{point_key(p['scheme'])}.json").exists()
        assert p["kl"] > 0 and p["ppl"] > 1  # every candidate quantizes: none is exact
    kl = {p["scheme"]: p["kl"] for p in first["points"]}
    assert kl["int2-token"] > kl["int4-token"] > kl["int8-token"]  # fewer bits, more loss
    assert set(first["frontier"]) <= set(names) and first["best"] in first["frontier"]
    # the frontier is sorted by bits with strictly falling KL
    front = [next(p for p in first["points"] if p["scheme"] == s) for s in first["frontier"]]
    assert all(a["bits_per_value"] <= b["bits_per_value"] and a["kl"] > b["kl"] for a, b in zip(front, front[1:]))
    assert (tmp_path / "points" / "sensitivity.json").exists()

    # a rerun over the same folder reuses every point (and the sensitivity table)
    (tmp_path / "points" / f"{point_key('int8-token')}.json").write_text(
        json.dumps(dict(next(p for p in first["points"] if p["scheme"] == "int8-token"), marker=1)))
    again = _sweep(tiny_models, setup, tmp_path / "points", params)
    assert again["evaluated"] == 0 and again["reused"] == len(names)
    assert next(p for p in again["points"] if p["scheme"] == "int8-token")["marker"] == 1

    # one more allocation candidate: only its sensitivity rows are measured, the others kept
    before = json.loads((tmp_path / "points" / "sensitivity.json").read_text())["rows"]
    more = dict(params, allocate_candidates=params["allocate_candidates"] + ["int8-token"])
    _sweep(tiny_models, setup, tmp_path / "points", more)
    after = json.loads((tmp_path / "points" / "sensitivity.json").read_text())["rows"]
    assert after[:len(before)] == before
    assert {r["scheme"] for r in after[len(before):]} == {"int8-token"}


def test_sweep_allocates_over_fp_nf_and_fitted_codes(tiny_models, setup, tmp_path):
    cands = ["lm2-token-rot16", "nf3-group16-rot16", "fp4e2m1-group16-rot16", "lm4s-token", "int8-token"]
    params = dict(grid=dict(code=["lm", "fp4e2m1"], bits=[3], granularity=["token"], rotation=[16]),
                  budget_min=2.0, budget_max=8.5, allocate=[3.0, 4.5], include_paper=False,
                  allocate_candidates=cands, batch_size=2)
    out = _sweep(tiny_models, setup, tmp_path / "points", params)
    rows = json.loads((tmp_path / "points" / "sensitivity.json").read_text())["rows"]
    layers = tiny_models[MODEL].model.config.num_hidden_layers
    assert {r["scheme"] for r in rows} == set(cands) and len(rows) == layers * 2 * len(cands)
    assert all(r["kl"] > 0 for r in rows)  # one site quantized: never exact
    by_site = {(r["layer"], r["module"], r["scheme"]): r["kl"] for r in rows}
    for layer in range(layers):
        for module in ("o_proj", "down_proj"):  # at every site 2 bits lose more than 8
            assert by_site[(layer, module, "lm2-token-rot16")] > by_site[(layer, module, "int8-token")], (layer, module)
    by_name = {p["scheme"]: p for p in out["points"]}
    assert {"lm3-token-rot16", "fp4e2m1-token-rot16"} <= set(by_name)  # the grid's code axis
    for budget in (3.0, 4.5):
        allocated = [p for p in out["points"] if p["allocated_for"] == budget]
        # 1e-9: the float rounding of bytes * 8 / values, nothing more
        assert len(allocated) == 1 and allocated[0]["bits_per_value"] <= budget + 1e-9
        assert allocated[0]["kl"] > 0
        # every site's scheme is one of the candidates
        smap = parse_scheme_map(allocated[0]["scheme"])
        assert {str(s) for s in smap.schemes()} <= set(cands)


@pytest.mark.parametrize("params, field", [
    (dict(budget_min=5, budget_max=3), "params.budget_min"),
    (dict(budget_max="4"), "params.budget_max"),
    (dict(kl_max=-1), "params.kl_max"),
    (dict(allocate=[3.0, 0]), "params.allocate"),
    (dict(allocate_method="ilp"), "params.allocate_method"),
    (dict(allocate_candidates=["int9-token"]), "params.allocate_candidates[0]"),
    (dict(allocate_candidates=["bf16;L0=int8-token"]), "params.allocate_candidates[0]"),
    (dict(grid=dict(bits=[3], colour=["red"])), "params.grid"),
    (dict(resume_from="../etc"), "params.resume_from"),
    (dict(budgets=[3]), "params.budgets"),
])
def test_bad_sweep_params_name_the_field(params, field):
    problems = dict(check_params(params))
    assert field in problems, problems


def test_sweep_kind_is_registered_and_validated(tmp_path, monkeypatch):
    from launch.registry import KINDS
    from launch.spec import JobSpec, SpecError
    monkeypatch.setenv("LOWBIT_RUNS", str(tmp_path / "runs"))
    assert "sweep" in KINDS
    JobSpec(kind="sweep", model=MODEL, tp=TP, schemes=["int4-token-rot16"], params=dict(allocate=[3.0]))
    with pytest.raises(SpecError) as info:
        JobSpec(kind="sweep", model=MODEL, tp=TP, schemes=["int4-token-rot128"], params=dict(kl_max="x"))
    fields = info.value.fields()
    assert "params.kl_max" in fields
    with pytest.raises(SpecError) as info:
        JobSpec(kind="sweep", model=MODEL, tp=TP, schemes=["int4-token-rot128"])
    assert info.value.fields() == ["schemes[0]"] and "rotation" in str(info.value)
    with pytest.raises(SpecError, match="no points"):
        JobSpec(kind="sweep", model=MODEL, tp=TP, params=dict(resume_from="20260101-000000-sweep-abcdef"))
    assert str(parse_scheme_map("int4-token-rot16")) == "int4-token-rot16"
