"""Self-check: does the TP-sharded model give the unsharded model's logits and greedy text?

    python -m lowbit tp-check --model smollm2-135m --tp 3

The parent process starts ``tp`` ranks with torchrun (``launch.worker``, kind ``tp-check``);
rank 0 also runs the unsharded model on the same prompt and writes ``tp_check.json``. The
last printed line says whether the continuations match; the exit code is 1 on a mismatch.
"""
from __future__ import annotations

import torch

from lowbit.model.engine import build_tp_model, greedy_generate, prefill_logits
from lowbit.model.models import load_model

DEFAULT_PROMPT = ("In tensor parallel inference, every decoder layer ends with an all-reduce of the "
                  "partial sums computed on each device. The main cost of this step is")
# fp32 logits of magnitude ~10-30 after 30 layers: summing the partials in another order
# changes the last bits of each layer's output (observed: 2.8e-5 on smollm2-135m at TP 3);
# 1e-3 absolute leaves ~35x headroom while any real sharding bug moves logits by >0.1.
LOGITS_ATOL = 1e-3


def run_tp_check(group, model_name: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 16) -> dict | None:
    """Collective over ``group``: every rank runs the sharded model; rank 0 returns the report."""
    loaded = load_model(model_name)
    tp = build_tp_model(model_name, group, loaded=loaded)
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    sharded_logits = prefill_logits(tp.model, ids)[0, -1]
    sharded = greedy_generate(tp.model, ids, max_new_tokens)
    if group.rank != 0:
        return None
    full_logits = prefill_logits(loaded.model, ids)[0, -1]
    full = greedy_generate(loaded.model, ids, max_new_tokens)
    diff = (sharded_logits - full_logits).abs().max().item()
    same_tokens = torch.equal(sharded["tokens"], full["tokens"])
    decode = loaded.tokenizer.decode
    return dict(
        model=model_name, tp=group.world_size, backend=getattr(group, "backend", "?"), prompt=prompt,
        max_abs_logit_diff=diff, atol=LOGITS_ATOL, logits_match=diff <= LOGITS_ATOL,
        greedy_match=same_tokens, sharded_text=decode(sharded["tokens"][0]), full_text=decode(full["tokens"][0]),
        model_load_seconds=loaded.seconds, ok=bool(diff <= LOGITS_ATOL and same_tokens),
    )
