"""Do two models' outlier features look alike? Consistency and size of the massive activations,
from stored calibration artifacts (no model runs).

    python -m bench.outliers runs/<smollm2 calibrate id>/calibration runs/<gemma calibrate id>/calibration

Per calibration, with the paper's k = hidden/64 (``lowbit.analysis.outlier_count``) and the
Jaccard overlaps of ``lowbit.analysis``: each batch's top-k against the EMA's (the selected set; also
without the first batch, which the EMA with gamma = 0.01 almost equals),
each rank's top-k against every other rank's, each layer's against every other layer's, all next
to ``random_jaccard`` (what unrelated sets would share). Then the size: the largest value in the
stored partials (``Calibration.sample``, the first tokens of the first batch at every site and
rank), where it is, and its ratio to the median magnitude of that same partial; the largest
per-batch extreme over all calibration tokens (``batch_min``/``batch_max``); and how many sites
(layer x module, range summed over ranks: the selection score) and site-ranks have a feature
whose range is more than ``--ratio`` (100) times the median range there.
Writes ``bench/results/outliers-<labels>.json`` with a meta block and prints a small table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

from bench._meta import finish_meta, start_meta, path as meta_path
from lowbit.analysis import (outlier_count, overlap_between_batches, overlap_between_layers, overlap_between_ranks,
                             random_jaccard)
from lowbit.calibration import Calibration
from lowbit.site import ROW_PARALLEL_MODULES

PAPER_K = Fraction(1, 64)  # the paper keeps hidden/64 features in BF16


def _off_diagonal(frame) -> list[float]:
    data = frame.to_numpy()
    return [float(data[i, j]) for i in range(data.shape[0]) for j in range(data.shape[1]) if i != j]


def _where(cal: Calibration, flat_index: int, shape: tuple) -> dict:
    layer, module, rank = (int(v) for v in np.unravel_index(flat_index, shape)[:3])
    return dict(layer=layer, module=ROW_PARALLEL_MODULES[module], rank=rank)


def _site(flat_index: int, shape: tuple) -> dict:
    """(layer, module) of a flat index into [L, M]: a site's selection score is summed over ranks."""
    layer, module = (int(v) for v in np.unravel_index(flat_index, shape))
    return dict(layer=layer, module=ROW_PARALLEL_MODULES[module])


def outlier_summary(cal: Calibration, ratio: float = 100.0) -> dict:
    """The consistency and size numbers of one calibration (see the module doc)."""
    if ratio <= 1:
        raise ValueError(f"ratio: must be > 1, got {ratio}")
    modules = cal.meta.get("modules") or ROW_PARALLEL_MODULES
    k = outlier_count(cal.hidden, PAPER_K)
    by_batch = [overlap_between_batches(cal, m, k) for m in modules]
    batches = [j for f in by_batch for j in f["jaccard"]]
    # with gamma = 0.01 the EMA is almost the first batch, so batch 0 agrees with it by construction
    later = [j for f in by_batch for j in f[f["batch"] > 0]["jaccard"]]
    ranks = [j for m in modules for layer in range(cal.layers)
             for j in _off_diagonal(overlap_between_ranks(cal, layer, m, k))] if cal.tp > 1 else []
    layer_frames = {m: overlap_between_layers(cal, m, k).to_numpy() for m in modules}
    layers = [float(f[i, j]) for f in layer_frames.values() for i in range(len(f)) for j in range(len(f)) if i != j]
    adjacent = [float(f[i, i + 1]) for f in layer_frames.values() for i in range(len(f) - 1)]

    ranges = cal.ranges().float()  # [L, M, tp, H]
    score = ranges.sum(2)  # [L, M, H]: the selection score
    score_ratio = score.amax(-1) / score.median(-1).values.clamp_min(1e-30)
    rank_ratio = ranges.amax(-1) / ranges.median(-1).values.clamp_min(1e-30)
    extremes = np.maximum(cal.batch_min.abs().float().amax(0).numpy(), cal.batch_max.abs().float().amax(0).numpy())
    out = dict(model=cal.meta.get("model"), tp=cal.tp, layers=cal.layers, hidden=cal.hidden, k=k,
               tokens=cal.meta.get("tokens"), batches=int(cal.batch_min.shape[0]), source=cal.meta.get("source"),
               random_jaccard=random_jaccard(cal.hidden, k),
               jaccard_batches_mean=statistics.fmean(batches), jaccard_batches_min=min(batches),
               jaccard_later_batches_mean=statistics.fmean(later) if later else None,
               jaccard_ranks_mean=statistics.fmean(ranks) if ranks else None,
               jaccard_ranks_min=min(ranks) if ranks else None,
               jaccard_layers_mean=statistics.fmean(layers) if layers else None,
               jaccard_adjacent_layers_mean=statistics.fmean(adjacent) if adjacent else None,
               ratio=ratio, sites=int(score_ratio.numel()), site_ranks=int(rank_ratio.numel()),
               sites_over_ratio=int((score_ratio > ratio).sum()),
               site_ranks_over_ratio=int((rank_ratio > ratio).sum()),
               largest_range_ratio=float(score_ratio.max()),
               largest_range_ratio_at=_site(int(score_ratio.argmax()), tuple(score_ratio.shape)),
               largest_batch_extreme=float(extremes.max()),
               largest_batch_extreme_at=dict(_where(cal, int(extremes.argmax()), extremes.shape),
                                             feature=int(np.unravel_index(int(extremes.argmax()), extremes.shape)[3])))
    if cal.sample is not None:
        x = cal.sample.float().abs()  # [L, M, tp, S, H]
        flat = int(x.argmax())
        where = _where(cal, flat, tuple(x.shape))
        token, feature = (int(v) for v in np.unravel_index(flat, tuple(x.shape))[3:])
        site = x[where["layer"], modules.index(where["module"]), where["rank"]]
        median = float(site.median())
        out.update(sample_tokens=int(x.shape[3]), largest_sample_value=float(x.max()),
                   largest_sample_at=dict(where, token=token, feature=feature),
                   largest_sample_site_median=median,
                   largest_sample_ratio_to_median=float(x.max()) / median if median > 0 else None,
                   sample_median_all_sites=float(x.median()))
    return out


# one (label, format) per summary number: the printed table here and the docs' block (bench.report)
ROWS = [("tokens x batches", lambda s: f"{s['tokens']} x {s['batches']}"),
        ("k (hidden/64) of hidden", lambda s: f"{s['k']} of {s['hidden']}"),
        ("Jaccard random sets", lambda s: f"{s['random_jaccard']:.3f}"),
        ("Jaccard batch vs EMA mean/min", lambda s: f"{s['jaccard_batches_mean']:.3f} / {s['jaccard_batches_min']:.3f}"),
        ("Jaccard later batches vs EMA, mean", lambda s: "-" if s["jaccard_later_batches_mean"] is None else
         f"{s['jaccard_later_batches_mean']:.3f}"),
        ("Jaccard rank vs rank mean/min", lambda s: "-" if s["jaccard_ranks_mean"] is None else
         f"{s['jaccard_ranks_mean']:.3f} / {s['jaccard_ranks_min']:.3f}"),
        ("Jaccard layers all/adjacent", lambda s: f"{s['jaccard_layers_mean']:.3f} / {s['jaccard_adjacent_layers_mean']:.3f}"),
        ("largest stored partial |x|", lambda s: f"{s.get('largest_sample_value', float('nan')):.3g}"),
        ("largest stored partial: layer/module/rank", lambda s: "{layer} {module} r{rank}".format(**s["largest_sample_at"])
         if "largest_sample_at" in s else "-"),
        ("largest stored partial / median |x| there", lambda s: f"{s.get('largest_sample_ratio_to_median') or float('nan'):.3g}"),
        ("largest batch extreme |x|", lambda s: f"{s['largest_batch_extreme']:.3g}"),
        ("largest batch extreme: layer/module/rank", lambda s: "{layer} {module} r{rank}".format(**s["largest_batch_extreme_at"])),
        ("sites with range > ratio x median", lambda s: f"{s['sites_over_ratio']} of {s['sites']}"),
        ("site-ranks, same", lambda s: f"{s['site_ranks_over_ratio']} of {s['site_ranks']}"),
        ("largest range / median range", lambda s: f"{s['largest_range_ratio']:.3g}")]


def format_table(summaries: dict[str, dict]) -> str:
    width = max(len(name) for name, _ in ROWS) + 2
    cols = list(summaries)
    colw = max(22, *(len(c) + 2 for c in cols))
    lines = [" " * width + "".join(f"{c:>{colw}}" for c in cols)]
    lines += [f"{name:<{width}}" + "".join(f"{fmt(summaries[c]):>{colw}}" for c in cols) for name, fmt in ROWS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calibrations", nargs="+", help="calibration folders (runs/<calibrate id>/calibration)")
    parser.add_argument("--ratio", type=float, default=100.0, help="a feature counts when its range is this many "
                                                                   "times the site's median range")
    parser.add_argument("--out", default=None, help="default bench/results/outliers-<labels>.json")
    args = parser.parse_args(argv)
    if args.ratio <= 1:
        parser.error(f"--ratio: must be > 1, got {args.ratio}")
    meta = start_meta("bench.outliers", sys.argv[1:] if argv is None else list(argv))
    summaries = {}
    for folder in args.calibrations:
        cal = Calibration.load(folder)
        label = f"{cal.meta.get('model', 'model')}-tp{cal.tp}"
        summaries[label] = dict(outlier_summary(cal, args.ratio), calibration=meta_path(folder))
    out = Path(args.out or f"bench/results/outliers-{'-'.join(summaries)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=finish_meta(meta), models=summaries), indent=2))
    print(format_table(summaries))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
