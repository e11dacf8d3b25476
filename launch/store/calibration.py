"""Calibration artifacts: which run made or used which, and loading one for the Outliers,
Layer error and Playground pages (the analysis itself is ``lowbit.analysis``)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from launch.layout import calibration_folder
from launch.spec import JobSpec
from launch.store.runs import load_spec, read_json, resolve_root
from lowbit.calibration import Calibration


def run_calibration_folder(run_id: str, spec: dict | None, root=None) -> Path | None:
    """Where the calibration a stored run made (calibrate) or used (evaluate) lives: the run layout's
    answer (``launch.layout.calibration_folder``) for the run's spec, None for other kinds or a
    spec that no longer reads."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("calibrate", "evaluate"):
        return None
    try:
        return calibration_folder(JobSpec.trusted(spec), run_id, resolve_root(root))
    except Exception:  # noqa: BLE001 - a spec that no longer maps to a folder has no calibration to show
        return None


CALIBRATION_COLUMNS = ["folder", "run_id", "kind", "model", "tp", "source", "batches", "tokens", "hidden", "layers",
                       "gamma", "created", "label"]


def calibration_sources(frame: pd.DataFrame, root=None) -> pd.DataFrame:
    """Every calibration artifact that a done calibrate/evaluate run made or used (one row per
    folder, the newest run naming it), read from its calibration.json only."""
    rows, seen = [], set()
    for _, run in frame.iterrows():
        if run["kind"] not in ("calibrate", "evaluate") or run["status"] not in ("done", "unindexed"):
            continue
        folder = run_calibration_folder(run["id"], load_spec(run["id"], root), root)
        if folder is None or str(folder) in seen:
            continue
        meta, problem = read_json(folder / "calibration.json")
        if problem or not isinstance(meta, dict) or not (folder / "calibration.safetensors").exists():
            continue
        seen.add(str(folder))
        rows.append(dict(folder=str(folder), run_id=run["id"], kind=run["kind"], model=meta.get("model"),
                         tp=meta.get("tp"), source=meta.get("source"), batches=meta.get("batches"),
                         tokens=meta.get("tokens"), hidden=meta.get("hidden"), layers=meta.get("layers"),
                         gamma=meta.get("gamma"), created=meta.get("created"),
                         label=f"{meta.get('model')} TP {meta.get('tp')} · {meta.get('source')} · "
                               f"{meta.get('tokens')} tokens · {run['kind']} {run['id']}"))
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def load_calibration(folder: str | Path):
    """The artifact in ``folder`` (``lowbit.calibration.Calibration``); raises CalibrationError."""
    return Calibration.load(folder)
