"""No tracked file holds an absolute path of the machine that wrote it (issue 24): result files,
docs and code name paths relative to the repository root (``runs/<run id>/...``), so a number's
source line reads the same on every clone and says nothing about one machine.

    .venv/bin/python -m pytest tests/test_no_machine_paths.py -q

What is scanned: the content of every file ``git ls-files`` lists, text files only (a file with a
NUL byte in its first 8 KiB is binary, e.g. the README's screenshot). What counts: a literal
absolute path under a home folder, a temp folder or a work folder (``MACHINE_FOLDERS``: root,
home, Users; tmp, var/tmp, dev/shm, macOS' private/var/folders; work, workspace, scratch, mnt),
written where a path starts (not a relative path's inner part such as ``runs/tmp/``). This
docstring names them without their leading slash, as any text about them must. No file is excluded:
tests build their temp paths at run time (``tmp_path``, ``tempfile``), never as literals, and
this file writes its patterns so that they do not match themselves. System paths a tool really
uses (``/usr/bin/chromium``, ``/run/lowbit-cluster/``, ``/proc``) are not machine-specific and
are not matched. ``lowbit.provenance`` is how code writes a path into a result file.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from lowbit.provenance import command_line, portable_path
from tests.conftest import REPO

# a folder name after a leading "/" that is not part of a longer path or word
MACHINE_FOLDERS = ["root", "home", "Users", "tmp", "var/tmp", "dev/shm", "private/var/folders", "work", "workspace",
                   "scratch", "mnt"]
MACHINE_PATH = re.compile(r"(?<![\w.~$])/(?:" + "|".join(re.escape(f) for f in MACHINE_FOLDERS) + r")(?![\w.-])")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"git ls-files failed in {REPO.name}: {exc}")
    return [name for name in out.stdout.decode().split("\0") if name]


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line holding a machine path."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if MACHINE_PATH.search(line)]


def test_the_pattern_finds_machine_paths_and_leaves_relative_and_system_paths():
    hits = ["--calibration /wo" + "rk/main/runs/x/calibration", '"cache_root": "/t' + "mp/coldcache\"",
            "~ is /ro" + "ot", "file:///ho" + "me/u/x", "TMP=/va" + "r/tmp/x"]
    misses = ["runs/tmp/x", "--calibration runs/x/calibration", "$TMPDIR/coldcache", "~/.cache/lowbit",
              "/usr/bin/chromium", "/run/lowbit-cluster/", "/rootfs", "https://example.org/tmp/x", "a/work/b"]
    assert [s for s in hits if not MACHINE_PATH.search(s)] == []
    assert [s for s in misses if MACHINE_PATH.search(s)] == []


def test_no_tracked_file_holds_an_absolute_machine_path():
    found = []
    for name in tracked_files():
        path = REPO / name
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        found += [f"{name}:{n}: {line[:160]}" for n, line in machine_paths(data.decode("utf-8", errors="replace"))]
    assert not found, ("absolute machine paths in tracked files (write them relative to the repository root, "
                       "as runs/<run id>/..., or build them at run time):\n" + "\n".join(found))


def test_result_paths_are_written_relative_to_the_repo_and_the_runs_root(tmp_path, monkeypatch):
    runs = tmp_path / "elsewhere" / "runs"
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    assert portable_path(REPO / "bench" / "results" / "x.json") == "bench/results/x.json"
    assert portable_path(runs / "r1" / "calibration", roots=dict(runs=runs)) == "runs/r1/calibration"
    assert portable_path(tmp_path / "cache" / "calib" / "c") == "$LOWBIT_CACHE/calib/c"
    assert portable_path("bench/results/x.json") == "bench/results/x.json"  # relative: as given
    line = command_line("bench.x", ["--calibration", str(runs / "r1" / "calibration"), f"--out={REPO / 'o.json'}",
                                    "--tasks", ""], roots=dict(runs=runs))
    assert line == "python -m bench.x --calibration runs/r1/calibration --out=o.json --tasks ''"
    assert not MACHINE_PATH.search(portable_path(tmp_path / "a" / "b"))


def test_a_bench_script_records_its_command_and_folders_without_machine_paths(tmp_path, monkeypatch, capsys):
    from bench.outliers import main
    from tests.test_outliers import synthetic_calibration
    monkeypatch.setenv("LOWBIT_RUNS", str(tmp_path / "runs"))
    folder = synthetic_calibration().save(tmp_path / "runs" / "r1" / "calibration")
    out = tmp_path / "outliers.json"
    assert main([str(folder), "--out", str(out)]) == 0
    text = out.read_text()
    assert machine_paths(text) == []
    data = json.loads(text)
    assert data["meta"]["command"].startswith("python -m bench.outliers runs/r1/calibration --out ")
    assert data["models"]["synthetic-tp2"]["calibration"] == "runs/r1/calibration"
