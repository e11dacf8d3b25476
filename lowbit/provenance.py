"""How a result file names the command that made it and the paths it used: relative to the
repository root (a run folder as ``runs/<run id>/...``), never an absolute path of the machine
that ran it, so a result reads the same on every clone and says nothing about one machine.

    PYTHONPATH=. python -c "import os; from lowbit.provenance import command_line as c; \\
        print(c('bench.x', ['--out', os.path.abspath('bench/results/x.json')]))"
    # python -m bench.x --out bench/results/x.json

Stdlib only: the bench scripts, the job layer and lowbit's own command-line tools all write
result files, and all of them name paths through ``portable_path``.
"""
from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

from lowbit.artifacts import cache_root

REPO = Path(__file__).resolve().parent.parent


def _bases(roots: dict[str, Path] | None) -> list[tuple[Path, str]]:
    """(folder, how a result names it) for every folder a path is written relative to."""
    bases = [(Path(folder), label) for label, folder in (roots or {}).items()]
    bases += [(REPO, ""), (Path.cwd(), ""), (cache_root(), "$LOWBIT_CACHE"),
              (Path(tempfile.gettempdir()), "$TMPDIR"), (Path.home(), "~")]
    return [(folder.resolve(), label) for folder, label in bases]


def portable_path(path: str | os.PathLike, roots: dict[str, Path] | None = None) -> str:
    """``path`` as a result file records it. A relative path stays as given. An absolute one is
    written relative to the deepest folder holding it of: ``roots`` (label -> folder, e.g.
    ``{"runs": runs_root()}`` gives ``runs/<id>/calibration``), the checkout and the current
    folder (plain relative paths), the cache root (``$LOWBIT_CACHE/...``), the temp folder
    (``$TMPDIR/...``) and the home folder (``~/...``). Anywhere else only its last two parts are
    kept, after ``<outside>/``: a run id or a file name, never the machine's folders. A labelled
    folder itself is named from the folder above it (the cache root as ``$TMPDIR/fresh-cache`` or
    ``~/.cache/lowbit``, not as ``$LOWBIT_CACHE``), the checkout itself is ``.``."""
    if not os.path.isabs(path):
        return str(path)
    target = Path(os.path.abspath(path))
    for base, label in sorted(_bases(roots), key=lambda b: -len(b[0].parts)):
        if target == base and not label:
            return "."
        if base in target.parents:
            return "/".join(p for p in (label, target.relative_to(base).as_posix()) if p)
    return "/".join(["<outside>", *target.parts[-2:]])


def portable_arg(arg: str, roots: dict[str, Path] | None = None) -> str:
    """One command-line argument with an absolute path in it made portable (``/x/y`` and ``--opt=/x/y``)."""
    if arg.startswith("--") and "=" in arg:
        option, value = arg.split("=", 1)
        return f"{option}={portable_arg(value, roots)}"
    return portable_path(arg, roots) if os.path.isabs(arg) else arg


def command_line(module: str, argv: list[str], roots: dict[str, Path] | None = None) -> str:
    """``python -m <module> <argv>`` as a result file records it: each argument shell-quoted,
    absolute paths made portable (``portable_path``)."""
    return shlex.join(["python", "-m", module, *(portable_arg(str(a), roots) for a in argv)])
