"""Multiple-choice log-likelihoods that do each piece of work once.

    python -m lowbit evaluate --model smollm2-135m --tp 3 --tasks arc_easy,piqa --items 100 ...

The choices of one item share a prefix: the question (arc, hellaswag, piqa, ...) or the start of
the sentence (winogrande, whose choices differ in the context and share the ending). Scoring
each choice as its own sequence ran that prefix once per choice, in every scheme. Here:

1. ``tokenize_items`` (once per item, whatever the schemes): each choice's context and
   continuation are tokenized as the package's requests are (context after the tokenizer's own
   BOS, continuation on its own); the prefix is the tokens every choice shares, up to (not
   including) the last context token of the shortest context, so that every position that
   predicts a continuation token lies in a branch.
2. ``plan_batches`` (once per task): each item is laid out as its prefix once, then each
   choice's branch (the rest of its sequence) side by side; positions restart at the prefix's end
   in every branch and ``lowbit.model.engine.prefix_tree_masks`` lets a branch see its prefix and
   itself only, so each branch computes what its whole sequence alone would, and the prefix's keys
   and values serve every choice in the same forward. Items are packed several to a row of
   ``row_tokens`` (first fit, widest first: almost no padding) and rows into batches of
   ``max_tokens`` (``ChoiceBatch``). A forward of many items costs the same two collectives per
   layer as a forward of one (at TP 3 the collectives' latency dominated small batches).
3. ``choice_logliks`` (per scheme): one decoder forward of the batch; the head runs only on the
   positions that predict a continuation token, vocabulary-parallel where the model allows
   (``lowbit.method.scores.TextScores.picked_log_probs``).

The numbers equal scoring each choice's sequence alone up to the order of floating-point sums:
a shorter attention row, another GEMM shape, the head's log-sum-exp completed over ranks, and
the gloo all-reduce's own chunking of a differently shaped message all sum the same terms in
another order (tests/test_choices.py holds the decisions identical and measures the difference).
``legacy_choice_logliks`` is that old path (each choice's whole sequence, the full head at the
kept positions), kept so that ``bench.scoring`` can time both on the same items.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.model.data import Item, bos_prefix, continuation_length
from lowbit.model.engine import prefix_tree_masks
from lowbit.method.scores import TextScores

DEFAULT_MAX_TOKENS = 4096  # tokens per forward: ~9 MB fp32 messages at SmolLM2's width
# Tokens per packed row: short items share a row (little padding), each row attends densely over
# its width (at 256 about a tenth of the decoder's multiply-adds at SmolLM2's size).
DEFAULT_ROW_TOKENS = 256


@dataclass(frozen=True)
class ChoiceItem:
    """One item, tokenized: the shared prefix, each choice's branch (the rest of its sequence),
    where in its branch the continuation's first token is predicted, and the continuation."""

    item: Item
    prefix: tuple[int, ...]
    branches: tuple[tuple[int, ...], ...]
    first: tuple[int, ...]                  # per choice: branch index predicting the continuation's first token
    continuations: tuple[tuple[int, ...], ...]

    @property
    def width(self) -> int:
        return len(self.prefix) + sum(map(len, self.branches))

    def lengths(self, unit: str) -> list[int]:
        """Each continuation's length in ``unit`` (``lowbit.model.data.NORM_UNITS``)."""
        return [continuation_length(unit, text, len(ids))
                for text, ids in zip(self.item.continuations, self.continuations)]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def tokenize_item(tokenizer, item: Item, bos: list[int] | None = None) -> ChoiceItem:
    """``item`` as a ``ChoiceItem``; ``bos``: ``lowbit.model.data.bos_prefix(tokenizer)`` (passed in
    to look it up once)."""
    bos = bos_prefix(tokenizer) if bos is None else bos
    contexts = [bos + tokenizer(c, add_special_tokens=False).input_ids for c in item.contexts]
    conts = [tokenizer(c, add_special_tokens=False).input_ids for c in item.continuations]
    if min(map(len, contexts)) < 1:
        raise ValueError(f"{item.task} item {item.doc_id}: a choice has no context token to predict its "
                         "continuation from")
    seqs = [c + k for c, k in zip(contexts, conts)]
    shared = min(_common_prefix(seqs), min(map(len, contexts)) - 1)
    return ChoiceItem(item, tuple(seqs[0][:shared]), tuple(tuple(s[shared:]) for s in seqs),
                      tuple(len(c) - 1 - shared for c in contexts), tuple(map(tuple, conts)))


def tokenize_items(tokenizer, items: list[Item]) -> list[ChoiceItem]:
    bos = bos_prefix(tokenizer)
    return [tokenize_item(tokenizer, item, bos) for item in items]


@dataclass
class ChoiceBatch:
    """The tensors of one packed forward (see the module doc), built once and run per scheme."""

    index: list[int]                 # which of the task's items, in the order their choices are numbered
    items: list[ChoiceItem]
    ids: torch.Tensor                # [rows, width]
    inputs: dict                     # attention_mask (prefix_tree_masks) and position_ids
    rows: torch.Tensor               # [n] the scored positions ...
    cols: torch.Tensor
    targets: torch.Tensor            # ... and the token each predicts
    choice: torch.Tensor             # [n] which choice of the batch (item-major) each belongs to
    choices: int


def build_batch(model, rows: list[list[int]], items: list[ChoiceItem], width: int, pad_id: int) -> ChoiceBatch:
    """One forward of ``rows`` (each a list of indices into ``items``, packed side by side)."""
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    owner = torch.full(shape, -1, dtype=torch.long)
    branch = torch.full(shape, -1, dtype=torch.long)
    position = torch.zeros(shape, dtype=torch.long)
    scored_rows, cols, targets, choice, index = [], [], [], [], []
    k = 0
    for r, members in enumerate(rows):
        at = 0
        for slot, i in enumerate(members):
            item = items[i]
            index.append(i)
            p = len(item.prefix)
            ids[r, at:at + p] = torch.tensor(item.prefix, dtype=torch.long)
            owner[r, at:at + item.width] = slot
            branch[r, at:at + p] = 0
            position[r, at:at + p] = torch.arange(p)
            at += p
            for b, (tokens, first, cont) in enumerate(zip(item.branches, item.first, item.continuations), start=1):
                ids[r, at:at + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                branch[r, at:at + len(tokens)] = b
                position[r, at:at + len(tokens)] = torch.arange(p, p + len(tokens))
                scored_rows += [r] * len(cont)
                cols += range(at + first, at + first + len(cont))
                targets += cont
                choice += [k] * len(cont)
                at += len(tokens)
                k += 1
    device = next(model.parameters()).device
    mask = prefix_tree_masks(model, owner, branch, position)
    mask = {kind: m.to(device) for kind, m in mask.items()} if isinstance(mask, dict) else mask.to(device)
    as_long = dict(dtype=torch.long, device=device)
    return ChoiceBatch(index, [items[i] for i in index], ids.to(device),
                       dict(attention_mask=mask, position_ids=position.to(device)),
                       torch.tensor(scored_rows, **as_long), torch.tensor(cols, **as_long),
                       torch.tensor(targets, **as_long), torch.tensor(choice, **as_long), k)


def pack_rows(items: list[ChoiceItem], width: int) -> list[list[int]]:
    """Items (indices) packed into rows of ``width`` tokens, first fit, widest first: a row holds
    several short items back to back instead of one item and its padding."""
    rows, free = [], []
    for i in sorted(range(len(items)), key=lambda i: (-items[i].width, i)):
        need = items[i].width
        slot = next((r for r, room in enumerate(free) if room >= need), None)
        if slot is None:
            rows.append([i])
            free.append(width - need)
        else:
            rows[slot].append(i)
            free[slot] -= need
    return rows


def plan_batches(model, items: list[ChoiceItem], pad_id: int, max_tokens: int = DEFAULT_MAX_TOKENS,
                 row_tokens: int = DEFAULT_ROW_TOKENS) -> list[ChoiceBatch]:
    """The task's items packed into rows of ``row_tokens`` tokens (or the widest item's width, if
    wider) and the rows into batches of at most ``max_tokens`` tokens (at least one row each).
    Wider rows pad less but attend over more unrelated tokens (dense masks)."""
    if max_tokens < 1 or row_tokens < 1:
        raise ValueError(f"max_tokens, row_tokens: must be >= 1, got {max_tokens}, {row_tokens}")
    if not items:
        return []
    width = max(row_tokens, max(item.width for item in items))
    rows = pack_rows(items, width)
    per_batch = max(1, max_tokens // width)
    return [build_batch(model, rows[b:b + per_batch], items, width, pad_id) for b in range(0, len(rows), per_batch)]


@torch.no_grad()
def choice_logliks(model, batch: ChoiceBatch, scores: TextScores) -> list[list[float]]:
    """Summed log-probability of each choice's continuation, per item of ``batch`` (row order)."""
    logp = scores.picked_log_probs(model, batch.ids, batch.rows, batch.cols, batch.targets, **batch.inputs)
    sums = torch.zeros(batch.choices, dtype=torch.float64, device=logp.device).index_add_(0, batch.choice, logp.double())
    flat, out, at = sums.tolist(), [], 0
    for item in batch.items:
        out.append(flat[at:at + len(item.branches)])
        at += len(item.branches)
    return out


# -- the path before issue 27, kept for bench.scoring's same-items comparison --------------------------
def legacy_sequences(item: ChoiceItem) -> tuple[list[list[int]], list[int]]:
    """Each choice's whole sequence (context + continuation) and where its continuation starts."""
    seqs = [list(item.prefix) + list(b) for b in item.branches]
    return seqs, [len(item.prefix) + f + 1 for f in item.first]


@torch.no_grad()
def legacy_choice_logliks(model, seqs: list[list[int]], starts: list[int], pad_id: int) -> list[float]:
    """Today's path before the packed scorer: every choice's whole sequence right-padded in one
    batch, the full head (``logits_to_keep``) at every position that predicts a continuation token
    in any row, the log-softmax over the whole vocabulary on every rank."""
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    needed = sorted({p for s, start in zip(seqs, starts) for p in range(start - 1, len(s) - 1)})
    column = {p: c for c, p in enumerate(needed)}
    keep = torch.tensor(needed, dtype=torch.long, device=device)
    logits = model(ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=keep).logits
    logp = F.log_softmax(logits.float(), -1)
    out = []
    for i, (s, start) in enumerate(zip(seqs, starts)):
        cols = torch.tensor([column[p] for p in range(start - 1, len(s) - 1)], device=device)
        tgt = torch.tensor(s[start:], device=device)
        out.append(logp[i, cols, tgt].sum().item())
    return out


def legacy_batches(items: list[ChoiceItem], max_sequences: int = 32) -> list[list[int]]:
    """Consecutive items grouped so that a group holds at most ``max_sequences`` choices (an item
    with more choices forms a group of its own), as the old path batched them."""
    batches, current, count = [], [], 0
    for i, item in enumerate(items):
        n = len(item.branches)
        if current and count + n > max_sequences:
            batches.append(current)
            current, count = [], 0
        current.append(i)
        count += n
    if current:
        batches.append(current)
    return batches
