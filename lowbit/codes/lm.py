"""The fitted codebook ``lm<B>[s][p]``: an index into 2**B levels fitted by Lloyd-Max per site (and rank).

Why: ``nf<B>`` places its levels for a normal distribution; the partials of a real site are not
quite normal (heavier tails before rotation, a peak at zero in sparse layers). Fitting the levels
to the site's own values (Lloyd-Max: each level the mean of the values nearest it) gives the
smallest squared error for that shape with the same bits.

Coding: as ``nf`` (scale = absmax, c = 1, nearest entry, ties to the lower entry) against the
table fitted for this site and sender, passed per call (``levels``: a sorted tuple of 2**B fp32
values in [-1, 1]); the stored code is the entry's index (``qrange``: 0 .. 2**B - 1). A fitted
table has no exact zero, so NaN decodes to the entry nearest 0 times the scale (still finite,
still touching nothing else); a zero scale still decodes to exactly 0. Quantizing or decoding
without a table is an error naming ``levels``.

What is fitted on (``site_tables``): the calibration's stored partials (``Calibration.sample``:
the first 16 tokens of the first batch, [L, M, tp, 16, H]) of the site, each rank's taken
through the same steps its messages take before the codebook lookup (``lowbit.comm.collectives``):
the ``-perm`` order, BF16 outlier columns left out (``top``/``rand``; with rotation zeroed first,
then all H rotated), the rotation, the message cut (gather: the whole row; two-shot: each of the
tp chunks), sp/thr picks left out (the 16 tokens taken as one message), then division by the
scale the quantizer uses (per-feature static absmax from the calibrated range, clamped to
[-1, 1]; or the group's absmax rounded to the scale format). Zero scales and non-finite values
are left out.

``lm<B>`` (table scope ``rank``) fits every rank's table on its own values; ``lm<B>s`` (``site``)
one table on all ranks' values; ``p`` (``pin_ends``) keeps the ends at -1 and +1 (each group's
absmax then decodes exactly). Either way the fit (``lowbit.codebook.lloyd_max``) is
deterministic and reads only the shared artifact, so every receiver builds every sender's table
itself: nothing travels per message; the tables' size is ``lowbit.wire.accounting.table_bytes``.

    PYTHONPATH=. python -c "from lowbit.codes.lm import fit_tables; help(fit_tables)"
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit import codebook
from lowbit.codes.base import CODES, Code, check_codebook
from lowbit.outliers import sparse_picks, threshold_select
from lowbit.plugins import SchemeError
from lowbit.quant import dynamic_qparams, static_qparams
from lowbit.rotation import rotate

FITTED_BITS = (2, 3, 4)  # lm<B>: 2**B levels fitted per site (and rank) on the calibration's sample
TABLE_SCOPES = ("rank", "site")  # lm<B>: one table per (site, rank); lm<B>s: one per site, shared by the ranks
TABLE_DTYPE = torch.float32  # a fitted table's entries, built once per run from the artifact
_RE = re.compile(r"lm(\d+)(a|s?p?)")


@CODES.register
@dataclass(frozen=True)
class LmCode(Code):
    name = "lm"
    order = 3
    syntax = "lm<B>[s][p]"
    help = ("Lloyd-Max codebook fitted per site (and rank; 's': one table per site, shared by its ranks; 'p': "
            "ends pinned at -1 and +1) on calibration, B in 2,3,4; symmetric scale")
    guide = """\
lm<B>[s] (fitted non-uniform code, Lloyd-Max / 1-D k-means): as nf<B>, but the 2**B levels
are fitted on the calibration's stored partials (the first 16 tokens of the first batch at
every site and rank) after the quantizer's own normalization (rotation if any, then / the
feature's / token's / group's absmax), so they lie in [-1, 1] and follow this site's shape.
lm<B>: one table per (site, rank); lm<B>s: one per site, fitted on all its ranks' samples.
lm<B>p / lm<B>sp: the first and last levels stay at -1 and +1 (only the others are fitted),
so each token's / group's absmax decodes exactly, as with nf and int; unpinned, the fit
puts the ends where the squared error is smallest (about +-0.65 for 3-bit per-token tables
on SmolLM2), clipping the largest value of every token.
Deterministic (quantile init, fixed iterations, float64 then fp32), so every rank builds
every sender's table from the shared artifact: 0 bits per message; the tables' one-time size
(2**B fp32 per site and rank, or per site) is reported apart. Needs a calibration."""
    options = ("table_scope", "pin_ends")
    needs_calibration = True
    table_scope: str = "rank"  # whose sample a table is fitted on (TABLE_SCOPES)
    pin_ends: bool = False  # lm<B>p: the end levels stay at -1 and +1, the absmax decodes exactly

    @classmethod
    def parse(cls, text: str, pos: int):
        m = _RE.match(text, pos)
        if not m:
            return None
        suffix = m.group(2)
        return cls(int(m.group(1)), suffix != "a", "site" if "s" in suffix else "rank", "p" in suffix), m.end()

    @classmethod
    def choices(cls) -> list["LmCode"]:
        return [cls(b) for b in FITTED_BITS]

    def __str__(self) -> str:
        return (f"lm{self.bits}" + ("a" if not self.symmetric else "") + ("s" if self.table_scope == "site" else "")
                + ("p" if self.pin_ends else ""))

    def validate(self, spec) -> None:
        check_codebook(self, spec, "fitted lm", FITTED_BITS, "the lm codebook is scaled by the absmax like nf; "
                                                             "allowed: lm<B>[s] without 'a' (its fitted levels need "
                                                             "not be symmetric)")
        if self.table_scope not in TABLE_SCOPES:
            raise SchemeError("table_scope", f"{self.table_scope!r} not allowed; allowed: {', '.join(TABLE_SCOPES)}")

    def check_levels(self, levels) -> None:
        lv = levels
        if lv is None:
            raise ValueError(f"levels: {self} has no fitted table; allowed: the table fitted on a calibration "
                             "(lowbit.codes.lm.site_tables; a QuantCommunicator does it), passed as levels=")
        ok = (isinstance(lv, tuple) and len(lv) == 2**self.bits
              and all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in lv)
              and all(a <= b for a, b in zip(lv, lv[1:])))
        if ok and self.pin_ends:
            ok = lv[0] == -1.0 and lv[-1] == 1.0
        if not ok:
            raise SchemeError("levels", f"{lv!r} not allowed; allowed: a sorted tuple of {2**self.bits} "
                                        "floats in [-1, 1] (the fitted table)"
                                        + (" from -1 to +1 (pinned ends)" if self.pin_ends else ""))

    def _table(self, levels) -> torch.Tensor:
        self.check_levels(levels)
        return torch.tensor(levels, dtype=TABLE_DTYPE)

    def encode(self, ratio: torch.Tensor, *, seed: int | None = None, levels=None) -> torch.Tensor:
        return codebook.nearest_index(ratio, self.bits, self._table(levels).to(ratio.device)).to(torch.float32)

    def decode(self, codes: torch.Tensor, *, levels=None) -> torch.Tensor:
        return codebook.decode_values(codes, self.bits, self._table(levels))

    def grid(self, levels=None) -> dict:
        return dict(levels=list(self._table(levels).tolist()), edges=(-1.0, 1.0))

    @property
    def table_bytes(self) -> int:
        return 2**self.bits * TABLE_DTYPE.itemsize

    def tables_per_site(self, tp: int) -> int:
        return tp if self.table_scope == "rank" else 1

    def site_levels(self, calibration, site, scheme, outlier_idx, perm):
        return site_tables(calibration, site, scheme, outlier_idx, perm)


# -- the fit ---------------------------------------------------------------------------------------
def site_tables(calibration, site, scheme, outlier_idx: torch.Tensor,
                perm: torch.Tensor | None = None) -> list[tuple[float, ...]]:
    """``fit_tables`` on the artifact's sample at ``site`` (in the ``perm`` order when given, with
    the calibrated static ranges for static scales); cached on the calibration, so the rank
    threads of one process and every communicator over the same artifact fit each site once."""
    key = (site, str(scheme))
    if key not in calibration.fitted:
        samples = torch.stack([calibration.site_sample(site, r).float() for r in range(calibration.tp)])
        smin = smax = None
        if not scheme.quant.grouping.dynamic:
            smin, smax = (torch.stack(t) for t in zip(*(calibration.rank_range(site, r) for r in range(calibration.tp))))
            smin, smax = smin.float(), smax.float()
        if perm is not None:
            samples = samples[:, :, perm]
        calibration.fitted[key] = fit_tables(samples, scheme, outlier_idx, smin, smax)
    return calibration.fitted[key]


def _ratios(x: torch.Tensor, quant, exclude: torch.Tensor, smin, smax) -> torch.Tensor:
    """1-D values x / scale of one message x [S, W] as the quantizer forms them (see the module
    docstring); ``exclude`` [S, W] marks values that are not coded."""
    finite = torch.isfinite(x)
    valid = finite & ~exclude
    x = torch.where(finite, x, 0.0)
    if not quant.grouping.dynamic:
        scales, _ = static_qparams(quant, smin, smax)
        scales = scales.expand_as(x)
        ratio = (x / torch.where(scales > 0, scales, 1.0)).clamp(-1.0, 1.0)
        return ratio[valid & (scales > 0)]
    xg, vg = quant.grouping.group(x, valid)
    scales, _ = dynamic_qparams(xg, vg, quant)
    scales = scales.unsqueeze(-1).expand_as(xg)
    ratio = xg / torch.where(scales > 0, scales, 1.0)
    return ratio[vg & (scales > 0)]


def _rank_values(x: torch.Tensor, scheme, outlier_idx: torch.Tensor, smin, smax, tp: int) -> torch.Tensor:
    """The normalized values of one rank's sample x [S, H] (already in the -perm order)."""
    hidden = x.shape[-1]
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
        values.append(_ratios(xm, scheme.quant, exclude, lo, hi))
    return torch.cat(values)


def fit_tables(samples: torch.Tensor, scheme, outlier_idx: torch.Tensor,
               static_min: torch.Tensor | None = None, static_max: torch.Tensor | None = None
               ) -> list[tuple[float, ...]]:
    """One fitted table per rank (identical ones for table scope ``site``) of an ``lm`` scheme.

    ``samples`` [tp, S, H]: the ranks' stored partials in the order the messages use (-perm
    applied); ``outlier_idx``: the BF16 columns in that order; ``static_min``/``static_max``
    [tp, H]: the static scales' ranges (static granularity only)."""
    code = scheme.quant.code
    if not isinstance(code, LmCode):
        raise ValueError(f"code: {str(code)!r} has no fitted table; allowed: lm<B>[s]")
    tp = samples.shape[0]
    per_rank = [_rank_values(samples[r].float(), scheme, outlier_idx, None if static_min is None else static_min[r],
                             None if static_max is None else static_max[r], tp) for r in range(tp)]
    if code.table_scope == "site":
        shared = tuple(codebook.lloyd_max(torch.cat(per_rank), code.bits, pin_ends=code.pin_ends).tolist())
        return [shared] * tp
    return [tuple(codebook.lloyd_max(v, code.bits, pin_ends=code.pin_ends).tolist()) for v in per_rank]
