"""Rows of several ``sum-error`` result files as one table (the matched-bits table of docs/results.md, which
``python -m bench.report`` renders through ``load_rows``; no model runs here).

Each file is what ``python -m lowbit.method.sweep sum-error ... --out FILE`` wrote: a ``meta``
block (command, date, load, machine) and one row per scheme. Rows print sorted by bits per value
(then KL), one markdown line each, with the file they came from; a scheme found in two files must
have the same KL in both (the runs are deterministic), else this refuses.

Until issue 26 the presets named after shipping systems expanded to lowbit's own renderings
(``PRESETS_BEFORE_26``); a row of a file written before then (``PRESETS_CHANGED``) under such a name
is read under the scheme it measured, so it never stands for the system's emulation.
"""
from __future__ import annotations

import json
from pathlib import Path

# what each preset named after a system expanded to before issue 26 made it that system's emulation
PRESETS_BEFORE_26 = {
    "mxfp4": "fp4e2m1-group32-se8m0", "nvfp4": "fp4e2m1-group16-se4m3",
    **{f"quickreduce-int{b}": f"int{b}-group32-sfp16@twoshot+int{b}-group32-sfp16" for b in (4, 6, 8)},
    "flashinfer-fp8": "fp8e4m3-flat256-sfp32@twoshot+fp8e4m3-flat256-sfp32", "trtllm-fp8": "fp8e4m3-flat496-sfp32",
}
PRESETS_CHANGED = "2026-12-03T10:00"  # result files dated before this measured PRESETS_BEFORE_26


def measured_scheme(scheme: str, date: str) -> str:
    """The scheme a row named ``scheme`` in a file of ``date`` (ISO) measured."""
    return PRESETS_BEFORE_26.get(scheme, scheme) if date < PRESETS_CHANGED else scheme


def load_rows(paths: list[str]) -> list[dict]:
    """Rows of every file, each with its ``source`` file name; one row per scheme."""
    rows: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "meta" not in data or "rows" not in data:
            raise ValueError(f"{path}: not a sum-error result (expected 'meta' and 'rows')")
        for row in data["rows"]:
            row = dict(row, scheme=measured_scheme(row["scheme"], data["meta"]["date"]))
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
