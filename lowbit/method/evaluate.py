"""Accuracy of a scheme against the exact run on the same tokens.

Text metrics (held-out chunks of a text source): perplexity, mean KL divergence
KL(reference || scheme) of next-token distributions, and top-1 agreement with the reference.
The reference is the exact fp32 all-reduce (``fp32``), so ``bf16`` shows the cost of the
usual 16-bit wire too.

Task metrics: zero-shot log-likelihood multiple choice (lm-eval's definitions): ``acc`` picks
the choice with the highest summed log-probability of its continuation, ``acc_norm`` divides
it by the continuation's length in the unit the task's package metric names (characters for
``acc_per_char`` and the raw tasks, tokens for ``acc_per_token``: medmcqa, medqa_en, ...; the
row's ``norm``); standard error = sample std / sqrt(n). The task's primary metric follows the
package's config (acc_norm for arc_challenge, hellaswag, piqa and the other length-normalized
tasks; acc otherwise; ``lowbit.model.data.TASK_INFO``) and "% kept" is the paper's: scheme
score / reference score, averaged over tasks. The log-likelihoods come from the packed scorer
(``lowbit.method.choices``): tokenizing and packing once per item, one forward per batch and
scheme with each item's shared prefix run once, the head only where a continuation token is
predicted, vocabulary-parallel (``lowbit.method.scores.TextScores``).

Per-layer error: relative error and SNR of each site's reduced output, ``local`` (every site
gets exact inputs: the error this site adds) and ``accumulated`` (inputs already carry the
upstream error: what the model really sees).

All functions are collective: every rank of the group calls them with the same arguments.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit import stats
from lowbit.artifacts import calibration_cache_dir
from lowbit.comm.codec import Codec, event_text
from lowbit.comm.collectives import QuantCommunicator
from lowbit.comm.communicator import Communicator, ExactCommunicator
from lowbit.comm.dist import Group
from lowbit.calibration import Calibration
from lowbit.counters import site_counters
from lowbit.method.calibrate import load_or_calibrate, with_calibration_defaults
from lowbit.model.data import CLASSIC_TASKS, TASK_INFO, Item, load_task, token_chunks
from lowbit.method.choices import (DEFAULT_MAX_TOKENS, ChoiceItem, choice_logliks, legacy_batches, legacy_choice_logliks,
                                   legacy_sequences, plan_batches, tokenize_items)
from lowbit.method.scores import TextScores
from lowbit.model.engine import build_tp_model, forward_partials, vocab_shardable
from lowbit.model.tp import set_communicator
from lowbit.scheme.plan import SchemePlan
from lowbit.scheme.spec import SchemeMap
from lowbit.site import Site

REFERENCE = "fp32"
# From the discovered tasks (lowbit.model.data): acc where the package scores raw log-likelihood,
# acc_norm where it normalizes by length (arc_challenge, hellaswag, piqa, ...: as OLMES does).
PRIMARY_METRIC = {t: info.primary for t, info in TASK_INFO.items()}


def make_communicator(group: Group, scheme: SchemeMap | str, calibration: Calibration | None,
                      codec: Codec | None = None, progress=None, counters: bool = True,
                      record: bool = True) -> Communicator:
    """The communicator of one (parsed) scheme; ``codec`` (``kernels.dispatch.Codec()``, injected by
    the job layer) runs the kernels inside it: the same numbers, less time. Every change of codec
    path at a site is reported to ``progress`` as a ``codec`` event (``lowbit.comm.codec``).
    ``counters=False``: no ``lowbit.counters`` per call (timings: they are diagnostics, not comm);
    ``record=False``: no per-call records (``bench.collectives`` times bare reduces)."""
    def changed(event: dict) -> None:
        if progress:
            progress("codec", None, None, event_text(str(scheme), event), event)
    return QuantCommunicator(group, scheme, calibration, record=record, codec=codec, on_path_change=changed,
                             counters=counters)


def _reference_first(plan: SchemePlan) -> list[str]:
    return [REFERENCE, *(s for s in plan if s != REFERENCE)]


def _summarize_calls(comm: Communicator) -> dict:
    values = sum(c.tokens * c.hidden for c in comm.calls)
    sent = sum(c.bytes_sent for c in comm.calls)
    leg1 = [c.extra.get("leg1_bits") for c in comm.calls if c.extra.get("leg1_bits") is not None]
    leg2 = [c.extra.get("leg2_bits") for c in comm.calls if c.extra.get("leg2_bits")]
    return dict(bits_per_value=8.0 * sent / values if values else 0.0,
                leg1_bits=sum(leg1) / len(leg1) if leg1 else None,
                leg2_bits=sum(leg2) / len(leg2) if leg2 else None,
                clamped=int(sum(c.extra.get("clamped", 0) for c in comm.calls)),
                nonfinite=int(sum(c.extra.get("nonfinite", 0) for c in comm.calls)),
                # thr<T>c<K>: features over the threshold that did not fit the fixed capacity
                thr_overflow=int(sum(c.extra.get("thr_overflow", 0) for c in comm.calls)),
                # @min<size>: calls whose message was small enough to go as the exact BF16 all-reduce
                gated_calls=int(sum(c.extra.get("gated", 0) for c in comm.calls)),
                comm_seconds=sum(c.seconds for c in comm.calls), calls=len(comm.calls), values=values,
                # the codec path each site's messages took (a change of path is also an event)
                codec_paths=comm.paths.by_site() if isinstance(comm, QuantCommunicator) else {},
                site_counters=site_counters(comm.calls))



@torch.no_grad()
def evaluate_text(model, group: Group, chunks: torch.Tensor, schemes: SchemePlan | list[str],
                  calibration: Calibration | None, batch_size: int = 4, progress=None, codec=None) -> dict[str, dict]:
    """Perplexity, KL vs the fp32 reference and top-1 agreement for each scheme on ``chunks``.

    The head is vocabulary-parallel where the model allows (``lowbit.model.engine.vocab_shardable``):
    each rank scores its slice of the vocabulary and the log-softmax, the target's log-probability,
    the KL sum and the arg-max are completed over the group (``TextScores``), instead of every rank
    computing the whole replicated head."""
    device = next(model.parameters()).device
    plan = SchemePlan.of(schemes, REFERENCE)
    comms = {s: make_communicator(group, plan[s], calibration, codec, progress) for s in _reference_first(plan)}
    acc = {s: defaultdict(float) for s in comms}
    scores = TextScores(group if vocab_shardable(model) else None)
    batches = list(chunks.split(batch_size))
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        targets = ids[:, 1:]
        ref = ref_top = None
        for name, comm in comms.items():
            set_communicator(model, comm)
            logp = scores.log_probs(model, ids)
            if ref is None:  # the fp32 reference comes first: its arg-max serves every scheme of the batch
                ref, ref_top = logp, scores.argmax(logp)
            nll, kl, top1 = scores.metrics(logp, ref, ref_top, targets)
            a = acc[name]
            a["nll"] += nll
            a["tokens"] += targets.numel()
            a["kl"] += kl
            a["top1"] += top1
        if progress:
            progress("text", step + 1, len(batches), f"held-out batch {step + 1}/{len(batches)}", {})
    out = {}
    for name, a in acc.items():
        n = a["tokens"]
        out[name] = dict(ppl=stats.perplexity(a["nll"], int(n)), kl=a["kl"] / n, top1_agreement=a["top1"] / n, tokens=int(n),
                         **_summarize_calls(comms[name]))
    return out


@dataclass
class TaskLogliks:
    """What ``task_logliks`` scored: {scheme: {task: each item's choice log-likelihoods}}, the
    tokenized items per task, each scheme's seconds of forwards, and the seconds of the work done
    once for every scheme (tokenizing, packing)."""

    logliks: dict[str, dict[str, list[list[float]]]]
    items: dict[str, list[ChoiceItem]]
    seconds: dict[str, float]
    shared_seconds: float


@torch.no_grad()
def task_logliks(model, group: Group, tokenizer, items_by_task: dict[str, list[Item]], comms: dict[str, Communicator],
                 progress=None, max_tokens: int = DEFAULT_MAX_TOKENS, legacy: bool = False,
                 batch_sequences: int = 32) -> TaskLogliks:
    """Each item's choice log-likelihoods for every communicator of ``comms``. Tokenizing, packing and the masks are done once
    per task (``lowbit.method.choices``); each batch then runs once per communicator, the
    reference's first. ``legacy``: the path before the packed scorer (each choice's sequence alone,
    ``batch_sequences`` per forward), kept for ``bench.scoring``'s comparison on the same items.
    An unsharded model (``group`` None, a communicator None) scores in one process: the floor."""
    scores = TextScores.for_model(model, group)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {s: {} for s in comms}
    seconds = dict.fromkeys(comms, 0.0)
    shared, tokenized_by_task = 0.0, {}
    total, done = sum(len(v) for v in items_by_task.values()), 0
    for task, items in items_by_task.items():
        start = time.perf_counter()
        tokenized = tokenized_by_task[task] = tokenize_items(tokenizer, items)
        batches = (legacy_batches(tokenized, batch_sequences) if legacy
                   else plan_batches(model, tokenized, pad_id, max_tokens))
        shared += time.perf_counter() - start
        for name in comms:
            out[name][task] = [None] * len(items)
        for batch in batches:
            index = batch if legacy else batch.index
            if legacy:
                pairs = [legacy_sequences(tokenized[i]) for i in index]
                seqs = [s for q, _ in pairs for s in q]
                starts = [s for _, t in pairs for s in t]
            for name, comm in comms.items():
                if comm is not None:
                    set_communicator(model, comm)
                start = time.perf_counter()
                if legacy:
                    flat, per_item = legacy_choice_logliks(model, seqs, starts, pad_id), []
                    for i in index:
                        per_item.append(flat[:len(tokenized[i].branches)])
                        flat = flat[len(tokenized[i].branches):]
                else:
                    per_item = choice_logliks(model, batch, scores)
                seconds[name] += time.perf_counter() - start
                for i, ll in zip(index, per_item):
                    out[name][task][i] = ll
            done += len(index)
            if progress:
                progress("tasks", done, total, f"{task}: item {sum(x is not None for x in out[REFERENCE][task])}/{len(items)}"
                         if REFERENCE in out else f"{task}: {done}/{total}", {})
    return TaskLogliks(out, tokenized_by_task, seconds, shared)


def task_hits(scored: TaskLogliks) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{scheme: {task: {"acc": [0/1 per item], "acc_norm": [...]}}}: each item's decisions, acc_norm
    per the task's unit (``lowbit.model.data.TaskInfo.norm``)."""
    hits = {s: {} for s in scored.logliks}
    for task, tokenized in scored.items.items():
        lengths = [item.lengths(TASK_INFO[task].norm) for item in tokenized]
        for name in scored.logliks:
            h = {"acc": [], "acc_norm": []}
            for ll, n, item in zip(scored.logliks[name][task], lengths, tokenized):
                hit = stats.choice_hits(ll, n, item.item.gold)
                h["acc"].append(hit["acc"])
                h["acc_norm"].append(hit["acc_norm"])
            hits[name][task] = h
    return hits


@torch.no_grad()
def evaluate_tasks(model, group: Group, tokenizer, items_by_task: dict[str, list[Item]],
                   schemes: SchemePlan | list[str],
                   calibration: Calibration | None, progress=None, max_tokens: int = DEFAULT_MAX_TOKENS, codec=None,
                   legacy: bool = False, batch_sequences: int = 32) -> dict[str, dict[str, dict]]:
    """{scheme: {task: {acc, acc_norm, acc_se, acc_norm_se, n, primary, norm, delta, delta_se, flipped},
    "_comm": {...}, "_timing": {seconds, items}}} for the reference and ``schemes``. ``acc_norm``
    divides by the continuation's length in the task's unit (``norm``: the package's metric,
    ``lowbit.model.data.TaskInfo.norm``). The log-likelihoods come from ``task_logliks`` (packed
    batches of up to ``max_tokens`` tokens; ``legacy`` for the old path); ``_timing`` holds the
    seconds of this scheme's forwards and the items they scored."""
    plan = SchemePlan.of(schemes, REFERENCE)
    # No lowbit.counters on task forwards: the record's counters are the held-out text's
    # (``summary_record``), and counting every task reduce cost more than the codec itself.
    comms = {s: make_communicator(group, plan[s], calibration, codec, progress, counters=False)
             for s in _reference_first(plan)}
    scored = task_logliks(model, group, tokenizer, items_by_task, comms, progress, max_tokens, legacy, batch_sequences)
    hits = task_hits(scored)
    n_items = sum(len(v) for v in items_by_task.values())
    out: dict[str, dict[str, dict]] = {}
    for name, by_task in hits.items():
        out[name] = {}
        for task, h in by_task.items():
            row = {"n": len(h["acc"])}
            for metric in ("acc", "acc_norm"):
                row[metric], row[f"{metric}_se"] = stats.mean_se(h[metric])
            row["primary"] = PRIMARY_METRIC[task]
            row["norm"] = TASK_INFO[task].norm
            # Paired with the reference on the same items: the difference's standard error is
            # far smaller than either accuracy's when the two mostly agree.
            mine, ref = h[row["primary"]], hits[REFERENCE][task][row["primary"]]
            row["delta"], row["delta_se"] = stats.paired_delta(mine, ref)
            row["flipped"] = sum(a != b for a, b in zip(mine, ref))
            out[name][task] = row
        out[name]["_comm"] = _summarize_calls(comms[name])
        out[name]["_timing"] = dict(seconds=scored.seconds[name], items=n_items, shared_seconds=scored.shared_seconds,
                                    scorer="legacy" if legacy else "packed")
    return out


def kept_pct(scheme_tasks: dict[str, dict], reference_tasks: dict[str, dict]) -> float | None:
    """The paper's "% of original performance": mean over tasks of scheme/reference primary score
    (``lowbit.stats.kept_pct`` also gives its standard error)."""
    return stats.kept_pct(scheme_tasks, reference_tasks)[0]


class ErrorProbe(Communicator):
    """Measures each site's error of a quantized communicator against the exact fp32 sum.

    mode ``local``: forward the exact sum (the next site sees exact inputs).
    mode ``accumulated``: first call ``start_recording()`` and run a pass of the exact model (stores each
    site's exact output), then ``start_comparing()`` and run the same tokens: the quantized output is
    forwarded and compared with the stored exact output.
    """

    def __init__(self, group: Group, inner: QuantCommunicator, mode: str = "local"):
        super().__init__(group, record=False)
        if mode not in ("local", "accumulated"):
            raise ValueError(f"mode: {mode!r} unknown; allowed: local, accumulated")
        self.inner, self.mode, self.phase = inner, mode, "compare"
        self.exact = ExactCommunicator(group, torch.float32, record=False)
        self.stored: dict[Site, list[torch.Tensor]] = defaultdict(list)
        self.cursor: dict[Site, int] = defaultdict(int)
        self.sums: dict[tuple[Site, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])

    def start_recording(self) -> None:
        self.phase = "record"

    def start_comparing(self) -> None:
        self.phase = "compare"
        self.cursor.clear()

    def _accumulate(self, site: Site, leg: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        s = self.sums[(site, leg)]
        err = (got.float() - ref.float())
        s[0] += float((err * err).sum())
        s[1] += float((ref.float() ** 2).sum())
        s[2] = max(s[2], float(err.abs().max())) if err.numel() else s[2]

    def _reduce(self, partial, site):
        if self.phase == "record":
            exact = self.exact.reduce(partial, site)
            self.stored[site].append(exact.detach().clone())
            return exact, 0, {}
        q = self.inner.reduce(partial, site)
        if self.mode == "local":
            ref = self.exact.reduce(partial, site)
        else:
            ref = self.stored[site][self.cursor[site]]
            self.cursor[site] += 1
        self._accumulate(site, "final", q, ref)
        if self.inner.last_first_leg is not None:
            self._accumulate(site, "leg1", self.inner.last_first_leg.reshape(ref.shape), ref)
            self.inner.last_first_leg = None
        return (ref if self.mode == "local" else q), 0, {}

    def rows(self, scheme: str) -> list[dict]:
        out = []
        for (site, leg), (err2, ref2, maxerr) in sorted(self.sums.items(), key=lambda kv: (kv[0][0].layer, kv[0][0].module, kv[0][1])):
            rel = math.sqrt(err2 / ref2) if ref2 > 0 else 0.0
            snr = 10 * math.log10(ref2 / err2) if err2 > 0 and ref2 > 0 else None  # None: no error at all
            out.append(dict(scheme=scheme, mode=self.mode, layer=site.layer, module=site.module, leg=leg,
                            rel_error=rel, snr_db=snr, max_abs_error=maxerr))
        return out


@torch.no_grad()
def layer_errors(model, group: Group, batches: list[torch.Tensor], schemes: SchemePlan | list[str],
                 calibration: Calibration | None, modes=("local", "accumulated"), progress=None) -> list[dict]:
    """Per-site relative error and SNR of each scheme, in each mode (see ``ErrorProbe``)."""
    device = next(model.parameters()).device
    previous = next(m.communicator for m in model.modules() if hasattr(m, "communicator"))
    plan = SchemePlan.of(schemes)
    measured = [s for s in plan if s != REFERENCE] if isinstance(schemes, SchemePlan) else list(plan)
    rows, total, step = [], len(measured) * len(modes), 0
    try:
        for scheme in measured:
            for mode in modes:
                inner = QuantCommunicator(group, plan[scheme], calibration, record=False, keep_first_leg=True)
                probe = ErrorProbe(group, inner, mode)
                set_communicator(model, probe)
                for ids in batches:
                    if mode == "accumulated":
                        probe.start_recording()
                        forward_partials(model, ids.to(device))
                        probe.start_comparing()
                    forward_partials(model, ids.to(device))
                rows += probe.rows(scheme)
                step += 1
                if progress:
                    progress("layer-error", step, total, f"{scheme} ({mode})", {})
    finally:
        set_communicator(model, previous)
    return rows


# The numbers one results.json record holds (besides "scheme" and the per-task "tasks" dict):
# ``summary_record`` writes exactly these, the results store reads exactly these.
TEXT_NUMBERS = ("bits_per_value", "leg1_bits", "leg2_bits", "ppl", "kl", "top1_agreement", "clamped", "nonfinite",
                "thr_overflow", "gated_calls", "text_tokens", "comm_seconds")
TASK_NUMBERS = ("kept_pct", "kept_se", "avg_primary")  # only when the run evaluated tasks
RECORD_NUMBERS = TEXT_NUMBERS + TASK_NUMBERS


def summary_record(scheme: str, text: dict, tasks: dict | None, reference_tasks: dict | None) -> dict:
    """One results.json record: scheme, ``TEXT_NUMBERS``, the codec path of each site
    (``codec_paths``), and with tasks the per-task metrics, % kept and the average primary score
    (``TASK_NUMBERS``)."""
    values = dict(text, text_tokens=text["tokens"], thr_overflow=text.get("thr_overflow", 0),
                  gated_calls=text.get("gated_calls", 0))
    rec = dict(scheme=scheme, **{k: values[k] for k in TEXT_NUMBERS}, codec_paths=text.get("codec_paths", {}),
               site_counters=text.get("site_counters", {}))
    if tasks is not None:
        rec["tasks"] = {t: r for t, r in tasks.items() if not t.startswith("_")}
        rec["kept_pct"], rec["kept_se"] = stats.kept_pct(tasks, reference_tasks)
        primaries = [r[r["primary"]] for t, r in rec["tasks"].items()]
        rec["avg_primary"] = sum(primaries) / len(primaries) if primaries else None
    return rec


# -- runner: a whole evaluation on a group (what the evaluate job kind calls) ---------------------
EVALUATE_DEFAULTS = dict(schemes=["bf16", "int4-static-top1/64"], eval_source="wikipedia", eval_chunks=8,
                         seq_len=256, batch_size=4, tasks=list(CLASSIC_TASKS), items=20, seed=0, layer_error=True,
                         layer_error_chunks=2, task_tokens=DEFAULT_MAX_TOKENS, legacy_scoring=False)


def task_timing(tasks: dict[str, dict]) -> dict:
    """The task phase's timing of an ``evaluate_tasks`` result: the scorer, the items, the seconds
    spent once for every scheme, and each scheme's seconds of forwards and seconds per item."""
    first = next(iter(tasks.values()))["_timing"]
    return dict(scorer=first["scorer"], items=first["items"], shared_seconds=first["shared_seconds"],
                schemes={s: dict(seconds=r["_timing"]["seconds"], seconds_per_item=r["_timing"]["seconds"] / r["_timing"]["items"])
                         for s, r in tasks.items()})


def evaluate(group: Group, params: dict, progress=None, codec=None, plan: SchemePlan | None = None) -> dict | None:
    """Collective: text metrics, task accuracy and per-layer error for each scheme of ``params``.

    ``plan``: the job's schemes already parsed (else parsed here, once). ``codec``: the kernels
    to run inside the communicators (``kernels.dispatch.Codec()``), or None for ``lowbit.wire.payload``.
    The calibration is ``params["calibration"]`` or the shared cache folder, made on the fly on
    the loaded model when missing. Rank 0 returns the result and, with ``out``, writes
    ``results.json`` (one record per scheme) and ``layer_errors.json`` there."""
    p = dict(EVALUATE_DEFAULTS, **params)
    schemes = list(p["schemes"])
    plan = SchemePlan.of(plan if plan is not None else schemes, REFERENCE)
    tp_model = build_tp_model(p["model"], group)
    calibration = None
    if plan.needs_calibration:
        cp = with_calibration_defaults(p)
        folder = Path(p.get("calibration") or calibration_cache_dir(p["model"], group.world_size, cp["source"],
                                                                   cp["chunks"], cp["seq_len"], cp["gamma"]))
        calibration = load_or_calibrate(tp_model, group, p, folder, progress)
    tok = tp_model.tokenizer
    held = token_chunks(tok, p["eval_source"], "eval", p["eval_chunks"], p["seq_len"])
    start = time.perf_counter()
    text = evaluate_text(tp_model.model, group, held, plan, calibration, p["batch_size"], progress, codec)
    tasks = None
    if p["items"] and p["tasks"]:
        items = {t: load_task(t, p["items"], p["seed"]) for t in p["tasks"]}
        tasks = evaluate_tasks(tp_model.model, group, tok, items, plan, calibration, progress, p["task_tokens"],
                               codec=codec, legacy=p["legacy_scoring"])
    layers = []
    if p["layer_error"]:
        layers = layer_errors(tp_model.model, group, list(held[:p["layer_error_chunks"]].split(1)), plan,
                              calibration, progress=progress)
    if group.rank != 0:
        return None
    records = [summary_record(s, text[s], tasks[s] if tasks else None, tasks[REFERENCE] if tasks else None)
               for s in [REFERENCE, *schemes]]
    result = dict(model=p["model"], tp=group.world_size, backend=getattr(group, "backend", "?"),
                  reference=REFERENCE, eval_source=p["eval_source"], eval_tokens=int(held.numel()),
                  items_per_task=p["items"], seed=p["seed"], calibration=calibration.meta if calibration else None,
                  codec=getattr(codec, "__name__", "kernels") if codec else "lowbit.wire.payload",
                  seconds=round(time.perf_counter() - start, 1), records=records,
                  task_timing=task_timing(tasks) if tasks else None)
    out = p.get("out")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text(json.dumps(result, indent=2))
        (Path(out) / "layer_errors.json").write_text(json.dumps(layers, indent=1))
    result["layer_errors"] = layers
    return result
