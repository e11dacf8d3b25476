# Size: ~600 lines: one short renderer per table block (about 30) after the shared reading, registry and checking.
"""Every measured table of README.md and docs/*.md, rendered from the result files under
bench/results/ through one renderer.

    .venv/bin/python -m bench.report            # rewrite every table block of README.md and docs/*.md
    .venv/bin/python -m bench.report --check    # exit 1 naming each block that differs, stray table, unknown name
    .venv/bin/python -m bench.report --list     # every table, the document holding it and its source files

A measured table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->`` in README.md or in
any docs/*.md (found by glob: a new page needs no registration); ``TABLES[NAME]`` renders it
from its files: the table, then one line naming each file with the command that made it, its
date and the machine's load where the file has them. Prose around a block is written by hand and
quotes the block's numbers. ``check`` also fails on a Markdown table outside every block (a table
nobody can trace to a file), on a block with an unknown name, on a table placed twice and on a
registered table no document places. ``tests/test_readme_tables.py`` runs the check.

A new table: write its renderer here, ``@block("my-table")`` above a function that returns the
Markdown (``table(...)`` and ``source_line(...)`` do most of it), put ``<!-- table: my-table -->``
and ``<!-- /table -->`` on two lines of the page, and run ``python -m bench.report``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

from bench.accuracy import markdown as accuracy_markdown
from bench.collectives import markdown_table as collectives_markdown
from bench.matched_bits import load_rows as matched_rows
from bench.outliers import ROWS as OUTLIER_ROWS
from bench.throughput import markdown as throughput_markdown
from launch.client import format_results
from launch.cluster import rate_bits
from lowbit.method import projection
from lowbit.scheme import MAX_MIN_MESSAGE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("bench/results")
BLOCK = re.compile(r"<!-- table: (?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


class ReportError(ValueError):
    """A table cannot be rendered from its files (missing file, missing row)."""


TABLES: dict[str, Callable[[], str]] = {}


def block(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register the decorated function as the renderer of ``<!-- table: name -->`` blocks."""
    def register(render_table: Callable[[], str]) -> Callable[[], str]:
        if name in TABLES:
            raise ValueError(f"table '{name}' is registered twice")
        TABLES[name] = render_table
        return render_table
    return register


# -- reading files -----------------------------------------------------------------------------
def load(name: str) -> dict:
    path = ROOT / RESULTS / name
    if not path.exists():
        raise ReportError(f"{RESULTS / name}: no such result file")
    return json.loads(path.read_text())


def _load_text(values: list[float]) -> str:
    """The 1-minute load average of a ``getloadavg()``-style list."""
    return f"{values[0]:.1f}"


def source_line(name: str, data: dict, note: str = "") -> str:
    """'Source: `file`: `command` (date, load x at the start, y at the end)' from the file's meta."""
    meta = data.get("meta", data)
    parts = [f"`{RESULTS / name}`"]
    command = meta.get("command")
    if command:
        parts.append(f"`{command}`")
    when = [str(meta["date"])[:19].replace("T", " ")] if meta.get("date") else []
    load = meta.get("load") if isinstance(meta.get("load"), dict) else {}  # bench._meta's block
    start = load.get("start") or meta.get("load_avg_start") or meta.get("load_avg") or meta.get("load_avg_before")
    end = load.get("end") or meta.get("load_avg_end") or meta.get("load_avg_after")
    if start:
        when.append(f"load {_load_text(start)}" + (f" -> {_load_text(end)}" if end else ""))
    run = data.get("run") if isinstance(data.get("run"), (str, dict)) else None
    if run:
        when.append(f"run `{run['id'] if isinstance(run, dict) else run}`")
    text = "Source: " + ": ".join(parts) + (f" ({', '.join(when)})" if when else "")
    return text + (f"; {note}" if note else "")


def rows_by_scheme(data: dict, schemes: list[str]) -> list[dict]:
    by = {r["scheme"]: r for r in data["rows"]}
    missing = [s for s in schemes if s not in by]
    if missing:
        raise ReportError(f"no rows for {', '.join(missing)}")
    return [by[s] for s in schemes]


def table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; a ``|`` inside a cell (e.g. ``|x|``) is escaped so it does not split the cell."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(head), "|" + "---|" * len(head)] + [line(r) for r in rows])


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _ppl(v) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


# -- the tables --------------------------------------------------------------------------------
SUM_ERROR = "sum-error-chunks2.json"
UNIFORM = ["int4-static-top1/64", "int4-token", "int4-token-rot64", "int4-group32", "int3-group32-top1/64-rot64",
           "int3-group32-rot64", "int3-group64-rot64", "int3-token-rot64", "int3-token-rot64-sr", "int2-group32-rot64"]
CODEBOOK = ["nf4-token-rot64", "nf3-group64-rot64", "nf3-token-rot64", "nf3-group64-perm", "int3-group64-perm"]
THRESHOLD = ["int4-token-thr20c1/128", "int4-token-thr50c1/128", "int4-token-thr100c1/128", "int4-static-thr50c1/128"]
ROUNDING = ["int4-static-top1/64", "int4-token-rot64", "int3-group64-rot64", "int8-token"]


def _text_rows(name: str, schemes: list[str], rel_error: bool, source: str | None = None) -> str:
    """Rows of a ``sum-error`` file; ``source`` replaces the source line (a second table of one run)."""
    data = load(name)
    head = ["scheme", "bits/value", "KL", "top-1 agree", "ppl"] + (["mean rel. error of the sum"] if rel_error else [])
    rows = []
    for r in rows_by_scheme(data, schemes):
        rows.append([f"`{r['scheme']}`", f"{r['bits_per_value']:.4g}", f"{r['kl']:.3f}", _pct(r["top1_agreement"]),
                     _ppl(r["ppl"])] + ([f"{r['mean_rel_error']:.3f}"] if rel_error else []))
    return table(head, rows) + "\n\n" + (source or source_line(name, data))


SAME_RUN = f"Source: `{RESULTS / SUM_ERROR}`, the uniform table's run"


@block("uniform")
def uniform() -> str:
    return _text_rows(SUM_ERROR, UNIFORM, rel_error=False)


@block("codebook")
def codebook() -> str:
    return _text_rows(SUM_ERROR, CODEBOOK, rel_error=True, source=SAME_RUN)


@block("threshold")
def threshold() -> str:
    return _text_rows(SUM_ERROR, THRESHOLD, rel_error=False, source=SAME_RUN)


@block("rounding")
def rounding() -> str:
    data = load("sum-error-rounding.json")
    rows = []
    for s in ROUNDING:
        near, sr = rows_by_scheme(data, [s, f"{s}-sr"])
        rows.append([f"`{s}`"] + [f"{r['mean_rel_error']:.3f} / {r['max_rel_error']:.3f}, {r['kl']:.3f}"
                                  for r in (near, sr)])
    head = ["scheme", "nearest: mean / max rel. error, KL", "`-sr`: mean / max rel. error, KL"]
    return table(head, rows) + "\n\n" + source_line("sum-error-rounding.json", data)


SWEEP_NF_MAP = 3.2  # the budget whose per-site map the table prints in full (the others are in the file)


@block("sweep-nf")
def sweep_nf() -> str:
    name = "sweep-nf-allocation.json"
    data = load(name)
    points = {p["scheme"]: p for p in data["points"]}
    paper = next(p for p in data["points"] if p["scheme"] == "int4-static-top1/64")
    rows = [["paper `int4-static-top1/64`", f"{paper['bits_per_value']:.4f}", f"{paper['kl']:.3f}",
             _pct(paper["top1_agreement"]), _ppl(paper["ppl"])]]
    for budget, scheme in sorted(data["best_at"].items(), key=lambda kv: -float(kv[0])):
        p = points[scheme]
        label = budget if ";" in scheme else f"{budget} (`{scheme}` everywhere)"
        rows.append([label, f"{p['bits_per_value']:.3f}", f"{p['kl']:.3f}", _pct(p["top1_agreement"]), _ppl(p["ppl"])])
    refs = {round(p["reference_ppl"], 2) for p in data["points"]}
    if len(refs) != 1:
        raise ReportError(f"{name}: points against different references: {sorted(refs)}")
    note = f"{data['run']['seconds']:.0f} s; fp32 reference perplexity {refs.pop():.2f} on " \
        f"{paper['text_tokens']} targets; its spec: `bench/results/sweep-nf-allocation.spec.json` " \
        "(`python -m launch submit <spec> --wait`)"
    maps = "\n".join(f"- {budget}-bit map: `{scheme}`" for budget, scheme in data["best_at"].items()
                      if ";" in scheme and float(budget) == SWEEP_NF_MAP)
    return table(["budget", "bits/value", "KL", "top-1", "ppl"], rows) + "\n\n" + source_line(name, data, note) + \
        "\n\n" + maps


@block("presets")
def presets() -> str:
    name = "formats-bits.json"
    data = load(name)
    rows = []
    for r in data["rows"]:
        if r["refused"]:
            e = r["elsewhere"]
            bits = f"refused at 576; {e['measured_bits']:.4f} at hidden {e['hidden']}" + \
                (f" (TP {e['tp']})" if "twoshot" in r["expansion"] else "")
        else:
            bits = f"{r['measured_bits']:.4f}"
        rows.append([f"`{r['preset']}`", f"`{r['expansion']}`", bits])
    return table(["preset", "expansion", "bits at hidden 576 (first leg, from bytes)"], rows) + "\n\n" + \
        source_line(name, data)


def _moved(data: dict) -> str:
    """Files made before the kernel benches moved to ``bench/`` say ``kernels.bench`` and ``kernels/results``."""
    command = data["meta"].get("command", "")
    if "--out kernels/" not in command:
        return ""
    return f"made as `{command.split('--out ')[1].split()[0]}` by `kernels.bench`, which is now `bench.kernels`; " \
        "moved here unchanged"


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


# the sizes the README shows (the file has every tokens x hidden of the run)
KERNEL_CPU_ROWS = {"int4-static-top1/64": [(1, 576), (16, 576), (16, 4096), (256, 576), (2048, 576), (8192, 576), (8192, 4096), (8192, 5120)],
                   "int4-group32-top1/64": [(2048, 576), (8192, 576), (8192, 5120)]}


@block("kernels-cpu")
def kernels_cpu() -> str:
    name = "kernels-cpu.json"
    data = load(name)
    codec = data["cpu"]["codec"]
    pairs = {(e["scheme"], e["tokens"], e["hidden"]): (e, f) for e, f in zip(codec[::2], codec[1::2])}
    rows = []
    for scheme, sizes in KERNEL_CPU_ROWS.items():
        for tokens, hidden in sizes:
            e, f = pairs[(scheme, tokens, hidden)]
            rows.append([f"`{e['scheme']}`", f"{e['tokens']} x {e['hidden']}", _ms(e["allreduce_s"]),
                     f"{_ms(e['quantize_s'])} + {_ms(e['unpack_sum_s'])}",
                     f"{_ms(f['quantize_s'])} + {_ms(f['unpack_sum_s'])}",
                     f"{e['quantize_s'] / f['quantize_s']:.1f}x / {e['unpack_sum_s'] / f['unpack_sum_s']:.1f}x",
                     f"{e['fraction_of_allreduce']:.1f}", f"{f['fraction_of_allreduce']:.1f}"])
    head = ["scheme", "tokens x hidden", "all_reduce ms", "eager q + u ms", "compiled q + u ms", "speedup q / u",
            "eager / all_reduce", "compiled / all_reduce"]
    return table(head, rows) + "\n\n" + source_line(name, data, _moved(data))


@block("kernels-native-summary")
def kernels_native_summary() -> str:
    """Per scheme, over every size of the native run: how much less CPU time (quantize + unpack) the
    numba kernels take than the reference and the compiled path, and the single ops where one of
    them is ahead (what ``kernels.dispatch``'s CPU rule rests on)."""
    name = "kernels-cpu-native.json"
    data = load(name)
    by = {(r["scheme"], r["tokens"], r["hidden"], r["path"]): r for r in data["native"]["codec"]}
    total = lambda r: r["quantize_cpu_s"] + r["unpack_sum_cpu_s"]  # noqa: E731
    rows, ahead = [], []
    for scheme in dict.fromkeys(r["scheme"] for r in data["native"]["codec"]):
        sizes = sorted({(t_, h) for s, t_, h, p in by if s == scheme})
        ratios = {other: [total(by[(scheme, *size, other)]) / total(by[(scheme, *size, "native")]) for size in sizes]
                  for other in ("reference", "compiled")}
        rows.append([f"`{scheme}`", f"{sizes[0][0]}-{sizes[-1][0]} x {sizes[0][1]}"] +
                    [f"{min(v):.1f}-{max(v):.1f}x" for v in ratios.values()] +
                    ["yes" if all(by[(scheme, *size, p)]["bit_identical"] for size in sizes
                                  for p in ("native", "compiled")) else "**no**"])
        for size in sizes:
            for op in ("quantize_cpu_s", "unpack_sum_cpu_s"):
                n = by[(scheme, *size, "native")][op]
                for other in ("reference", "compiled"):
                    if by[(scheme, *size, other)][op] < n:
                        ahead.append(f"`{scheme}` {size[0]} x {size[1]} {op.split('_cpu')[0]}: {other} "
                                     f"{_ms(by[(scheme, *size, other)][op])} ms vs native {_ms(n)} ms")
    head = ["scheme", "tokens x hidden", "reference / native (CPU time)", "compiled / native", "bit-identical"]
    note = "single ops where a torch path is ahead: " + ("; ".join(ahead) or "none")
    return table(head, rows) + "\n\n" + source_line(name, data, _moved(data)) + "\n\n" + note


@block("kernels-native")
def kernels_native() -> str:
    name = "kernels-cpu-native.json"
    data = load(name)
    by = {(r["path"], r["tokens"]): r for r in data["native"]["codec"] if r["scheme"] == "int4-static-top1/64"}
    rows = []
    for tokens in sorted({t for _, t in by}):
        cells = [str(tokens)]
        for path in ("native", "compiled", "reference"):
            r = by[(path, tokens)]
            cells.append(f"{_ms(r['quantize_cpu_s'])} / {_ms(r['unpack_sum_cpu_s'])}")
        cells.append(_ms(by[("native", tokens)]["copy_bf16_s"]))
        rows.append(cells)
    head = ["tokens x 576", "native q / u ms", "compiled q / u ms", "reference q / u ms", "bf16 copy ms"]
    return table(head, rows) + "\n\n" + source_line(name, data, _moved(data))


def _label(method: str, scheme: str) -> str:
    return {"gather": "gather", "two_shot": "two-shot"}.get(method, method) + f" `{scheme}`"


@block("collectives-gate")
def collectives_gate() -> str:
    name = "collectives-gate-native.json"
    data = load(name)
    recs = [r for r in data["records"] if r["tokens"] >= 256 and r["method"] != "all_reduce"]
    links = list(dict.fromkeys(r["link"] for r in data["records"]))
    by = {(r["tokens"], r["method"], r["scheme"], r["link"]): r for r in recs}
    rows = []
    for key in dict.fromkeys((r["tokens"], r["method"], r["scheme"]) for r in recs):
        cells = [f"{key[0]}", _label(key[1], key[2])]
        for link in links:
            r = by.get(key + (link,))
            cells.append("" if r is None else f"{r['speedup_vs_bf16']:.2f}x [{r['compute_ms']:.3g}]")
        rows.append(cells)
    loads = [run["meta"].get("load_avg_before", [None])[0] for run in data["meta"].get("runs", [])]
    note = "load at the start of each link's job: " + ", ".join(f"{v:.1f}" for v in loads if v is not None)
    return table(["tokens x 576", "scheme"] + links, rows) + "\n\n" + source_line(name, data, note)


@block("collectives-8192")
def collectives_8192() -> str:
    name = "collectives-tp3-8192x576.json"
    data = load(name)
    return collectives_markdown(data["records"]) + "\n\n" + source_line(name, data)


def _runs_note(data: dict) -> str:
    """bench.accuracy's own record of its runs: the calibrate and evaluate run ids and times."""
    return f"calibrate run `{data['calibrate_run']}`, evaluate run `{data['evaluate_run']}` " \
        f"({data['result']['run']['seconds']:.0f} s); {data['wall_seconds']:.0f} s in all, queue waits included"


def _accuracy(name: str, tasks: list[str], note: str = "") -> str:
    data = load(name)
    return accuracy_markdown(data["result"], data["rows"], tasks) + "\n\n" + \
        source_line(name, data, _runs_note(data) + note)


@block("accuracy")
def accuracy() -> str:
    return _accuracy("accuracy.json", ["arc_easy", "piqa", "winogrande"])


@block("neighbours")
def neighbours() -> str:
    """With each threshold scheme's overflow: features over T that found no BF16 slot (rank 0)."""
    over = [(r["scheme"], r["thr_overflow"]) for r in load("neighbours.json")["result"]["records"] if r.get("thr_overflow")]
    note = "".join(f"; `thr_overflow` of `{s}`: {n:,} features over rank 0's text-metric messages" for s, n in over)
    return _accuracy("neighbours.json", ["arc_easy", "piqa"], note)


@block("gemma-tp2")
def gemma_tp2() -> str:
    name = "gemma3-270m-tp2.json"
    data = load(name)
    rows = [[f"`{r['scheme']}`", f"{r['bits_per_value']:.4g}", f"{r['ppl']:.3f}", f"{r['kl']:.4f}",
             f"{100 * r['top1_agreement']:.1f}", f"{r['clamped']:,}"] for r in data["rows"]]
    return table(["scheme", "bits/value", "ppl", "KL", "top-1 %", "clamped values"], rows) + "\n\n" + \
        source_line(name, data, _runs_note(data))


THROUGHPUT_LINKS = [("loopback", "throughput-loopback-native.json"), ("1 Gbit/s", "throughput-1gbit-native.json"),
                    ("100 Mbit/s", "throughput-100mbit-native.json")]


@block("throughput-native")
def throughput_native() -> str:
    rows, sources = [], []
    for label, name in THROUGHPUT_LINKS:
        data = load(name)
        gates = data.get("gates") or {}
        for r in data["records"]:
            if r["scheme"] == "bf16":
                continue
            gate = gates.get(r["scheme"])
            scheme = f"`{r['scheme']}`" + (f" (gate: {_gate_text(gate)})" if gate else "")
            rows.append([label, scheme, f"{r['bits_per_value']:.4g}", f"{r['prefill_speedup']:.2f}",
                         f"{r['decode_speedup']:.2f}"])
        bf16 = next(r for r in data["records"] if r["scheme"] == "bf16")
        share = " / ".join(f"{100 * s:.0f}%" for s in bf16["prefill_comm_share"])
        sources.append(source_line(name, data, f"bf16 spends {share} of its prefill in the communicator (ranks)"))
    head = ["link", "scheme", "bits/value", "prefill × bf16", "decode × bf16"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {s}" for s in sources)


def _gate_text(gate: dict) -> str:
    return "never quantize" if gate["bytes"] >= MAX_MIN_MESSAGE else f"{gate['bytes'] / 1024:.0f} KiB"


@block("throughput-eager")
def throughput_eager() -> str:
    name = "throughput.json"
    data = load(name)
    return throughput_markdown(data) + "\n\n" + source_line(name, data)


@block("evaluate-tasks")
def evaluate_tasks() -> str:
    """The CLI's own evaluate table (``launch.client.format_results``) of a stored run, as printed."""
    name = "evaluate-sciq-openbookqa.json"
    data = load(name)
    return f"```text\n$ .venv/bin/{data['meta']['command']}\n{format_results(data)}\n```\n\n" + \
        source_line(name, data, f"wall time {data['meta']['wall_seconds']} s, queue wait included; the command "
                                    "writes `<out>/results.json`, kept here as one file")


OUTLIERS = "outliers-smollm2-135m-tp3-gemma3-270m-tp2.json"


@block("outliers")
def outliers() -> str:
    """bench.outliers: consistency (Jaccard) and size of two calibrations' outliers, side by side,
    with that script's own rows (``bench.outliers.ROWS``)."""
    data = load(OUTLIERS)
    models = list(data["models"].values())
    head = [""] + [f"{m['model']} TP {m['tp']}" for m in models]
    return table(head, [[label] + [fmt(m) for m in models] for label, fmt in OUTLIER_ROWS]) + "\n\n" + \
        source_line(OUTLIERS, data, f"ratio {models[0]['ratio']:g}")


PLAN = "accuracy-smollm2-135m-tp3-se0.03-plan.json"


@block("accuracy-plan")
def accuracy_plan() -> str:
    """bench.accuracy --target-se --plan-only: items per task from the pilot, and the time it predicts."""
    data = load(PLAN)
    plan = data["plan"]
    rows = [[t["task"], t["primary"], str(t["available"]), f"`{t['driving_scheme']}`", str(t["items_needed"]),
             str(t["items_run"]), f"{100 * t['expected_delta_se']:.2f}", f"{t['seconds_per_item_per_scheme']:.2f}",
             f"{t['estimated_seconds']:.0f}"] for t in plan["tasks"]]
    head = ["task", "metric", "items", "noisiest scheme", "items needed", "items run", "expected Δ SE (pts)",
            "s / item / scheme (pilot)", "estimated s"]
    note = (f"target SE {100 * plan['target_se']:g} points ({plan['target']}); {len(plan['schemes'])} schemes; "
            f"pilot run `{plan['pilot_run']}` ({plan['tasks'][0]['pilot_items']} items, {plan['pilot_seconds']:.0f} s); whole run estimated {plan['estimated_seconds']:.0f} s")
    return table(head, rows) + "\n\n" + source_line(PLAN, data, note)


DEMO_FILES = ["demo-gemma3-270m-tp2-cold.json", "demo-gemma3-270m-tp2-warm.json"]
DEMO_BEFORE = ["demo-gemma3-270m-tp2.json"]  # before the vocabulary-parallel held-out metrics


def _demo_rows(names: list[str]) -> str:
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
                         f"{sub['load_before'][0]:.1f} -> {sub['load_after'][0]:.1f}", stages])
        sources.append(source_line(name, data))
    head = ["cache", "run", "wall s", "CPU s (all ranks)", "load before -> after", "stages (s)"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {s}" for s in sources)


@block("demo-gemma")
def demo_gemma() -> str:
    return _demo_rows(DEMO_FILES)


@block("demo-gemma-before")
def demo_gemma_before() -> str:
    return _demo_rows(DEMO_BEFORE)


@block("demo-metrics")
def demo_metrics() -> str:
    """What the Gemma demo measured: one row per scheme, the same at the printed digits in every
    submit of every file (float sums differ in the last bits with the order; a difference at the
    printed digits is refused, not averaged)."""
    def rows_of(metrics: dict) -> list[list[str]]:
        return [[f"`{s}`", _pct(m["top1_agreement"]), f"{m['kl']:.4f}", f"{m['ppl']:.2f}"] for s, m in metrics.items()]
    submits = [(name, sub) for name in DEMO_FILES + DEMO_BEFORE for sub in load(name)["submits"]]
    rows = rows_of(submits[0][1]["metrics"])
    for name, sub in submits:
        if rows_of(sub["metrics"]) != rows:
            raise ReportError(f"{name}: run {sub['run']} measured other metrics than {submits[0][1]['run']}")
    note = f"the same in all {len(submits)} submits (the runs of the timing tables here and in docs/history.md)"
    return table(["scheme", "top-1 agree", "KL", "ppl"], rows) + "\n\n" + \
        "\n".join(f"- {source_line(n, load(n))}" for n in DEMO_FILES + DEMO_BEFORE) + f"\n- {note}"


MATCHED_FILES = ["matched-bits-presets.json", "matched-bits-new.json", "matched-bits-pinned.json",
                 "matched-bits-scales.json"]
# the README's rows: the paper, every preset that runs at 576, and the best new schemes near 4.25 bits
MATCHED = ["int4-static-top1/64", "mxfp4", "nvfp4", "quickreduce-int4", "mxfp8", "quickreduce-int6", "quickreduce-int8",
           "lm4-group64-rot64", "nf4-group64-rot64", "fp4e2m1-group32-se8m0-rot64", "lm4-group32-se8m0-rot64",
           "lm4p-static-top1/64", "lm4-static-top1/64", "lm4p-token-rot64", "lm4-token-rot64", "lm4s-token-rot64",
           "nf4-token-rot64", "fp4e2m1-token-rot64"]


@block("matched-bits")
def matched_bits() -> str:
    """The paper against the presets and the new codes, rows of several sum-error files (one run each)."""
    by = {r["scheme"]: r for r in matched_rows([str(ROOT / RESULTS / n) for n in MATCHED_FILES])}
    missing = [s for s in MATCHED if s not in by]
    if missing:
        raise ReportError(f"no rows for {', '.join(missing)}")
    rows = [[f"`{r['scheme']}`", f"{r['bits_per_value']:.4g}", f"{r['kl']:.4f}", _pct(r["top1_agreement"]),
             f"{r['ppl']:.2f}", f"{r.get('table_bytes', 0):,}", r["source"]] for r in (by[s] for s in MATCHED)]
    head = ["scheme", "bits/value (both legs)", "KL", "top-1 agree", "ppl", "table bytes (once per run)", "file"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {source_line(n, load(n))}" for n in MATCHED_FILES)


SWEEPS_LM = ["sweep-lm-allocation.json", "sweep-lm-pinned-allocation.json", "sweep-lm-group32-allocation.json"]


@block("sweep-lm")
def sweep_lm() -> str:
    """Per-site allocations with the fitted codebooks among the candidates: the best point per budget."""
    rows, notes = [], []
    for name in SWEEPS_LM:
        data = load(name)
        points = {p["scheme"]: p for p in data["points"]}
        cands = ", ".join(f"`{c}`" for c in data["params"]["allocate_candidates"])
        for budget, scheme in sorted(data["best_at"].items(), key=lambda kv: -float(kv[0])):
            p = points[scheme]
            rows.append([f"`{data['run']['id']}`", budget, f"{p['bits_per_value']:.3f}", f"{p['kl']:.4f}",
                         _pct(p["top1_agreement"]), f"{p['ppl']:.2f}"])
        spec = name.replace(".json", ".spec.json")
        resumed = load(spec)["params"].get("resume_from")
        notes.append(f"- `{data['run']['id']}` ({data['run']['seconds']:.0f} s"
                     + (f", resumed from `{resumed}`" if resumed else "") + f"): candidates {cands}; "
                     f"`{RESULTS / name}`, its spec `{RESULTS / spec}`")
    return table(["sweep", "budget", "bits/value", "KL", "top-1", "ppl"], rows) + "\n\n" + "\n".join(notes)




# -- the teaching pages, the links, the model ------------------------------------------------------
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
            f"{data['loadavg_before'].split()[0]} -> {data['loadavg_after'].split()[0]}; the Playground page reruns "
            f"after a control change in {min(page):.0f}-{max(page):.0f} ms (median of {data['page'][0]['repeats']} "
            f"per change, {len(page)} changes, AppTest); made by `python -m bench.playground --calibration "
            "runs/<calibrate id>/calibration --page` (the file predates recorded commands)")
    head = ["scheme", "bits/value", "SQNR of the rank's message dB", "SQNR of the sum dB", "compute ms (median)"]
    return table(head, rows) + "\n\nSource: `" + str(RESULTS / PLAYGROUND) + "`; " + note


GATE = "collectives-gate-native.json"


@block("link-model")
def link_model() -> str:
    """The emulated links against the ring all-reduce's ideal time, 2 (N-1)/N x bytes x 8 / rate."""
    data = load(GATE)
    rows = []
    for r in data["records"]:
        if r["method"] != "all_reduce" or r["link"] == "loopback" or r["tokens"] < 256:
            continue
        ideal_ms = 1e3 * projection.allreduce_s(r["tp"], r["tokens"] * r["hidden"] * 2, 0.0, rate_bits(r["link"]) / 8)
        rows.append([r["link"], f"{r['tokens']} x {r['hidden']}", f"{r['bytes_per_rank'] / 1e6:.2f}",
                     f"{ideal_ms:.0f}", f"{r['median_ms']:.0f}", f"{r['median_ms'] / ideal_ms:.2f}"])
    head = ["link", "tokens x hidden", "bf16 MB", "ring ideal ms", "measured ms", "measured / ideal"]
    return table(head, rows) + "\n\n" + source_line(GATE, data, "the bf16 all-reduce rows, TP 3")


LINKS_SMALL = "collectives-tp3-576-links.json"


@block("projection")
def projection_table() -> str:
    """lowbit.method.projection (a model, not a measurement) for Llama-2-13B at TP 8 and the paper's
    bits, and how far the same model lands from the measured gloo collectives."""
    shape, bits = projection.SHAPES["llama2-13b"], 4.1875
    rows = []
    for link in projection.INTERCONNECTS.values():
        r = projection.project(shape, link, 8, 8192, bits)
        cross = projection.crossover_tokens(shape, link, 8, bits)
        rows.append([link.name, f"{r['exact_us'] / 1e3:.2f}", f"{min(r['gather_us'], r['two_shot_us']) / 1e3:.2f}",
                     f"{r['comm_speedup']:.2f}", f"{r['e2e_speedup']:.2f}", "> 65536" if cross is None else str(cross)])
    head = ["link (model)", "bf16 all-reduce ms", "quantized ms", "communication ×", "end to end ×",
            "quantized wins from (tokens)"]
    data = load(LINKS_SMALL)
    checked = projection.check_against(data["records"])
    big = sorted(abs(r["rel_error"]) for r in checked if r["tokens"] * r["hidden"] >= 2048 * 576)
    small = [abs(r["rel_error"]) for r in checked if r["tokens"] <= 16 and r["method"] != "all_reduce"]
    note = (f"{shape.name}, TP 8, {bits} bits/value, 8192 tokens: `python -m lowbit.method.projection --check "
            f"{RESULTS / LINKS_SMALL}` (inputs and formulas in `lowbit/method/projection.py`). Checked against the "
            f"measured gloo collectives (alpha and beta fitted per link to the bf16 all-reduce, codec time from the "
            f"measured compute-only runs): median |error| {100 * big[len(big) // 2]:.0f}% at >= 2048 x 576 values, "
            f"{100 * min(small):.0f}-{100 * max(small):.0f}% for the quantized methods at 1-16 tokens")
    return table(head, rows) + "\n\n" + note + "\n\n" + source_line(LINKS_SMALL, data)


@block("collectives-small")
def collectives_small() -> str:
    data = load(LINKS_SMALL)
    return collectives_markdown(data["records"]) + "\n\n" + source_line(LINKS_SMALL, data)


GRID = "collectives-loopback-grid.json"


@block("collectives-grid")
def collectives_grid() -> str:
    """The loopback grid (TP 2/3/4, several sizes) in one line per TP: how the quantized records compare with bf16."""
    data = load(GRID)
    rows = []
    for tp in sorted({r["tp"] for r in data["records"]}):
        quant = [r["speedup_vs_bf16"] for r in data["records"]
                 if r["tp"] == tp and r["method"] != "all_reduce" and r.get("speedup_vs_bf16") is not None]
        quant.sort()
        rows.append([str(tp), str(len(quant)), str(sum(s > 1 for s in quant)), f"{quant[len(quant) // 2]:.2f}",
                     f"{quant[0]:.2f} - {quant[-1]:.2f}"])
    head = ["TP", "quantized records", "faster than bf16", "median × bf16", "range × bf16"]
    return table(head, rows) + "\n\n" + source_line(GRID, data)


# -- the README's headline results: a few rows of the files the docs render in full --------------
HEADLINE_SCHEMES = [("int4-token", "Int4, one scale per token"), ("int4-static-top1/64", "the paper"),
                    ("mxfp4", "MXFP4 preset"), ("nvfp4", "NVFP4 preset"),
                    ("lm4-group64-rot64", "fitted 4-bit codebook, rotated, scale per 64")]


@block("headline-schemes")
def headline_schemes() -> str:
    by = {r["scheme"]: r for r in matched_rows([str(ROOT / RESULTS / n) for n in [SUM_ERROR] + MATCHED_FILES])}
    rows = [[f"`{s}`", what, f"{by[s]['bits_per_value']:.4g}", f"{by[s]['kl']:.3f}", _pct(by[s]["top1_agreement"])]
            for s, what in HEADLINE_SCHEMES]
    files = dict.fromkeys(by[s]["source"] for s, _ in HEADLINE_SCHEMES)
    return table(["scheme", "what", "bits/value", "KL", "top-1 agree"], rows) + "\n\n" + \
        "\n".join(f"- {source_line(n, load(n))}" for n in files)


@block("headline-allocation")
def headline_allocation() -> str:
    """The lowest KL any per-site allocation sweep reached at each budget, next to the paper's point."""
    best, paper = {}, None
    for name in SWEEPS_LM:
        data = load(name)
        points = {p["scheme"]: p for p in data["points"]}
        paper = paper or points.get("int4-static-top1/64")
        for budget, scheme in data["best_at"].items():
            if budget not in best or points[scheme]["kl"] < best[budget][0]["kl"]:
                best[budget] = (points[scheme], data["run"]["id"], name)
    if paper is None:
        raise ReportError("no sweep holds the paper's point int4-static-top1/64")
    rows = [["paper `int4-static-top1/64`", "", f"{paper['bits_per_value']:.4f}", f"{paper['kl']:.4f}",
             _pct(paper["top1_agreement"])]]
    for budget, (p, run, _) in sorted(best.items(), key=lambda kv: -float(kv[0])):
        rows.append([f"per-site map, budget {budget}", f"`{run}`", f"{p['bits_per_value']:.3f}", f"{p['kl']:.4f}",
                     _pct(p["top1_agreement"])])
    files = dict.fromkeys(n for _, _, n in best.values())
    return table(["scheme", "sweep", "bits/value", "KL", "top-1 agree"], rows) + "\n\n" + \
        "\n".join(f"- `{RESULTS / n}` (spec `{RESULTS / n.replace('.json', '.spec.json')}`)" for n in files)


@block("headline-collectives")
def headline_collectives() -> str:
    data = load(GATE)
    by = {(r["link"], r["method"]): r for r in data["records"] if r["tokens"] == 8192}
    links = list(dict.fromkeys(r["link"] for r in data["records"]))
    rows = [[link, f"{by[(link, 'all_reduce')]['median_ms']:.0f}", f"{by[(link, 'gather')]['speedup_vs_bf16']:.2f}x",
             f"{by[(link, 'two_shot')]['speedup_vs_bf16']:.2f}x"] for link in links]
    schemes = ", ".join(f"{m} `{by[(links[0], m)]['scheme']}`" for m in ("gather", "two_shot"))
    return table(["link", "bf16 all-reduce ms", "gather × bf16", "two-shot × bf16"], rows) + "\n\n" + \
        source_line(GATE, data, f"TP 3, 8192 x 576; {schemes}")


@block("headline-throughput")
def headline_throughput() -> str:
    rows, sources = [], []
    for label, name in THROUGHPUT_LINKS:
        data = load(name)
        paper, gated = rows_by_scheme(dict(rows=data["records"]), ["int4-static-top1/64", "int4-static-top1/64@minauto"])
        rows.append([label, f"{paper['prefill_speedup']:.2f}", f"{paper['decode_speedup']:.2f}",
                     f"{gated['decode_speedup']:.2f}"])
        sources.append(source_line(name, data))
    head = ["link", "prefill × bf16", "decode × bf16", "decode × bf16, size gate `@minauto`"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {s}" for s in sources)


HEADLINE_OUTLIERS = ["Jaccard random sets", "Jaccard later batches vs EMA, mean", "largest stored partial |x|",
                     "largest stored partial: layer/module/rank", "largest stored partial / median |x| there",
                     "sites with range > ratio x median"]


@block("headline-outliers")
def headline_outliers() -> str:
    data = load(OUTLIERS)
    models = list(data["models"].values())
    fmt = dict(OUTLIER_ROWS)
    head = [""] + [f"{m['model']} TP {m['tp']}" for m in models]
    return table(head, [[label] + [fmt[label](m) for m in models] for label in HEADLINE_OUTLIERS]) + "\n\n" + \
        source_line(OUTLIERS, data, f"ratio {models[0]['ratio']:g}")


# -- documents ---------------------------------------------------------------------------------
def documents(root: Path | None = None) -> list[Path]:
    """README.md and every docs/*.md (sorted): the pages whose blocks this module renders."""
    root = ROOT if root is None else root
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def _name(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT.resolve()).as_posix()
    except ValueError:
        return path.name


def render(text: str, where: str = "README.md") -> str:
    """``text`` with every table block re-rendered from its files; ``where`` names the page in errors."""
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise ReportError(f"{where} block '{name}': unknown table; allowed: {', '.join(TABLES)}")
        try:
            body = TABLES[name]()
        except (ReportError, KeyError, StopIteration) as exc:
            raise ReportError(f"{where} block '{name}': {exc}") from exc
        return f"<!-- table: {name} -->\n{body}\n<!-- /table -->"
    return BLOCK.sub(one, text)


def stray_tables(text: str) -> list[int]:
    """Line numbers of Markdown tables outside every block (and outside code fences)."""
    inside = [(m.start(), m.end()) for m in BLOCK.finditer(text)]
    out, fence, pos, prev_table = [], False, 0, False
    for number, line in enumerate(text.split("\n"), start=1):
        if line.startswith("```"):
            fence = not fence
        is_table = line.startswith("|") and not fence
        if is_table and not prev_table and not any(a <= pos < b for a, b in inside):
            out.append(number)
        prev_table = is_table
        pos += len(line) + 1
    return out


def check(paths: list[Path] | None = None) -> list[str]:
    """Problems of ``paths`` (default: every document): a block whose text differs from its files,
    a block with an unknown name, a table outside every block, a table placed twice; with the
    default, also a registered table that no document places."""
    problems, placed = [], {}
    for path in documents() if paths is None else paths:
        text, where = path.read_text(), _name(path)
        for m in BLOCK.finditer(text):
            name = m.group("name")
            line = text.count("\n", 0, m.start()) + 1
            if name in placed:
                problems.append(f"{where}:{line}: table '{name}' is placed twice (also {placed[name]}); "
                                "place it once and link to it")
            placed.setdefault(name, f"{where}:{line}")
            if name not in TABLES:
                problems.append(f"{where}:{line}: block '{name}': unknown table; allowed: {', '.join(TABLES)}")
                continue
            try:
                body = render(m.group(0), where)
            except ReportError as exc:
                problems.append(f"{where}:{line}: {exc}")
                continue
            if body != m.group(0):
                problems.append(f"{where}:{line}: table '{name}' differs from its files (run python -m bench.report)")
        problems += [f"{where}:{n}: a table outside every <!-- table: NAME --> block" for n in stray_tables(text)]
    if paths is None:
        problems += [f"table '{n}' is registered but no page places it (README.md or docs/*.md)"
                     for n in TABLES if n not in placed]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write; exit 1 on any problem")
    parser.add_argument("--list", action="store_true", help="print every table with its page")
    parser.add_argument("pages", nargs="*", type=Path, help="only these pages (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    pages = args.pages or None
    if args.list:
        where = {m.group("name"): _name(p) for p in documents() for m in BLOCK.finditer(p.read_text())}
        print("\n".join(f"{n:24s} {where.get(n, '(no page)')}" for n in TABLES))
        return 0
    if args.check:
        problems = check(pages)
        print("\n".join(problems) or f"{len(pages or documents())} pages: every table matches its files")
        return 1 if problems else 0
    try:
        count = 0
        for path in pages or documents():
            text = path.read_text()
            rendered = render(text, _name(path))
            if rendered != text:
                path.write_text(rendered)
            count += len(BLOCK.findall(rendered))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(pages or documents())} pages: {count} tables rendered")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
