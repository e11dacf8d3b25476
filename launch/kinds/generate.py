"""Kind ``generate``: greedy generation with the TP-sharded model: tokens, text and timings."""
from __future__ import annotations

from lowbit.model.engine import build_tp_model, greedy_generate


def run(ctx) -> dict | None:
    """Greedy generation with the TP-sharded model: tokens, text and timings."""
    spec = ctx.spec
    ctx.events.loading(f"loading {spec.model} sharded {ctx.group.world_size} ways")
    tp = build_tp_model(spec.model, ctx.group)
    ids = tp.tokenizer(spec.prompt or "", return_tensors="pt").input_ids
    ctx.events.step(0, 1, f"generating {spec.max_new_tokens} tokens after a {ids.shape[1]}-token prompt")
    out = greedy_generate(tp.model, ids, spec.max_new_tokens)
    tokens = out["tokens"][0].tolist()
    decode_tps = out["decode_tokens"] / out["decode_seconds"] if out["decode_seconds"] > 0 else None
    ctx.events.step(1, 1, "generated", tokens=len(tokens), decode_tokens_per_s=decode_tps)
    if ctx.rank != 0:
        return None
    return dict(model=spec.model, tp=ctx.group.world_size, backend=getattr(ctx.group, "backend", "?"),
                prompt=spec.prompt, prompt_tokens=int(ids.shape[1]), tokens=tokens,
                text=tp.tokenizer.decode(tokens), load_seconds=tp.load_seconds,
                prefill_seconds=out["prefill_seconds"], decode_seconds=out["decode_seconds"],
                decode_tokens=out["decode_tokens"], decode_tokens_per_s=decode_tps)
