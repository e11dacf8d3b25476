"""Calibration artifacts: which run made or used which, and loading one for the Outliers,
Layer error and Playground pages (the analysis itself is ``lowbit.analysis``)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from safetensors import SafetensorError

from launch.layout import calibration_folder
from launch.spec import JobSpec, SpecError
from launch.store.problems import ArtifactDamaged, ArtifactMissing, ArtifactOutdated
from launch.store.runs import load_spec, read_json, resolve_root
from lowbit import analysis
from lowbit.calibration import ARTIFACT_META, ARTIFACT_TENSORS, Calibration


def run_calibration_folder(run_id: str, spec: dict | None, root=None) -> Path | None:
    """Where the calibration a stored run made (calibrate) or used (evaluate) lives: the run layout's
    answer (``launch.layout.calibration_folder``) for the run's spec, None for other kinds or a
    spec that no longer reads."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("calibrate", "evaluate"):
        return None
    try:
        return calibration_folder(JobSpec.trusted(spec), run_id, resolve_root(root))
    except SpecError:  # a spec from another version (unknown fields): no calibration to show
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


def load_calibration(folder: str | Path) -> Calibration:
    """The artifact in ``folder`` (``lowbit.calibration.Calibration``). Raises
    ``ArtifactMissing`` (a file is not there), ``ArtifactDamaged`` (a file does not read) or
    ``ArtifactOutdated`` (a tensor this version reads is absent)."""
    folder = Path(folder)
    missing = [name for name in (ARTIFACT_TENSORS, ARTIFACT_META) if not (folder / name).exists()]
    if missing:
        raise ArtifactMissing(f"{' and '.join(missing)} missing in {folder.name}: the calibration was never "
                              "finished or its files were removed; calibrate again")
    try:
        return Calibration.load(folder)
    except FileNotFoundError as exc:  # removed between the check above and the read
        raise ArtifactMissing(f"{Path(exc.filename or folder).name} vanished while it was read; calibrate "
                              "again") from exc
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactDamaged(f"the files in {folder.name} cannot be read ({exc}); calibrate again") from exc
    except KeyError as exc:  # Calibration.load reads its tensors by name
        raise ArtifactOutdated(f"the artifact in {folder.name} has no tensor {exc}: it was written by another "
                               "version; calibrate again") from exc


def spikiest_stored_sample(calibration: Calibration) -> tuple[int, str, int]:
    """``lowbit.analysis.spikiest_sample``, with an artifact that stores no sample partials (made
    before they were recorded) named ``ArtifactOutdated``."""
    if calibration.sample is None:
        raise ArtifactOutdated("this calibration stores no sample partials (it was made before they were "
                               "recorded); calibrate again to see them")
    return analysis.spikiest_sample(calibration)
