"""Audit runs as frames: the pre-flight page's verdicts, sites and fixes (``launch.kinds.audit``).

    PYTHONPATH=. python -c "from launch.store.audit import audit_runs; from launch.store.runs import runs_frame; \\
        print(audit_runs(runs_frame()))"

The report (result.json) holds every number; these functions only lay it out as tables and read
the Markdown the job wrote beside it (``audit.md``). A counter a codec did not report stays empty
(None), never 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from launch.kinds.audit import MARKDOWN_FILE
from launch.layout import run_paths
from launch.store.runs import finished_ok
from lowbit.method.audit import Thresholds, site_flags
from lowbit.method.audit_report import SITE_COLUMNS, markdown
from lowbit.method.audit_sites import LEG2

VERDICT_COLUMNS = ["format", "verdict", "bits_per_value", "kl", "top1_agreement", "ppl", "min_sqnr_db",
                   "flagged_sites", "fix", "fix_bits", "reasons"]
SITE_FRAME_COLUMNS = ["format", "site", "layer", "module", *SITE_COLUMNS, *(LEG2 + c for c in SITE_COLUMNS),
                      "sqnr_db", "flagged"]
FIX_COLUMNS = ["format", "kind", "text", "bits_per_value", "kl", "top1_agreement", "verdict", "reasons"]


def audit_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Done audit runs (newest first) with a label for a select box."""
    runs = finished_ok(frame, "audit").copy()
    runs["label"] = [f"{r.model} · TP {r.tp} · {r.id}" for r in runs.itertuples()]
    return runs.reset_index(drop=True)


def verdict_frame(report: dict) -> pd.DataFrame:
    """One row per audited format: its verdict, scores, flagged sites and cheapest measured fix."""
    rows = []
    for f in report.get("formats") or []:
        fix = f.get("fix")
        rows.append(dict(format=f["format"], verdict=f["verdict"], bits_per_value=f.get("bits_per_value"),
                         kl=f.get("kl"), top1_agreement=f.get("top1_agreement"), ppl=f.get("ppl"),
                         min_sqnr_db=f.get("min_sqnr_db"), flagged_sites=", ".join(f.get("flagged_sites") or []),
                         fix=(f"{fix['kind']}: {fix['text']}" if fix else ("none found" if "fix" in f else "")),
                         fix_bits=fix["bits_per_value"] if fix else None, reasons="; ".join(f.get("reasons") or [])))
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def site_frame(report: dict) -> pd.DataFrame:
    """One row per (audited format, site): the counters and the SQNR of the sum; ``flagged`` as the
    report's thresholds judge it. Fix candidates' sites are left out (``fixes`` has their verdicts)."""
    th = Thresholds(**report["thresholds"]) if report.get("thresholds") else Thresholds()
    rows = []
    for r in report.get("site_rows") or []:
        if r.get("role", "format") != "format":
            continue
        rows.append(dict({c: r.get(c) for c in SITE_FRAME_COLUMNS if c in r}, site=f"L{r['layer']}.{r['module']}",
                         flagged="; ".join(what for _, what in site_flags(r, th))))
    out = pd.DataFrame(rows, columns=SITE_FRAME_COLUMNS)
    return out.astype({c: "Int64" for c in SITE_FRAME_COLUMNS[4:-2]})  # None stays empty, never 0


def fix_frame(report: dict) -> pd.DataFrame:
    """Every fix the audit measured, in the order it tried them (cheapest first per format)."""
    rows = [dict({c: t.get(c) for c in FIX_COLUMNS}, reasons="; ".join(t.get("reasons") or []))
            for t in report.get("fixes") or []]
    return pd.DataFrame(rows, columns=FIX_COLUMNS)


def report_json(report: dict) -> str:
    """The report as the JSON a user downloads (the run block included)."""
    return json.dumps(report, indent=1, allow_nan=False)


def report_markdown(run_id: str, report: dict, root=None) -> str:
    """The Markdown the job wrote (``audit.md``); rendered from the report when that file is gone."""
    path = run_paths(run_id, Path(root) if root else None).file(MARKDOWN_FILE)
    try:
        return path.read_text()
    except OSError:
        return markdown(report)
