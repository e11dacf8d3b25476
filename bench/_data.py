"""Synthetic partial sums for the benchmarks: seeded Gaussians whose consistent outlier features
(1/64 of them, the same on every rank) are ``OUTLIER_GAIN`` times larger, as the paper observes
in real partials. The one copy ``bench.collectives`` and ``bench.kernels`` both use."""
from __future__ import annotations

import torch

OUTLIER_GAIN = 20.0  # how much larger the synthetic consistent-outlier features are


def outlier_features(hidden: int, seed: int = 0) -> torch.Tensor:
    """The synthetic consistent-outlier features: 1/64 of them (at least one), same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(hidden, generator=g)[:max(1, hidden // 64)].sort().values


def synthetic_partial(tokens: int, hidden: int, rank: int = 0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Rank ``rank``'s partial sum [tokens, hidden]: seeded Gaussian, the outlier features larger."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + tokens * 31 + hidden)
    x = torch.randn(tokens, hidden, generator=g)
    x[:, outlier_features(hidden, seed)] *= OUTLIER_GAIN
    return x.to(dtype)
