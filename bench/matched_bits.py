"""Rows of several ``sum-error`` result files as one table (the matched-bits table of docs/results.md, which
``python -m bench.report`` renders through ``load_rows``; no model runs here).

Each file is what ``python -m lowbit.method.sweep sum-error ... --out FILE`` wrote: a ``meta``
block (command, date, load, machine) and one row per scheme. Rows print sorted by bits per value
(then KL), one markdown line each, with the file they came from; a scheme found in two files must
have the same KL in both (the runs are deterministic), else this refuses.
"""
from __future__ import annotations

import json
from pathlib import Path


def load_rows(paths: list[str]) -> list[dict]:
    """Rows of every file, each with its ``source`` file name; one row per scheme."""
    rows: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "meta" not in data or "rows" not in data:
            raise ValueError(f"{path}: not a sum-error result (expected 'meta' and 'rows')")
        for row in data["rows"]:
            seen = rows.get(row["scheme"])
            if seen is not None and seen["kl"] != row["kl"]:
                raise ValueError(f"{row['scheme']}: KL {seen['kl']} in {seen['source']} but {row['kl']} in {path}")
            rows.setdefault(row["scheme"], dict(row, source=Path(path).name))
    return sorted(rows.values(), key=lambda r: (r["bits_per_value"], r["kl"]))


def markdown(rows: list[dict]) -> str:
    lines = ["| scheme | bits/value | KL | top-1 agree | ppl | mean rel. error of the sum | table bytes | file |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['scheme']}` | {r['bits_per_value']:.4g} | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% "
                     f"| {r['ppl']:.2f} | {r['mean_rel_error']:.4f} | {r.get('table_bytes', 0)} | {r['source']} |")
    return "\n".join(lines)
