"""The run directory layout: the one place that knows where a run's files live.

    runs/                       LOWBIT_RUNS, default ./runs
      index.sqlite              the run index (launch.index)
      queue.lock                held by the process that schedules jobs (launch.queue)
      <run id>/
        spec.json               the validated JobSpec
        events.jsonl            progress lines appended by rank 0 (launch.events)
        result.json             rank 0's result; a kind may add *.parquet / *.json next to it
        error.json              torchrun's root-cause error file (``@record`` on the worker)
        logs/launcher.log       torchrun's own stdout+stderr (ranks tee'd with a [rank] prefix)
        logs/<torchrun id>/attempt_0/<rank>/{stdout,stderr}.log, error.json   per-rank files
        slurm.json              executor slurm: job ids and the sbatch command line (launch.executors.slurm)
        slurm.sbatch            executor slurm: the batch script (slurm-prepare.sbatch: a sweep's first job)
        logs/task-<i>.log, logs/error-task-<i>.json   executor slurm: array task i's output and error file

Every path handed out here is checked to stay inside the runs root: run ids are restricted to
``RUN_ID_PATTERN`` and file names a job writes go through ``RunPaths.file``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from lowbit.artifacts import CALIBRATE_DEFAULTS, calibration_cache_dir

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FILE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Files of a run directory that are bookkeeping, not results.
BOOKKEEPING_FILES = frozenset({"spec.json", "events.jsonl", "error.json", "slurm.json"})


class UnsafePath(ValueError):
    """An id or file name that could leave the runs root."""


def runs_root() -> Path:
    """The runs root: ``$LOWBIT_RUNS`` or ``./runs`` (resolved to an absolute path)."""
    return Path(os.environ.get("LOWBIT_RUNS") or "runs").resolve()


def run_id_problem(run_id: object) -> str | None:
    """Why ``run_id`` is not a safe run id, or None."""
    if not isinstance(run_id, str):
        return f"must be a string, got {type(run_id).__name__}"
    if ".." in run_id:
        return "must not contain '..'"
    if not RUN_ID_PATTERN.match(run_id):
        return "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} (letters, digits, '.', '_', '-'; no '/')"
    return None


def check_run_id(run_id: object) -> str:
    problem = run_id_problem(run_id)
    if problem:
        raise UnsafePath(f"run id {run_id!r}: {problem}")
    return run_id  # type: ignore[return-value]


def new_run_id(kind: str) -> str:
    """A fresh, sortable, unique run id such as ``20250101-120000-generate-3f9a1c``."""
    safe_kind = re.sub(r"[^A-Za-z0-9-]", "-", kind)[:20] or "job"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{safe_kind}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RunPaths:
    """Where the files of one run live."""

    root: Path
    run_id: str

    def __post_init__(self):
        check_run_id(self.run_id)
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def dir(self) -> Path:
        return self.root / self.run_id

    @property
    def spec(self) -> Path:
        return self.dir / "spec.json"

    @property
    def events(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def result(self) -> Path:
        return self.dir / "result.json"

    @property
    def error(self) -> Path:
        """torchrun's root-cause error file (TORCHELASTIC_ERROR_FILE of the launcher)."""
        return self.dir / "error.json"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def launcher_log(self) -> Path:
        return self.logs / "launcher.log"

    @property
    def slurm_record(self) -> Path:
        """A Slurm run's job ids and submit command (``launch.executors.slurm``)."""
        return self.dir / "slurm.json"

    def slurm_script(self, piece: str | None = None) -> Path:
        """The batch script of the run (or of one ``piece`` of it, e.g. ``prepare``)."""
        return self.dir / (f"slurm-{piece}.sbatch" if piece else "slurm.sbatch")

    def piece_log(self, piece: str) -> Path:
        """Slurm's output file of one piece of the run (``task-<i>``, ``prepare``)."""
        return self.logs / f"{piece}.log"

    def piece_error(self, piece: str) -> Path:
        """torchrun's root-cause error file of one piece of the run."""
        return self.logs / f"error-{piece}.json"

    def rank_logs(self) -> list[Path]:
        """Per-rank stdout/stderr logs written by torchrun under ``logs/`` (all attempts)."""
        if not self.logs.is_dir():
            return []
        return sorted(p for p in self.logs.rglob("*.log") if p != self.launcher_log)

    def rank_error_files(self) -> list[Path]:
        """Per-rank error files written by ``@record`` (torchrun puts them next to the logs)."""
        if not self.logs.is_dir():
            return []
        return sorted(self.logs.rglob("error.json"))

    def file(self, name: str) -> Path:
        """A result file a job kind may write (a plain name, no directories)."""
        if not isinstance(name, str) or ".." in name or not FILE_NAME_PATTERN.match(name):
            raise UnsafePath(f"result file name {name!r} must be a plain name matching {FILE_NAME_PATTERN.pattern}")
        return self.dir / name

    def result_files(self) -> list[str]:
        """Names of the result files present (result.json first, then other json/parquet)."""
        if not self.dir.is_dir():
            return []
        names = sorted(p.name for p in self.dir.iterdir()
                       if p.is_file() and p.suffix in (".json", ".parquet") and p.name not in BOOKKEEPING_FILES)
        return sorted(names, key=lambda n: n != "result.json")

    def make(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)


def run_paths(run_id: str, root: Path | None = None) -> RunPaths:
    return RunPaths(root or runs_root(), run_id)


def index_path(root: Path | None = None) -> Path:
    return (root or runs_root()) / "index.sqlite"


def queue_lock_path(root: Path | None = None) -> Path:
    return (root or runs_root()) / "queue.lock"


def queue_log_path(root: Path | None = None) -> Path:
    """Where a background queue server started by the CLI writes its own output."""
    return (root or runs_root()) / "queue.log"


CALIBRATION_DIR = "calibration"  # inside a calibrate run's directory


def calibration_params(spec, **overrides) -> dict:
    """The calibration a job spec (``launch.spec.JobSpec``) asks for: ``CALIBRATE_DEFAULTS``
    overridden by ``spec.params`` and then by ``overrides`` (a kind's own defaults, e.g. the
    sweep's seq_len), text from ``calib_data``, chunks of ``calib_tokens``."""
    p = {k: overrides.get(k, spec.params.get(k, v)) for k, v in CALIBRATE_DEFAULTS.items() if k != "chunks"}
    p.update(model=spec.model, source=spec.calib_data, chunks=max(1, spec.calib_tokens // p["seq_len"]))
    return p


def calibration_folder(spec, run_id: str | None = None, root: Path | None = None, **overrides) -> Path:
    """The one answer to "where is this run's calibration": a calibrate run's own
    ``runs/<id>/calibration``; else the ``calib_from`` run's; else the shared cache folder named
    by the spec's calibration parameters (``lowbit.artifacts.calibration_cache_dir``)."""
    root = Path(root) if root else runs_root()
    if spec.kind == "calibrate":
        return RunPaths(root, run_id or spec.run_id).dir / CALIBRATION_DIR
    if spec.calib_from:
        return RunPaths(root, spec.calib_from).dir / CALIBRATION_DIR
    p = calibration_params(spec, **overrides)
    return calibration_cache_dir(spec.model, spec.tp, p["source"], p["chunks"], p["seq_len"], p["gamma"])


def tail_text(path: Path, lines: int) -> str | None:
    """The last ``lines`` lines of a text file (read from its last 64 kB), or None when it cannot
    be read or is empty."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:]) or None


def read_json(path: Path):
    """The JSON value of a run file, or None when it is missing or does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
