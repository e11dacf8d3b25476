"""Per-site sensitivity and bit allocation: which layers can take fewer bits, for a budget.

Sensitivity of a site (layer x module) to a candidate scheme: the mean KL(reference || run)
of the next-token distributions when ONLY that site uses the candidate and every other site
stays exact (the scheme map ``<base>;L<l>.<module>=<candidate>``), minus the KL of the base
alone. One short run per (site, candidate); the reference is the fp32 all-reduce. The
log-probabilities come through ``lowbit.method.scores.TextScores``: vocabulary-parallel where the
head allows (each rank scores its slice; Gemma 3's 262k-token head was most of a sweep's time).

Allocation: pick one candidate per site so that the average bits per value over all sites is
at most ``budget`` and the summed sensitivity (an additive model of the total KL) is smallest.
Every row-parallel site moves the same T x H values, so the average bits per value is the plain
mean of the sites' bits (``lowbit.comm.collectives.scheme_bits_per_value``). ``dp`` is exact for the
additive model (a knapsack over integer bytes per 8 tokens); ``greedy`` upgrades the site with
the best KL saved per bit until the budget is spent. Either returns a ``SchemeMap`` whose
``str()`` is a scheme like any other (``int3-token-rot64;L0-1=int4-token-rot64;...``).

    python -m lowbit sweep ...     # runs sensitivity + allocation for each budget (lowbit.method.sweep)
"""
from __future__ import annotations

import math
from collections import Counter
from functools import reduce

import numpy as np
import torch

from lowbit.comm.collectives import QuantCommunicator
from lowbit.method.scores import TextScores
from lowbit.wire.accounting import scheme_bits_per_value
from lowbit.site import Site
from lowbit.comm.communicator import ExactCommunicator
from lowbit.scheme import SchemeMap, parse_scheme, parse_scheme_map
from lowbit.model.tp import row_parallel_sites, set_communicator

DEFAULT_CANDIDATES = ("int2-group32-rot64", "int3-token-rot64", "int3-group32-rot64", "int4-token-rot64",
                      "int5-token-rot64", "int8-token")


class BudgetError(ValueError):
    """A budget below the cheapest allocation, or inputs that do not fit together."""


def site_override(base: str, site: Site, candidate: str) -> str:
    """The scheme map that quantizes only ``site`` with ``candidate`` (``base`` elsewhere)."""
    return str(parse_scheme_map(f"{base};L{site.layer}.{site.module}={candidate}"))


@torch.no_grad()
def site_sensitivity(model, group, batches: list[torch.Tensor], candidates: list[str], calibration=None,
                     base: str = "fp32", sites: list[Site] | None = None, progress=None) -> list[dict]:
    """Collective. Rows ``{layer, module, scheme, kl, kl_increase, bits}`` for every site and
    candidate (see the module docstring); the base's own KL is subtracted."""
    device = next(model.parameters()).device
    previous = next(m.communicator for m in model.modules() if hasattr(m, "communicator"))
    sites = sites if sites is not None else row_parallel_sites(model)
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
        else model.config.hidden_size
    tp = group.world_size

    scores = TextScores.for_model(model, group)

    def mean_kl(comm, refs) -> tuple[float, list[torch.Tensor]]:
        set_communicator(model, comm)
        total, count, out = 0.0, 0, []
        for i, ids in enumerate(batches):
            logp = scores.log_probs(model, ids.to(device))
            if refs is None:
                out.append(logp)
                continue
            total += scores.kl_sum(logp, refs[i])
            count += logp.shape[0] * logp.shape[1]
        return (total / count if count else 0.0), out

    rows = []
    try:
        _, refs = mean_kl(ExactCommunicator(group, torch.float32, record=False), None)
        base_kl = 0.0  # the fp32 base is the reference itself
        if str(parse_scheme(base)) != "fp32":
            base_kl = mean_kl(QuantCommunicator(group, base, calibration, record=False), refs)[0]
        total, step = len(sites) * len(candidates), 0
        for site in sites:
            for cand in candidates:
                smap = site_override(base, site, cand)
                kl, _ = mean_kl(QuantCommunicator(group, smap, calibration, record=False), refs)
                rows.append(dict(layer=site.layer, module=site.module, scheme=str(parse_scheme(cand)), kl=kl,
                                 kl_increase=max(0.0, kl - base_kl), bits=scheme_bits_per_value(cand, hidden, tp)))
                step += 1
                if progress:
                    progress("sensitivity", step, total, f"{site} {cand}: KL {kl:.4g}", {})
    finally:
        set_communicator(model, previous)
    return rows


def _table(rows: list[dict]):
    """(sites in order, candidates in order, kl [S, C], bits [C]) from sensitivity rows."""
    sites = sorted({(r["layer"], r["module"]) for r in rows})
    cands = list(dict.fromkeys(r["scheme"] for r in rows))
    bits = {}
    kl = np.full((len(sites), len(cands)), np.inf)
    for r in rows:
        i, j = sites.index((r["layer"], r["module"])), cands.index(r["scheme"])
        kl[i, j] = r["kl_increase"]
        bits[r["scheme"]] = r["bits"]
    if not np.isfinite(kl).all():
        raise BudgetError("sensitivity: every site needs a row for every candidate")
    return sites, cands, kl, np.array([bits[c] for c in cands])


def _as_map(sites, cands, choice) -> SchemeMap:
    """Scheme map: the most used candidate as the default, the others as per-site overrides."""
    default = Counter(choice).most_common(1)[0][0]
    overrides = {(layer, module): parse_scheme(cands[c]) for (layer, module), c in zip(sites, choice) if c != default}
    return SchemeMap(parse_scheme(cands[default]), overrides)


def map_bits_per_value(smap: SchemeMap | str, sites: list[tuple[int, str]], hidden: int, tp: int) -> float:
    """Average bits per value of a scheme map over ``sites`` (every site moves T x H values)."""
    smap = parse_scheme_map(smap) if isinstance(smap, str) else smap
    return sum(scheme_bits_per_value(smap.for_site(layer, module), hidden, tp) for layer, module in sites) / len(sites)


def allocate(rows: list[dict], budget: float, hidden: int, method: str = "dp") -> SchemeMap:
    """Per-site choice of candidate minimizing summed KL increase with mean bits <= budget."""
    if method not in ("dp", "greedy"):
        raise ValueError(f"method: {method!r} unknown; allowed: dp, greedy")
    sites, cands, kl, bits = _table(rows)
    n = len(sites)
    # integer cost: bytes per 8 tokens of one site = bits * hidden (exact for packed codes)
    cost = np.rint(bits * hidden).astype(np.int64)
    if not np.allclose(cost, bits * hidden, atol=1e-6):
        raise BudgetError(f"bits {bits.tolist()} are not whole bytes per 8 tokens at hidden {hidden}")
    capacity = int(math.floor(budget * hidden * n + 1e-9))
    if cost.min() * n > capacity:
        raise BudgetError(f"budget {budget} bits/value is below the cheapest candidate "
                          f"({bits.min():.4g} bits/value); allowed: >= {bits.min():.4g}")
    if method == "greedy":
        choice = _greedy(kl, cost, capacity)
    else:
        choice = _dp(kl, cost, capacity)
    assert sum(cost[c] for c in choice) <= capacity
    return _as_map(sites, cands, choice)


def _greedy(kl: np.ndarray, cost: np.ndarray, capacity: int) -> list[int]:
    cheapest = int(np.argmin(cost))
    # among equally cheap candidates start from the least sensitive one per site
    choice = [int(np.argmin(np.where(cost == cost[cheapest], kl[i], np.inf))) for i in range(len(kl))]
    spent = int(sum(cost[c] for c in choice))
    while True:
        best, best_gain = None, 0.0
        for i, c in enumerate(choice):
            for j in range(len(cost)):
                extra = cost[j] - cost[c]
                saved = kl[i, c] - kl[i, j]
                if saved <= 0 or spent + extra > capacity:
                    continue
                gain = saved / extra if extra > 0 else math.inf
                if gain > best_gain:
                    best, best_gain = (i, j), gain
        if best is None:
            return choice
        i, j = best
        spent += int(cost[j] - cost[choice[i]])
        choice[i] = j


def _dp(kl: np.ndarray, cost: np.ndarray, capacity: int) -> list[int]:
    g = int(reduce(math.gcd, [int(c) for c in cost], 0)) or 1
    unit, cap = cost // g, capacity // g
    n, m = kl.shape
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        for j in range(m):
            u = int(unit[j])
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[:cap + 1 - u] + kl[i, j]
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise BudgetError("no allocation fits the budget")
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        j = int(picks[i, end])
        choice[i] = j
        end -= int(unit[j])
    return choice
