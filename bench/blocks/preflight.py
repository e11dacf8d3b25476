"""The tables of docs/preflight.md: the pre-flight audits of the embedded models (bench.audit_speed),
their verdicts, the fixes measured, the flagged sites and the audit's wall time."""
from __future__ import annotations

from bench.blocks import ReportError, block, load, source_line, table
from lowbit.method.audit_report import fix_rows, flagged_site_rows, verdict_rows

AUDITS = {"smollm2": "audit-smollm2-135m-tp3.json", "gemma3": "audit-gemma3-270m-tp2.json"}
VERDICT_HEAD = ["format", "verdict", "bits/value", "KL", "top-1", "ppl", "worst site SQNR dB", "flagged sites",
                "cheapest safe fix (measured)"]
FIX_HEAD = ["format", "fix", "scheme", "bits/value", "KL", "verdict", "why not safe"]
SITE_HEAD = ["format", "site", "non-finite out", "beyond range in", "clamped", "attenuated groups",
             "underflowed groups", "groups", "SQNR dB", "why"]


def _audit(name: str) -> str:
    """One audit's verdicts, the fixes it measured and its flagged sites (the report's own rows,
    ``lowbit.method.audit_report``), then the file and the thresholds."""
    data = load(name)
    report = data["report"]
    parts = [table(VERDICT_HEAD, verdict_rows(report))]
    if report["fixes"]:
        parts.append("Fixes tried, cheapest first, each measured:\n\n" + table(FIX_HEAD, fix_rows(report)))
    flagged = flagged_site_rows(report)
    parts.append("Flagged sites:\n\n" + table(SITE_HEAD, flagged) if flagged else
                 "No site is flagged under any audited format.")
    th = ", ".join(f"{k} {v:g}" for k, v in report["thresholds"].items())
    note = (f"{report['eval_tokens']} held-out tokens of {report['eval_source']}, {report['site_tokens']} in the "
            f"per-site pass; thresholds {th}; run `{report['run']['id']}`")
    return "\n\n".join(parts) + "\n\n" + source_line(name, data, note)


@block("preflight-smollm2")
def preflight_smollm2() -> str:
    return _audit(AUDITS["smollm2"])


@block("preflight-gemma3")
def preflight_gemma3() -> str:
    return _audit(AUDITS["gemma3"])


@block("preflight-speed")
def preflight_speed() -> str:
    """bench.audit_speed: the whole command, start to exit, with the load around it."""
    rows, sources = [], []
    for name in AUDITS.values():
        try:
            data = load(name)
        except ReportError:  # a model not audited yet is left out, not invented
            continue
        t, report = data["timing"], data["report"]
        quantized = len([f for f in report["formats"] if f["format"] != "bf16"])
        rows.append([f"{data['model']} TP {data['tp']}", str(quantized), str(report["measure_rounds"]),
                     f"{t['wall_seconds']:.0f}", f"{t['cpu_seconds']:.0f}",
                     f"{t['load']['start'][0]:.1f} -> {t['load']['end'][0]:.1f}",
                     "yes" if t["wall_seconds"] <= data["target_seconds"] else "no"])
        sources.append(source_line(name, data))
    head = ["model", "formats", "measure rounds", "wall s", "CPU s (all ranks)", "load before -> after",
            "within 600 s"]
    return table(head, rows) + "\n\n" + "\n".join(f"- {s}" for s in sources)
