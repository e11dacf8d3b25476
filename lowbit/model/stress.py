"""Stress models for the pre-flight audit: a tiny random model in which one chosen site's
row-parallel partial sums exceed fp16's range and another chosen site's are tiny.

    python -c "from lowbit.model.models import load_model; print(load_model('stress-tiny').name)"

Neither embedded model has partials above 65504 (SmolLM2's largest stored partial is 2.32e4), so
an audit that must flag "values beyond the fp16 cast" and "blocks under the reciprocal-scale
cliff" at exactly the right sites needs a model built to have them. ``stress-tiny`` is
``tiny-llama`` (hidden 64, 2 layers, TP 1/2/4; seeded random weights) with two weights rescaled:

1. ``overflow_site`` (L0.down_proj): its weight is multiplied by a power of two chosen so that on
   a fixed probe batch, at every TP size the model shards to, EVERY rank's partial has a value
   above ``OVERFLOW_TARGET`` = 4 x 65504 (the margin covers other inputs);
2. ``tiny_site`` (L1.o_proj): its weight is multiplied by a power of two chosen so that every
   rank's partial stays below ``TINY_TARGET`` = 1e-5 on the probe batch, ten times under
   ``TINY_BOUND`` = 1e-4 (below that, QuickReduce's INT4 encoding scale 8 / max overflows fp16).

Sites are scaled in forward order, each measured after the ones before it were scaled (the huge
L0 output changes what L1 sees). Powers of two keep every scaled weight exact, so the partials
scale exactly. Everything is deterministic: same seed, same probe, same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.model.tp import input_columns, valid_tp_sizes
from lowbit.site import ROW_PARALLEL_MODULES, Site

FP16_MAX = 65504.0
TINY_BOUND = 1e-4
OVERFLOW_TARGET = 4 * FP16_MAX
TINY_TARGET = TINY_BOUND / 10
PROBE_SEED = 1234
PROBE_SHAPE = (2, 16)
MAX_TP = 8


@dataclass(frozen=True)
class StressSpec:
    """Which tiny config a stress model starts from and which sites it makes extreme."""

    base: str            # a name in lowbit.model.models.TINY_CONFIGS
    overflow_site: Site  # every rank's partial exceeds FP16_MAX
    tiny_site: Site      # every rank's partial stays under TINY_BOUND


STRESS_MODELS: dict[str, StressSpec] = {
    "stress-tiny": StressSpec("tiny-llama", overflow_site=Site(0, "down_proj"), tiny_site=Site(1, "o_proj")),
}


def stress_spec(name: str) -> StressSpec:
    """The spec of stress model ``name`` (which sites were made extreme)."""
    if name not in STRESS_MODELS:
        raise ValueError(f"model: {name!r} is not a stress model; stress models: {', '.join(STRESS_MODELS)}")
    return STRESS_MODELS[name]


def site_linear(model: torch.nn.Module, site: Site) -> torch.nn.Linear:
    """The (unsharded) row-parallel linear of ``site`` in a decoder-only model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    prefix = f"layers.{site.layer}."
    for name, module in decoder.named_modules():
        if name.startswith(prefix) and name.endswith("." + site.module) and isinstance(module, torch.nn.Linear):
            return module
    raise ValueError(f"site: {site} has no linear in this model")


def probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED))


@torch.no_grad()
def partial_extremes(model: torch.nn.Module, site: Site, input_ids: torch.Tensor,
                     tp_sizes: list[int]) -> dict[int, list[float]]:
    """{tp: [max |partial| of rank r]}: what each rank's row-parallel partial at ``site`` would
    hold if ``model`` were sharded tp ways, from one unsharded forward pass."""
    linear = site_linear(model, site)
    captured = []
    handle = linear.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    try:
        model(input_ids, use_cache=False)
    finally:
        handle.remove()
    x, weight = captured[0].float(), linear.weight.float()
    return {tp: [float(torch.nn.functional.linear(x[..., cols], weight[:, cols]).abs().max())
                 for cols in (input_columns(linear.in_features, r, tp) for r in range(tp))]
            for tp in tp_sizes}


def apply_stress(model: torch.nn.Module, spec: StressSpec) -> dict[str, float]:
    """Rescale ``model``'s weights in place as ``spec`` says; returns {site: factor applied}."""
    tp_sizes = valid_tp_sizes(model.config, MAX_TP)
    ids = probe_ids(model.config.vocab_size)
    factors = {}
    order = sorted((spec.overflow_site, spec.tiny_site), key=lambda s: (s.layer, ROW_PARALLEL_MODULES.index(s.module)))
    for site in order:
        extremes = [v for per_rank in partial_extremes(model, site, ids, tp_sizes).values() for v in per_rank]
        if site == spec.overflow_site:
            factor = 2.0 ** math.ceil(math.log2(OVERFLOW_TARGET / min(extremes)))
        else:
            factor = 2.0 ** math.floor(math.log2(TINY_TARGET / max(extremes)))
        with torch.no_grad():
            site_linear(model, site).weight.mul_(factor)
        factors[str(site)] = factor
    return factors
