"""`streamlit run` with every script run recorded: a full run or a fragment rerun, its page, the
script thread's CPU seconds and wall seconds, and (``LOWBIT_PROBE_PROFILE=1``) where that CPU went,
from cProfile on the thread's CPU clock, summed by package: gc.collect, plotly, streamlit, pandas, the app's own code...

    LOWBIT_PROBE_OUT=runs.jsonl python bench/_rerun_probe.py app.py --server.port 8501

Run as a script (bench.classroom_load starts it with the app's directory as its working directory,
so it can probe another checkout of the app as well). One JSON line per script run.
"""
from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import threading
import time

from streamlit.runtime.scriptrunner import script_runner
from streamlit.web import cli

OUT = os.environ.get("LOWBIT_PROBE_OUT", "probe-runs.jsonl")
PROFILE = os.environ.get("LOWBIT_PROBE_PROFILE") == "1"
_LOCK = threading.Lock()
_original = script_runner.ScriptRunner._run_script


def bucket(filename: str, function: str) -> str:
    """The part of the program a profiled function belongs to."""
    if "gc.collect" in function or function == "<built-in method gc.collect>":
        return "gc.collect (after every run)"
    if "site-packages/" in filename:
        package = filename.split("site-packages/", 1)[1].split("/", 1)[0]
        return package.removeprefix("_").split(".")[0] if package != "_plotly_utils" else "plotly"
    here = os.getcwd()
    if filename.startswith(here):
        part = os.path.relpath(filename, here).split(os.sep, 1)[0]
        return "app: " + (part if part in ("pages", "launch", "lowbit", "kernels") else "app.py")
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    return "python stdlib"


def _split(profile: cProfile.Profile) -> tuple[dict[str, float], dict[str, float]]:
    """Own time (tottime) of every profiled function summed by ``bucket``, and the 8 functions
    with the most own time."""
    stats = pstats.Stats(profile)
    parts: dict[str, float] = {}
    functions = []
    for (filename, line, function), (_, _, tottime, _, _) in stats.stats.items():
        name = bucket(filename, function)
        parts[name] = parts.get(name, 0.0) + tottime
        where = filename.split("site-packages/")[-1] if "site-packages/" in filename else os.path.basename(filename)
        functions.append((tottime, f"{where}:{line}({function})"))
    top = {name: round(t, 4) for t, name in sorted(functions, reverse=True)[:8]}
    return {k: round(v, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.0005}, top


def _probed(self, rerun_data) -> None:
    # CPU time of this thread, not wall time: the machine may be shared, and waiting is not cost
    profile = cProfile.Profile(time.thread_time) if PROFILE else None
    cpu, wall = time.thread_time(), time.perf_counter()
    if profile:
        profile.enable()
    try:
        return _original(self, rerun_data)
    finally:
        if profile:
            profile.disable()
        record = dict(kind="fragment" if rerun_data.fragment_id_queue else "full", page=rerun_data.page_name,
                      thread_cpu_s=round(time.thread_time() - cpu, 4), wall_s=round(time.perf_counter() - wall, 4),
                      time=time.time())
        if profile:
            record["split_s"], record["top_functions_s"] = _split(profile)
        with _LOCK, open(OUT, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    script_runner.ScriptRunner._run_script = _probed
    sys.argv = ["streamlit", "run", *sys.argv[1:]]
    sys.exit(cli.main())
