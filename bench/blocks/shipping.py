"""The tables of docs/shipping.md: lowbit's ``quickreduce-int4`` against the re-derived QuickReduce
INT4 codec, the issue's edge inputs, and QuickReduce per hardware path
(``python -m bench.shipping_agreement`` writes the file)."""
from __future__ import annotations

from bench.blocks import block, load, pct, source_line, table

SHIPPING = "shipping-agreement.json"
CODEC_ROWS = {
    "preset": "the quickreduce-int4 preset (the emulation) vs QuickReduce",
    "as_shipped": "lowbit's own int4-group32-sfp16 (contiguous 32, lowbit's rule) vs QuickReduce (interleaved 32, its rule)",
    "same_groups_interleaved": "both on QuickReduce's interleaved groups (only the rule differs)",
    "same_groups_contiguous": "both on contiguous groups of 32 (only the rule differs)",
    "same_rule_lowbit": "lowbit's rule on both groupings (only the grouping differs)",
    "same_rule_quickreduce": "QuickReduce's rule on both groupings (only the grouping differs)",
}


@block("shipping-agreement")
def shipping_agreement() -> str:
    data = load(SHIPPING)
    rows = [[label, pct(data["codec"][key]["agreement"]), f"{data['codec'][key]['rel_l2_lowbit']:.4f}",
             f"{data['codec'][key]['rel_l2_quickreduce']:.4f}"] for key, label in CODEC_ROWS.items()]
    for run in data["all_reduce"].values():
        who = "the preset" if run.get("scheme", "quickreduce-int4") == "quickreduce-int4" else "lowbit's own"
        rows.append([f"TP-{run['tp']} all-reduce, {who} vs QuickReduce, randn x {run['scale']:g} (error vs the exact sum)",
                     pct(run["agreement"]), f"{run['rel_l2_lowbit']:.4f}", f"{run['rel_l2_quickreduce']:.4f}"])
    head = ["comparison (seeded 64 x 576 bf16)", "equal decoded values", "rel. L2 error, A", "rel. L2 error, B"]
    return table(head, rows) + "\n\n" + source_line(SHIPPING, data, "A = the first of each pair, B = the second")


@block("shipping-edges")
def shipping_edges() -> str:
    data = load(SHIPPING)
    rows = []
    for key in ("70144", "1e30"):
        r = data["edge_cases"][key]
        rows.append([f"one value {r['input']:.6g} in an N(0, 1) tensor", f"{r['lowbit_output']:g}",
                     f"{r['preset_output']:g}", f"{r['quickreduce_output']:g}",
                     f"{r['lowbit_nonfinite']} / {r['preset_nonfinite']} / {r['quickreduce_nonfinite']}"])
    tiny = data["edge_cases"]["randn_1e-5"]
    rows.append(["randn x 1e-5 (rel. L2 error of the round trip)", f"{tiny['rel_l2_lowbit']:.4f}",
                 f"{tiny['preset_rel_l2']:.4f}", f"{tiny['rel_l2_quickreduce']:.4f}",
                 f"{tiny['lowbit_nonfinite']} / {tiny['preset_nonfinite']} / {tiny['quickreduce_nonfinite']}"])
    head = ["input (one codec round trip)", "lowbit's own output", "preset output", "QuickReduce output",
            "non-finite outputs (own / preset / QR)"]
    return table(head, rows) + "\n\n" + source_line(SHIPPING, data)


@block("shipping-paths")
def shipping_paths() -> str:
    data = load(SHIPPING)
    rows = [[r["input"], r["code"], r["path"], str(r["nonfinite"]),
             "" if r["planted_output"] is None else f"{r['planted_output']:g}", f"{r['rel_l2']:.3f}", pct(r["norm_kept"])]
            for r in data["quickreduce_paths"]]
    head = ["TP-2 input", "code", "path", "non-finite outputs", "output at 70144", "rel. L2 error", "norm kept"]
    return table(head, rows) + "\n\n" + source_line(SHIPPING, data, "error and norm over the other finite outputs; "
                                                     "norm kept = ||output|| / ||exact sum||")
