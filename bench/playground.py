"""How fast the Playground answers: the analysis behind one control change, per setting.

    python -m bench.playground --calibration runs/<calibrate id>/calibration \\
        --out bench/results/playground.json

Times ``launch.store.teaching.playground_view`` (what the page calls: ``lowbit.playground.analyze``
on the stored 16-token sample -- the rank's message through the payload codec, the sum over
ranks through the real communicator on threads, the bit accounting -- plus the frames) for a set
of control settings at the spikiest stored site, ``--repeats`` times each after one warm-up, and
reports medians. With ``--page`` it also drives the real page with Streamlit's AppTest and times
the rerun after each control change (the whole script, both side-by-side schemes). The load
averages are recorded before and after (``load``, ``bench._meta``'s block): the machine is shared.
Target (issue 18): <= 1 s per control change for a 16-token sample at hidden 576.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench._meta import command as meta_command, end_load, path as meta_path, start_load

SETTINGS = ["int4-static-top1/64", "int4-static", "int4-token", "int4-token-rot64", "int4-group32",
            "int4-group32-top1/64-rot64", "nf4-static-top1/64", "int4-token-sr", "int2-static-rand1/64",
            "int8-token", "int4-static-top1/64@twoshot+int8-token", "bf16"]
# (widget kind, key, value): the page's controls moved one after another
PAGE_STEPS = [("selectbox", "pg_gran", "token"), ("toggle", "pg_rot", True), ("radio", "pg_outliers", "none"),
              ("checkbox", "pg_sr", True), ("selectbox", "pg_gran", "group"), ("radio", "pg_code", "nf"),
              ("selectbox", "pg_gran", "static"), ("radio", "pg_outliers", "random"), ("radio", "pg_code", "int"),
              ("selectbox", "pg_bits_int", 3)]


def time_views(cal, settings: list[str], repeats: int) -> list[dict]:
    from launch.store.teaching import playground_view
    from lowbit.analysis import spikiest_sample
    layer, module, rank = spikiest_sample(cal)
    rows = []
    for scheme in settings:
        playground_view(cal, layer, module, rank, scheme)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            view = playground_view(cal, layer, module, rank, scheme)
            times.append(time.perf_counter() - start)
        row = view["summary"].iloc[0]
        rows.append(dict(scheme=scheme, layer=layer, module=module, rank=rank, repeats=repeats,
                         median_ms=1e3 * statistics.median(times), max_ms=1e3 * max(times),
                         rank_sqnr_db=float(row["rank_sqnr_db"]), sum_sqnr_db=float(row["sum_sqnr_db"]),
                         bits_per_value=float(row["bits_per_value"])))
        print(f"{scheme:<42} median {rows[-1]['median_ms']:7.1f} ms  max {rows[-1]['max_ms']:7.1f} ms", flush=True)
    return rows


def time_page(runs_root: Path, repeats: int) -> list[dict]:
    """AppTest on app.py -> Playground; each control change's rerun time (``repeats`` rounds, each
    with Streamlit's caches cleared first, so every change computes its schemes afresh)."""
    from streamlit.testing.v1 import AppTest
    os.environ["LOWBIT_RUNS"] = str(runs_root)
    repo = Path(__file__).resolve().parent.parent
    times: dict[str, list[float]] = {}
    import streamlit as st
    for _ in range(repeats):
        # every round cold: the caches are process-wide, so a second round would only measure hits
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(str(repo / "app.py"), default_timeout=300).run()
        at.switch_page("pages/playground.py").run()
        for kind, key, value in PAGE_STEPS:
            widget = getattr(at, kind)(key=key)
            widget.set_value(value)
            start = time.perf_counter()
            at.run()
            times.setdefault(f"{key}={value}", []).append(time.perf_counter() - start)
            if at.exception:
                raise RuntimeError(f"{key}={value}: {[e.value for e in at.exception]}")
    rows = [dict(change=k, repeats=len(v), median_ms=1e3 * statistics.median(v), max_ms=1e3 * max(v))
            for k, v in times.items()]
    for r in rows:
        print(f"page rerun after {r['change']:<24} median {r['median_ms']:7.1f} ms  max {r['max_ms']:7.1f} ms",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=Path, required=True,
                        help="a calibration folder with stored samples (runs/<calibrate id>/calibration)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--page", action="store_true", help="also time the page's reruns with AppTest")
    parser.add_argument("--page-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/playground.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.page_repeats < 1:
        parser.error("--repeats and --page-repeats: must be >= 1")
    import torch

    from launch.store.calibration import load_calibration
    cal = load_calibration(args.calibration)
    info = dict(command=meta_command("bench.playground", sys.argv[1:] if argv is None else list(argv)),
                calibration=meta_path(args.calibration), model=cal.meta.get("model"), tp=cal.tp, hidden=cal.hidden,
                sample_tokens=int(cal.sample.shape[3]) if cal.sample is not None else None,
                machine=dict(python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
                             torch_threads=torch.get_num_threads(), platform=platform.platform()),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), load=start_load())
    info["views"] = time_views(cal, SETTINGS, args.repeats)
    if args.page:
        # the runs root holding this calibration: <root>/<run id>/calibration
        info["page"] = time_page(args.calibration.resolve().parent.parent, args.page_repeats)
    end_load(info["load"])
    worst = max(r["median_ms"] for r in info["views"] + info.get("page", []))
    info["target_ms"], info["worst_median_ms"] = 1000.0, worst
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2))
    print(f"worst median {worst:.1f} ms (target 1000 ms); load {info['load']['start']} -> {info['load']['end']}; "
          f"wrote {args.out}")
    return 0 if worst <= 1000.0 else 1


if __name__ == "__main__":
    sys.exit(main())
