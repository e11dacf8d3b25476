"""Calibration, outlier selection and evaluation on a tiny Llama with TP ranks as threads.

What is checked: the EMA is the stated recurrence over the per-batch statistics, the artifact
round-trips, top-k picks the features with the largest range summed over ranks (the same on every
rank), evaluation's reference has zero KL and full agreement, more bits give less error, paired
task deltas are consistent with the accuracies, and the job functions write what the app reads.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lowbit.method.calibrate import (SAMPLE_TOKENS, Calibration, CalibrationError, ema_trace, jaccard, run_calibration, select_outliers,
                              topk_sets)
from lowbit.site import ROW_PARALLEL_MODULES, Site
from lowbit.model.data import load_task, token_chunks
from lowbit.comm.dist import ThreadWorld
from lowbit.model.engine import build_tp_model
from lowbit.method.evaluate import REFERENCE, evaluate_tasks, evaluate_text, kept_pct, layer_errors
from lowbit.scheme import OutlierSpec

TP = 2
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def batches(tiny_models):
    chunks = token_chunks(tiny_models[MODEL].tokenizer, "wikipedia", "calib", 6, 32)
    return list(chunks.split(2))


@pytest.fixture(scope="module")
def calibration(tiny_models, batches):
    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        return run_calibration(tp.model, group, batches, gamma=0.25, meta=dict(model=MODEL))
    cals = ThreadWorld(TP).run(body)
    for other in cals[1:]:  # gathered: every rank holds everyone's statistics
        torch.testing.assert_close(other.ema_max, cals[0].ema_max, rtol=0, atol=0)
    return cals[0]


def test_calibration_shapes_and_meta(calibration, tiny_models):
    cfg = tiny_models[MODEL].model.config
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    assert calibration.ema_min.shape == (L, len(ROW_PARALLEL_MODULES), TP, H)
    assert calibration.batch_max.shape == (3, L, len(ROW_PARALLEL_MODULES), TP, H)
    assert calibration.meta["tokens"] == 6 * 32 and calibration.meta["gamma"] == 0.25
    assert (calibration.batch_min <= calibration.batch_max).all()
    assert (calibration.ema_min <= calibration.ema_max).all()


def test_ema_is_the_stated_recurrence(calibration):
    bmax, g = calibration.batch_max, 0.25
    expected = bmax[0]
    for b in range(1, bmax.shape[0]):
        expected = (1 - g) * expected + g * bmax[b]
    torch.testing.assert_close(calibration.ema_max, expected)
    # ema_trace's last point is the artifact's range of that feature, summed over ranks
    site = Site(1, "down_proj")
    trace = ema_trace(calibration, site, feature=5)
    assert trace.shape == (3,)
    final = calibration.ranges()[1, 1, :, 5].sum()
    assert math.isclose(trace[-1].item(), final.item(), rel_tol=1e-5)


def test_per_batch_minmax_are_the_partials_true_extremes(tiny_models, batches, calibration):
    """Rank r's partial at layer 0 o_proj, recomputed by hand, has the recorded min/max."""
    from lowbit.comm.communicator import Communicator, ExactCommunicator
    from lowbit.model.tp import set_communicator

    class Grab(Communicator):
        def __init__(self, group):
            super().__init__(group, record=False)
            self.inner, self.seen = ExactCommunicator(group, record=False), []

        def _reduce(self, partial, site):
            if site == Site(0, "o_proj"):
                self.seen.append(partial.detach().reshape(-1, partial.shape[-1]).clone())
            return self.inner.reduce(partial, site), 0, {}

    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        grab = Grab(group)
        set_communicator(tp.model, grab)
        with torch.no_grad():
            tp.model(batches[0], use_cache=False)
            tp.model(batches[1], use_cache=False)
        return grab.seen
    partials = ThreadWorld(TP).run(body)
    for rank, (first, second) in enumerate(partials):
        torch.testing.assert_close(calibration.batch_max[1, 0, 0, rank], second.max(0).values)
        torch.testing.assert_close(calibration.batch_min[1, 0, 0, rank], second.min(0).values)
        # the stored sample: the first SAMPLE_TOKENS tokens of the first batch, as this rank made them
        torch.testing.assert_close(calibration.site_sample(Site(0, "o_proj"), rank), first[:SAMPLE_TOKENS])
    L, H = calibration.layers, calibration.hidden
    assert calibration.sample.shape == (L, len(ROW_PARALLEL_MODULES), TP, SAMPLE_TOKENS, H)


def test_reduced_sum_ranges_are_recorded_and_bounded_by_the_ranks(calibration, tmp_path):
    """The static two-shot second leg's ranges: the EMA of the reduced sum's per-batch min/max, the
    same on every rank, never wider than the ranks' ranges added up (|sum| <= sum of |partials|)."""
    L, M, tp, H = calibration.ema_min.shape
    assert calibration.sum_min.shape == calibration.sum_max.shape == (L, M, H)
    assert (calibration.sum_min <= calibration.sum_max).all()
    tol = 1e-4 * calibration.ema_max.abs().sum(2).max()
    assert (calibration.sum_max <= calibration.ema_max.sum(2) + tol).all()
    assert (calibration.sum_min >= calibration.ema_min.sum(2) - tol).all()
    back = Calibration.load(calibration.save(tmp_path / "cal"))
    assert torch.equal(back.sum_min, calibration.sum_min) and torch.equal(back.sum_max, calibration.sum_max)
    assert back.sum_range(Site(0, "down_proj"))[1].shape == (H,)


def test_artifact_round_trips_and_refuses_a_mismatch(calibration, tmp_path):
    calibration.save(tmp_path / "cal")
    again = Calibration.load(tmp_path / "cal")
    torch.testing.assert_close(again.ema_min, calibration.ema_min, rtol=0, atol=0)
    torch.testing.assert_close(again.sample, calibration.sample, rtol=0, atol=0)
    assert again.meta == calibration.meta
    # an artifact from before samples were kept still loads; asking it for a sample names the fix
    old = Calibration(calibration.ema_min, calibration.ema_max, calibration.batch_min, calibration.batch_max,
                      calibration.meta)
    old.save(tmp_path / "old")
    assert Calibration.load(tmp_path / "old").sample is None
    with pytest.raises(CalibrationError, match="calibrate` again"):
        Calibration.load(tmp_path / "old").site_sample(Site(0, "o_proj"), 0)
    with pytest.raises(CalibrationError, match="layers 0.."):
        again.site_sample(Site(99, "o_proj"), 0)
    again.check_matches(MODEL, TP)
    with pytest.raises(CalibrationError, match="TP size 2"):
        again.check_matches(MODEL, 4)
    with pytest.raises(CalibrationError, match="model"):
        again.check_matches("smollm2-135m", TP)
    with pytest.raises(CalibrationError, match="no artifact"):
        Calibration.load(tmp_path / "missing")


def test_topk_selects_the_largest_summed_ranges(calibration):
    site, H = Site(0, "down_proj"), calibration.hidden
    spec = OutlierSpec(select="topk", k_frac=Fraction(1, 16))
    picked = select_outliers(calibration, site, spec, H)
    k = spec.count(H)
    assert picked.numel() == k == H // 16
    score = calibration.ranges()[0, 1].sum(0)
    assert score[picked].min() >= score.sort(descending=True).values[k - 1]
    assert torch.equal(picked, topk_sets(score, k))


def test_random_selection_is_seeded_and_varies_by_site(calibration):
    H = calibration.hidden
    spec = OutlierSpec(select="random", k_frac=Fraction(1, 16), seed=3)
    a = select_outliers(None, Site(0, "o_proj"), spec, H)
    assert torch.equal(a, select_outliers(None, Site(0, "o_proj"), spec, H))
    assert not torch.equal(a, select_outliers(None, Site(1, "o_proj"), spec, H))
    assert a.numel() == H // 16 and len(set(a.tolist())) == a.numel()
    assert select_outliers(None, Site(0, "o_proj"), OutlierSpec(select="none"), H).numel() == 0
    with pytest.raises(CalibrationError, match="needs a calibration"):
        select_outliers(None, Site(0, "o_proj"), OutlierSpec(select="topk", k_frac=Fraction(1, 16)), H)


def test_jaccard():
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([3, 2, 1])) == 1.0
    assert jaccard(torch.tensor([1, 2]), torch.tensor([3, 4])) == 0.0
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == 0.5


SCHEMES = ["bf16", "int8-token", "int4-static-top1/16", "int2-token"]


@pytest.fixture(scope="module")
def text_metrics(tiny_models, calibration):
    held = token_chunks(tiny_models[MODEL].tokenizer, "wikipedia", "eval", 4, 32)

    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        return evaluate_text(tp.model, group, held, SCHEMES, calibration, batch_size=2)
    results = ThreadWorld(TP).run(body)
    assert results[0][REFERENCE]["ppl"] == results[1][REFERENCE]["ppl"]  # every rank computes the same
    return results[0]


def test_reference_has_no_divergence(text_metrics):
    ref = text_metrics[REFERENCE]
    assert ref["kl"] == 0 and ref["top1_agreement"] == 1.0
    assert ref["bits_per_value"] == 32 and math.isfinite(ref["ppl"]) and ref["ppl"] > 1
    assert ref["tokens"] == 4 * 31  # next-token targets per 32-token chunk


def test_fewer_bits_cost_more_kl(text_metrics):
    kl = {s: text_metrics[s]["kl"] for s in SCHEMES}
    assert 0 <= kl["bf16"] < kl["int8-token"] < kl["int2-token"], kl
    assert kl["int4-static-top1/16"] < kl["int2-token"], kl
    assert text_metrics["int2-token"]["top1_agreement"] < text_metrics["bf16"]["top1_agreement"]


def test_bits_per_value_are_measured_from_bytes(text_metrics):
    assert text_metrics["bf16"]["bits_per_value"] == 16
    assert text_metrics["int8-token"]["bits_per_value"] == pytest.approx(8 + 16 / 64)  # bf16 scale per 64-wide row
    assert text_metrics["int2-token"]["bits_per_value"] < 3
    top = text_metrics["int4-static-top1/16"]["bits_per_value"]
    assert top == pytest.approx(4 + (16 - 4) / 16)  # static scales are not sent; 1/16 of values in bf16


def test_fused_kernels_inside_the_evaluation_give_the_same_metrics(tiny_models, calibration, text_metrics,
                                                                   monkeypatch):
    """evaluate_text with codec=kernels.dispatch.Codec() (here the native kernels; they and the
    Triton kernels are held byte-equal to the reference in tests/test_kernels*) gives the very same numbers."""
    from kernels import dispatch
    monkeypatch.setenv(dispatch.ENV, "native")
    held = token_chunks(tiny_models[MODEL].tokenizer, "wikipedia", "eval", 4, 32)

    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        return evaluate_text(tp.model, group, held, SCHEMES, calibration, batch_size=2, codec=dispatch.Codec())
    fused = ThreadWorld(TP).run(body)[0]
    for scheme in SCHEMES:
        for key in ("ppl", "kl", "top1_agreement", "bits_per_value", "clamped", "nonfinite"):
            assert fused[scheme][key] == text_metrics[scheme][key], (scheme, key)


def test_vocab_parallel_head_gives_the_full_heads_metrics(tiny_models, calibration, text_metrics, monkeypatch):
    """Each rank scoring its vocabulary slice, completed by collectives (TextScores with a group),
    equals every rank scoring the whole replicated head, up to the order of float sums."""
    from lowbit.method import evaluate as ev
    held = token_chunks(tiny_models[MODEL].tokenizer, "wikipedia", "eval", 4, 32)
    assert ev.vocab_shardable(build_tp_model(MODEL, ThreadWorld(1).group(0), loaded=tiny_models[MODEL]).model)
    monkeypatch.setattr(ev, "vocab_shardable", lambda model: False)

    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        return evaluate_text(tp.model, group, held, SCHEMES, calibration, batch_size=2)
    full = ThreadWorld(TP).run(body)[0]
    for scheme in [REFERENCE] + SCHEMES:
        assert text_metrics[scheme]["top1_agreement"] == full[scheme]["top1_agreement"], scheme
        assert text_metrics[scheme]["ppl"] == pytest.approx(full[scheme]["ppl"], rel=1e-5), scheme
        assert text_metrics[scheme]["kl"] == pytest.approx(full[scheme]["kl"], rel=1e-4, abs=1e-6), scheme


def test_vocab_ranges_cover_the_vocabulary_once():
    from lowbit.model.engine import vocab_range
    for vocab, tp in [(49152, 3), (262144, 4), (10, 3), (7, 2)]:
        spans = [vocab_range(vocab, r, tp) for r in range(tp)]
        assert spans[0][0] == 0 and spans[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_task_accuracy_with_paired_deltas(tiny_models, calibration):
    items = {"arc_easy": load_task("arc_easy", 6, seed=0), "piqa": load_task("piqa", 6, seed=0)}

    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        return evaluate_tasks(tp.model, group, tp.tokenizer, items, ["bf16", "int2-token"], calibration)
    out = ThreadWorld(TP).run(body)[0]
    for scheme in (REFERENCE, "bf16", "int2-token"):
        for task in items:
            row = out[scheme][task]
            assert row["n"] == 6 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
            assert row["delta"] == pytest.approx(row[row["primary"]] - out[REFERENCE][task][row["primary"]])
    for task in items:
        assert out[REFERENCE][task]["delta"] == 0 and out[REFERENCE][task]["flipped"] == 0
    assert kept_pct(out[REFERENCE], out[REFERENCE]) == 100.0
    assert out["int2-token"]["_comm"]["bits_per_value"] < out["bf16"]["_comm"]["bits_per_value"]


def test_layer_errors_local_and_accumulated(tiny_models, calibration, batches):
    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        return layer_errors(tp.model, group, batches[:1], ["int8-token", "int2-token"], calibration)
    rows = ThreadWorld(TP).run(body)[0]
    L = tiny_models[MODEL].model.config.num_hidden_layers
    by = {(r["scheme"], r["mode"], r["layer"], r["module"], r["leg"]): r for r in rows}
    for mode in ("local", "accumulated"):
        for layer in range(L):
            for module in ROW_PARALLEL_MODULES:
                e8 = by[("int8-token", mode, layer, module, "final")]["rel_error"]
                e2 = by[("int2-token", mode, layer, module, "final")]["rel_error"]
                assert 0 < e8 < e2, (mode, layer, module, e8, e2)
    # the first site sees exact inputs in both modes: same error
    first = ("int2-token", "{}", 0, "o_proj", "final")
    assert by[first[:1] + ("local",) + first[2:]]["rel_error"] == pytest.approx(
        by[first[:1] + ("accumulated",) + first[2:]]["rel_error"], rel=1e-4)


def test_batching_items_does_not_change_the_scores(tiny_models, calibration):
    """Padding leaves every choice's log-likelihood as it is alone (up to fp32 GEMM order): one item
    per forward (a budget below any item's width) and all five in one give the same scores."""
    items = {"arc_easy": load_task("arc_easy", 5, seed=1)}

    def body(group, max_tokens):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        return evaluate_tasks(tp.model, group, tp.tokenizer, items, ["int4-token"], calibration,
                              max_tokens=max_tokens)
    one = ThreadWorld(TP).run(body, 1)[0]
    many = ThreadWorld(TP).run(body, 4096)[0]
    for scheme in (REFERENCE, "int4-token"):
        for metric in ("acc", "acc_norm", "n"):
            assert one[scheme]["arc_easy"][metric] == many[scheme]["arc_easy"][metric]


def test_forward_partials_runs_every_layer_but_the_head_on_one_position(tiny_models, batches):
    """Calibration and layer errors skip lm_head on all but the last position; what they see (the
    partials, and so the last logits) is the full forward's."""
    from lowbit.model.engine import forward_partials

    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        with torch.no_grad():
            return forward_partials(tp.model, batches[0]).logits, tp.model(batches[0], use_cache=False).logits
    for short, full in ThreadWorld(TP).run(body):
        assert short.shape == (full.shape[0], 1, full.shape[2])
        torch.testing.assert_close(short[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
