"""Model loading (embedded GGUF -> verified cache, clear errors) and the data sources."""
from __future__ import annotations

import pytest
import torch

from lowbit.model import data
from lowbit.model.models import ModelUnavailable, load_model, load_tokenizer


def test_unknown_hub_id_fails_with_clear_message():
    with pytest.raises(ModelUnavailable, match=r"cannot download it\. Allowed: smollm2-135m, tiny-llama"):
        load_model("meta-llama/Llama-2-13b-hf")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelUnavailable, match="has no config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_embedded_model_cache_holds_plain_weights_equal_to_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    first = load_model("smollm2-135m")
    assert first.source == "gguf"
    assert getattr(first.model.config, "quantization_config", None) is None
    second = load_model("smollm2-135m")
    assert second.source == "cache"
    print(f"embedded model: first load {first.seconds:.1f} s (GGUF), second {second.seconds:.2f} s (cache)")
    ref, got = first.model.state_dict(), second.model.state_dict()
    assert ref.keys() == got.keys()
    bad = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not bad, f"tensors differ after the cache round trip: {bad[:5]}"
    assert second.seconds < first.seconds


def test_calibration_and_eval_chunks_never_overlap():
    tok = load_tokenizer()
    stream = data.token_stream("wikipedia", tok)
    calib = data.token_chunks(tok, "wikipedia", "calib", 4, 64)
    held = data.token_chunks(tok, "wikipedia", "eval", 4, 64)
    assert calib.shape == held.shape == (4, 64)
    assert torch.equal(calib.flatten(), stream[:256])
    assert torch.equal(held.flatten(), stream[-256:])
    assert torch.equal(calib, data.token_chunks(tok, "wikipedia", "calib", 4, 64))  # deterministic


def test_too_many_tokens_is_refused():
    tok = load_tokenizer()
    with pytest.raises(data.DataError, match="requested from 'wikipedia'"):
        data.token_chunks(tok, "wikipedia", "calib", 10_000, 1024)


@pytest.mark.parametrize("bad, field", [(dict(source="reddit"), "source"), (dict(split="train"), "split")])
def test_bad_data_requests_name_the_field(bad, field):
    args = dict(source="wikipedia", split="calib") | bad
    with pytest.raises(data.DataError, match=f"^{field}: .*allowed"):
        data.token_chunks(load_tokenizer(), args["source"], args["split"], 1, 8)


@pytest.mark.parametrize("task, n_choices", [("arc_easy", None), ("arc_challenge", None), ("hellaswag", 4),
                                             ("piqa", 2), ("winogrande", 2), ("boolq", 2)])
def test_tasks_load_as_multiple_choice_items(task, n_choices):
    items = data.load_task(task, 5, seed=1)
    assert len(items) == 5 and items == data.load_task(task, 5, seed=1)
    assert items != data.load_task(task, 5, seed=2)
    for item in items:
        assert len(item.contexts) == len(item.continuations) >= 2
        assert n_choices is None or len(item.continuations) == n_choices
        assert 0 <= item.gold < len(item.continuations)
        assert not item.contexts[0].strip() == "Answer:"  # unconditional requests are skipped


def test_unknown_task_is_refused():
    with pytest.raises(data.DataError, match="tasks: 'mmlu' unknown; allowed: arc_easy"):
        data.load_task("mmlu", 3)
