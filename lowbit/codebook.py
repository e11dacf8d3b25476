"""Non-uniform codes: the fixed normal-quantile codebook (``nf<B>``), fitted tables (``lm<B>``),
and the one nearest-entry coder both use.

Why: a uniform grid spends as many levels on the rare large values as on the crowd near zero.
Partial sums are roughly bell-shaped, so levels placed at quantiles of a normal distribution
(the idea of NF4 in QLoRA) leave less error on the typical value for the same bits.

The codebook of ``B`` bits (B in 3, 4) has ``2**B`` entries in [-1, 1], built once in float64
and rounded once to fp32 (``Phi^-1`` is the standard normal quantile, ``torch.special.ndtri``)::

    n = 2**B,  delta = 1 / (2 n),  top = Phi^-1(1 - delta)
    side(m)  = [Phi^-1(1/2 + (1/2 - delta) * i / m) / top  for i = 1..m]
    codebook = sorted(-side(n/2 - 1)) + [0] + side(n/2)

so it has an exact zero (NaN inputs and all-zero groups decode to exactly 0), ends at exactly -1
and +1, and has one more positive level than negative ones (like NF4). It is a constant: the
same for every message, site, rank and run ("static per layer/module": a different code at one
site is a per-site override of the scheme map).

Quantizing ``v = x / scale`` (scale = absmax of the feature / token / group, no constant factor)
picks the nearest entry. Tie rule: ``v`` exactly on the midpoint of two neighbours goes to the
lower (more negative) entry; the midpoints are fp32 values computed from the fp32 entries.
-Inf and values below -1 go to the first entry, +Inf and values above 1 to the last. Every
|v| <= 1 is within ``max_gap(B) / 2`` of its entry, so the error is at most
``scale * max_gap(B) / 2`` (plus fp32 rounding).

Fitted tables (scheme code ``lm<B>``, B in 2, 3, 4): ``lloyd_max`` fits ``2**B`` levels to a
1-D sample (Lloyd-Max quantizer = 1-D k-means under squared error): start at the sample's
quantiles ``(i + 1/2) / 2**B`` (float64), then at most ``LLOYD_ITERS`` rounds of "cut at the
midpoints, move each level to the mean of its cell" (an empty cell keeps its level; it stops
early when no level moves), then round once to fp32. Nothing random, so every rank fitting the same sample gets the same table
(``lowbit.codes.lm`` says which sample). A fitted table has no exact zero and its
ends need not reach +-1, so its error bound uses ``table_max_gap``: the largest of the gaps
between neighbours and twice each end's distance to +-1. Every function below that takes
``table`` (sorted fp32 entries) codes against it instead of ``codebook(bits)``: the same
midpoints, the same tie rule (a midpoint goes to the lower entry), the same clamping of +-Inf.

    PYTHONPATH=. python -c "from lowbit.codebook import codebook; print(codebook(4))"
"""
from __future__ import annotations

import functools

import torch

CODEBOOK_BITS = (3, 4)
LLOYD_ITERS = 1000  # at most; a fixed cap (and the exact stop below) keeps the fit the same on every rank


def _check(bits: int) -> None:
    if bits not in CODEBOOK_BITS:
        raise ValueError(f"bits: {bits} not allowed for the codebook; allowed: {', '.join(map(str, CODEBOOK_BITS))}")


@functools.lru_cache(maxsize=4)
def codebook(bits: int) -> torch.Tensor:
    """The ``2**bits`` sorted fp32 entries in [-1, 1] (see the module docstring)."""
    _check(bits)
    n = 2**bits
    delta = 1.0 / (2 * n)
    top = torch.special.ndtri(torch.tensor(1.0 - delta, dtype=torch.float64))

    def side(m: int) -> torch.Tensor:
        probs = 0.5 + (0.5 - delta) * torch.arange(1, m + 1, dtype=torch.float64) / m
        return torch.special.ndtri(probs) / top

    values = torch.cat([-side(n // 2 - 1).flip(0), torch.zeros(1, dtype=torch.float64), side(n // 2)])
    return values.to(torch.float32)


@functools.lru_cache(maxsize=4)
def boundaries(bits: int) -> torch.Tensor:
    """fp32 midpoints between neighbouring entries [2**bits - 1] (the decision thresholds)."""
    c = codebook(bits).to(torch.float64)
    return ((c[1:] + c[:-1]) / 2).to(torch.float32)


def zero_index(bits: int) -> int:
    """Index of the exact-zero entry: the number of negative entries, 2**(bits-1) - 1."""
    _check(bits)
    return 2 ** (bits - 1) - 1


def max_gap(bits: int) -> float:
    """Largest distance between neighbouring entries (twice the worst in-range error / scale)."""
    c = codebook(bits)
    return float((c[1:] - c[:-1]).max())


def table_boundaries(table: torch.Tensor) -> torch.Tensor:
    """fp32 midpoints between neighbouring entries of a sorted table (computed in float64)."""
    c = table.to(torch.float64)
    return ((c[1:] + c[:-1]) / 2).to(torch.float32)


def table_max_gap(table: torch.Tensor) -> float:
    """Twice the worst in-range error / scale of a sorted table in [-1, 1]: the largest gap between
    neighbours, or twice the distance from an end entry to +-1 (for ``codebook(bits)``, whose ends
    are +-1, this is ``max_gap(bits)``)."""
    c = table.to(torch.float64)
    ends = torch.stack([2 * (c[0] + 1), 2 * (1 - c[-1])])
    return float(torch.cat([c[1:] - c[:-1], ends]).max())


def lloyd_max(values: torch.Tensor, bits: int, iters: int = LLOYD_ITERS, pin_ends: bool = False) -> torch.Tensor:
    """The ``2**bits`` sorted fp32 levels fitted to the finite ``values`` (any shape, in [-1, 1])
    by Lloyd-Max (see the module docstring); an empty sample gives ``2**bits`` zeros (with
    ``pin_ends``: -1, zeros, +1). ``pin_ends`` keeps the first and last level at -1 and +1 and
    fits the others: the absmax of every token / group (which is +-1 after the division) then
    decodes exactly, as with ``nf`` and the uniform grid."""
    n = 2**bits
    v = values.reshape(-1).to(torch.float64)
    v = v[torch.isfinite(v)].sort().values
    fixed = torch.zeros(n, dtype=torch.bool)
    if pin_ends:
        fixed[0] = fixed[-1] = True
    ends = torch.zeros(n, dtype=torch.float64)
    ends[0], ends[-1] = -1.0, 1.0
    if v.numel() == 0:
        return torch.where(fixed, ends, 0.0).to(torch.float32)
    levels = torch.quantile(v, (torch.arange(n, dtype=torch.float64) + 0.5) / n)
    levels = torch.where(fixed, ends, levels).sort().values
    for _ in range(iters):
        cells = torch.searchsorted((levels[1:] + levels[:-1]) / 2, v, right=False)  # ties: the lower level
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, cells, v)
        counts = torch.bincount(cells, minlength=n).to(torch.float64)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
        new = torch.where(fixed, ends, new).sort().values
        if torch.equal(new, levels):
            break
        levels = new
    return levels.clamp(-1.0, 1.0).to(torch.float32)


def nearest_index(v: torch.Tensor, bits: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """Index (int64, same shape) of the entry nearest each fp32 ``v``; ties go to the lower entry.

    Entries: ``table`` (sorted fp32, a fitted ``lm`` table) or else ``codebook(bits)``. ``v`` must
    hold no NaN (callers map NaN to 0 first); +-Inf go to the end entries.
    """
    b = (boundaries(bits) if table is None else table_boundaries(table)).to(v.device)
    # searchsorted(..., right=False) counts the midpoints strictly below v: a v equal to a
    # midpoint stays with the lower entry, as the docstring's tie rule says.
    return torch.searchsorted(b, v.contiguous(), right=False)


def decode_values(indices: torch.Tensor, bits: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 entries of ``table`` (default ``codebook(bits)``) for uint8/int64 ``indices`` (same shape)."""
    return (codebook(bits) if table is None else table).to(indices.device)[indices.long()]
