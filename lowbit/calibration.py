"""The calibration artifact: per-feature ranges of the communicated partial sums, and the BF16
outlier sets chosen from them.

``Calibration`` is what ``lowbit.method.calibrate`` measures and saves, and what the communicators
(``lowbit.comm``), the fitted codebook (``lowbit.codes.lm``), the playground and the pages read.
It lives apart from the procedure that makes it, so reading an artifact never imports the
calibration run (``lowbit.comm`` must not import ``lowbit.method``: an import-linter contract).

Tensors are indexed [layer, module, rank, feature] (``ema_min`` / ``ema_max``: the EMA of every
batch's min and max, the static scales; ``batch_min`` / ``batch_max``: every batch's, for the
consistency plots; ``sample``: the first ``SAMPLE_TOKENS`` tokens of the first batch's partial;
``sum_min`` / ``sum_max``: the EMA of the reduced sum's, a static two-shot second leg's scales).

Outlier selection (same indices on every rank): ``topk`` scores each feature by its range summed
over ranks and keeps the k = floor(k_frac * hidden) largest; ``random`` draws k features with a
seed; ``none`` keeps none.

    PYTHONPATH=. python -c "from lowbit.calibration import Calibration; help(Calibration.load)"
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.site import ROW_PARALLEL_MODULES, Site

ARTIFACT_TENSORS = "calibration.safetensors"
ARTIFACT_META = "calibration.json"
SAMPLE_TOKENS = 16  # smollm2-135m TP 3: 30 x 2 x 3 x 16 x 576 fp32 = 6.6 MB


class CalibrationError(ValueError):
    """Missing or mismatched calibration; the message names the field and what was expected."""


@dataclass
class Calibration:
    """Feature statistics of the partial sums: tensors indexed [layer, module, rank, feature]."""

    ema_min: torch.Tensor  # [L, M, tp, H]
    ema_max: torch.Tensor
    batch_min: torch.Tensor  # [batches, L, M, tp, H]
    batch_max: torch.Tensor
    meta: dict = field(default_factory=dict)
    sample: torch.Tensor | None = None  # [L, M, tp, S, H]: first S tokens of the first batch (older artifacts: None)
    sum_min: torch.Tensor | None = None  # [L, M, H]: EMA of the reduced sum's per-batch min (older artifacts: None)
    sum_max: torch.Tensor | None = None
    # fitted lm codebooks already built from this artifact, keyed by (site, scheme string): a
    # derived cache (lowbit.codes.lm.site_tables), never saved
    fitted: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def tp(self) -> int:
        return self.ema_min.shape[2]

    @property
    def hidden(self) -> int:
        return self.ema_min.shape[3]

    @property
    def layers(self) -> int:
        return self.ema_min.shape[0]

    @staticmethod
    def module_index(module: str) -> int:
        return ROW_PARALLEL_MODULES.index(module)

    def rank_range(self, site: Site, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """EMA (min, max) per feature of ``rank``'s partial at ``site``: the static scales."""
        m = self.module_index(site.module)
        return self.ema_min[site.layer, m, rank], self.ema_max[site.layer, m, rank]

    def sum_range(self, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """EMA (min, max) per feature of the reduced sum at ``site``: a static second leg's scales."""
        if self.sum_min is None or self.sum_max is None:
            raise CalibrationError("calibration: this artifact keeps no ranges of the reduced sum (made before "
                                   "they were recorded); run `python -m lowbit calibrate` again (force) to get "
                                   "them for a static two-shot second leg")
        m = self.module_index(site.module)
        return self.sum_min[site.layer, m], self.sum_max[site.layer, m]

    def ranges(self) -> torch.Tensor:
        """Per-rank range 2*max(|min|,|max|): [L, M, tp, H]."""
        return 2 * torch.maximum(self.ema_min.abs(), self.ema_max.abs())

    def batch_ranges(self) -> torch.Tensor:
        return 2 * torch.maximum(self.batch_min.abs(), self.batch_max.abs())

    def check_matches(self, model: str, tp: int) -> None:
        problems = []
        if self.meta.get("model") != model:
            problems.append(f"model {self.meta.get('model')!r} (job: {model!r})")
        if self.tp != tp:
            problems.append(f"TP size {self.tp} (job: {tp})")
        if problems:
            raise CalibrationError("calibration: artifact was made for " + " and ".join(problems)
                                   + "; run `python -m lowbit calibrate` for this model and TP size")

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"ema_min": self.ema_min.contiguous(), "ema_max": self.ema_max.contiguous(),
                   "batch_min": self.batch_min.contiguous(), "batch_max": self.batch_max.contiguous()}
        if self.sample is not None:
            tensors["sample"] = self.sample.contiguous()
        if self.sum_min is not None and self.sum_max is not None:
            tensors["sum_min"], tensors["sum_max"] = self.sum_min.contiguous(), self.sum_max.contiguous()
        save_file(tensors, str(folder / ARTIFACT_TENSORS))
        (folder / ARTIFACT_META).write_text(json.dumps(self.meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Calibration":
        folder = Path(folder)
        if not (folder / ARTIFACT_TENSORS).exists() or not (folder / ARTIFACT_META).exists():
            raise CalibrationError(f"calibration: no artifact in {folder} (expected {ARTIFACT_TENSORS} "
                                   f"and {ARTIFACT_META}); run `python -m lowbit calibrate` first")
        t = load_file(str(folder / ARTIFACT_TENSORS))
        return cls(t["ema_min"], t["ema_max"], t["batch_min"], t["batch_max"],
                   json.loads((folder / ARTIFACT_META).read_text()), t.get("sample"), t.get("sum_min"),
                   t.get("sum_max"))

    def site_sample(self, site: Site, rank: int) -> torch.Tensor:
        """The stored partial of ``rank`` at ``site``: [S, H] fp32 (see ``SAMPLE_TOKENS``)."""
        if self.sample is None:
            raise CalibrationError("calibration: this artifact keeps no sample partials (made before they were "
                                   "recorded); run `python -m lowbit calibrate` again to get them")
        if not 0 <= site.layer < self.layers or not 0 <= rank < self.tp:
            raise CalibrationError(f"calibration: no sample for layer {site.layer}, rank {rank}; allowed: "
                                   f"layers 0..{self.layers - 1}, ranks 0..{self.tp - 1}")
        return self.sample[site.layer, self.module_index(site.module), rank]


def select_outliers(calibration: Calibration | None, site: Site, outliers, hidden: int) -> torch.Tensor:
    """Sorted feature indices kept in BF16 at ``site`` (identical on every rank); how many is
    ``OutlierSpec.count`` (the scheme grammar owns that rule: 576 features at 1/64 -> 9)."""
    method, seed = outliers.select, outliers.seed
    if method == "none":
        return torch.empty(0, dtype=torch.long)
    k = outliers.count(hidden)
    if method == "random":
        gen = torch.Generator().manual_seed(seed * 1_000_003 + site.layer * 2 + ROW_PARALLEL_MODULES.index(site.module))
        return torch.randperm(hidden, generator=gen)[:k].sort().values
    if calibration is None:
        raise CalibrationError("calibration: top-k outlier selection needs a calibration artifact")
    score = calibration.ranges()[site.layer, Calibration.module_index(site.module)].sum(0)  # summed over ranks
    return score.topk(k).indices.sort().values
