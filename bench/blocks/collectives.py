"""The tables of docs/collectives.md: the collective benchmark with the native codec, the emulated
links against the ring's ideal time, and the alpha-beta model of real interconnects."""
from __future__ import annotations

from bench.blocks import RESULTS, block, load, source_line, table
from launch.spec import rate_bits
from lowbit.method import projection


def _label(method: str, scheme: str) -> str:
    return {"gather": "gather", "two_shot": "two-shot"}.get(method, method) + f" `{scheme}`"


@block("collectives-gate")
def collectives_gate() -> str:
    name = "collectives-gate-native.json"
    data = load(name)
    recs = [r for r in data["records"] if r["tokens"] >= 256 and r["method"] != "exact"]
    links = list(dict.fromkeys(r["link"] for r in data["records"]))
    by = {(r["tokens"], r["method"], r["scheme"], r["link"]): r for r in recs}
    rows = []
    for key in dict.fromkeys((r["tokens"], r["method"], r["scheme"]) for r in recs):
        cells = [f"{key[0]}", _label(key[1], key[2])]
        for link in links:
            r = by.get(key + (link,))
            cells.append("" if r is None else f"{r['speedup_vs_bf16']:.2f}x [{r['compute_ms']:.3g}]")
        rows.append(cells)
    loads = [run["meta"]["load"]["start"][0] for run in data["meta"]["runs"]]
    note = "load at the start of each link's job: " + ", ".join(f"{v:.1f}" for v in loads)
    return table(["tokens x 576", "scheme"] + links, rows) + "\n\n" + source_line(name, data, note)


TWO_SHOT = ["collectives-twoshot-fused.json", "collectives-twoshot-fused-run2.json"]


@block("collectives-twoshot-fused")
def collectives_twoshot_fused() -> str:
    """8192 x 576 at TP 3 after the fused two-shot owner step, one row per (run, link, scheme):
    median, ratio to bf16 and compute-only reduce, with each link job's load beside it."""
    rows, sources = [], []
    for n, name in enumerate(TWO_SHOT, 1):
        data = load(name)
        loads = {run["link"]: run["meta"]["load"] for run in data["meta"]["runs"]}
        for r in data["records"]:
            load_text = "{:.1f} -> {:.1f}".format(loads[r["link"]]["start"][0], loads[r["link"]]["end"][0])
            rows.append([str(n), r["link"], _label(r["method"], r["scheme"]), f"{r['median_ms']:.0f}",
                         f"{r['speedup_vs_bf16']:.2f}x", f"{r['compute_ms']:.3g}", load_text])
        sources.append(f"- run {n}: " + source_line(name, data))
    head = ["run", "link", "scheme (8192 x 576, TP 3)", "median ms", "x bf16", "compute ms",
            "load (1 min, start -> end)"]
    return table(head, rows) + "\n\n" + "\n".join(sources)


GATE = "collectives-gate-native.json"


@block("link-model")
def link_model() -> str:
    """The emulated links against the ring all-reduce's ideal time, 2 (N-1)/N x bytes x 8 / rate."""
    data = load(GATE)
    rows = []
    for r in data["records"]:
        if r["method"] != "exact" or r["link"] == "loopback" or r["tokens"] < 256:
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
    small = [abs(r["rel_error"]) for r in checked if r["tokens"] <= 16 and r["method"] != "exact"]
    note = (f"{shape.name}, TP 8, {bits} bits/value, 8192 tokens: `python -m lowbit.method.projection --check "
            f"{RESULTS / LINKS_SMALL}` (inputs and formulas in `lowbit/method/projection.py`). Checked against the "
            f"measured gloo collectives (alpha and beta fitted per link to the bf16 all-reduce, codec time from the "
            f"measured compute-only runs): median |error| {100 * big[len(big) // 2]:.0f}% at >= 2048 x 576 values, "
            f"{100 * min(small):.0f}-{100 * max(small):.0f}% for the quantized methods at 1-16 tokens")
    return table(head, rows) + "\n\n" + note + "\n\n" + source_line(LINKS_SMALL, data)
