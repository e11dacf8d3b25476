"""Log-probabilities from the head, over the whole vocabulary or vocabulary-parallel.

``TextScores`` is what every evaluation reads log-probabilities through: held-out text metrics
(``lowbit.method.evaluate.evaluate_text``), per-site sensitivity (``lowbit.method.sensitivity``)
and multiple-choice tasks (``lowbit.method.choices``). With a group, each rank runs its slice of
the replicated ``lm_head`` (``lowbit.model.engine.vocab_range``) and the log-softmax, the target's
log-probability, the KL and the arg-max are completed by collectives: Gemma 3's 262k-token head,
done ``tp`` times over, was most of each rank's work.

All methods with a group are collective: every rank calls them with the same arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit import stats
from lowbit.comm.dist import Group
from lowbit.model.engine import decoder_hidden, head_slice, vocab_shard_logits, vocab_shardable

# At most this many fp32 logits per head call when scoring picked positions: Gemma 3's 262,144-token
# head over a thousand positions would be 1 GB per rank at once.
PICKED_LOGITS_PER_CALL = 1 << 24


class TextScores:
    """Next-token log-probabilities and their sums, over the whole vocabulary or, with a group,
    over this rank's vocabulary slice (``vocab_shard_logits``) completed by collectives: the
    global max and sum of exponentials (log-softmax), the target's log-probability (it lies on one
    rank's slice), the KL terms (``stats.kl_per_token`` of each slice, summed over ranks) and the
    arg-max (each rank's best, the first of the largest). Same values as the full head up to the
    order of floating-point sums.

    ``plain_head`` False (a head the slices cannot stand in for: Gemma 2's final soft-capping,
    ``lowbit.model.engine.vocab_shardable``) makes ``picked_log_probs`` run the model's own head;
    such a model is scored without a group."""

    def __init__(self, group: Group | None, plain_head: bool = True):
        if group is not None and not plain_head:
            raise ValueError("group: a vocabulary-parallel head needs a plain lm_head (plain_head=True)")
        self.group = group
        self.plain_head = plain_head
        self.lo = 0

    @classmethod
    def for_model(cls, model, group: Group | None) -> "TextScores":
        """Vocabulary-parallel over ``group`` where the model's head allows it, else the full head."""
        plain = vocab_shardable(model)
        return cls(group if plain else None, plain_head=plain)

    def log_probs(self, model, ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [batch, seq - 1, vocab or this rank's slice] of each next token."""
        if self.group is None:
            return F.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
        logits, self.lo = vocab_shard_logits(model, ids, self.group.rank, self.group.world_size)
        peak = self.group.all_gather(logits.amax(-1).contiguous()).amax(0)
        total = self.group.all_reduce((logits - peak[..., None]).exp().sum(-1))
        return logits - (peak + total.log())[..., None]

    def kl_sum(self, logp: torch.Tensor, ref: torch.Tensor) -> float:
        """Sum over positions of KL(ref || logp) (both from ``log_probs``)."""
        kl = stats.kl_per_token(ref, logp).sum()
        return float(kl if self.group is None else self.group.all_reduce(kl))

    def metrics(self, logp: torch.Tensor, ref: torch.Tensor, ref_top: torch.Tensor,
                targets: torch.Tensor) -> tuple[float, float, int]:
        """(sum of -log p(target), sum of KL(ref || logp), positions whose arg-max is ``ref_top``,
        the reference's ``argmax``)."""
        top1 = int((self.argmax(logp) == ref_top).sum().item())
        if self.group is None:
            return -logp.gather(-1, targets[..., None]).sum().item(), stats.kl_per_token(ref, logp).sum().item(), top1
        local = targets - self.lo
        mine = (local >= 0) & (local < logp.shape[-1])
        picked = logp.gather(-1, local.clamp(0, logp.shape[-1] - 1)[..., None]).squeeze(-1)
        sums = torch.stack([-(picked * mine).sum(), stats.kl_per_token(ref, logp).sum()])
        nll, kl = self.group.all_reduce(sums).tolist()
        return nll, kl, top1

    def argmax(self, logp: torch.Tensor) -> torch.Tensor:
        """Token id of the largest log-probability at each position (ties: the lowest id)."""
        if self.group is None:
            return logp.argmax(-1)
        best, where = logp.max(-1)
        best, where = self.group.all_gather(best.contiguous()), self.group.all_gather((where + self.lo).contiguous())
        return where.gather(0, best.argmax(0, keepdim=True)).squeeze(0)

    def picked_log_probs(self, model, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         targets: torch.Tensor, **inputs) -> torch.Tensor:
        """fp32 log p(``targets[i]`` | the prefix up to ``ids[rows[i], cols[i]]``) for each i: the head
        runs on those positions only (and, with a group, on this rank's vocabulary slice: the
        log-sum-exp and the target's logit are completed by one all-gather and one all-reduce per
        call). ``inputs`` go to the decoder (``attention_mask``, ``position_ids``)."""
        if not self.plain_head:
            keep = torch.unique(cols)
            logits = model(ids, use_cache=False, logits_to_keep=keep, **inputs).logits
            logp = F.log_softmax(logits.float(), -1)
            return logp[rows, torch.searchsorted(keep, cols), targets]
        hidden = decoder_hidden(model, ids, **inputs)[rows, cols]
        rank, tp = (0, 1) if self.group is None else (self.group.rank, self.group.world_size)
        weight, lo = head_slice(model, rank, tp)
        width = weight.shape[0]
        step = max(1, PICKED_LOGITS_PER_CALL // max(1, width))
        out = []
        for start in range(0, len(targets), step):
            logits = F.linear(hidden[start:start + step], weight).float()
            local = targets[start:start + step] - lo
            mine = (local >= 0) & (local < width)
            peak = logits.amax(-1)
            if self.group is not None:
                peak = self.group.all_gather(peak.contiguous()).amax(0)
            shifted = logits.gather(-1, local.clamp(0, width - 1)[:, None]).squeeze(-1) - peak
            sums = torch.stack([(logits - peak[:, None]).exp().sum(-1), torch.where(mine, shifted, 0.0)])
            if self.group is not None:
                sums = self.group.all_reduce(sums)
            out.append(sums[1] - sums[0].log())
        return torch.cat(out) if out else torch.zeros(0)
