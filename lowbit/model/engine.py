"""Run a TP-sharded model on one rank: build it, prefill, greedy-decode.

Every rank calls these with the same inputs; the communicator inside the row-parallel
linears keeps the ranks in lockstep, and since every rank receives the same reduced sums,
greedy decoding picks the same token on every rank without extra broadcasts.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from lowbit.comm.communicator import Communicator, ExactCommunicator
from lowbit.comm.dist import Group, device_for
from lowbit.model.models import LoadedModel, load_config, load_model
from lowbit.model.tp import check_tp_size, shard_model, text_config


@dataclass
class TPModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    group: Group
    load_seconds: float


def build_tp_model(name: str, group: Group, communicator: Communicator | None = None,
                   dtype: torch.dtype = torch.float32, loaded: LoadedModel | None = None) -> TPModel:
    """Load ``name`` and shard it for ``group.rank``. ``loaded`` (e.g. a cached full model in
    tests) is deep-copied instead of loading again."""
    check_tp_size(load_config(name) if loaded is None else loaded.model.config, group.world_size, name)
    if loaded is None:
        loaded = load_model(name, dtype=dtype)
        model = loaded.model
    else:
        model = copy.deepcopy(loaded.model)
    shard_model(model, group.rank, group.world_size, communicator or ExactCommunicator(group))
    model.to(device_for(group))
    return TPModel(model, loaded.tokenizer, name, group, loaded.seconds)


def forward_partials(model: torch.nn.Module, input_ids: torch.Tensor):
    """Run ``input_ids`` through ``model`` for its communication only (calibration, layer errors):
    every decoder layer and its all-reduces run, but ``lm_head`` sees just the last position
    (``logits_to_keep=1``). Gemma 3's 262k-token head over every position cost more than the
    decoder itself (2048 calibration tokens x 640 x 262,144 multiply-adds per rank)."""
    return model(input_ids, use_cache=False, logits_to_keep=1)


def vocab_shardable(model: torch.nn.Module) -> bool:
    """Can ``vocab_shard_logits`` stand in for the model's own head? A plain ``lm_head`` (no bias)
    over ``model.model``'s last hidden state, with no logit soft-capping or scaling after it."""
    cfg = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    return (isinstance(head, torch.nn.Linear) and head.bias is None and hasattr(model, "model")
            and not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None)


def vocab_range(vocab: int, rank: int, tp: int) -> tuple[int, int]:
    """[lo, hi) of the vocabulary rank ``rank`` of ``tp`` scores: contiguous, ceil(vocab / tp) each."""
    per = -(-vocab // tp)
    return min(vocab, rank * per), min(vocab, (rank + 1) * per)


def head_slice(model: torch.nn.Module, rank: int = 0, tp: int = 1) -> tuple[torch.Tensor, int]:
    """The rows of the replicated ``lm_head`` weight that rank ``rank`` of ``tp`` scores
    (``vocab_range``; the whole head for ``tp`` 1), and the slice's first token id."""
    lo, hi = vocab_range(model.lm_head.weight.shape[0], rank, tp)
    return model.lm_head.weight[lo:hi], lo


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """The decoder's last hidden state at every position (the head is not run); ``inputs``:
    e.g. ``attention_mask`` and ``position_ids`` (``prefix_tree_masks``)."""
    return model.model(input_ids, use_cache=False, **inputs).last_hidden_state


def vocab_shard_logits(model: torch.nn.Module, input_ids: torch.Tensor, rank: int, tp: int) -> tuple[torch.Tensor, int]:
    """fp32 logits of this rank's vocabulary slice at every position but the last, and the slice's
    first token id. Every rank runs the decoder (and its all-reduces) in full, but the replicated
    ``lm_head`` only over ``vocab_range``: for Gemma 3's 262,144-token head that was most of each
    rank's work, done ``tp`` times over. ``vocab_shardable(model)`` must hold."""
    hidden = decoder_hidden(model, input_ids)[:, :-1]
    weight, lo = head_slice(model, rank, tp)
    return torch.nn.functional.linear(hidden, weight).float(), lo


def prefix_tree_masks(model: torch.nn.Module, owner: torch.Tensor, branch: torch.Tensor, position: torch.Tensor):
    """Attention masks for rows that each pack one or more sequences sharing a prefix, their
    branches side by side: ``owner`` [rows, width] numbers the packed item a token belongs to (-1 on
    padding), ``branch`` is 0 on the item's prefix and b > 0 on its branch b, ``position`` each
    token's position in its own sequence (a branch starts where its prefix ends). A prefix token
    sees its item's prefix up to itself; a branch token sees its item's whole prefix and its own
    branch up to itself, never another branch or item; a sliding-window layer also drops keys
    ``sliding_window`` or more positions back (as transformers' own masks do); a pad token sees
    only itself (a finite row nobody reads). Additive masks [rows, 1, width, width] in the model's
    dtype (0 or the dtype's minimum: what the eager and SDPA attention both take): one per layer
    type, as a dict, for a model whose config lists ``layer_types``, else one for every layer."""
    cfg = text_config(model.config)
    q_own, k_own = owner[:, :, None], owner[:, None, :]
    q_br, k_br = branch[:, :, None], branch[:, None, :]
    q_pos, k_pos = position[:, :, None], position[:, None, :]
    allowed = (q_own >= 0) & (q_own == k_own) & ((k_br == 0) | (k_br == q_br)) & (k_pos <= q_pos)
    allowed |= (q_own < 0) & torch.eye(owner.shape[1], dtype=torch.bool, device=owner.device)
    window = getattr(cfg, "sliding_window", None)
    dtype = next(model.parameters()).dtype

    def additive(ok: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)[:, None]

    def for_type(kind: str) -> torch.Tensor:
        if kind == "sliding_attention" and window:
            return additive(allowed & (q_pos - k_pos < window))
        if kind in ("full_attention", "sliding_attention"):
            return additive(allowed)
        raise ValueError(f"layer_types: {kind!r} has no packed-prefix mask; allowed: full_attention, sliding_attention")

    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return {kind: for_type(kind) for kind in dict.fromkeys(layer_types)}
    return for_type("sliding_attention" if window else "full_attention")  # mistral: a window on every layer


@torch.no_grad()
def prefill_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for every position of ``input_ids`` [batch, seq] (fp32)."""
    device = next(model.parameters()).device
    return model(input_ids.to(device), use_cache=False).logits.float().cpu()


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> dict:
    """Greedy decoding with a KV cache. Returns new token ids and prefill/decode timings."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    past = out.past_key_values
    next_id = out.logits[:, -1].argmax(-1)
    prefill_s = time.perf_counter() - t0
    new = [next_id]
    t1 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and bool((next_id == eos_token_id).all()):
            break
        out = model(next_id[:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_id = out.logits[:, -1].argmax(-1)
        new.append(next_id)
    decode_s = time.perf_counter() - t1
    tokens = torch.stack(new, dim=1).cpu()
    return dict(tokens=tokens, prefill_seconds=prefill_s, decode_seconds=decode_s,
                decode_tokens=tokens.shape[1] - 1)
