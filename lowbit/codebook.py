"""Non-uniform codes (scheme code ``nf<B>``): a fixed codebook of normal quantiles.

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

    PYTHONPATH=. python -c "from lowbit.codebook import codebook; print(codebook(4))"
"""
from __future__ import annotations

import functools

import torch

CODEBOOK_BITS = (3, 4)


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


def nearest_index(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Index (int64, same shape) of the entry nearest each fp32 ``v``; ties go to the lower entry.

    ``v`` must hold no NaN (callers map NaN to 0 first); +-Inf go to the end entries.
    """
    b = boundaries(bits).to(v.device)
    # searchsorted(..., right=False) counts the midpoints strictly below v: a v equal to a
    # midpoint stays with the lower entry, as the docstring's tie rule says.
    return torch.searchsorted(b, v.contiguous(), right=False)


def decode_values(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 codebook entries for uint8/int64 ``indices`` (same shape)."""
    return codebook(bits).to(indices.device)[indices.long()]
