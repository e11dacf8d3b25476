"""Fitted codebooks (scheme code ``lm<B>[s]``): one Lloyd-Max table per site and rank, from calibration.

Why: ``nf<B>`` places its levels for a normal distribution; the partials of a real site are not
quite normal (heavier tails before rotation, a peak at zero in sparse layers). Fitting the levels
to the site's own values (Lloyd-Max: each level the mean of the values nearest it) gives the
smallest squared error for that shape with the same bits.

What is fitted on: the calibration's stored partials (``Calibration.sample``: the first 16 tokens
of the first batch, [L, M, tp, 16, H]) of the site, each rank's taken through the same steps its
messages take before the codebook lookup (``lowbit.comm.collectives``): the ``-perm`` order, BF16
outlier columns left out (``top``/``rand``; with rotation zeroed first, then all H rotated), the
rotation, the message cut (gather: the whole row; two-shot: each of the tp chunks), sp/thr picks
left out (the 16 tokens taken as one message), then division by the scale the quantizer uses
(per-feature static absmax from the calibrated range, clamped to [-1, 1]; or the token's /
group's absmax rounded to the scale format). Zero scales and non-finite values are left out.

``table_scope`` ``rank`` (``lm<B>``) fits every rank's table on its own values; ``site``
(``lm<B>s``) one table on all ranks' values. Either way the fit (``lowbit.codebook.lloyd_max``)
is deterministic and reads only the shared artifact, so every receiver builds every sender's
table itself: nothing travels per message; the tables' size is ``lowbit.wire.accounting.table_bytes``.

    PYTHONPATH=. python -c "from lowbit.method.fitted_codebook import fit_tables; help(fit_tables)"
"""
from __future__ import annotations

import torch

from lowbit.codebook import lloyd_max
from lowbit.calibration import Calibration
from lowbit.quant import dynamic_qparams, static_qparams
from lowbit.rotation import rotate
from lowbit.scheme import QuantSpec, Scheme
from lowbit.site import Site
from lowbit.outliers import sparse_picks, threshold_select


def site_tables(calibration: Calibration, site: Site, scheme: Scheme, outlier_idx: torch.Tensor,
                perm: torch.Tensor | None = None) -> list[tuple[float, ...]]:
    """``fit_tables`` on the artifact's sample at ``site`` (in the ``perm`` order when given, with
    the calibrated static ranges for static scales); cached on the calibration, so the rank
    threads of one process and every communicator over the same artifact fit each site once."""
    key = (site, str(scheme))
    if key not in calibration.fitted:
        samples = site_samples(calibration, site)
        smin = smax = None
        if scheme.quant.granularity == "static":
            smin, smax = (torch.stack(t) for t in zip(*(calibration.rank_range(site, r) for r in range(calibration.tp))))
            smin, smax = smin.float(), smax.float()
        if perm is not None:
            samples = samples[:, :, perm]
        calibration.fitted[key] = fit_tables(samples, scheme, outlier_idx, smin, smax)
    return calibration.fitted[key]


def site_samples(calibration: Calibration, site: Site) -> torch.Tensor:
    """Every rank's stored partial at ``site``: [tp, S, H] fp32."""
    return torch.stack([calibration.site_sample(site, r).float() for r in range(calibration.tp)])


def _ratios(x: torch.Tensor, quant: QuantSpec, exclude: torch.Tensor, smin, smax) -> torch.Tensor:
    """1-D values x / scale of one message x [S, W] as the quantizer forms them (see the module
    docstring); ``exclude`` [S, W] marks values that are not coded."""
    finite = torch.isfinite(x)
    valid = finite & ~exclude
    x = torch.where(finite, x, 0.0)
    if quant.granularity == "static":
        scales, _ = static_qparams(quant, smin, smax)
        scales = scales.expand_as(x)
        ratio = (x / torch.where(scales > 0, scales, 1.0)).clamp(-1.0, 1.0)
        return ratio[valid & (scales > 0)]
    width = x.shape[-1] if quant.granularity == "token" else quant.group_size
    xg, vg = x.reshape(x.shape[0], -1, width), valid.reshape(x.shape[0], -1, width)
    scales, _ = dynamic_qparams(xg, vg, quant)
    scales = scales.unsqueeze(-1).expand_as(xg)
    ratio = xg / torch.where(scales > 0, scales, 1.0)
    return ratio[vg & (scales > 0)]


def _rank_values(x: torch.Tensor, scheme: Scheme, outlier_idx: torch.Tensor, smin, smax, tp: int) -> torch.Tensor:
    """The normalized values of one rank's sample x [S, H] (already in the -perm order)."""
    hidden = x.shape[-1]
    quant = scheme.quant
    out_mask = torch.zeros(hidden, dtype=torch.bool)
    out_mask[outlier_idx] = True
    if scheme.rotation is not None:
        x = rotate(torch.where(out_mask, 0.0, x), scheme.rotation)
        out_mask = torch.zeros(hidden, dtype=torch.bool)  # all H rotated features are coded
    width = hidden // tp if scheme.algo == "two_shot" else hidden
    values = []
    for start in range(0, hidden, width):
        cols = slice(start, start + width)
        xm = x[:, cols]
        exclude = out_mask[cols].expand_as(xm).clone()
        if scheme.sparse:
            exclude.scatter_(1, sparse_picks(xm, scheme.sparse), True)
        if scheme.threshold is not None:
            chosen, _ = threshold_select(xm, scheme.threshold.value, scheme.threshold.capacity(width))
            exclude[:, chosen] = True
        lo = None if smin is None else smin[cols]
        hi = None if smax is None else smax[cols]
        values.append(_ratios(xm, quant, exclude, lo, hi))
    return torch.cat(values)


def fit_tables(samples: torch.Tensor, scheme: Scheme, outlier_idx: torch.Tensor,
               static_min: torch.Tensor | None = None, static_max: torch.Tensor | None = None
               ) -> list[tuple[float, ...]]:
    """One fitted table per rank (identical ones for ``table_scope == "site"``) of an ``lm`` scheme.

    ``samples`` [tp, S, H]: the ranks' stored partials in the order the messages use (-perm
    applied); ``outlier_idx``: the BF16 columns in that order; ``static_min``/``static_max``
    [tp, H]: the static scales' ranges (static granularity only)."""
    quant = scheme.quant
    if quant.code != "lm":
        raise ValueError(f"code: {quant.code_text!r} has no fitted table; allowed: lm<B>[s]")
    tp = samples.shape[0]
    per_rank = [_rank_values(samples[r].float(), scheme, outlier_idx, None if static_min is None else static_min[r],
                             None if static_max is None else static_max[r], tp) for r in range(tp)]
    if quant.table_scope == "site":
        shared = tuple(lloyd_max(torch.cat(per_rank), quant.bits, pin_ends=quant.pin_ends).tolist())
        return [shared] * tp
    return [tuple(lloyd_max(v, quant.bits, pin_ends=quant.pin_ends).tolist()) for v in per_rank]
