"""Per-message outlier selection: which values of one message leave the quantizer and travel in BF16.

The static sets (``top<K>`` / ``rand<K>``) come from the calibration artifact
(``lowbit.calibration.select_outliers``); the two per-message mechanisms pick from the message
itself, on every sender, and send what they picked (``lowbit.wire.payload`` lays it out):

- ``sparse_picks`` (``sp<n>``): per token the ``n`` values of largest |x| (NaN ranks above +Inf,
  which ranks above every finite value; equal magnitudes: lower column first);
- ``threshold_select`` (``thr<T>c<K>``): the features whose largest |x| over the message's tokens
  exceeds T (a NaN or Inf counts as exceeding), at most C of them, the largest first.

The fitted codebook (``lowbit.codes.lm``) leaves the same values out of its sample, so it imports
these rules from here rather than from the payload layout.

    PYTHONPATH=. python -c "import torch; from lowbit.outliers import sparse_picks; print(sparse_picks(torch.randn(2, 8), 2))"
"""
from __future__ import annotations

import torch


def sparse_picks(x: torch.Tensor, n: int) -> torch.Tensor:
    """Column indices [T, n] of each token's ``n`` largest |x| (see the module docstring)."""
    magnitude = torch.where(torch.isnan(x), torch.inf, x.abs())
    order = torch.sort(magnitude, dim=-1, descending=True, stable=True).indices  # ties: lower column first
    # NaN above +Inf: a second stable sort on "is NaN" moves NaNs first and keeps the rest in order.
    is_nan = torch.isnan(x).gather(-1, order).to(torch.int8)
    order = order.gather(-1, torch.sort(is_nan, dim=-1, descending=True, stable=True).indices)
    return order[:, :n]


def threshold_select(x: torch.Tensor, threshold: float, capacity: int) -> tuple[torch.Tensor, int]:
    """(selected feature indices, ascending; overflow count) of the thr rule on x [T, H]."""
    score = torch.where(torch.isfinite(x), x.abs(), torch.inf).amax(0) if x.shape[0] else x.new_zeros(x.shape[1])
    over = score > threshold
    n_over = int(over.sum())
    if n_over == 0:
        return torch.empty(0, dtype=torch.long, device=x.device), 0
    order = torch.sort(torch.where(over, score, -1.0), descending=True, stable=True).indices
    chosen = order[:min(n_over, capacity)].sort().values
    return chosen, max(0, n_over - capacity)
