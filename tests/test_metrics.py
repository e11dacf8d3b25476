"""The evaluation metrics against values computed by hand (lowbit.stats, lowbit.method.evaluate) and
the score table the CLI prints (blank for absent values, ± next to every score)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from lowbit import stats
from launch.client import format_results
from lowbit.method.evaluate import summary_record


def test_kl_of_two_known_distributions():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    kl = stats.kl_per_token(p, q)
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); identical distributions: 0
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    # KL is not symmetric: KL(q || p) = 0.25 ln(0.5) + 0.75 ln(1.5)
    assert stats.kl_per_token(q, p)[0].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)


def test_perplexity_of_a_known_loglikelihood_sequence():
    logliks = [-1.0, -2.0, -3.0]  # mean NLL 2 -> ppl e^2
    assert stats.perplexity(-sum(logliks), len(logliks)) == pytest.approx(math.exp(2.0))
    assert stats.perplexity(3 * math.log(4), 3) == pytest.approx(4.0)  # uniform over 4 tokens
    with pytest.raises(ValueError, match="tokens"):
        stats.perplexity(1.0, 0)


def test_acc_and_acc_norm_disagree_on_a_constructed_item():
    # lengths 2 and 9 (" a" and " abcdefgh" in characters): -4 beats -6 in sum, but -6/9 = -0.67
    # beats -4/2 = -2 per character
    hit = stats.choice_hits([-4.0, -6.0], [2, 9], gold=1)
    assert hit == {"acc": 0.0, "acc_norm": 1.0}
    assert stats.choice_hits([-4.0, -6.0], [2, 9], gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    with pytest.raises(ValueError, match="gold"):
        stats.choice_hits([-1.0, -2.0], [2, 2], gold=2)
    with pytest.raises(ValueError, match="lengths: must be >= 1"):
        stats.choice_hits([-1.0, -2.0], [2, 0], gold=1)


def test_standard_error_and_paired_delta_on_a_small_table():
    scheme = [1.0, 0.0, 1.0, 1.0, 0.0]
    reference = [1.0, 1.0, 1.0, 0.0, 0.0]
    mean, se = stats.mean_se(scheme)
    # mean 0.6; sample variance (3 * 0.4^2 + 2 * 0.6^2) / 4 = 0.3; se = sqrt(0.3 / 5)
    assert mean == pytest.approx(0.6)
    assert se == pytest.approx(math.sqrt(0.06))
    assert se == pytest.approx(statistics.stdev(scheme) / math.sqrt(len(scheme)))
    delta, delta_se = stats.paired_delta(scheme, reference)
    # differences [0, -1, 0, 1, 0]: mean 0, variance 2/4, se sqrt(0.5 / 5)
    assert delta == pytest.approx(0.0)
    assert delta_se == pytest.approx(math.sqrt(0.1))
    delta, delta_se = stats.paired_delta([1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    assert delta == pytest.approx(-0.5) and delta_se == pytest.approx(math.sqrt(1 / 12))
    assert stats.mean_se([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="same items"):
        stats.paired_delta([1.0], [1.0, 0.0])



def test_items_for_a_target_se_on_a_hand_computed_pilot():
    # a pilot of 5 items: differences [0, -1, 0, 1, 0] (the table above): delta_se = sqrt(0.1),
    # so the sample variance of the differences is 5 * 0.1 = 0.5
    _, delta_se = stats.paired_delta([1.0, 0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0])
    var = stats.paired_variance(delta_se, 5)
    assert var == pytest.approx(0.5)
    # SE 0.05 needs 0.5 / 0.0025 = 200 items; SE 0.03: 0.5 / 0.0009 = 555.6 -> 556
    assert stats.items_for_se(var, 0.05) == 200
    assert stats.items_for_se(var, 0.03) == 556
    assert stats.items_for_se(var, 0.03, available=300) == 300  # capped by the task's size
    # a 0/1 score at p = 0.5: variance 0.25, SE 0.05 needs exactly 100 (not 101 from float error)
    assert stats.bernoulli_variance(0.5) == 0.25 and stats.bernoulli_variance(0.8) == pytest.approx(0.16)
    assert stats.items_for_se(0.25, 0.05) == 100
    assert stats.items_for_se(0.0, 0.05) == 1  # no disagreement seen: one item, never zero
    with pytest.raises(ValueError, match="target_se"):
        stats.items_for_se(0.25, 0.0)
    with pytest.raises(ValueError, match="p: "):
        stats.bernoulli_variance(1.5)


def _task_row(primary: str, scheme_hits: list[float], ref_hits: list[float]) -> dict:
    """A task row shaped like ``evaluate_tasks`` writes it (both metrics equal here)."""
    row = {"n": len(scheme_hits), "primary": primary}
    for metric in ("acc", "acc_norm"):
        row[metric], row[f"{metric}_se"] = stats.mean_se(scheme_hits)
    row["delta"], row["delta_se"] = stats.paired_delta(scheme_hits, ref_hits)
    row["flipped"] = sum(a != b for a, b in zip(scheme_hits, ref_hits))
    return row


def test_kept_pct_and_its_standard_error():
    scheme = {"arc_easy": dict(primary="acc", acc=0.6, acc_se=0.2, delta=-0.2, delta_se=0.1),
              "piqa": dict(primary="acc_norm", acc_norm=0.45, acc_norm_se=0.2, delta=-0.05, delta_se=0.05)}
    reference = {"arc_easy": dict(primary="acc", acc=0.8), "piqa": dict(primary="acc_norm", acc_norm=0.5)}
    kept, se = stats.kept_pct(scheme, reference)
    # ratios 0.75 and 0.9 -> 82.5 %; SE = 100/2 * sqrt((0.1/0.8)^2 + (0.05/0.5)^2)
    assert kept == pytest.approx(82.5)
    assert se == pytest.approx(50 * math.sqrt(0.125 ** 2 + 0.1 ** 2))
    assert not stats.kept_is_unresolved(kept, se)   # 8.0 < the 17.5 point gap
    assert stats.kept_is_unresolved(98.0, 3.0)      # 3 > 2: within one SE of no loss
    assert stats.kept_is_unresolved(101.0, 1.5)     # a "gain" within its error too
    assert not stats.kept_is_unresolved(None, 3.0)
    assert stats.kept_pct({}, reference) == (None, None)


def _result(records: list[dict]) -> dict:
    return dict(model="tiny-llama", tp=2, backend="threads", reference="fp32", eval_source="wikipedia",
                eval_tokens=64, items_per_task=5, seed=0, calibration=None, codec="lowbit.wire.payload", seconds=1.0,
                records=records)


def _text(bits: float, ppl: float, kl: float, top1: float) -> dict:
    return dict(bits_per_value=bits, leg1_bits=None, leg2_bits=None, ppl=ppl, kl=kl, top1_agreement=top1,
                clamped=0, nonfinite=0, thr_overflow=0, tokens=64, comm_seconds=0.01)


def test_score_table_shows_se_paired_delta_and_flags_unresolved_kept():
    ref_hits = [1.0, 1.0, 1.0, 0.0, 0.0]
    int4_hits = [1.0, 0.0, 1.0, 1.0, 0.0]
    ref_tasks = {"arc_easy": _task_row("acc", ref_hits, ref_hits)}
    int4_tasks = {"arc_easy": _task_row("acc", int4_hits, ref_hits)}
    records = [summary_record("fp32", _text(32.0, 20.0, 0.0, 1.0), ref_tasks, ref_tasks),
               summary_record("int4-token", _text(4.5, 21.0, 0.25, 0.8), int4_tasks, ref_tasks)]
    assert records[1]["kept_pct"] == pytest.approx(100.0)             # 0.6 / 0.6
    assert records[1]["kept_se"] == pytest.approx(100 * math.sqrt(0.1) / 0.6)
    table = stats.score_table(_result(records))
    ref, int4 = table.iloc[0], table.iloc[1]
    assert int4["arc_easy (acc) %"] == f"60.0 ± {100 * math.sqrt(0.06):.1f}"
    assert int4["Δ arc_easy pp"] == f"+0.0 ± {100 * math.sqrt(0.1):.1f}"
    assert ref["Δ arc_easy pp"] == ""                                  # no difference to itself
    assert int4["kept %"] == f"100.0 ± {100 * math.sqrt(0.1) / 0.6:.1f} !"  # SE 52.7 > the 0 gap
    text = format_results(_result(records))
    assert "None" not in text and "nan" not in text
    assert stats.UNRESOLVED_NOTE in text


def test_score_table_leaves_absent_values_blank():
    records = [summary_record("fp32", _text(32.0, 20.0, 0.0, 1.0), None, None),
               dict(summary_record("bf16", _text(16.0, 20.0, 1e-4, 0.99), None, None), ppl=None, top1_agreement=None)]
    table = stats.score_table(_result(records))
    assert list(table.columns) == ["scheme", "bits/value", "ppl", "KL", "top-1 %"]
    assert table.iloc[1]["ppl"] == "" and table.iloc[1]["top-1 %"] == ""
    assert table.iloc[0]["top-1 %"] == "100.0"
    text = format_results(_result(records))
    assert "None" not in text and "nan" not in text.lower()
    assert stats.fmt_pm(None, 0.1) == "" and stats.fmt_pm(float("nan")) == ""
    assert stats.fmt_pm(0.25, 0.05, 100.0) == "25.0 ± 5.0"


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3", "tiny-llama"])
def test_choice_logliks_through_kept_positions_equal_the_full_logits(tiny_models, name):
    """The old path's log-likelihood of each continuation (kept for bench.scoring) sends only the
    positions that predict a continuation token through lm_head (Gemma 2's final softcap included): same numbers as
    taking them from the logits of every position."""
    import torch.nn.functional as F

    from lowbit.model.data import load_task
    from lowbit.method.choices import legacy_choice_logliks, legacy_sequences, tokenize_item
    loaded = tiny_models[name]
    seqs, starts = [], []
    for item in load_task("openbookqa", 3, seed=0):  # questions of different lengths: right padding
        s, st = legacy_sequences(tokenize_item(loaded.tokenizer, item))
        seqs += s
        starts += st
    got = legacy_choice_logliks(loaded.model, seqs, starts, pad_id=0)
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    with torch.no_grad():
        logp = F.log_softmax(loaded.model(ids, attention_mask=mask, use_cache=False).logits.float(), -1)
    want = [logp[i, torch.arange(st - 1, len(s) - 1), torch.tensor(s[st:])].sum().item()
            for i, (s, st) in enumerate(zip(seqs, starts))]
    assert len(got) == 12
    assert got == pytest.approx(want, abs=1e-4)
