"""Kind ``audit``: the pre-flight audit of formats on a model (``lowbit.method.audit``).

The spec's ``schemes`` are the formats to audit (presets or any scheme strings; the exact BF16
all-reduce is always measured as the baseline), ``eval_data`` / ``eval_tokens`` the held-out text
of the model-level scores; ``params`` holds the thresholds (``lowbit.method.audit.Thresholds``)
and the measurement's sizes (``AUDIT_PARAMS``). Rank 0 returns the report (result.json) and writes
it as Markdown to ``audit.md`` beside it: the two files a user downloads and attaches to an
engine's issue.

    python -m lowbit audit --model smollm2-135m --tp 3 --formats quickreduce-int4,mxfp4
"""
from __future__ import annotations

from launch.kinds import codec as kind_codec
from launch.kinds import method
from lowbit.method.audit import AUDIT_DEFAULTS, Thresholds, audit
from lowbit.method.audit_report import markdown
from lowbit.scheme import MIN_MESSAGE_AUTO, parse_scheme_map

MARKDOWN_FILE = "audit.md"
# name -> (type, lowest, highest); None: no bound. gate_bytes may also be null (the default gate).
AUDIT_PARAMS = dict(seq_len=(int, 16, 8192), batch_size=(int, 1, 1024), site_tokens=(int, 16, 1_000_000),
                    gate_bytes=(int, 1, 1 << 40), max_fixes=(int, 0, 64), gamma=(float, 0.0, 1.0))
DEFAULT_SITE_TOKENS = AUDIT_DEFAULTS["site_chunks"] * AUDIT_DEFAULTS["seq_len"]


def check_params(params: dict) -> list[tuple[str, str]]:
    """Every params key: the thresholds, the sizes in ``AUDIT_PARAMS``, ``codec``."""
    problems = kind_codec.check(params) + Thresholds.problems(params)
    allowed = sorted([*AUDIT_PARAMS, *Thresholds.names(), "codec"])
    for key, value in params.items():
        if key in Thresholds.names() or key == "codec":
            continue
        if key not in AUDIT_PARAMS:
            problems.append((f"params.{key}", f"unknown parameter; allowed: {', '.join(allowed)}"))
            continue
        kind, lo, hi = AUDIT_PARAMS[key]
        if key == "gate_bytes" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            problems.append((f"params.{key}", f"must be {'a number' if kind is float else 'an integer'}, got {value!r}"))
        elif not lo <= value <= hi or (kind is float and value == lo):
            problems.append((f"params.{key}", f"must be between {lo} and {hi}, got {value!r}"))
    return problems


def check_spec(spec: dict) -> list[tuple[str, str]]:
    """At least one format; each runs at this hidden size and TP size (``method.check_schemes``);
    no ``@minauto`` (the audit measures a given gate); token counts against seq_len."""
    if not spec["schemes"]:
        return [("schemes", "audit needs at least one format, e.g. quickreduce-int4 or any scheme string "
                            "(python -m lowbit schemes lists the presets)")]
    problems = []
    for i, text in enumerate(spec["schemes"]):
        if any(s.min_message == MIN_MESSAGE_AUTO for s in parse_scheme_map(text).schemes()):
            problems.append((f"schemes[{i}]", f"{text!r}: @minauto not allowed in an audit; allowed: @min<size>, "
                                              "or no gate (the audit tries a gate itself)"))
    if problems:
        return problems
    problems = method.check_schemes(spec)
    seq_len = spec["params"].get("seq_len", AUDIT_DEFAULTS["seq_len"])
    if spec["eval_tokens"] < seq_len:
        problems.append(("eval_tokens", f"must be at least params.seq_len ({seq_len}) tokens, got {spec['eval_tokens']}"))
    site_tokens = spec["params"].get("site_tokens", DEFAULT_SITE_TOKENS)
    if site_tokens > spec["eval_tokens"]:
        problems.append(("params.site_tokens", f"must be at most eval_tokens ({spec['eval_tokens']}): the sites are "
                                               f"measured on the first of the held-out chunks; got {site_tokens}"))
    return problems + method.check_calib_from(spec)


def run(ctx) -> dict | None:
    spec = ctx.spec
    params = method.lowbit_params(ctx)
    seq_len = params["seq_len"]
    params.update({k: spec.params[k] for k in (*Thresholds.names(), "gate_bytes", "max_fixes", "batch_size")
                   if k in spec.params})
    params.update(formats=list(spec.schemes), eval_source=spec.eval_data, seed=spec.seed,
                  eval_chunks=max(1, spec.eval_tokens // seq_len),
                  site_chunks=max(1, spec.params.get("site_tokens", DEFAULT_SITE_TOKENS) // seq_len))
    _, codec = kind_codec.make(kind_codec.codec_name(spec.params, "reference"))
    ctx.events.loading(f"loading {spec.model} sharded {ctx.group.world_size} ways")
    report = audit(ctx.group, params, method.progress(ctx), codec=codec)
    if report is not None:
        report["codec"] = kind_codec.codec_name(spec.params, "reference")
        ctx.paths.file(MARKDOWN_FILE).write_text(markdown(report))
    return report
