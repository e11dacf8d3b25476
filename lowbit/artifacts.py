"""Where lowbit keeps what it computes once: the cache root and the shared calibration folders.

    PYTHONPATH=. python -c "from lowbit.artifacts import calibration_cache_dir as d; print(d('smollm2-135m', 3))"

Stdlib only, so the job layer (``launch.layout``, the one owner of a run's calibration folder)
can name a folder without importing torch. ``CALIBRATE_DEFAULTS`` are the calibration parameters
a job uses when its spec does not set them; the cached folder's name is made of them.
"""
from __future__ import annotations

import os
from pathlib import Path

CALIBRATE_DEFAULTS = dict(source="wikipedia", chunks=16, seq_len=256, batch_size=4, gamma=0.01)


def cache_root() -> Path:
    """``$LOWBIT_CACHE`` or ``~/.cache/lowbit``: converted models and shared calibrations."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def calibration_cache_dir(model: str, tp: int, source: str = CALIBRATE_DEFAULTS["source"],
                          chunks: int = CALIBRATE_DEFAULTS["chunks"], seq_len: int = CALIBRATE_DEFAULTS["seq_len"],
                          gamma: float = CALIBRATE_DEFAULTS["gamma"]) -> Path:
    """The shared calibration folder of (model, TP size, text source, chunks x seq_len, gamma)."""
    safe = model.replace("/", "--")
    return cache_root() / "calib" / f"{safe}-tp{tp}-{source}-{chunks}x{seq_len}-g{gamma:g}"
