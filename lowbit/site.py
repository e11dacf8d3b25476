"""Where a partial sum is communicated: ``Site`` (layer, module) and the row-parallel module names.

The one owner of the names ``o_proj`` / ``down_proj`` (the HF TP plan's ``rowwise`` linears of a
decoder layer, attention first). Schemes, communicators, calibration, the results store and the
pages import them from here.
"""
from __future__ import annotations

from dataclasses import dataclass

ROW_PARALLEL_MODULES = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Site:
    """Where a partial sum is communicated: decoder layer index and row-parallel module."""

    layer: int
    module: str

    def __str__(self) -> str:
        return f"L{self.layer}.{self.module}"
