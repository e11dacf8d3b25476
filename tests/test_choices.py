"""The packed multiple-choice scorer (lowbit.method.choices) against scoring each choice alone.

What is held: the packing (prefix once, branches side by side, positions and masks) gives each
choice the log-likelihood its whole sequence alone gives, on every tiny family (sliding windows,
Gemma 2's soft-capped head, MQA) and through the vocabulary-parallel head at TP 2; the decisions
equal the old path's (``legacy_choice_logliks``) item by item; each task is scored with its
package's metric, as a plain single-process transformers computation of the same items scores it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit import stats
from lowbit.comm.communicator import ExactCommunicator
from lowbit.comm.dist import ThreadWorld
from lowbit.method.choices import (ChoiceItem, choice_logliks, legacy_batches, legacy_choice_logliks, legacy_sequences,
                                   pack_rows, plan_batches, tokenize_item, tokenize_items)
from lowbit.method.evaluate import REFERENCE, evaluate_tasks, task_logliks
from lowbit.method.scores import TextScores
from lowbit.model.data import TASK_INFO, Item, bos_prefix, continuation_length, load_task
from lowbit.model.engine import build_tp_model, prefix_tree_masks

# fp32 log-likelihoods summed over a continuation: the packed and the alone computation add the same
# terms in another order (attention rows of another length, GEMMs of another shape, the log-sum-exp
# over vocabulary slices), a few ulp per term: 1e-6 relative to the value, plus 1e-4 absolute for
# the tiny random models' sums of ~100s of nats (2 layers).
REL, ABS = 1e-6, 1e-4
# SmolLM2's 30 layers carry those roundings forward (largest seen: 3.0e-6 relative, -101.5976 vs
# -101.5973): 2e-5 relative, and the old path's own batch sensitivity is printed beside it.
REL_DEEP = 2e-5


def _alone(model, seqs, starts) -> list[float]:
    """Each choice as its own unpadded sequence through the model's full head: the definition."""
    out = []
    with torch.no_grad():
        for s, start in zip(seqs, starts):
            logp = F.log_softmax(model(torch.tensor([s]), use_cache=False).logits[0].float(), -1)
            out.append(logp[torch.arange(start - 1, len(s) - 1), torch.tensor(s[start:])].double().sum().item())
    return out


def _packed(model, items: list[ChoiceItem], max_tokens=4096, group=None, row_tokens=256) -> list[list[float]]:
    scores = TextScores.for_model(model, group)
    out = [None] * len(items)
    for batch in plan_batches(model, items, 0, max_tokens, row_tokens):
        for i, ll in zip(batch.index, choice_logliks(model, batch, scores)):
            out[i] = ll
    return out


def _assert_close(got: list[list[float]], want: list[list[float]], rel: float = REL) -> float:
    """Every log-likelihood within ABS + rel * |value|; returns the largest relative difference."""
    worst = 0.0
    for k, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w), k
        for j, (a, b) in enumerate(zip(g, w)):
            assert abs(a - b) <= ABS + rel * abs(b), f"item {k} choice {j}: packed {a!r} alone {b!r} diff {abs(a - b):.3g}"
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return worst


def _mixed_items(tokenizer, five_shot: bool = False) -> list[ChoiceItem]:
    """Items of every shape: shared question (arc), shared ending (winogrande), long endings
    (hellaswag), with ``five_shot`` a five-shot context of ~600 tokens (medmcqa)."""
    items = []
    for task, n in (("arc_easy", 2), ("winogrande", 2), ("hellaswag", 1)) + ((("medmcqa", 1),) if five_shot else ()):
        items += load_task(task, n, seed=3)
    return tokenize_items(tokenizer, items)


def test_an_item_packs_its_shared_prefix_once_and_each_choice_after_it(tiny_models):
    tok = tiny_models["tiny-llama"].tokenizer
    for task in ("arc_easy", "winogrande"):
        item = load_task(task, 1, seed=0)[0]
        packed = tokenize_item(tok, item)
        contexts = [bos_prefix(tok) + tok(c, add_special_tokens=False).input_ids for c in item.contexts]
        conts = [tok(c, add_special_tokens=False).input_ids for c in item.continuations]
        for j, (ctx, cont) in enumerate(zip(contexts, conts)):
            whole = list(packed.prefix) + list(packed.branches[j])
            assert whole == ctx + cont  # prefix + branch is the choice's own sequence
            assert len(packed.prefix) + packed.first[j] == len(ctx) - 1  # predicts cont[0] from ctx[-1]
            assert list(packed.continuations[j]) == cont
        assert len(packed.prefix) == min(map(len, contexts)) - 1 or any(
            c[len(packed.prefix)] != contexts[0][len(packed.prefix)] for c in contexts)
    winogrande = tokenize_item(tok, load_task("winogrande", 1, seed=0)[0])
    assert len(winogrande.prefix) > 0  # the sentence start before the blank is shared


def test_masks_keep_branches_and_items_apart_and_apply_the_sliding_window(tiny_models):
    model = tiny_models["tiny-gemma3"].model  # every layer slides, window 8
    # one row: item 0 = prefix of 3, branch 1 of 2, branch 2 of 9; item 1 = prefix 1, branch 1 of 1; one pad
    owner = torch.tensor([[0] * 14 + [1, 1, -1]])
    branch = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 1, -1]])
    position = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 0]])
    masks = prefix_tree_masks(model, owner, branch, position)
    assert set(masks) == {"sliding_attention"}
    seen = (masks["sliding_attention"][0, 0] == 0).int()
    as_list = lambda row: "".join(map(str, seen[row].tolist()))  # noqa: E731 - one row as 0/1 text
    assert as_list(4) == "11111" + "0" * 12    # branch 1's 2nd token: its prefix, its branch
    assert as_list(5) == "111001" + "0" * 11   # branch 2 never sees branch 1
    # position 11, window 8: positions 4..11 only (the prefix and position 3 are out)
    assert as_list(13) == "000000" + "11111111" + "000"
    assert as_list(15) == "0" * 14 + "110"     # item 1 sees itself, never item 0
    assert as_list(16) == "0" * 16 + "1"       # a pad sees itself only
    full = prefix_tree_masks(tiny_models["tiny-llama"].model, owner, branch, position)
    assert isinstance(full, torch.Tensor) and bool((full[0, 0, 13, :3] == 0).all())  # no window: the prefix


def test_rows_pack_several_items_and_batches_cover_every_item_once(tiny_models):
    loaded = tiny_models["tiny-llama"]
    items = tokenize_items(loaded.tokenizer, load_task("arc_easy", 12, seed=4))
    widths = [i.width for i in items]
    rows = pack_rows(items, 256)
    assert sorted(i for r in rows for i in r) == list(range(12))
    assert all(sum(widths[i] for i in r) <= 256 for r in rows) and len(rows) < 12  # several items per row
    batches = plan_batches(loaded.model, items, 0, max_tokens=512)
    assert all(b.ids.shape[0] <= 2 and b.ids.shape[1] == 256 for b in batches)
    assert sorted(i for b in batches for i in b.index) == list(range(12))
    assert sum(b.choices for b in batches) == sum(len(i.branches) for i in items)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-mqa", "tiny-mistral", "tiny-qwen2", "tiny-gemma2",
                                  "tiny-gemma3"])
def test_packed_scores_equal_each_sequence_alone(tiny_models, name):
    """Every family, one process: the packed batch gives each choice its own sequence's log-likelihood
    (Gemma 2: soft-capped head and window 8; Gemma 3: window 8 on every layer, contexts far past it)."""
    loaded = tiny_models[name]
    items = _mixed_items(loaded.tokenizer)
    want = [_alone(loaded.model, *legacy_sequences(item)) for item in items]
    _assert_close(_packed(loaded.model, items), want)
    _assert_close(_packed(loaded.model, items, max_tokens=64), want)  # one row per batch, wider than the budget
    _assert_close(_packed(loaded.model, items, row_tokens=1), want)  # rows as wide as the widest item


def test_packed_scores_through_the_vocabulary_parallel_head_at_tp2(tiny_models):
    """TP 2, exact fp32 all-reduce, each rank scoring half the vocabulary: the same log-likelihoods
    as the unsharded model scoring each choice alone (a five-shot item among them)."""
    loaded = tiny_models["tiny-gemma3"]
    items = _mixed_items(loaded.tokenizer, five_shot=True)
    want = [_alone(loaded.model, *legacy_sequences(item)) for item in items]

    def body(group):
        tp = build_tp_model("tiny-gemma3", group, ExactCommunicator(group, torch.float32), loaded=loaded)
        return _packed(tp.model, items, group=group)
    ranks = ThreadWorld(2).run(body)
    assert ranks[0] == ranks[1]
    _assert_close(ranks[0], want)


def test_decisions_and_rows_equal_the_old_path_at_tp2(tiny_models):
    """evaluate_tasks' rows with the packed scorer equal the old path's (each choice's sequence in
    batches of 32, the full head on every rank) to the last digit, for the reference, bf16 and a
    4-bit scheme on these items; the log-likelihoods agree to float-sum order. (A quantized scheme
    can move an item where a partial sits on a rounding boundary: a 1e-7 change of the float order
    then picks the neighbouring code. These items have none; SmolLM2 at TP 3 has, see
    docs/accuracy.md, and so has the old path against itself when its batches change.)"""
    loaded = tiny_models["tiny-llama"]
    items = {"arc_easy": load_task("arc_easy", 8, seed=2), "winogrande": load_task("winogrande", 6, seed=2),
             "piqa": load_task("piqa", 6, seed=2)}

    def body(group, legacy):
        tp = build_tp_model("tiny-llama", group, loaded=loaded)
        rows = evaluate_tasks(tp.model, group, tp.tokenizer, items, ["bf16", "int4-token"], None, legacy=legacy)
        comms = {REFERENCE: ExactCommunicator(group, torch.float32, record=False)}
        return rows, task_logliks(tp.model, group, tp.tokenizer, items, comms, legacy=legacy).logliks[REFERENCE]
    new, new_ll = ThreadWorld(2).run(body, False)[0]
    old, old_ll = ThreadWorld(2).run(body, True)[0]
    for scheme in (REFERENCE, "bf16", "int4-token"):
        for task in items:
            assert new[scheme][task] == old[scheme][task], (scheme, task)
    assert new[REFERENCE]["_timing"]["scorer"] == "packed" and old[REFERENCE]["_timing"]["scorer"] == "legacy"
    assert new[REFERENCE]["_timing"]["items"] == 20 and new["bf16"]["_timing"]["seconds"] > 0
    for task in items:
        _assert_close(new_ll[task], old_ll[task])


def test_acc_norm_divides_by_the_unit_the_package_names():
    assert TASK_INFO["piqa"].norm == "char" and TASK_INFO["medmcqa"].norm == "token"
    assert TASK_INFO["arc_easy"].norm == "char"  # a raw task's secondary acc_norm: lm-eval's characters
    assert [continuation_length(u, " café", 3) for u in ("char", "byte", "token")] == [5, 6, 3]
    # -4 over 4 tokens (-1 each) beats -6 over 2 (-3 each); per character -6/30 beats -4/5
    hits = {unit: stats.choice_hits([-4.0, -6.0], [continuation_length(unit, c, n) for c, n in
                                                   ((" a bc", 4), (" " + "x" * 29, 2))], gold=1)
            for unit in ("char", "token")}
    assert hits["token"] == {"acc": 0.0, "acc_norm": 0.0} and hits["char"] == {"acc": 0.0, "acc_norm": 1.0}
    with pytest.raises(ValueError, match="norm: 'word' unknown; allowed: char, byte, token"):
        continuation_length("word", "x", 1)


def _plain_transformers_hits(model, tokenizer, items: list[Item], unit: str) -> list[float]:
    """The package metric computed as a user would with plain transformers in one process: each
    choice's context and continuation tokenized as the request gives them, one forward per choice,
    summed log-softmax of the continuation, divided by its length in ``unit`` (raw: not divided)."""
    hits = []
    bos = [tokenizer.bos_token_id] if tokenizer("x").input_ids[0] == tokenizer.bos_token_id else []
    for item in items:
        scores = []
        for ctx, cont in zip(item.contexts, item.continuations):
            c = bos + tokenizer(ctx, add_special_tokens=False).input_ids
            k = tokenizer(cont, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([c + k])).logits[0].float(), -1)
            ll = sum(logp[len(c) - 1 + i, t].item() for i, t in enumerate(k))
            length = {"raw": 1, "char": len(cont), "token": len(k)}[unit]
            scores.append(ll / length)
        hits.append(float(max(range(len(scores)), key=scores.__getitem__) == item.gold))
    return hits


def _check_package_metric(loaded, model_name, tasks: dict[str, tuple[str, int]], tp: int):
    """``tasks``: {task: (unit, items)}."""
    items = {t: load_task(t, n, seed=0) for t, (_, n) in tasks.items()}

    def body(group):
        model = build_tp_model(model_name, group, loaded=loaded)
        return evaluate_tasks(model.model, group, model.tokenizer, items, [], None)
    rows = ThreadWorld(tp).run(body)[0][REFERENCE]
    for task, (unit, n) in tasks.items():
        assert TASK_INFO[task].package_metric == {"raw": "acc_raw", "char": "acc_per_char",
                                                  "token": "acc_per_token"}[unit]
        plain = _plain_transformers_hits(loaded.model, loaded.tokenizer, items[task], unit)
        row = rows[task]
        print(task, row["primary"], row["norm"], row[row["primary"]], sum(plain) / n)
        assert row[row["primary"]] == sum(plain) / n, task


def test_each_task_is_scored_with_its_package_metric_on_a_tiny_model(tiny_models):
    """TP 2 against a plain single-process transformers computation of the same items, one task
    per package metric: acc_raw (arc_easy), acc_per_char (piqa), acc_per_token (medmcqa)."""
    _check_package_metric(tiny_models["tiny-llama"], "tiny-llama",
                          {"arc_easy": ("raw", 4), "piqa": ("char", 4), "medmcqa": ("token", 4)}, tp=2)


# The embedded model's checks run whole forwards of SmolLM2 on a shared 2-core machine: 30 minutes,
# not the suite's 15, before a slow machine counts as a hang.
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_each_task_is_scored_with_its_package_metric_on_smollm2(smollm2):
    """The same on the embedded model at TP 3, where the choices are not near-random (medmcqa's
    five-shot contexts are ~700 tokens a choice: fewer of its items)."""
    _check_package_metric(smollm2, "smollm2-135m",
                          {"arc_easy": ("raw", 10), "piqa": ("char", 10), "medmcqa": ("token", 4)}, tp=3)


def _legacy(model, items: list[ChoiceItem], max_sequences: int) -> list[list[float]]:
    out = []
    for batch in legacy_batches(items, max_sequences):
        pairs = [legacy_sequences(items[i]) for i in batch]
        flat = legacy_choice_logliks(model, [s for q, _ in pairs for s in q], [s for _, t in pairs for s in t], 0)
        for i in batch:
            out.append(flat[:len(items[i].branches)])
            flat = flat[len(items[i].branches):]
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_packed_decisions_equal_the_old_path_on_smollm2(smollm2):
    """The embedded model, one process: 32 items of the four table tasks, the packed scorer against
    the old path item by item: same decisions, log-likelihoods within float-sum order (printed
    beside the old path's own change when arc_easy's items go one per forward)."""
    model, tok = smollm2.model, smollm2.tokenizer
    for task in ("arc_easy", "piqa", "winogrande", "hellaswag"):
        items = tokenize_items(tok, load_task(task, 8, seed=5))
        new = _packed(model, items)
        old = _legacy(model, items, 32)
        worst = _assert_close(new, old, REL_DEEP)
        same_bits = sum(a == b for x, y in zip(new, old) for a, b in zip(x, y))
        own = ""
        if task == "arc_easy":  # the old path, one item per forward instead of 32 sequences
            own = f"; the old path against itself one item per forward: {_assert_close(_legacy(model, items, 1), old, REL_DEEP):.2e}"
        print(f"{task}: packed vs old: largest relative difference {worst:.2e}, bit-equal {same_bits} of "
              f"{sum(map(len, new))}{own}")
        unit = TASK_INFO[task].norm
        for item, a, b in zip(items, new, old):
            n = item.lengths(unit)
            assert stats.choice_hits(a, n, item.item.gold) == stats.choice_hits(b, n, item.item.gold)
