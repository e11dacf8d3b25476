"""Kind ``tp-check``: sharded vs unsharded logits and greedy text (``lowbit.model.tpcheck``)."""
from __future__ import annotations

from lowbit.model.tpcheck import DEFAULT_PROMPT, run_tp_check


def run(ctx) -> dict | None:
    """Sharded vs unsharded logits and greedy text (lowbit.model.tpcheck)."""
    ctx.events.step(0, 1, f"tp-check of {ctx.spec.model} at TP {ctx.group.world_size}")
    report = run_tp_check(ctx.group, ctx.spec.model, ctx.spec.prompt or DEFAULT_PROMPT, ctx.spec.max_new_tokens)
    ctx.events.step(1, 1, "compared", ok=None if report is None else report["ok"])
    return report
