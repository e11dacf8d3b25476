"""Cheap math on stored artifacts (a calibration's EMA ranges, batch ranges and 16-token samples),
as frames for the results store and so the pages: feature ranges, top-k overlaps (Jaccard)
between batches, ranks, layers and text sources, EMA traces, the rotation panel's before/after.

No model runs here; each call takes milliseconds on SmolLM2's artifact (30 layers x 2 modules x
3 ranks x 576 features). Pages call these on the artifacts ``launch.store.calibration`` loads;
no page restates this math.

    PYTHONPATH=. python -c "from lowbit.analysis import random_jaccard; print(random_jaccard(576, 9))"
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd

from lowbit.calibration import select_outliers
from lowbit.method.calibrate import ema_trace, jaccard, topk_sets
from lowbit.rotation import check_block, rotation_effect
from lowbit.scheme import OutlierSpec, parse_scheme
from lowbit.site import ROW_PARALLEL_MODULES, Site

def rotation_view(calibration, layer: int, module: str, rank: int, block: int,
                  quant: str = "int4-token") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One stored partial (the calibration's ``sample``) before and after the block rotation.

    Returns ``values`` (one row per value: stage ``original`` / ``rotated``, token, feature,
    value) and ``tokens`` (one row per token: absmax and relative quantization error with
    ``quant``, a dynamic scheme such as ``int4-token`` or ``int4-group64``, without and with the
    rotation; see ``lowbit.rotation.rotation_effect``). Raises CalibrationError / ValueError with
    the field named."""
    x = calibration.site_sample(Site(layer, module), rank)
    check_block(x.shape[-1], block)
    scheme = parse_scheme(quant)
    if scheme.is_exact or scheme.rotation is not None:
        raise ValueError(f"quant: {quant!r} not allowed; allowed: a dynamic scheme without rotation, e.g. int4-token")
    eff = rotation_effect(x, block, scheme.quant)
    tokens, hidden = x.shape
    grid = dict(token=np.repeat(np.arange(tokens), hidden), feature=np.tile(np.arange(hidden), tokens))
    values = pd.concat([pd.DataFrame(dict(stage="original", value=x.reshape(-1).numpy(), **grid)),
                        pd.DataFrame(dict(stage=f"rotated (R={block})", value=eff["rotated"].reshape(-1).numpy(),
                                          **grid))], ignore_index=True)
    per_token = pd.DataFrame(dict(token=np.arange(tokens), **{k: eff[k].numpy() for k in (
        "absmax", "absmax_rotated", "rms", "error", "error_rotated", "rest_error", "rest_error_rotated")}))
    return values, per_token


def spikiest_sample(calibration) -> tuple[int, str, int]:
    """(layer, module, rank) whose stored sample has the largest max|x| / RMS: the partial where
    rotation has the most to show. Raises CalibrationError when the artifact has no samples."""
    calibration.site_sample(Site(0, ROW_PARALLEL_MODULES[0]), 0)  # the no-sample error, named
    x = calibration.sample.float()  # [L, M, tp, S, H]
    rms = x.pow(2).mean(dim=(-1, -2)).sqrt()
    crest = x.abs().amax(dim=(-1, -2)) / _safe_divisor(rms)
    layer, module, rank = np.unravel_index(int(crest.argmax()), tuple(crest.shape))
    return int(layer), ROW_PARALLEL_MODULES[int(module)], int(rank)


def _safe_divisor(t):
    """``t`` with zeros replaced by ones (a safe divisor)."""
    return t.where(t > 0, t.new_ones(()))


def outlier_count(hidden: int, k_frac: Fraction) -> int:
    """How many features a top-k / random selection keeps (the scheme grammar's rule)."""
    return OutlierSpec("topk", Fraction(k_frac)).count(hidden)


def selected_features(cal, layer: int, module: str, k_frac: Fraction) -> list[int]:
    """The features the paper keeps in BF16 at this site (top-k of the range summed over ranks)."""
    idx = select_outliers(cal, Site(layer, module), OutlierSpec("topk", Fraction(k_frac)), cal.hidden)
    return [int(i) for i in idx]


def feature_ranges(cal, layer: int, module: str) -> pd.DataFrame:
    """EMA range 2*max(|min|,|max|) of every feature of each rank's partial: feature, rank, range."""
    ranges = cal.ranges()[layer, cal.module_index(module)].float().numpy()  # [tp, H]
    tp, hidden = ranges.shape
    return pd.DataFrame(dict(feature=np.tile(np.arange(hidden), tp), rank=np.repeat(np.arange(tp), hidden),
                             range=ranges.reshape(-1)))


def range_heatmap(cal, module: str) -> np.ndarray:
    """Range summed over ranks, [layers, features]: the selection score of every feature."""
    return cal.ranges()[:, cal.module_index(module)].sum(1).float().numpy()


def random_jaccard(hidden: int, k: int) -> float:
    """Expected Jaccard overlap of two random k-subsets of ``hidden`` features (the no-structure line)."""
    if k <= 0 or hidden <= 0:
        return 0.0
    inter = k * k / hidden
    return inter / (2 * k - inter)


def overlap_between_batches(cal, module: str, k: int) -> pd.DataFrame:
    """Per layer and batch: Jaccard of that batch's top-k (range summed over ranks) with the
    top-k of the final EMA, i.e. the selected set."""
    m = cal.module_index(module)
    batch = cal.batch_ranges()[:, :, m].sum(2)  # [B, L, H]
    ema = topk_sets(cal.ranges()[:, m].sum(1), k)  # [L, k]
    sets = topk_sets(batch, k)  # [B, L, k]
    rows = [dict(layer=layer, batch=b, jaccard=jaccard(sets[b, layer], ema[layer]))
            for b in range(sets.shape[0]) for layer in range(sets.shape[1])]
    return pd.DataFrame(rows, columns=["layer", "batch", "jaccard"])


def overlap_between_ranks(cal, layer: int, module: str, k: int) -> pd.DataFrame:
    """rank x rank Jaccard of each rank's own top-k at one site."""
    sets = topk_sets(cal.ranges()[layer, cal.module_index(module)], k)  # [tp, k]
    tp = sets.shape[0]
    data = [[jaccard(sets[i], sets[j]) for j in range(tp)] for i in range(tp)]
    return pd.DataFrame(data, index=[f"rank {i}" for i in range(tp)], columns=[f"rank {j}" for j in range(tp)])


def overlap_between_layers(cal, module: str, k: int) -> pd.DataFrame:
    """layer x layer Jaccard of the selected top-k sets (range summed over ranks)."""
    sets = topk_sets(cal.ranges()[:, cal.module_index(module)].sum(1), k)  # [L, k]
    n = sets.shape[0]
    data = [[jaccard(sets[i], sets[j]) for j in range(n)] for i in range(n)]
    return pd.DataFrame(data, index=list(range(n)), columns=list(range(n)))


def overlap_between_sources(cal_a, cal_b, k: int) -> pd.DataFrame:
    """Per layer and module: Jaccard of the selected sets of two calibrations of the same model
    and TP size (e.g. Wikipedia-style text vs Shakespeare)."""
    if cal_a.ranges().shape != cal_b.ranges().shape:
        raise ValueError(f"calibrations differ in shape {tuple(cal_a.ranges().shape)} vs "
                         f"{tuple(cal_b.ranges().shape)}: pick two of the same model and TP size")
    rows = []
    for m, module in enumerate(cal_a.meta.get("modules") or ROW_PARALLEL_MODULES):
        a = topk_sets(cal_a.ranges()[:, m].sum(1), k)
        b = topk_sets(cal_b.ranges()[:, m].sum(1), k)
        rows += [dict(layer=layer, module=module, jaccard=jaccard(a[layer], b[layer])) for layer in range(a.shape[0])]
    return pd.DataFrame(rows, columns=["layer", "module", "jaccard"])


def ema_trace_frame(cal, layer: int, module: str, feature: int) -> pd.DataFrame:
    """After each calibration batch: that batch's range of ``feature`` (summed over ranks) and
    the EMA the static scale comes from."""
    ema = ema_trace(cal, Site(layer, module), feature).float().numpy()
    batch = cal.batch_ranges()[:, layer, cal.module_index(module), :, feature].sum(-1).float().numpy()
    return pd.DataFrame(dict(batch=np.arange(len(ema)), batch_range=batch, ema_range=ema))
