"""The tables of docs/teaching.md: the Playground's numbers and the classroom demo, timed."""
from __future__ import annotations

from bench.blocks import RESULTS, ReportError, block, load, pct, source_line, table


DEMO_FILES = ["demo-gemma3-270m-tp2-cold.json", "demo-gemma3-270m-tp2-warm.json"]
DEMO_BEFORE = ["demo-gemma3-270m-tp2.json"]  # before the vocabulary-parallel held-out metrics


def demo_rows(names: list[str]) -> str:
    """bench.demo_timing: the Gemma demo from submit to result, per submit, with the load around it."""
    rows, sources = [], []
    for name in names:
        data = load(name)
        for sub in data["submits"]:
            cache = "model warm, calibration " + ("cached" if sub["calibration_cached"] else "cold") \
                if sub["model_cached"] else "model cold"
            stages = ", ".join(f"{k} {v:.0f}" for k, v in sub["stages"].items() if v >= 0.5)
            cpu = sub.get("cpu_seconds")
            rows.append([cache, f"`{sub['run']}`", f"{sub['wall_seconds']:.0f}", "" if cpu is None else f"{cpu:.0f}",
                         f"{sub['load']['start'][0]:.1f} -> {sub['load']['end'][0]:.1f}", stages])
        sources.append(source_line(name, data))
    head = ["cache", "run", "wall s", "CPU s (all ranks)", "load before -> after", "stages (s)"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {s}" for s in sources)


@block("demo-gemma")
def demo_gemma() -> str:
    return demo_rows(DEMO_FILES)


@block("demo-metrics")
def demo_metrics() -> str:
    """What the Gemma demo measured: one row per scheme, the same at the printed digits in every
    submit of every file (float sums differ in the last bits with the order; a difference at the
    printed digits is refused, not averaged)."""
    def rows_of(metrics: dict) -> list[list[str]]:
        return [[f"`{s}`", pct(m["top1_agreement"]), f"{m['kl']:.4f}", f"{m['ppl']:.2f}"] for s, m in metrics.items()]
    submits = [(name, sub) for name in DEMO_FILES + DEMO_BEFORE for sub in load(name)["submits"]]
    rows = rows_of(submits[0][1]["metrics"])
    for name, sub in submits:
        if rows_of(sub["metrics"]) != rows:
            raise ReportError(f"{name}: run {sub['run']} measured other metrics than {submits[0][1]['run']}")
    note = f"the same in all {len(submits)} submits (the runs of the timing tables here and in docs/history.md)"
    return table(["scheme", "top-1 agree", "KL", "ppl"], rows) + "\n\n" + \
        "\n".join(f"- {source_line(n, load(n))}" for n in DEMO_FILES + DEMO_BEFORE) + f"\n- {note}"


PLAYGROUND = "playground.json"


@block("playground")
def playground() -> str:
    """bench.playground: SQNR of one stored partial per scheme, and the page's rerun time per control change."""
    data = load(PLAYGROUND)
    rows = [[f"`{v['scheme']}`", f"{v['bits_per_value']:.4g}", f"{v['rank_sqnr_db']:.2f}", f"{v['sum_sqnr_db']:.2f}",
             f"{v['median_ms']:.0f}"] for v in data["views"]]
    at = data["views"][0]
    page = [r["median_ms"] for r in data["page"]]
    note = (f"{data['model']} TP {data['tp']}, layer {at['layer']} {at['module']}, rank {at['rank']}, the first "
            f"{data['sample_tokens']} tokens stored by calibration `{data['calibration']}`; {data['date']}, load "
            f"{data['load']['start'][0]:.2f} -> {data['load']['end'][0]:.2f}; the Playground page reruns "
            f"after a control change in {min(page):.0f}-{max(page):.0f} ms (median of {data['page'][0]['repeats']} "
            f"per change, {len(page)} changes, AppTest); made by `python -m bench.playground --calibration "
            "runs/<calibrate id>/calibration --page` (the file predates recorded commands)")
    head = ["scheme", "bits/value", "SQNR of the rank's message dB", "SQNR of the sum dB", "compute ms (median)"]
    return table(head, rows) + "\n\nSource: `" + str(RESULTS / PLAYGROUND) + "`; " + note
