"""The pre-flight audit: will this quantized all-reduce break my model, where, and what is the
cheapest fix? Pure functions over a group and a model; the ``audit`` job kind calls ``audit``.

    python -m lowbit audit --model smollm2-135m --tp 3                     # every preset, default thresholds
    python -m lowbit audit --model stress-tiny --tp 2 --formats quickreduce-int4,mxfp8 --degrades-kl 0.05

Steps (every rank runs them with the same arguments; every decision is taken from numbers that
are the same on every rank):

1. Load and shard the model; look for non-finite weights. A model that has any is reported (a
   per-model finding naming the tensors) and no format is measured: its exact run is not finite.
2. Measure each format (a preset or any scheme string, ``lowbit.scheme``) that can run at this
   hidden size and TP size: on held-out text, KL(exact fp32 || format), top-1 agreement and
   perplexity (``lowbit.method.evaluate.evaluate_text``: every site quantized, as deployed); and
   per site, with exact inputs, the counters of ``lowbit.method.audit_sites`` and the SQNR of
   the sum (one forward serves every format).
3. A verdict per format against ``Thresholds``: ``breaks``, ``degrades`` or ``safe``.
4. For each format that is not safe, the cheapest measured fix: the candidates of ``candidates``
   ordered by bits per value (both legs, the accounting's ``lowbit.wire.accounting``), each
   measured in turn (re-run, all pending formats' next candidates together), the first whose
   verdict is ``safe`` reported. Candidates: the native path (the format without its input
   cast), the flagged sites kept exact (``L<i>.<module>=bf16``), an audited format already
   judged safe at no more bits (it costs no measurement: switching is the cheapest fix when it
   exists), a wider format (any preset or
   audited format with more bits), and a message-size gate (``@min<size>``; by default just above
   the audit's message size, so every audited message goes exact: a gate only helps messages
   smaller than its size).

Rank 0 returns the report (``lowbit.method.audit_report`` renders it as Markdown).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from lowbit.artifacts import calibration_cache_dir
from lowbit.casts import NoCast
from lowbit.casts.bf16 import BF16Cast
from lowbit.comm.dist import Group
from lowbit.method.audit_sites import LEG2, SiteProbe
from lowbit.method.calibrate import load_or_calibrate, with_calibration_defaults
from lowbit.method.evaluate import REFERENCE, evaluate_text
from lowbit.model.data import token_chunks
from lowbit.model.engine import build_tp_model, forward_partials
from lowbit.model.tp import row_parallel_sites, set_communicator, text_config
from lowbit.scheme import PRESETS, QuantSpec, Scheme, SchemeError, SchemeMap, parse_scheme_map
from lowbit.scheme.plan import SchemePlan
from lowbit.wire.accounting import scheme_bits_per_value

VERDICTS = ("safe", "degrades", "breaks")
NOT_AUDITED = "not audited"
BASELINE = "bf16"  # always measured: what the exact 16-bit all-reduce itself costs against fp32


@dataclass(frozen=True)
class Thresholds:
    """What makes a format ``breaks`` or ``degrades`` (``safe`` otherwise); every field is a
    ``params`` key of the audit job and a ``--<name>`` flag of the command line.

    - breaks: any non-finite output at any site, a non-finite output distribution, or
      KL(exact || format) above ``breaks_kl`` nats per token (1.0 by default: most of the
      next-token distribution is lost);
    - degrades: KL above ``degrades_kl`` (0.01 by default: about a 1% rise in perplexity, the
      size of bf16-vs-fp32 noise times a hundred), a site whose SQNR of the sum is below
      ``min_sqnr_db`` (10 dB by default: an error a third of the signal's RMS), a site with inputs
      beyond the format's range, or a site whose attenuated plus underflowed groups exceed the
      share ``max_group_loss`` of its groups (0 by default: any such group)."""

    breaks_kl: float = 1.0
    degrades_kl: float = 0.01
    min_sqnr_db: float = 10.0
    max_group_loss: float = 0.0

    BOUNDS = dict(breaks_kl=(0.0, 100.0), degrades_kl=(0.0, 100.0), min_sqnr_db=(-100.0, 200.0),
                  max_group_loss=(0.0, 1.0))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def problems(cls, params: dict) -> list[tuple[str, str]]:
        """(field, problem) of every threshold in ``params`` (``params.<name>``)."""
        out = []
        for name in cls.names():
            if name not in params:
                continue
            value, (lo, hi) = params[name], cls.BOUNDS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                out.append((f"params.{name}", f"must be a finite number, got {value!r}"))
            elif not lo <= value <= hi:
                out.append((f"params.{name}", f"must be between {lo:g} and {hi:g}, got {value!r}"))
        t = cls.from_params(params) if not out else None
        if t is not None and t.degrades_kl > t.breaks_kl:
            out.append(("params.degrades_kl", f"{t.degrades_kl!r} is above breaks_kl {t.breaks_kl!r}; allowed: "
                                              f"degrades_kl <= breaks_kl"))
        return out

    @classmethod
    def from_params(cls, params: dict) -> "Thresholds":
        return cls(**{name: float(params[name]) for name in cls.names() if name in params})


# -- verdicts ------------------------------------------------------------------------------------
def finite(value) -> float | None:
    """A number for the report, or None where it is missing or not finite (JSON has no NaN)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _both(row: dict, counter: str) -> int:
    return (row.get(counter) or 0) + (row.get(LEG2 + counter) or 0)


def site_flags(row: dict, th: Thresholds) -> list[tuple[str, str]]:
    """(severity, what) of one site row: ``breaks`` for non-finite outputs, ``degrades`` for inputs
    beyond range, group losses over the share, or a low SQNR."""
    flags = []
    nonfinite = _both(row, "nonfinite_out")
    if nonfinite:
        flags.append(("breaks", f"{nonfinite} non-finite outputs"))
    beyond = _both(row, "beyond_range_in")
    if beyond:
        flags.append(("degrades", f"{beyond} inputs beyond the format's range"))
    groups = _both(row, "groups")
    lost = _both(row, "attenuated_groups") + _both(row, "underflowed_groups")
    if lost and groups and lost / groups > th.max_group_loss:
        flags.append(("degrades", f"{_both(row, 'attenuated_groups')} attenuated and "
                                  f"{_both(row, 'underflowed_groups')} underflowed of {groups} groups"))
    if row.get("sqnr_db") is not None and row["sqnr_db"] < th.min_sqnr_db:
        flags.append(("degrades", f"SQNR {row['sqnr_db']:.1f} dB < {th.min_sqnr_db:g}"))
    return flags


def verdict(scores: dict, sites: list[dict], th: Thresholds) -> tuple[str, list[str]]:
    """(``safe`` | ``degrades`` | ``breaks``, the reasons) of one measured format."""
    reasons = {"breaks": [], "degrades": []}
    kl = finite(scores.get("kl"))
    if kl is None:
        reasons["breaks"].append("the output distribution is not finite (KL undefined)")
    elif kl > th.breaks_kl:
        reasons["breaks"].append(f"KL {kl:.3g} > {th.breaks_kl:g}")
    elif kl > th.degrades_kl:
        reasons["degrades"].append(f"KL {kl:.3g} > {th.degrades_kl:g}")
    for row in sites:
        for severity, what in site_flags(row, th):
            reasons[severity].append(f"L{row['layer']}.{row['module']}: {what}")
    for name in ("breaks", "degrades"):
        if reasons[name]:
            return name, reasons[name]
    return "safe", []


def flagged_sites(sites: list[dict], th: Thresholds) -> list[str]:
    return [f"L{r['layer']}.{r['module']}" for r in sites if site_flags(r, th)]


# -- candidate fixes -----------------------------------------------------------------------------
def _with_cast(q: QuantSpec | None, cast) -> QuantSpec | None:
    if q is None or q.cast == NoCast():
        return q
    return QuantSpec(code=q.code, grouping=q.grouping, scale=q.scale, rounding=q.rounding, cast=cast)


def _map(smap: SchemeMap, fn) -> SchemeMap:
    return SchemeMap(fn(smap.default), {k: fn(v) for k, v in smap.overrides.items()})


def native_variant(text: str) -> str | None:
    """``text`` on its native path, or None when it casts nothing: the partial quantized as it is
    (no input cast) where the scheme allows it, else in bf16 (``-bf16``: QuickReduce's native path,
    whose scale rule needs the cast that names its arithmetic)."""
    smap = parse_scheme_map(text)
    for cast in (NoCast(), BF16Cast()):
        try:
            native = _map(smap, lambda s: s if s.is_exact else replace(s, quant=_with_cast(s.quant, cast),
                                                                       second=_with_cast(s.second, cast)))
            if native == smap:
                return None
            return str(parse_scheme_map(str(native)))  # a cast the scale format refuses raises here
        except SchemeError:
            continue
    return None


def keep_exact_variant(text: str, sites: list[str]) -> str:
    """``text`` with ``sites`` (``L<i>.<module>``) sent as the exact BF16 all-reduce."""
    smap = parse_scheme_map(text)
    keys = [(int(s[1:].split(".")[0]), s.split(".")[1]) for s in sites]
    if not any(k in smap.overrides or (k[0], None) in smap.overrides for k in keys):
        return ";".join([text, *(f"{s}=bf16" for s in sites)])
    exact = Scheme("exact", wire_dtype="bf16")
    return str(SchemeMap(smap.default, {**smap.overrides, **{k: exact for k in keys}}))


def gated_variant(text: str, nbytes: int) -> str:
    """``text`` with every quantized site gated at ``nbytes`` (``@min<size>``)."""
    return str(_map(parse_scheme_map(text), lambda s: s if s.is_exact else replace(s, min_message=nbytes)))


def map_bits(text: str, sites: list[tuple[int, str]], hidden: int, tp: int, tokens: int) -> float:
    """Bits per value (both legs) of ``text`` averaged over ``sites`` at ``tokens`` per message."""
    smap = parse_scheme_map(text)
    bits = [scheme_bits_per_value(smap.for_site(layer, module), hidden, tp, tokens) for layer, module in sites]
    return sum(bits) / len(bits)


def quantized(text: str) -> bool:
    """Does ``text`` quantize any site (a fix search only makes sense then)?"""
    return any(not s.is_exact for s in parse_scheme_map(text).schemes())


def runnable_problem(text: str, hidden: int, tp: int) -> str | None:
    """Why ``text`` cannot run at this hidden size and TP size, or None."""
    try:
        parse_scheme_map(text).validate_for(hidden, tp)
    except SchemeError as exc:
        return str(exc)
    return None


def runnable_presets(hidden: int, tp: int) -> tuple[list[str], dict[str, str]]:
    """The presets that run at this hidden size and TP size (an audit's default formats), and why
    each other one does not: QuickReduce runs at TP 2/4/8 only, so "every preset" at TP 3 is the
    runnable ones, with the rest named, not a refused spec."""
    problems = {name: runnable_problem(name, hidden, tp) for name in PRESETS}
    return [n for n, p in problems.items() if p is None], {n: p for n, p in problems.items() if p is not None}


def gate_size(tokens: int, hidden: int) -> int:
    """The default gate: the smallest power of two above the BF16 bytes of a ``tokens`` message."""
    return 1 << (tokens * hidden * 2).bit_length()


def candidates(text: str, flagged: list[str], all_sites: list[tuple[int, str]], wider: list[str], hidden: int,
               tp: int, tokens: int, gate_bytes: int, safe: list[str] = ()) -> list[dict]:
    """The fixes to try for ``text``, cheapest first by bits per value (ties: in this order):
    native path, flagged sites exact, audited formats judged ``safe`` at no more bits, wider
    formats, size gate."""
    out = []
    native = native_variant(text)
    if native:
        out.append(dict(kind="native path", text=native, note="no input cast: the partial is quantized as it is"))
    if flagged and len(flagged) < len(all_sites):
        out.append(dict(kind="sites exact", text=keep_exact_variant(text, flagged),
                        note=f"{', '.join(flagged)} as the exact BF16 all-reduce"))
    own = map_bits(text, all_sites, hidden, tp, tokens)
    for other in safe:
        if other != text and quantized(other) and map_bits(other, all_sites, hidden, tp, tokens) <= own:
            out.append(dict(kind="safe format", text=other, note="audited here and judged safe, at no more bits"))
    for other in wider:
        if other != text and map_bits(other, all_sites, hidden, tp, tokens) > own:
            out.append(dict(kind="wider format", text=other, note=""))
    out.append(dict(kind="size gate", text=gated_variant(text, gate_bytes),
                    note=f"messages under {gate_bytes} bytes (BF16) go exact; the audit's are "
                         f"{tokens * hidden * 2} bytes"))
    for order, c in enumerate(out):
        c.update(predicted_bits=map_bits(c["text"], all_sites, hidden, tp, tokens), order=order)
    return sorted(out, key=lambda c: (c["predicted_bits"], c["order"]))


# -- the run -------------------------------------------------------------------------------------
AUDIT_DEFAULTS = dict(formats=list(PRESETS), eval_source="wikipedia", eval_chunks=4, site_chunks=2, seq_len=256,
                      batch_size=4, seed=0, gate_bytes=None, max_fixes=6, **asdict(Thresholds()))


def nonfinite_weights(model: torch.nn.Module, group: Group) -> list[dict]:
    """Collective: [{tensor, per_rank}] for every parameter with a non-finite value on any rank's
    shard (``per_rank``: the count in each rank's shard)."""
    names, counts = zip(*[(n, int((~torch.isfinite(p.detach())).sum())) for n, p in model.named_parameters()])
    every = group.all_gather(torch.tensor(counts, dtype=torch.int64))
    return [dict(tensor=name, per_rank=[int(v) for v in every[:, i].tolist()])
            for i, name in enumerate(names) if int(every[:, i].sum())]


class _Measure:
    """Measurements of scheme texts on one model and text, each made once (text + sites)."""

    def __init__(self, model, group, held, site_chunks, calibration, batch_size, codec, progress):
        self.model, self.group, self.held, self.calibration = model, group, held, calibration
        self.site_batches = list(held[:site_chunks].split(batch_size))
        self.batch_size, self.codec, self.progress = batch_size, codec, progress
        self.done: dict[str, dict] = {}
        self.rounds = 0

    def __call__(self, texts: list[str], label: str) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self.done))
        if not new:
            return
        self.rounds += 1
        plan = SchemePlan(new)

        def text_progress(stage, step, total, message, metrics):
            if self.progress and stage == "text":
                self.progress("audit", step, total, f"{label}: {message} ({len(new)} formats)", metrics)
            elif self.progress:
                self.progress(stage, step, total, message, metrics)
        scores = evaluate_text(self.model, self.group, self.held, plan, self.calibration, self.batch_size,
                               text_progress, self.codec)
        probe = SiteProbe(self.group, {t: plan[t] for t in new}, self.calibration, self.codec)
        previous = next(m.communicator for m in self.model.modules() if hasattr(m, "communicator"))
        set_communicator(self.model, probe)
        try:
            for step, ids in enumerate(self.site_batches, start=1):
                forward_partials(self.model, ids.to(next(self.model.parameters()).device))
                if self.progress:
                    self.progress("audit", step, len(self.site_batches), f"{label}: sites, batch {step}", {})
        finally:
            set_communicator(self.model, previous)
        rows = probe.rows()
        for t in new:
            self.done[t] = dict(scores=scores[t], sites=[r for r in rows if r["format"] == t],
                                reference_ppl=scores[REFERENCE]["ppl"])


def _format_record(text: str, m: dict, th: Thresholds) -> dict:
    s = m["scores"]
    v, reasons = verdict(s, m["sites"], th)
    sqnrs = [r["sqnr_db"] for r in m["sites"] if r["sqnr_db"] is not None]
    return dict(format=text, verdict=v, reasons=reasons, kl=finite(s.get("kl")), top1_agreement=finite(s.get("top1_agreement")),
                ppl=finite(s.get("ppl")), bits_per_value=finite(s.get("bits_per_value")),
                min_sqnr_db=min(sqnrs) if sqnrs else None, flagged_sites=flagged_sites(m["sites"], th))


def audit(group: Group, params: dict, progress=None, codec=None) -> dict | None:
    """Collective: the audit of ``params["model"]`` over ``params["formats"]`` (see the module
    docstring); rank 0 returns the report, the other ranks None."""
    p = dict(AUDIT_DEFAULTS, **params)
    th = Thresholds.from_params(p)
    start = time.perf_counter()
    tp_model = build_tp_model(p["model"], group)
    model, tp = tp_model.model, group.world_size
    hidden = text_config(model.config).hidden_size
    sites = [(s.layer, s.module) for s in row_parallel_sites(model)]
    tokens = p["batch_size"] * p["seq_len"]
    formats = list(dict.fromkeys([BASELINE, *p["formats"]]))
    problems = {f: runnable_problem(f, hidden, tp) for f in formats}
    runnable = [f for f in formats if problems[f] is None]
    report = dict(model=p["model"], tp=tp, hidden=hidden, sites=len(sites), eval_source=p["eval_source"],
                  seq_len=p["seq_len"], batch_size=p["batch_size"], message_tokens=tokens, thresholds=asdict(th),
                  model_findings=[], formats=[], site_rows=[], fixes=[], reference_ppl=None)
    bad = nonfinite_weights(model, group)
    if bad:
        listed = "; ".join(f"{b['tensor']} ({', '.join(f'rank {r}: {c}' for r, c in enumerate(b['per_rank']) if c)})"
                           for b in bad[:5])
        report["model_findings"].append(dict(finding="non-finite weights", tensors=bad, message=(
            f"the model's weights hold non-finite values in {len(bad)} tensor(s): {listed}. Its exact run is not "
            f"finite, so no format can be judged against it: fix the checkpoint first.")))
        report["formats"] = [dict(format=f, verdict=NOT_AUDITED, reasons=["the model has non-finite weights"])
                             for f in formats]
        return _finish(report, group, start)
    calibration = None
    plan = SchemePlan(runnable)
    if plan.needs_calibration:
        cp = with_calibration_defaults(p)
        folder = Path(p.get("calibration") or calibration_cache_dir(p["model"], tp, cp["source"], cp["chunks"],
                                                                   cp["seq_len"], cp["gamma"]))
        calibration = load_or_calibrate(tp_model, group, p, folder, progress)
    held = token_chunks(tp_model.tokenizer, p["eval_source"], "eval", p["eval_chunks"], p["seq_len"])
    report.update(eval_tokens=int(held.numel()), site_tokens=int(held[:p["site_chunks"]].numel()))
    measure = _Measure(model, group, held, p["site_chunks"], calibration, p["batch_size"], codec, progress)
    measure(runnable, "formats")
    records = {f: _format_record(f, measure.done[f], th) for f in runnable}
    report["reference_ppl"] = finite(measure.done[runnable[0]]["reference_ppl"]) if runnable else None
    gate = int(p["gate_bytes"] or gate_size(tokens, hidden))
    wider = [f for f in dict.fromkeys([*runnable, *PRESETS]) if runnable_problem(f, hidden, tp) is None
             and quantized(f)]
    safe = [f for f in runnable if records[f]["verdict"] == "safe"]
    pending = {f: candidates(f, records[f]["flagged_sites"], sites, wider, hidden, tp, tokens, gate, safe)
               for f in runnable if records[f]["verdict"] != "safe" and quantized(f)}
    tried = {f: [] for f in pending}
    while pending:
        batch = {f: c.pop(0) for f, c in pending.items()}
        measure([c["text"] for c in batch.values()], f"fixes, round {measure.rounds}")
        for f, c in batch.items():
            rec = _format_record(c["text"], measure.done[c["text"]], th)
            tried[f].append(dict({k: v for k, v in c.items() if k != "order"},
                                 **{k: rec[k] for k in ("verdict", "reasons", "kl", "top1_agreement",
                                                        "bits_per_value", "min_sqnr_db", "flagged_sites")}))
        pending = {f: c for f, c in pending.items()
                   if c and tried[f][-1]["verdict"] != "safe" and len(tried[f]) < p["max_fixes"]}
    for f in formats:
        rec = records.get(f) or dict(format=f, verdict=NOT_AUDITED, reasons=[f"cannot run here: {problems[f]}"])
        if f in tried:
            safe = [t for t in tried[f] if t["verdict"] == "safe"]
            rec["fix"] = safe[0] if safe else None
            report["fixes"] += [dict(t, format=f) for t in tried[f]]
        report["formats"].append(rec)
    for text, m in measure.done.items():  # every measured scheme's sites: the formats', then the fixes'
        report["site_rows"] += [dict(r, role="format" if text in records else "fix") for r in m["sites"]]
    report["calibration"] = calibration.meta if calibration else None
    report["measure_rounds"] = measure.rounds
    return _finish(report, group, start)


def _finish(report: dict, group: Group, start: float) -> dict | None:
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report if group.rank == 0 else None
