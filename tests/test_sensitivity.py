"""Per-site sensitivity and bit allocation: the budget is never exceeded, the result is a valid
scheme map, DP is optimal for the additive model, greedy is never better than DP."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.method.calibrate import run_calibration
from lowbit.wire.accounting import scheme_bits_per_value
from lowbit.site import ROW_PARALLEL_MODULES, Site
from lowbit.model.data import token_chunks
from lowbit.comm.dist import ThreadWorld
from lowbit.model.engine import build_tp_model
from lowbit.scheme import parse_scheme_map
from lowbit.method.sensitivity import BudgetError, allocate, map_bits_per_value, site_override, site_sensitivity

HIDDEN, TP = 576, 3
CANDS = ["int2-group32-rot64", "int3-token-rot64", "int4-token-rot64", "int8-token"]


def synthetic_rows(kl_table, cands=CANDS):
    """Rows as site_sensitivity returns them, for sites L0..L{n-1} x both modules."""
    rows = []
    sites = [(layer, m) for layer in range(len(kl_table) // 2 + 1) for m in ROW_PARALLEL_MODULES][:len(kl_table)]
    for (layer, module), kls in zip(sites, kl_table):
        for cand, kl in zip(cands, kls):
            rows.append(dict(layer=layer, module=module, scheme=cand, kl=kl, kl_increase=kl,
                             bits=scheme_bits_per_value(cand, HIDDEN, TP)))
    return rows, sites


def total_kl(rows, smap):
    return sum(r["kl_increase"] for r in rows if str(smap.for_site(r["layer"], r["module"])) == r["scheme"])


kl_tables = st.integers(1, 5).flatmap(lambda n: st.lists(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=len(CANDS), max_size=len(CANDS))
    .map(lambda v: sorted(v, reverse=True)), min_size=n, max_size=n))


@settings(max_examples=60, deadline=None)
@given(kl_tables, st.floats(2.5, 9.0), st.sampled_from(["dp", "greedy"]))
def test_allocation_never_exceeds_the_budget_and_is_a_valid_map(table, budget, method):
    rows, sites = synthetic_rows(table)
    smap = allocate(rows, budget, HIDDEN, method)
    text = str(smap)
    again = parse_scheme_map(text)
    assert again == smap and str(again) == text
    again.validate_for(HIDDEN, TP)
    assert map_bits_per_value(again, sites, HIDDEN, TP) <= budget + 1e-12


@settings(max_examples=40, deadline=None)
@given(kl_tables, st.floats(2.5, 9.0))
def test_dp_is_optimal_and_greedy_never_beats_it(table, budget):
    rows, sites = synthetic_rows(table)
    dp = total_kl(rows, allocate(rows, budget, HIDDEN, "dp"))
    greedy = total_kl(rows, allocate(rows, budget, HIDDEN, "greedy"))
    bits = [scheme_bits_per_value(c, HIDDEN, TP) for c in CANDS]
    best = min(sum(table[i][c] for i, c in enumerate(choice))
               for choice in itertools.product(range(len(CANDS)), repeat=len(table))
               if sum(bits[c] for c in choice) / len(table) <= budget + 1e-12)
    # sums of the same floats in another order: 1e-9 relative
    assert dp == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert greedy >= dp - 1e-9


def test_a_sensitive_site_gets_more_bits():
    # site 0 is 100x more sensitive than the others: at a 3.5-bit budget it must get int8
    table = [[100.0, 50.0, 10.0, 0.0]] + [[1.0, 0.5, 0.1, 0.0]] * 5
    rows, sites = synthetic_rows(table)
    smap = allocate(rows, 3.5, HIDDEN)
    assert str(smap.for_site(*sites[0])) == "int8-token"
    assert str(smap.default) == "int2-group32-rot64"


def test_budget_below_the_cheapest_candidate_is_refused():
    rows, _ = synthetic_rows([[1, 0.5, 0.2, 0]] * 2)
    with pytest.raises(BudgetError, match="below the cheapest candidate"):
        allocate(rows, 2.0, HIDDEN)
    with pytest.raises(ValueError, match="dp, greedy"):
        allocate(rows, 3.0, HIDDEN, "ilp")


def test_site_override_quantizes_one_site_only():
    smap = parse_scheme_map(site_override("fp32", Site(3, "down_proj"), "int4-token-rot64"))
    assert str(smap.for_site(3, "down_proj")) == "int4-token-rot64"
    assert str(smap.for_site(3, "o_proj")) == "fp32" and str(smap.for_site(0, "down_proj")) == "fp32"


def test_sensitivity_on_a_tiny_model_then_allocation(tiny_models):
    model_name, tp = "tiny-llama", 2
    tok = tiny_models[model_name].tokenizer
    calib = list(token_chunks(tok, "wikipedia", "calib", 2, 32).split(2))
    batch = [token_chunks(tok, "wikipedia", "eval", 1, 32)]
    cands = ["int2-token-rot16", "int4-token-rot16", "int8-token"]

    def body(group):
        m = build_tp_model(model_name, group, loaded=tiny_models[model_name])
        cal = run_calibration(m.model, group, calib, meta=dict(model=model_name))
        return site_sensitivity(m.model, group, batch, cands, cal)
    rows = ThreadWorld(tp).run(body)[0]
    layers = tiny_models[model_name].model.config.num_hidden_layers
    assert len(rows) == layers * 2 * len(cands)
    by = {(r["layer"], r["module"], r["scheme"]): r for r in rows}
    for layer in range(layers):
        for module in ROW_PARALLEL_MODULES:
            kl2, kl8 = by[(layer, module, "int2-token-rot16")]["kl"], by[(layer, module, "int8-token")]["kl"]
            assert 0 <= kl8 < kl2, (layer, module, kl8, kl2)  # fewer bits at one site: more KL
    hidden = tiny_models[model_name].model.config.hidden_size
    sites = [(layer, m) for layer in range(layers) for m in ROW_PARALLEL_MODULES]
    for budget in (2.5, 3.0, 4.5):
        smap = allocate(rows, budget, hidden)
        smap.validate_for(hidden, tp)
        assert map_bits_per_value(smap, sites, hidden, tp) <= budget
    assert torch.isfinite(torch.tensor([r["kl"] for r in rows])).all()


def test_sensitivity_scores_through_the_vocabulary_parallel_head(tiny_models, monkeypatch):
    """site_sensitivity reads its log-probabilities through TextScores: at TP 2 each rank scores
    half the vocabulary, and every site's KL equals the full head's up to float-sum order."""
    from lowbit.method import scores
    model_name, tp = "tiny-llama", 2
    batch = [token_chunks(tiny_models[model_name].tokenizer, "wikipedia", "eval", 1, 32)]
    cands = ["int4-token-rot16"]

    def body(group):
        m = build_tp_model(model_name, group, loaded=tiny_models[model_name])
        return site_sensitivity(m.model, group, batch, cands, None)
    sliced = ThreadWorld(tp).run(body)[0]
    monkeypatch.setattr(scores, "vocab_shardable", lambda model: False)
    full = ThreadWorld(tp).run(body)[0]
    assert [(r["layer"], r["module"]) for r in sliced] == [(r["layer"], r["module"]) for r in full]
    for a, b in zip(sliced, full):
        # KL sums of fp32 terms over 49152 tokens in two slices vs one: relative 1e-4, 1e-7 floor for ~0 KL
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-7), (a, b)
