"""The numbers evaluation reports, as small pure functions (tested against hand-computed values
in tests/test_metrics.py), and the score table the CLI and the app both print.

- ``kl_per_token``: KL(reference || scheme) of next-token distributions given as log-probs.
- ``perplexity``: exp of the mean negative log-likelihood.
- ``choice_hits``: lm-eval's ``acc`` (highest summed log-likelihood) and ``acc_norm`` (highest
  log-likelihood per unit of the continuation's length: the task's characters, tokens or bytes)
  for one multiple-choice item.
- ``mean_se``: mean and standard error (sample std / sqrt(n), as lm-eval reports it).
- ``paired_delta``: mean difference of two scores on the same items and its standard error
  (the std of the per-item differences / sqrt(n)); far smaller than either score's error when
  the two runs mostly agree.
- ``kept_pct``: the paper's "% of original performance kept" (mean over tasks of scheme /
  reference primary score) and its standard error: each task's ratio carries the paired
  difference's error over the reference score.
- ``score_table``: one row per scheme, every value with its ± (blank when absent).
- ``bernoulli_variance`` / ``paired_variance`` / ``items_for_se``: sizing a run to a target
  standard error from a pilot (``bench.accuracy --target-se``): the per-item variance of a 0/1
  score is p(1-p); that of the paired differences is recovered from the pilot's ``delta_se``
  and n (``mean_se`` divides the sample variance by n); the items needed are
  ``n = ceil(variance / se^2)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def kl_per_token(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || q) over the last axis for log-probabilities ``ref_logp`` and ``logp``."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(total negative log-likelihood / tokens)."""
    if tokens < 1:
        raise ValueError(f"tokens: must be >= 1, got {tokens}")
    return math.exp(nll_sum / tokens)


def choice_hits(logliks: Sequence[float], lengths: Sequence[int], gold: int) -> dict[str, float]:
    """{"acc": 1.0 | 0.0, "acc_norm": 1.0 | 0.0} for one item (ties go to the first choice);
    ``lengths``: each continuation's length in the task's unit (``lowbit.model.data.continuation_length``)."""
    if not 0 <= gold < len(logliks) or len(logliks) != len(lengths):
        raise ValueError(f"gold: {gold} must index one of {len(logliks)} choices with one length each")
    if any(n < 1 for n in lengths):
        raise ValueError(f"lengths: must be >= 1, got {list(lengths)}")
    best = max(range(len(logliks)), key=lambda i: logliks[i])
    best_norm = max(range(len(logliks)), key=lambda i: logliks[i] / lengths[i])
    return {"acc": float(best == gold), "acc_norm": float(best_norm == gold)}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation / sqrt(n)); the error is 0 for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("values: need at least one")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_delta(scheme: Sequence[float], reference: Sequence[float]) -> tuple[float, float]:
    """(mean of scheme - reference per item, its standard error); same items, same order."""
    if len(scheme) != len(reference):
        raise ValueError(f"scheme and reference must score the same items: {len(scheme)} vs {len(reference)}")
    return mean_se([a - b for a, b in zip(scheme, reference)])


def kept_pct(scheme_tasks: dict[str, dict], reference_tasks: dict[str, dict]) -> tuple[float | None, float | None]:
    """(% kept, its standard error) over the tasks both sides scored with a reference score > 0.

    ``% kept = 100/T * sum_t s_t / r_t``; with the reference score held fixed, ``s_t / r_t``
    has the error ``delta_se_t / r_t`` (the paired difference's), so
    ``SE = 100/T * sqrt(sum_t (delta_se_t / r_t)^2)``. A task without ``delta_se`` uses the
    scheme's own standard error.
    """
    ratios, terms = [], []
    for task, row in scheme_tasks.items():
        if task.startswith("_") or task not in reference_tasks:
            continue
        primary = row["primary"]
        ref = reference_tasks[task][primary]
        if not ref > 0:
            continue
        ratios.append(row[primary] / ref)
        se = row.get("delta_se")
        se = row.get(f"{primary}_se") if se is None else se
        if se is not None:
            terms.append((se / ref) ** 2)
    if not ratios:
        return None, None
    se = 100.0 * math.sqrt(sum(terms)) / len(ratios) if len(terms) == len(ratios) else None
    return 100.0 * sum(ratios) / len(ratios), se


def kept_is_unresolved(kept: float | None, se: float | None) -> bool:
    """True when the error of "% kept" exceeds the gap to 100 % it claims (the loss, or gain,
    is within one standard error of no change at all)."""
    if kept is None or se is None:
        return False
    return se > abs(100.0 - kept)


def fmt_pm(value: float | None, se: float | None = None, scale: float = 1.0, digits: int = 1,
           signed: bool = False) -> str:
    """``"55.0 ± 11.4"``; blank when ``value`` is missing (never "None" or "nan")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{value * scale:+.{digits}f}" if signed else f"{value * scale:.{digits}f}"
    if se is not None and not (isinstance(se, float) and math.isnan(se)):
        text += f" ± {se * scale:.{digits}f}"
    return text


def fmt_num(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


UNRESOLVED_NOTE = "!: the standard error of % kept exceeds the gap to 100 % it claims (not resolved at this n)"


def score_table(result: dict):
    """An evaluate result's records as display strings: one row per scheme, each task's
    primary score in % with its standard error, the paired difference to the reference
    (``Δ``, percentage points) with its error, the average and "% kept" with its error, flagged
    ``!`` when that error exceeds the gap it claims. Absent values are blank."""
    import pandas as pd
    reference = result.get("reference", "fp32")
    records = [r for r in result.get("records") or [] if isinstance(r, dict)]
    ref_tasks = next((r.get("tasks") or {} for r in records if r.get("scheme") == reference), {})
    rows = []
    for r in records:
        top1 = r.get("top1_agreement")
        row = {"scheme": r.get("scheme", ""), "bits/value": fmt_num(r.get("bits_per_value"), ".4g"),
               "ppl": fmt_num(r.get("ppl"), ".4g"), "KL": fmt_num(r.get("kl"), ".4g"),
               "top-1 %": fmt_pm(top1, None, 100.0)}
        tasks = r.get("tasks") or {}
        for task, t in tasks.items():
            primary = t.get("primary", "acc")
            row[f"{task} ({primary}) %"] = fmt_pm(t.get(primary), t.get(f"{primary}_se"), 100.0)
            is_ref = r.get("scheme") == reference
            row[f"Δ {task} pp"] = "" if is_ref else fmt_pm(t.get("delta"), t.get("delta_se"), 100.0, signed=True)
        if tasks:
            primaries = [(t.get(t.get("primary", "acc")), t.get(f"{t.get('primary', 'acc')}_se")) for t in tasks.values()]
            ses = [se for _, se in primaries if se is not None]
            avg = r.get("avg_primary")
            avg_se = math.sqrt(sum(s * s for s in ses)) / len(ses) if len(ses) == len(primaries) and ses else None
            row["avg %"] = fmt_pm(avg, avg_se, 100.0)
            kept, kept_se = r.get("kept_pct"), r.get("kept_se")
            if kept_se is None and r.get("scheme") != reference and ref_tasks:
                kept, kept_se = kept_pct(tasks, ref_tasks)
            flag = " !" if r.get("scheme") != reference and kept_is_unresolved(kept, kept_se) else ""
            row["kept %"] = fmt_pm(kept, None if r.get("scheme") == reference else kept_se) + flag
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.fillna("") if not frame.empty else frame


def bernoulli_variance(p: float) -> float:
    """Per-item variance p(1-p) of a 0/1 score with mean ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: must be in [0, 1], got {p}")
    return p * (1.0 - p)


def paired_variance(delta_se: float, n: int) -> float:
    """Sample variance of the per-item differences behind a ``paired_delta`` standard error
    over ``n`` items (``mean_se``'s se = sqrt(var / n), so var = n * se^2)."""
    if n < 1 or delta_se < 0:
        raise ValueError(f"delta_se, n: need delta_se >= 0 and n >= 1, got {delta_se}, {n}")
    return n * delta_se ** 2


def items_for_se(variance: float, target_se: float, available: int | None = None) -> int:
    """Items needed for a mean of per-item ``variance`` to have standard error ``target_se``:
    ``ceil(variance / target_se^2)``, at least 1 and at most ``available`` (the task's size)."""
    if not target_se > 0:
        raise ValueError(f"target_se: must be > 0, got {target_se}")
    if variance < 0:
        raise ValueError(f"variance: must be >= 0, got {variance}")
    # round first so that 0.25 / 0.05**2 = 100.00000000000001 asks for 100 items, not 101
    n = max(1, math.ceil(round(variance / target_se ** 2, 9)))
    return n if available is None else min(n, available)
