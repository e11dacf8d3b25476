"""docs/classroom.md's tables: bench.classroom_load's figures against issue 29's targets (the code
before next to this code), and one rerun profiled before and after.

    .venv/bin/python -m bench.report docs/classroom.md
"""
from __future__ import annotations

from bench.blocks import block, load, source_line, table

LOAD, LOAD_MAIN = "classroom-load.json", "classroom-load-main.json"
PROFILE = ["classroom-profile-before.json", "classroom-profile-after.json"]


@block("classroom-load")
def classroom_load() -> str:
    """A class's sessions and tabs on one server, the code before next to this code."""
    data, before = load(LOAD), load(LOAD_MAIN)
    head, rows, note = load_rows(data, before)
    return table(head, rows) + "\n\n" + note + "\n\n" + "\n".join(
        f"- {source_line(n, d)}" for n, d in ((LOAD_MAIN, before), (LOAD, data)))


@block("classroom-profile")
def classroom_profile() -> str:
    """Where one rerun's CPU goes, on the code before and on this code."""
    before, after = (load(n) for n in PROFILE)
    return table(*profile_rows(before, after)) + "\n\n" + "\n".join(f"- {source_line(n, load(n))}" for n in PROFILE)


def _load_text(load: dict) -> str:
    return f"{load['start'][0]:.1f} -> {load['end'][0]:.1f}"


def _timing(t: dict, target_median: float, target_worst: float) -> str:
    """'median / worst' in seconds; a client that timed out is '> the timeout', and the count says how many."""
    def cell(v) -> str:
        return f"> {t['timeout_s']:g} s" if v is None else f"{v:.2f} s"
    ok = t["median_s"] is not None and t["worst_s"] is not None and t["median_s"] <= target_median \
        and t["worst_s"] <= target_worst
    late = f", {t['timed_out']} of {t['n']} not done within {t['timeout_s']:g} s" if t.get("timed_out") else ""
    return f"{cell(t['median_s'])} / {cell(t['worst_s'])}" + ("" if ok else f" (missed{late})")


def _cpu(runs: dict) -> str:
    """A median script run's CPU seconds; '-' when no run was recorded (every client timed out before it)."""
    return "-" if runs["median_s"] is None else f"{runs['median_s']:.3f} s"


def load_rows(data: dict, before: dict | None = None) -> tuple[list[str], list[list[str]], str]:
    """(head, rows, a note): the load benchmark's figures against issue 29's targets, with the load
    beside each phase; ``before``: the same headless phase on the code before (another file)."""
    h, c, tg = data.get("headless"), data.get("chromium"), data["targets"]
    b = before.get("headless") if before else None
    phases = [p for p in (b, h, c) if p]
    head = ["", "target"] + [f"{p['sessions']} headless sessions, {before['app']}" if p is b else
                             f"{p['sessions']} headless sessions" if "sessions" in p else
                             f"{p['tabs']} Chromium tabs ({p['viewport']})" for p in phases]

    def each(fn) -> list[str]:
        return [fn(p) for p in phases]
    rows = [
        ["Playground loaded, median / worst", f"<= {tg['page_loaded_median_s']:g} s / {tg['page_loaded_worst_s']:g} s",
         *each(lambda p: _timing(p["page_loaded"], tg["page_loaded_median_s"], tg["page_loaded_worst_s"]))],
        ["control changed, median / worst", f"<= {tg['control_change_median_s']:g} s / {tg['control_change_worst_s']:g} s",
         *each(lambda p: _timing(p["control_change"], tg["control_change_median_s"], tg["control_change_worst_s"]))],
        ["server CPU per script run, median: while pages load / while controls change (runs)", "",
         *each(lambda p: f"{_cpu(p['script_cpu']['page_load'])} / {_cpu(p['script_cpu']['control_change'])} "
                         f"({p['script_cpu']['page_load']['runs']} / {p['script_cpu']['control_change']['runs']})")],
        ["server CPU, whole phase (browsers' CPU)", "",
         *each(lambda p: f"{p['server_cpu_s']:.1f} s" + (f" ({p['browsers_cpu_s']:.0f} s)" if "browsers_cpu_s" in p
                                                          else ""))],
        ["server RSS, all sessions / one session", f"<= {tg['rss_ratio']:g}x",
         *each(lambda p: f"{p['rss_sessions_mb']:.0f} / {p['rss_one_session_mb']:.0f} MB = {p['rss_ratio']:.2f}x"
               if "rss_ratio" in p else "")],
        ["load average (1 min) over the phase", "", *each(lambda p: _load_text(p["load"]))],
    ]
    if c:
        idle = c["idle"]
        rows.append([f"idle: server CPU over {idle['seconds']:g} s", f"<= {tg['idle_core_pct_per_tab']:g} % of a core "
                     "per tab", *["" for p in phases if p is not c],
                     f"{idle['server_cpu_s']:.2f} s = {idle['core_pct_per_tab']:.3f} % per tab, "
                     f"{idle['script_runs']} script runs (load {_load_text(idle['load'])})"])
    note = (f"Page: {data['page']}, control: {data['control']} (each client at a random moment within "
            f"{(h or c)['spread_s']:g} s), stored partials: {data['partials']}.")
    return head, rows, note


def _split(record: dict | None, parts: int = 3) -> str:
    if not record:
        return ""
    split = record.get("split_s") or {}
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(split.items())[:parts])
    return f"{record['thread_cpu_s']:.3f} s" + (f" ({top})" if top else "")


def profile_rows(before: dict, after: dict) -> tuple[list[str], list[list[str]]]:
    """(head, rows): one rerun profiled, main against this branch: script-thread CPU and its biggest
    parts."""
    b, a = before["profile"], after["profile"]

    def idle(p: dict) -> str:
        i = p["idle"]
        return f"{i['script_runs']} runs in {i['seconds']:g} s, {i['cpu_s']:.2f} s CPU"

    def job(p: dict) -> str:
        r = p["job"]["runs"]
        return f"{r['fragment_reruns']} fragment reruns, median {r['median_thread_cpu_s']:.3f} s" + \
            (f" ({_split(r['example']).split('(', 1)[1]}" if r["example"] and "(" in _split(r["example"]) else "")
    rows = [["one page load (Playground; its views already computed by an earlier session)", _split(b["page_load"]),
             _split(a["page_load"])],
            ["one control change (the first session to pick it: computes the view)", _split(b["control_change"]),
             _split(a["control_change"])],
            ["an idle tab (no job running)", idle(b), idle(a)],
            ["the sidebar while a job runs", job(b), job(a)]]
    return ["script-thread CPU (cProfile, largest parts in s)", before["app"], after["app"]], rows
