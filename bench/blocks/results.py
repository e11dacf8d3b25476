"""The tables of docs/results.md: text metrics of the sum-error runs, the sweeps, the accuracy
runs with tasks, the outliers and the throughput, each from its files under bench/results/."""
from __future__ import annotations

from bench.accuracy import markdown as accuracy_markdown
from bench.matched_bits import load_rows as matched_rows
from bench.outliers import ROWS as OUTLIER_ROWS
from bench.blocks import RESULTS, ReportError, block, load, pct, ppl, result_path, rows_by_scheme, source_line, table
from lowbit.scheme import MAX_MIN_MESSAGE


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
        rows.append([f"`{r['scheme']}`", f"{r['bits_per_value']:.4g}", f"{r['kl']:.3f}", pct(r["top1_agreement"]),
                     ppl(r["ppl"])] + ([f"{r['mean_rel_error']:.3f}"] if rel_error else []))
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
             pct(paper["top1_agreement"]), ppl(paper["ppl"])]]
    for budget, scheme in sorted(data["best_at"].items(), key=lambda kv: -float(kv[0])):
        p = points[scheme]
        label = budget if ";" in scheme else f"{budget} (`{scheme}` everywhere)"
        rows.append([label, f"{p['bits_per_value']:.3f}", f"{p['kl']:.3f}", pct(p["top1_agreement"]), ppl(p["ppl"])])
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
    return _throughput_table(THROUGHPUT_LINKS)


THROUGHPUT_TWO_SHOT = [("100 Mbit/s", "throughput-100mbit-twoshot.json")]


@block("throughput-twoshot")
def throughput_twoshot() -> str:
    """The paper's gather and its two-shot (int4 second leg, the fused owner step) at 100 Mbit/s."""
    return _throughput_table(THROUGHPUT_TWO_SHOT)


def _throughput_table(links: list[tuple[str, str]]) -> str:
    rows, sources = [], []
    for label, name in links:
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


MATCHED_FILES = ["matched-bits-presets.json", "matched-bits-new.json", "matched-bits-pinned.json",
                 "matched-bits-scales.json", "matched-bits-faithful-tp3.json"]
# the README's rows: the paper, every preset that runs at 576 / TP 3 (the systems' emulations: mxfp4, nvfp4;
# QuickReduce, FlashInfer and TensorRT-LLM refuse TP 3), lowbit's own renderings the presets had before
# issue 26 (bench.matched_bits.PRESETS_BEFORE_26), and the best new schemes near 4.25 bits
MATCHED = ["int4-static-top1/64", "mxfp4", "fp4e2m1-group32-se8m0", "nvfp4", "fp4e2m1-group16-se4m3",
           "int4-group32-sfp16@twoshot+int4-group32-sfp16", "mxfp8", "int6-group32-sfp16@twoshot+int6-group32-sfp16",
           "int8-group32-sfp16@twoshot+int8-group32-sfp16",
           "lm4-group64-rot64", "nf4-group64-rot64", "fp4e2m1-group32-se8m0-rot64", "lm4-group32-se8m0-rot64",
           "lm4p-static-top1/64", "lm4-static-top1/64", "lm4p-token-rot64", "lm4-token-rot64", "lm4s-token-rot64",
           "nf4-token-rot64", "fp4e2m1-token-rot64"]


@block("matched-bits")
def matched_bits() -> str:
    """The paper against the presets and the new codes, rows of several sum-error files (one run each)."""
    by = {r["scheme"]: r for r in matched_rows([str(result_path(n)) for n in MATCHED_FILES])}
    missing = [s for s in MATCHED if s not in by]
    if missing:
        raise ReportError(f"no rows for {', '.join(missing)}")
    rows = [[f"`{r['scheme']}`", f"{r['bits_per_value']:.4g}", f"{r['kl']:.4f}", pct(r["top1_agreement"]),
             f"{r['ppl']:.2f}", f"{r.get('table_bytes', 0):,}", r["source"]] for r in (by[s] for s in MATCHED)]
    head = ["scheme", "bits/value (both legs)", "KL", "top-1 agree", "ppl", "table bytes (once per run)", "file"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {source_line(n, load(n))}" for n in MATCHED_FILES)


MATCHED_TP2 = "matched-bits-faithful-gemma3-tp2.json"


@block("matched-bits-tp2")
def matched_bits_tp2() -> str:
    """The shipping systems' emulations at TP 2 on gemma3-270m (QuickReduce, FlashInfer and TensorRT-LLM
    refuse TP 3, and smollm2-135m's 9 heads shard only at TP 1 and 3), next to lowbit's own rendering of
    QuickReduce INT4 (the preset's expansion before issue 26)."""
    data = load(MATCHED_TP2)
    rows = [[f"`{r['scheme']}`", f"{r['bits_per_value']:.4g}", f"{r['kl']:.4f}", pct(r["top1_agreement"]),
             f"{r['ppl']:.2f}"] for r in sorted(data["rows"], key=lambda r: (r["bits_per_value"], r["kl"]))]
    head = ["scheme (gemma3-270m, TP 2)", "bits/value (both legs)", "KL", "top-1 agree", "ppl"]
    return table(head, rows) + "\n\n" + source_line(MATCHED_TP2, data)


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
                         pct(p["top1_agreement"]), f"{p['ppl']:.2f}"])
        spec = name.replace(".json", ".spec.json")
        resumed = load(spec)["params"].get("resume_from")
        notes.append(f"- `{data['run']['id']}` ({data['run']['seconds']:.0f} s"
                     + (f", resumed from `{resumed}`" if resumed else "") + f"): candidates {cands}; "
                     f"`{RESULTS / name}`, its spec `{RESULTS / spec}`")
    return table(["sweep", "budget", "bits/value", "KL", "top-1", "ppl"], rows) + "\n\n" + "\n".join(notes)
