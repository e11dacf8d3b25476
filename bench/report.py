# Size: ~490 lines: one short renderer per README table (21 of them) after the shared reading and checking.
"""README tables rendered from the result files under bench/results/, through one renderer.

    .venv/bin/python -m bench.report            # rewrite every table block of README.md from its files
    .venv/bin/python -m bench.report --check    # exit 1 naming each block README disagrees with
    .venv/bin/python -m bench.report --list     # the tables and the files they read

A measured table in README.md sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``;
``TABLES[NAME]`` renders it from its files: the table, then one line naming each file with the
command that made it, its date and the machine's load where the file has them. Prose around a
block is written by hand and quotes the block's numbers. ``check`` also fails on a Markdown table
outside every block (a table nobody can trace to a file) and on a block with an unknown name.
``tests/test_readme_tables.py`` runs the check, so README cannot drift from its files.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

from bench import classroom_rows
from bench.accuracy import markdown as accuracy_markdown
from bench.collectives import markdown_table as collectives_markdown
from bench.matched_bits import load_rows as matched_rows
from bench.outliers import ROWS as OUTLIER_ROWS
from bench.throughput import markdown as throughput_markdown
from launch.client import format_results
from lowbit.scheme import MAX_MIN_MESSAGE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("bench/results")
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- table: (?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


class ReportError(ValueError):
    """A table cannot be rendered from its files (missing file, missing row)."""


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


def uniform() -> str:
    return _text_rows(SUM_ERROR, UNIFORM, rel_error=False)


def codebook() -> str:
    return _text_rows(SUM_ERROR, CODEBOOK, rel_error=True, source=SAME_RUN)


def threshold() -> str:
    return _text_rows(SUM_ERROR, THRESHOLD, rel_error=False, source=SAME_RUN)


def rounding() -> str:
    data = load("sum-error-rounding.json")
    rows = []
    for s in ROUNDING:
        near, sr = rows_by_scheme(data, [s, f"{s}-sr"])
        rows.append([f"`{s}`"] + [f"{r['mean_rel_error']:.3f} / {r['max_rel_error']:.3f}, {r['kl']:.3f}"
                                  for r in (near, sr)])
    head = ["scheme", "nearest: mean / max rel. error, KL", "`-sr`: mean / max rel. error, KL"]
    return table(head, rows) + "\n\n" + source_line("sum-error-rounding.json", data)


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
    note = "its spec: `bench/results/sweep-nf-allocation.spec.json` (`python -m launch submit <spec> --wait`)"
    return table(["budget", "bits/value", "KL", "top-1", "ppl"], rows) + "\n\n" + source_line(name, data, note)


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
KERNEL_CPU_ROWS = {"int4-static-top1/64": [(1, 576), (256, 576), (2048, 576), (8192, 576), (8192, 4096), (8192, 5120)],
                   "int4-group32-top1/64": [(2048, 576), (8192, 576), (8192, 5120)]}


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


def collectives_8192() -> str:
    name = "collectives-tp3-8192x576.json"
    data = load(name)
    return collectives_markdown(data["records"]) + "\n\n" + source_line(name, data)


def _accuracy(name: str, tasks: list[str]) -> str:
    data = load(name)
    return accuracy_markdown(data["result"], data["rows"], tasks) + "\n\n" + source_line(name, data)


def accuracy() -> str:
    return _accuracy("accuracy.json", ["arc_easy", "piqa", "winogrande"])


def neighbours() -> str:
    return _accuracy("neighbours.json", ["arc_easy", "piqa"])


def gemma_tp2() -> str:
    name = "gemma3-270m-tp2.json"
    data = load(name)
    rows = [[f"`{r['scheme']}`", f"{r['bits_per_value']:.4g}", f"{r['ppl']:.3f}", f"{r['kl']:.4f}",
             f"{100 * r['top1_agreement']:.1f}", f"{r['clamped']:,}"] for r in data["rows"]]
    return table(["scheme", "bits/value", "ppl", "KL", "top-1 %", "clamped values"], rows) + "\n\n" + \
        source_line(name, data)


THROUGHPUT_LINKS = [("loopback", "throughput-loopback-native.json"), ("1 Gbit/s", "throughput-1gbit-native.json"),
                    ("100 Mbit/s", "throughput-100mbit-native.json")]


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
        sources.append(source_line(name, data))
    head = ["link", "scheme", "bits/value", "prefill × bf16", "decode × bf16"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {s}" for s in sources)


def _gate_text(gate: dict) -> str:
    return "never quantize" if gate["bytes"] >= MAX_MIN_MESSAGE else f"{gate['bytes'] / 1024:.0f} KiB"


def throughput_eager() -> str:
    name = "throughput.json"
    data = load(name)
    return throughput_markdown(data) + "\n\n" + source_line(name, data)


def evaluate_tasks() -> str:
    """The CLI's own evaluate table (``launch.client.format_results``) of a stored run, as printed."""
    name = "evaluate-sciq-openbookqa.json"
    data = load(name)
    return f"```text\n$ .venv/bin/{data['meta']['command']}\n{format_results(data)}\n```\n\n" + \
        source_line(name, data, f"wall time {data['meta']['wall_seconds']} s, queue wait included; the command "
                                    "writes `<out>/results.json`, kept here as one file")


OUTLIERS = "outliers-smollm2-135m-tp3-gemma3-270m-tp2.json"


def outliers() -> str:
    """bench.outliers: consistency (Jaccard) and size of two calibrations' outliers, side by side,
    with that script's own rows (``bench.outliers.ROWS``)."""
    data = load(OUTLIERS)
    models = list(data["models"].values())
    head = [""] + [f"{m['model']} TP {m['tp']}" for m in models]
    return table(head, [[label] + [fmt(m) for m in models] for label, fmt in OUTLIER_ROWS]) + "\n\n" + \
        source_line(OUTLIERS, data, f"ratio {models[0]['ratio']:g}")


PLAN = "accuracy-smollm2-135m-tp3-se0.03-plan.json"


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


DEMO_FILES = ["demo-gemma3-270m-tp2-cold.json", "demo-gemma3-270m-tp2-warm.json", "demo-gemma3-270m-tp2.json"]


def demo_gemma() -> str:
    """bench.demo_timing: the Gemma demo from submit to result, per submit, with the load around it."""
    rows, sources = [], []
    for name in DEMO_FILES:
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


MATCHED_FILES = ["matched-bits-presets.json", "matched-bits-new.json", "matched-bits-pinned.json",
                 "matched-bits-scales.json"]
# the README's rows: the paper, every preset that runs at 576, and the best new schemes near 4.25 bits
MATCHED = ["int4-static-top1/64", "mxfp4", "nvfp4", "quickreduce-int4", "mxfp8", "quickreduce-int6", "quickreduce-int8",
           "lm4-group64-rot64", "nf4-group64-rot64", "fp4e2m1-group32-se8m0-rot64", "lm4-group32-se8m0-rot64",
           "lm4p-static-top1/64", "lm4-static-top1/64", "lm4p-token-rot64", "lm4-token-rot64", "lm4s-token-rot64",
           "nf4-token-rot64", "fp4e2m1-token-rot64"]


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


CLASSROOM, CLASSROOM_MAIN = "classroom-load.json", "classroom-load-main.json"
CLASSROOM_PROFILE = ["classroom-profile-before.json", "classroom-profile-after.json"]


def classroom_load() -> str:
    """bench.classroom_load: a class's sessions and tabs on one server, against issue 29's targets."""
    data, before = load(CLASSROOM), load(CLASSROOM_MAIN)
    head, rows, note = classroom_rows.load_rows(data, before)
    return table(head, rows) + "\n\n" + note + "\n\n" + "\n".join(
        f"- {source_line(n, d)}" for n, d in ((CLASSROOM_MAIN, before), (CLASSROOM, data)))


def classroom_profile() -> str:
    """bench.classroom_load --profile on main and on this code: where one rerun's CPU goes."""
    before, after = (load(n) for n in CLASSROOM_PROFILE)
    return table(*classroom_rows.profile_rows(before, after)) + "\n\n" + \
        "\n".join(f"- {source_line(n, load(n))}" for n in CLASSROOM_PROFILE)


TABLES: dict[str, Callable[[], str]] = {
    "uniform": uniform, "codebook": codebook, "threshold": threshold, "rounding": rounding, "sweep-nf": sweep_nf,
    "presets": presets, "kernels-cpu": kernels_cpu, "kernels-native": kernels_native,
    "collectives-gate": collectives_gate, "accuracy": accuracy, "gemma-tp2": gemma_tp2, "neighbours": neighbours,
    "collectives-8192": collectives_8192, "throughput-native": throughput_native, "throughput-eager": throughput_eager,
    "evaluate-tasks": evaluate_tasks, "outliers": outliers, "accuracy-plan": accuracy_plan, "demo-gemma": demo_gemma,
    "matched-bits": matched_bits, "sweep-lm": sweep_lm, "classroom-load": classroom_load,
    "classroom-profile": classroom_profile,
}


# -- README ------------------------------------------------------------------------------------
def render(text: str) -> str:
    """``text`` with every table block re-rendered from its files."""
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise ReportError(f"README block '{name}': unknown table; allowed: {', '.join(TABLES)}")
        try:
            body = TABLES[name]()
        except (ReportError, KeyError, StopIteration) as exc:
            raise ReportError(f"README block '{name}': {exc}") from exc
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


def check(path: Path = README) -> list[str]:
    """Problems: blocks whose text differs from their files, tables outside blocks."""
    text = path.read_text()
    problems = []
    rendered = render(text)
    old = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
    new = {m.group("name"): m.group("body") for m in BLOCK.finditer(rendered)}
    problems += [f"{path.name}: table '{n}' differs from its files (run python -m bench.report)"
                 for n in old if old[n] != new[n]]
    problems += [f"{path.name}:{line}: a table outside every <!-- table: NAME --> block" for line in stray_tables(text)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write; exit 1 on any difference")
    parser.add_argument("--list", action="store_true", help="print the table names")
    parser.add_argument("--readme", default=str(README))
    args = parser.parse_args(argv)
    path = Path(args.readme)
    if args.list:
        print("\n".join(TABLES))
        return 0
    try:
        if args.check:
            problems = check(path)
            print("\n".join(problems) or f"{path.name}: every table matches its files")
            return 1 if problems else 0
        text = path.read_text()
        path.write_text(render(text))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path.name}: {len(BLOCK.findall(path.read_text()))} tables rendered")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
