"""A class on one laptop: N students' sessions on one app server, measured from outside.

    .venv/bin/python -m bench.classroom_load --out bench/results/classroom-load.json
    .venv/bin/python -m bench.classroom_load --sessions 30 --tabs 20 --idle-s 60 --runs runs
    .venv/bin/python -m bench.classroom_load --profile --app-dir ../other-checkout   # one rerun, where it goes

Starts `streamlit run app.py` (through bench/_rerun_probe.py, which records every script run's CPU)
on a runs root with stored partials (it runs the Playground's one-click capture job first when
there are none), then, each phase on a fresh server:

1. **headless**: one websocket session (the browser's protocol, bench/_st_client.py) opens the
   Playground: the server's RSS with one session. Then ``--sessions`` sessions open it at once
   (page loaded: to the end of its script run) and each changes one control ("Granularity" to
   "token") at a random moment within ``--spread-s`` seconds, as a class does when the teacher
   says "now switch to per-token scales" (control change: to the end of the rerun); RSS again.
2. **chromium**: ``--tabs`` tabs of Debian's headless Chromium open the Playground at once (page
   loaded: its 6 charts drawn and the script stopped), then each changes the same control (to
   the first figure redrawn); then they sit idle and the server's CPU seconds over ``--idle-s``
   give an idle tab's cost.

Every figure is saved with the load average around its phase (the cores may be shared); the
targets (issue 29) sit next to them. ``--profile`` instead profiles single reruns with cProfile
(one page load, one control change, and the sidebar's fragment reruns while a small job runs)
and saves where their CPU went. Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from bench._meta import finish_meta, start_meta
from bench._st_client import HeadlessSession
from launch.presets import capture_spec
from launch.queue import JobQueue
from launch.store.calibration import calibration_sources
from launch.store.runs import runs_frame

REPO = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "_rerun_probe.py"
CHROMIUM = "/usr/bin/chromium"
# Each student's tab is in the foreground of their own screen: no background-tab throttling.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                  "--disable-backgrounding-occluded-windows"]
PAGE, CONTROL, VALUE = "playground", "Granularity", "token"
PLAYGROUND_CHARTS = 6
TARGETS = dict(page_loaded_median_s=3.0, page_loaded_worst_s=6.0, control_change_median_s=1.0,
               control_change_worst_s=2.0, idle_core_pct_per_tab=0.5, rss_ratio=1.5)
FIRST_FIGURE_JS = ("JSON.stringify(Array.from(document.querySelector('.js-plotly-plot').data)"
                   ".map(t => [Array.from(t.x || []), Array.from(t.y || [])]))")
RENDERED_JS = (f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {PLAYGROUND_CHARTS} && "
               "!document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')")


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def browser_cpu_s() -> float:
    """CPU seconds of every Chromium process this benchmark started (they share the cores with the
    server, as a class's browsers would not: each student has a machine)."""
    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "chrom" in proc.name():
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total


def summary(seconds: list[float | None], timeout_s: float) -> dict:
    """Median and worst of the clients' times; a client that timed out (None) counts as slower than
    every finished one, and a median or worst that is such a client is None, with ``timed_out``."""
    ranked = sorted(seconds, key=lambda s: math.inf if s is None else s)
    median = ranked[(len(ranked) - 1) // 2] if len(ranked) % 2 else None
    if len(ranked) % 2 == 0:
        low, high = ranked[len(ranked) // 2 - 1], ranked[len(ranked) // 2]
        median = None if high is None else (low + high) / 2
    return dict(median_s=None if median is None else round(median, 3),
                worst_s=None if ranked[-1] is None else round(ranked[-1], 3), n=len(ranked),
                timed_out=sum(s is None for s in ranked), timeout_s=timeout_s,
                all_s=[None if s is None else round(s, 3) for s in ranked])


# -- the app server ----------------------------------------------------------------------------------
def ensure_partials(root: Path) -> str:
    """A calibration with stored sample partials in ``root`` (the Playground needs one): the newest
    one there, else the capture job the Playground's button starts, run now."""
    sources = calibration_sources(runs_frame(root), root)
    if not sources.empty:
        return str(sources.iloc[0]["folder"])
    queue = JobQueue(root)
    run_id = queue.submit(capture_spec())
    row = queue.wait(run_id, timeout_s=1800)
    if row["status"] != "done":
        raise SystemExit(f"capture run {run_id} ended {row['status']}: {row.get('error')}")
    return ensure_partials(root)


class Server:
    """`streamlit run app.py` in ``app_dir`` under the rerun probe, on a free port."""

    def __init__(self, app_dir: Path, root: Path, work: Path, profile: bool = False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs_log = work / f"probe-{self.port}.jsonl"
        self.log = open(work / f"server-{self.port}.log", "wb")
        env = dict(os.environ, LOWBIT_RUNS=str(root), LOWBIT_PROBE_OUT=str(self.runs_log),
                   LOWBIT_PROBE_PROFILE="1" if profile else "0", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(PROBE), "app.py", "--server.address", "127.0.0.1",
                                      "--server.port", str(self.port), "--server.headless", "true"],
                                     cwd=app_dir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                time.sleep(0.3)
        raise SystemExit(f"the app did not start; see {self.log.name}")

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        return round(self.ps.memory_info().rss / 2**20, 1)

    def script_runs(self) -> list[dict]:
        if not self.runs_log.exists():
            return []
        return [json.loads(line) for line in self.runs_log.read_text().splitlines() if line.strip()]

    async def runs_recorded(self, count: int, timeout_s: float = 30.0, since: int = 0,
                            kind: str | None = None) -> None:
        """Wait until the probe has written ``count`` runs (of ``kind``, after the first ``since``): it
        writes just after a run's last message to the browser, so a client sees the end first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self.script_runs()[since:]
            if len([r for r in runs if kind is None or r["kind"] == kind]) >= count:
                return
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def warm_up(url: str) -> None:
    """One session opens the app's front page, then the measured page, and leaves: the process's
    first run imports torch and friends, which is the server starting, not a student's page load."""
    async with HeadlessSession(url, page="") as s:
        await s.load()
    async with HeadlessSession(url, page=PAGE) as s:
        await s.load()


# -- phase 1: headless sessions ----------------------------------------------------------------------
async def headless_phase(server: Server, sessions: int, spread_s: float, seed: int, timeout_s: float) -> dict:
    await warm_up(server.url)
    one = HeadlessSession(server.url, page=PAGE)
    await one.__aenter__()
    await one.load()
    await asyncio.sleep(2)
    rss_one = server.rss_mb()
    await one.close()

    clients = [HeadlessSession(server.url, page=PAGE, timeout_s=timeout_s) for _ in range(sessions)]
    load0, cpu0, runs0 = load_avg(), server.cpu_s(), len(server.script_runs())
    await asyncio.gather(*(c.__aenter__() for c in clients))
    loaded = await asyncio.gather(*(c.load() for c in clients))
    await server.runs_recorded(runs0 + sessions)
    rss_many, runs1 = server.rss_mb(), len(server.script_runs())
    rng = random.Random(seed)

    async def change(client: HeadlessSession, was_loaded: bool) -> float | None:
        await asyncio.sleep(rng.uniform(0, spread_s))
        return await client.set_widget(CONTROL, VALUE) if was_loaded else None  # no page, no control
    changed = await asyncio.gather(*(change(c, t is not None) for c, t in zip(clients, loaded)))
    await server.runs_recorded(runs1 + sessions)
    cpu1, load1, runs = server.cpu_s(), load_avg(), server.script_runs()
    await asyncio.gather(*(c.close() for c in clients))
    return dict(sessions=sessions, page_loaded=summary(loaded, timeout_s), control_change=summary(changed, timeout_s),
                spread_s=spread_s, rss_one_session_mb=rss_one, rss_sessions_mb=rss_many,
                rss_ratio=round(rss_many / rss_one, 3), server_cpu_s=round(cpu1 - cpu0, 1),
                script_cpu=dict(page_load=cpu_of(runs[runs0:runs1]), control_change=cpu_of(runs[runs1:])),
                load=dict(start=load0, end=load1))


def cpu_of(runs: list[dict]) -> dict:
    """The script thread's CPU seconds per run (the probe's record): what one page load or one
    control change costs the server whatever the machine's load (wall times stretch with it)."""
    cpu = [r["thread_cpu_s"] for r in runs]
    return dict(runs=len(cpu), median_s=round(statistics.median(cpu), 4) if cpu else None,
                total_s=round(sum(cpu), 2))


# -- phase 2: Chromium tabs --------------------------------------------------------------------------
async def chromium_phase(server: Server, tabs: int, spread_s: float, idle_s: float, seed: int,
                         timeout_s: float) -> dict:
    from playwright.async_api import TimeoutError as PlaywrightTimeout  # heavy optional dependency: this phase only
    from playwright.async_api import async_playwright
    await warm_up(server.url)
    rng = random.Random(seed)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            pages = [await browser.new_page(viewport=dict(width=1280, height=720)) for _ in range(tabs)]
            load0, cpu0, runs0, browser0 = load_avg(), server.cpu_s(), len(server.script_runs()), browser_cpu_s()

            async def open_tab(page) -> float | None:
                start = time.perf_counter()
                try:  # not the "load" event: tabs starting at once on 2 cores take longer than its default
                    await page.goto(f"{server.url}/{PAGE}", wait_until="commit", timeout=timeout_s * 1000)
                    await page.wait_for_function(RENDERED_JS, timeout=timeout_s * 1000, polling=250)
                except PlaywrightTimeout:
                    return None
                return time.perf_counter() - start
            loaded = await asyncio.gather(*(open_tab(p) for p in pages))
            await server.runs_recorded(runs0 + tabs)
            runs1 = len(server.script_runs())

            async def change(page, was_loaded: bool) -> float | None:
                await asyncio.sleep(rng.uniform(0, spread_s))
                if not was_loaded:
                    return None
                before = await page.evaluate(FIRST_FIGURE_JS)
                box = page.get_by_role("combobox", name=CONTROL, exact=True).first
                start = time.perf_counter()
                try:
                    await box.click(timeout=timeout_s * 1000)
                    await page.get_by_role("option", name=VALUE, exact=True).click(timeout=timeout_s * 1000)
                    await page.wait_for_function(f"{FIRST_FIGURE_JS} !== {json.dumps(before)} && ({RENDERED_JS})",
                                                 timeout=timeout_s * 1000, polling=100)
                except PlaywrightTimeout:
                    return None
                return time.perf_counter() - start
            changed = await asyncio.gather(*(change(p, t is not None) for p, t in zip(pages, loaded)))
            await server.runs_recorded(runs1 + tabs)
            busy_cpu, busy_load, runs = server.cpu_s() - cpu0, load_avg(), server.script_runs()
            busy_browser = browser_cpu_s() - browser0
            await asyncio.sleep(10)  # let the last reruns and websocket traffic settle
            runs_before, idle_load0, idle_cpu0 = len(server.script_runs()), load_avg(), server.cpu_s()
            await asyncio.sleep(idle_s)
            idle_cpu, idle_load1 = server.cpu_s() - idle_cpu0, load_avg()
            idle_runs = len(server.script_runs()) - runs_before
        finally:
            await browser.close()
    per_tab_pct = 100 * idle_cpu / idle_s / tabs
    return dict(tabs=tabs, viewport="1280x720", page_loaded=summary(loaded, timeout_s),
                control_change=summary(changed, timeout_s),
                spread_s=spread_s, server_cpu_s=round(busy_cpu, 1), browsers_cpu_s=round(busy_browser, 1),
                load=dict(start=load0, end=busy_load), script_cpu=dict(page_load=cpu_of(runs[runs0:runs1]), control_change=cpu_of(runs[runs1:])),
                idle=dict(seconds=idle_s, server_cpu_s=round(idle_cpu, 2), core_pct_per_tab=round(per_tab_pct, 3),
                          script_runs=idle_runs, load=dict(start=idle_load0, end=idle_load1)))


# -- --profile: single reruns ------------------------------------------------------------------------
async def profile_phase(server: Server, root: Path, job_s: float, idle_s: float) -> dict:
    """One page load and one control change in one session, then the sidebar while a small job
    runs (its fragment reruns every few seconds then) and after it, idle."""
    await warm_up(server.url)
    await server.runs_recorded(2, kind="full")  # the warm-up's two page loads, written after they ended
    seen = len(server.script_runs())
    async with HeadlessSession(server.url, page=PAGE) as s:
        await s.load()
        await s.set_widget(CONTROL, VALUE)
        await server.runs_recorded(2, since=seen, kind="full")  # an old app's poller may rerun in between
        measured = server.script_runs()[seen:]
        idle_from = len(server.script_runs())
        await asyncio.sleep(idle_s)
        idle = server.script_runs()[idle_from:]
        queue = JobQueue(root)  # the app's own queue (in the server) starts it
        run_id = queue.submit(dict(kind="calibrate", model="tiny-llama", tp=2, calib_tokens=2048,
                                   params=dict(seq_len=64), time_limit_s=job_s + 120))
        await asyncio.sleep(2)
        job_from = len(server.script_runs())
        await s.set_widget(CONTROL, "group")  # a full rerun sees the job and starts the sidebar's poller
        polling = s.polling
        deadline = time.monotonic() + job_s
        while time.monotonic() < deadline and (queue.get(run_id) or {}).get("status") in ("queued", "running"):
            await asyncio.sleep(1)
        await asyncio.sleep(8)
        during = server.script_runs()[job_from + 1:]
        after_job = s.polling
        status = (queue.get(run_id) or {}).get("status")
    full = [r for r in measured if r["kind"] == "full"]  # an old app's idle poller may rerun in between
    return dict(page_load=full[0] if full else None, control_change=full[1] if len(full) > 1 else None,
                idle=_runs_summary(idle, idle_s), job=dict(id=run_id, status=status, pollers_while_running=polling,
                                                          pollers_after=after_job, runs=_runs_summary(during)))


def _runs_summary(runs: list[dict], seconds: float | None = None) -> dict:
    """How many script runs (and fragment reruns), their median CPU, and one profiled split."""
    fragments = [r for r in runs if r["kind"] == "fragment"]
    out = dict(script_runs=len(runs), fragment_reruns=len(fragments),
               median_thread_cpu_s=round(statistics.median([r["thread_cpu_s"] for r in runs]), 4) if runs else 0.0,
               cpu_s=round(sum(r["thread_cpu_s"] for r in runs), 3), example=runs[len(runs) // 2] if runs else None)
    if seconds:
        out["seconds"] = seconds
    return out


def _partials_label(folder: str, root: Path) -> str:
    """The calibration the Playground shows, without this machine's paths: its model, TP, text and
    tokens (calibration.json)."""
    meta = json.loads((Path(folder) / "calibration.json").read_text())
    return f"{meta.get('model')} TP {meta.get('tp')}, {meta.get('tokens')} {meta.get('source')} tokens"


# -- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classroom_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=None, help="runs root to serve (default: a copy of $LOWBIT_RUNS or ./runs)")
    parser.add_argument("--app-dir", default=str(REPO), help="the checkout whose app.py is served")
    parser.add_argument("--label", default=None, help="what --app-dir is, for the results file (e.g. main@1ab18af)")
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--tabs", type=int, default=20)
    parser.add_argument("--spread-s", type=float, default=5.0,
                        help="each client changes its control at a random moment within this many seconds")
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="a page load or control change not done after this long counts as timed out")
    parser.add_argument("--skip", choices=["headless", "chromium"], action="append", default=[])
    parser.add_argument("--profile", action="store_true", help="profile single reruns instead (cProfile)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    meta = start_meta("bench.classroom_load", sys.argv[1:] if argv is None else argv)
    work = Path(tempfile.mkdtemp(prefix="classroom-load-"))
    source = Path(args.runs or os.environ.get("LOWBIT_RUNS", "runs")).resolve()
    source.mkdir(parents=True, exist_ok=True)
    folder = ensure_partials(source)  # the Playground's own capture job, once, when none is stored
    root = work / "runs"  # a copy: the load (and --profile's job) must not write into the user's runs
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("queue.lock"))
    folder = folder.replace(str(source), str(root), 1)
    out = dict(meta=meta, app=args.label or "this checkout",
               page=PAGE, control=f"{CONTROL} -> {VALUE}", partials=_partials_label(folder, root), targets=TARGETS)
    phases = [] if args.profile else [p for p in ("headless", "chromium") if p not in args.skip]
    if args.profile:
        phases = ["profile"]
    for phase in phases:
        server = Server(Path(args.app_dir), root, work, profile=phase == "profile")
        try:
            if phase == "headless":
                out[phase] = asyncio.run(headless_phase(server, args.sessions, args.spread_s, args.seed,
                                                        args.timeout_s))
            elif phase == "chromium":
                out[phase] = asyncio.run(chromium_phase(server, args.tabs, args.spread_s, args.idle_s, args.seed,
                                                        args.timeout_s))
            else:
                out[phase] = asyncio.run(profile_phase(server, root, job_s=120, idle_s=args.idle_s / 2))
        finally:
            server.stop()
        print(f"{phase}: {json.dumps(out[phase], indent=1)[:3000]}", flush=True)
        if args.out:  # after every phase: a later phase that fails loses nothing measured before it
            finish_meta(meta)
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    finish_meta(meta)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

