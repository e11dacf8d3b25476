"""bench.outliers on a small seeded synthetic calibration whose outliers are planted by hand:
the consistency overlaps, the largest stored value and where, and the > ratio site counts."""
from __future__ import annotations

import json

import pytest
import torch

from bench.outliers import format_table, main, outlier_summary
from lowbit.method.calibrate import Calibration

LAYERS, MODULES, TP, HIDDEN, BATCHES, TOKENS = 2, 2, 2, 128, 3, 4
PLANTED = [5, 17]  # k = 128 / 64 = 2: exactly the planted features are every top-k set


def synthetic_calibration() -> Calibration:
    g = torch.Generator().manual_seed(0)
    half = 0.5 + torch.rand(BATCHES, LAYERS, MODULES, TP, HIDDEN, generator=g)  # |min| = max in [0.5, 1.5)
    half[..., PLANTED] = 500.0  # ranges 1000 per rank: > 100x the median range of ~2 everywhere ...
    half[:, 1, 0, :, PLANTED] = 25.0  # ... except layer 1 o_proj: range 50 per rank, still the top-2
    half[2, 0, 1, 1, 5] = 3000.0  # one batch's extreme at layer 0 down_proj rank 1
    ema = half.mean(0)
    sample = 0.1 * torch.randn(LAYERS, MODULES, TP, TOKENS, HIDDEN, generator=g)
    sample[1, 1, 1, 3, 17] = -5000.0  # the largest stored partial value: layer 1 down_proj rank 1
    meta = dict(model="synthetic", tp=TP, tokens=BATCHES * 8, modules=["o_proj", "down_proj"], gamma=0.01)
    return Calibration(-ema, ema, -half, half, meta, sample)


def test_planted_outliers_are_consistent_and_located():
    s = outlier_summary(synthetic_calibration(), ratio=100.0)
    assert s["k"] == 2
    # two random 2-subsets of 128 share 2*2/128 features on average: J = (4/128) / (4 - 4/128)
    assert s["random_jaccard"] == pytest.approx((4 / 128) / (4 - 4 / 128))
    for key in ("jaccard_batches_mean", "jaccard_batches_min", "jaccard_later_batches_mean", "jaccard_ranks_mean", "jaccard_ranks_min",
                "jaccard_layers_mean", "jaccard_adjacent_layers_mean"):
        assert s[key] == 1.0, key  # the same two features top every batch, rank and layer
    assert s["largest_sample_value"] == 5000.0
    assert s["largest_sample_at"] == dict(layer=1, module="down_proj", rank=1, token=3, feature=17)
    site = synthetic_calibration().sample[1, 1, 1].abs()
    assert s["largest_sample_ratio_to_median"] == pytest.approx(5000.0 / float(site.median()))
    assert s["largest_batch_extreme"] == 3000.0
    assert s["largest_batch_extreme_at"] == dict(layer=0, module="down_proj", rank=1, feature=5)
    # 3 of 4 sites (and 6 of 8 site-ranks) have a range > 100x their median: not layer 1 o_proj (~25x)
    assert (s["sites_over_ratio"], s["sites"]) == (3, 4)
    assert (s["site_ranks_over_ratio"], s["site_ranks"]) == (6, 8)
    # the extreme batch lifts the EMA of feature 5 at layer 0 down_proj rank 1 to (500+500+3000)/3
    assert s["largest_range_ratio_at"] == dict(layer=0, module="down_proj")
    # the ~25x site counts once the threshold is below it
    assert outlier_summary(synthetic_calibration(), ratio=10.0)["sites_over_ratio"] == 4
    with pytest.raises(ValueError, match="ratio"):
        outlier_summary(synthetic_calibration(), ratio=1.0)


def test_main_writes_the_summary_with_its_meta(tmp_path, capsys):
    folder = synthetic_calibration().save(tmp_path / "calibration")
    out = tmp_path / "outliers.json"
    assert main([str(folder), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["meta"]) == {"command", "date", "load", "machine"}
    assert len(data["meta"]["load"]["start"]) == 3 and len(data["meta"]["load"]["end"]) == 3
    assert data["models"]["synthetic-tp2"]["sites_over_ratio"] == 3
    printed = capsys.readouterr().out
    assert "synthetic-tp2" in printed and "1 down_proj r1" in printed
    assert "synthetic-tp2" in format_table(data["models"])
