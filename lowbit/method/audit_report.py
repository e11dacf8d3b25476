"""The pre-flight audit's report as Markdown: what a user attaches to an engine's issue.

    PYTHONPATH=. python -c "import json, sys; from lowbit.method.audit_report import markdown; \\
        print(markdown(json.load(open(sys.argv[1]))))" runs/<id>/result.json

The report (``lowbit.method.audit.audit``'s dict; the job's result.json) holds every number; this
module only lays them out: the verdict per format with its cheapest measured fix, every fix tried,
the flagged sites with their counters, the model's own findings, the thresholds, and the command
that reproduces the audit. A counter the codec did not report is written ``n/r`` (not reported),
never 0.
"""
from __future__ import annotations

import shlex

from lowbit.method.audit import Thresholds, site_flags
from lowbit.method.audit_sites import LEG2, NOT_REPORTED

SITE_COLUMNS = ("nonfinite_out", "beyond_range_in", "clamped", "attenuated_groups", "underflowed_groups", "groups")
NOT_REPORTED_CELL = "n/r"


def _table(head: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(head), "|" + "---|" * len(head), *(line(r) for r in rows)])


def _num(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _count(row: dict, counter: str) -> str:
    """A site's counter; ``first + second`` leg for a two-shot scheme; ``n/r`` where not reported."""
    legs = [counter, LEG2 + counter] if row.get("two_shot") else [counter]
    return " + ".join(NOT_REPORTED_CELL if row.get(c) is None else str(row[c]) for c in legs)


def command(report: dict) -> str:
    """The command line that reproduces the audit (its thresholds and formats included)."""
    formats = [f["format"] for f in report["formats"] if f["format"] != "bf16"]
    args = ["python", "-m", "lowbit", "audit", "--model", report["model"], "--tp", str(report["tp"]),
            "--formats", ",".join(formats)]
    if report.get("eval_tokens"):
        args += ["--eval-data", report["eval_source"], "--eval-tokens", str(report["eval_tokens"]),
                 "--site-tokens", str(report["site_tokens"]), "--seq-len", str(report["seq_len"]),
                 "--batch-size", str(report["batch_size"])]
    for name, value in report["thresholds"].items():
        args += [f"--{name.replace('_', '-')}", f"{value:g}"]
    return shlex.join(args)


def verdict_rows(report: dict) -> list[list[str]]:
    rows = []
    for f in report["formats"]:
        fix = f.get("fix")
        fix_text = "-" if "fix" not in f else (f"{fix['kind']}: `{fix['text']}` ({fix['bits_per_value']:.2f} bits)"
                                               if fix else "none found")
        rows.append([f"`{f['format']}`", f"**{f['verdict']}**", _num(f.get("bits_per_value"), ".2f"),
                     _num(f.get("kl")), _num(f.get("top1_agreement"), ".3f"), _num(f.get("ppl"), ".2f"),
                     _num(f.get("min_sqnr_db"), ".1f"), ", ".join(f.get("flagged_sites") or []) or "-", fix_text])
    return rows


def fix_rows(report: dict) -> list[list[str]]:
    return [[f"`{t['format']}`", t["kind"], f"`{t['text']}`", _num(t.get("bits_per_value"), ".2f"), _num(t.get("kl")),
             t["verdict"], "; ".join(t.get("reasons") or [])[:160] or "-"] for t in report["fixes"]]


def flagged_site_rows(report: dict) -> list[list[str]]:
    th = Thresholds(**report["thresholds"])
    rows = []
    for r in report["site_rows"]:
        if r.get("role", "format") != "format" or not site_flags(r, th):
            continue
        rows.append([f"`{r['format']}`", f"L{r['layer']}.{r['module']}", *(_count(r, c) for c in SITE_COLUMNS),
                     _num(r.get("sqnr_db"), ".1f"), "; ".join(what for _, what in site_flags(r, th))])
    return rows


def markdown(report: dict) -> str:
    """The whole report as one Markdown document."""
    th = report["thresholds"]
    lines = [f"# Pre-flight audit: `{report['model']}` at TP {report['tp']}", ""]
    if report.get("eval_tokens"):
        lines += [f"{len(report['formats'])} formats (hidden {report['hidden']}, {report['sites']} sites). Model: "
                  f"KL(exact fp32 || format), top-1 agreement and perplexity on {report['eval_tokens']} held-out "
                  f"tokens of `{report['eval_source']}` with every site quantized (exact fp32 perplexity "
                  f"{_num(report.get('reference_ppl'), '.2f')}). Sites: {report['site_tokens']} tokens, every site "
                  f"given the exact inputs, so a site is flagged for what it does itself. Messages of "
                  f"{report['message_tokens']} tokens.", ""]
    lines += [f"Verdicts: **breaks** = a non-finite output at any site, a non-finite output distribution, or KL > "
              f"{th['breaks_kl']:g}; **degrades** = KL > {th['degrades_kl']:g}, a site with SQNR < "
              f"{th['min_sqnr_db']:g} dB, inputs beyond the format's range, or attenuated + underflowed groups over "
              f"{100 * th['max_group_loss']:g}% of a site's groups; **safe** otherwise.", ""]
    for finding in report.get("model_findings") or []:
        lines += [f"**Model finding ({finding['finding']}):** {finding['message']}", ""]
    lines += ["## Verdicts", "", _table(["format", "verdict", "bits/value", "KL", "top-1", "ppl", "worst site SQNR dB",
                                         "flagged sites", "cheapest safe fix (measured)"], verdict_rows(report)), ""]
    for f in report["formats"]:
        if f.get("reasons") and f["verdict"] != "safe":
            lines.append(f"- `{f['format']}` {f['verdict']}: {'; '.join(f['reasons'][:6])}"
                         + (f" (and {len(f['reasons']) - 6} more)" if len(f["reasons"]) > 6 else ""))
    if report["fixes"]:
        lines += ["", "## Fixes tried (cheapest first, each measured)", "",
                  _table(["format", "fix", "scheme", "bits/value", "KL", "verdict", "why not safe"], fix_rows(report))]
    flagged = flagged_site_rows(report)
    lines += ["", "## Flagged sites", ""]
    if flagged:
        lines += [_table(["format", "site", "non-finite out", "beyond range in", "clamped", "attenuated groups",
                          "underflowed groups", "groups", "SQNR dB", "why"], flagged),
                  "", f"Two-shot counters read `first leg + second leg`; `{NOT_REPORTED_CELL}`: {NOT_REPORTED}."]
    else:
        lines.append("No site is flagged under any audited format.")
    lines += ["", "## Reproduce", "", "```", command(report), "```", ""]
    return "\n".join(lines)

