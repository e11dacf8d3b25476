"""The tables of docs/method.md: the named presets' bits, measured from their payload bytes."""
from __future__ import annotations

from bench.blocks import block, load, source_line, table


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
