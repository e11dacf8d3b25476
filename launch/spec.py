"""JobSpec: everything a job needs, validated before any process starts.

    spec = JobSpec(kind="generate", model="tiny-llama", tp=2, prompt="Hello", max_new_tokens=8)
    spec.to_json()                     # what goes to runs/<id>/spec.json
    JobSpec.from_json(text)            # raises SpecError listing every bad field at once

A ``SpecError`` carries ``problems``: a list of (field, message) pairs, and reads as
"tp: 3 cannot shard tiny-llama (...); valid TP sizes: 1, 2, 4; backend: ...". Checks that need
the machine (is the model loadable here, does the TP size divide its heads, are there enough
GPUs for NCCL) are part of validation, so a bad spec never reaches torchrun.

Where it runs: ``executor`` "local" (this machine, the default) or "slurm" (a batch job; the
fields partition, account, qos, nnodes, gpus_per_node, time_limit_s and max_concurrent become
sbatch options; ``launch.executors.slurm`` checks them against the cluster at submit).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from launch.layout import calibration_folder, run_id_problem
from launch.registry import KINDS, available_kinds, kind_problem
from lowbit.model.data import TASKS, TEXT_SOURCES
from lowbit.model.models import known_names, load_config
from lowbit.model.tp import TPSizeError, check_tp_size
from lowbit.scheme import parse_scheme_map

BACKENDS = ("auto", "gloo", "nccl")
EXECUTORS = ("local", "slurm")      # where a run's torchrun runs (launch.executors)
# A link is ``loopback`` or an emulated rate (launch.cluster rate-limits veth links to it).
RATE_PATTERN = re.compile(r"^([1-9][0-9]{0,5}(?:\.[0-9]{1,3})?)(kbit|mbit|gbit)$")
RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOST_PORT_PATTERN = re.compile(r"^(?P<host>[A-Za-z0-9]([A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})$")
MAX_TP = 64
MAX_TOKENS = 10_000_000
MAX_ITEMS = 1_000_000
MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 20_000
MAX_TIME_LIMIT_S = 7 * 24 * 3600.0
MAX_COLLECTIVE_TIMEOUT_S = 3600.0
MAX_PARAMS_BYTES = 65_536
MAX_GPUS_PER_NODE = 64
MAX_CONCURRENT = 10_000
SLURM_ONLY = dict(partition=None, account=None, qos=None, gpus_per_node=0, max_concurrent=4)


class SpecError(ValueError):
    """Every problem of a spec at once: ``problems`` is a list of (field, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{name}: {msg}" for name, msg in self.problems))

    def fields(self) -> list[str]:
        return [name for name, _ in self.problems]


def rate_bits(link: str) -> float:
    """Bits per second of a link rate such as ``100mbit`` (ValueError for ``loopback``)."""
    m = RATE_PATTERN.match(link or "")
    if not m:
        raise ValueError(f"{link!r} is not a link rate; allowed: a rate like 1gbit, 100mbit, 500kbit")
    return float(m.group(1)) * RATE_UNITS[m.group(2)]


def available_gpus() -> int:
    """CUDA devices visible here (0 without torch CUDA); tests may monkeypatch this."""
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch CUDA means no GPUs
        return 0


def _known_data():
    """(text sources, tasks) from lowbit.model.data, or (None, None) if it cannot be imported."""
    try:
        return tuple(TEXT_SOURCES), tuple(TASKS)
    except Exception:  # noqa: BLE001 - fall back to a name-shape check
        return None, None


@dataclass
class JobSpec:
    kind: str
    model: str = "smollm2-135m"
    tp: int = 1
    backend: str = "auto"
    schemes: list = field(default_factory=list)        # scheme strings (lowbit.scheme grammar)
    calib_data: str = "wikipedia"                      # text source for calibration
    calib_tokens: int = 4096
    eval_data: str = "wikipedia"                       # text source for held-out perplexity / KL
    eval_tokens: int = 4096
    tasks: list = field(default_factory=list)          # multiple-choice benchmarks
    items_per_task: int = 50
    prompt: str | None = None
    max_new_tokens: int = 16
    seed: int = 0
    time_limit_s: float = 3600.0
    collective_timeout_s: float = 120.0
    link: str = "loopback"                             # or a rate: 1gbit, 100mbit, 500kbit
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None                   # host:port of the c10d rendezvous (nnodes > 1, local)
    executor: str = "local"                            # or "slurm": a batch job on a Slurm cluster
    partition: str | None = None                       # Slurm partition (None: the cluster's default)
    account: str | None = None                         # Slurm account to charge (None: the user's default)
    qos: str | None = None                             # Slurm quality of service (None: the default)
    gpus_per_node: int = 0                             # Slurm --gpus-per-node (0: CPU-only, none asked for)
    max_concurrent: int = 4                            # Slurm: at most this many of a sweep's point jobs at once
    calib_from: str | None = None                      # run id of a calibrate run to reuse
    run_id: str | None = None                          # chosen id; None: generated at submit
    params: dict = field(default_factory=dict)         # kind-specific extras (JSON values)

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise SpecError(problems)

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: object) -> "JobSpec":
        if not isinstance(data, dict):
            raise SpecError([("spec", f"must be a JSON object, got {type(data).__name__}")])
        names = cls.field_names()
        problems = [(str(k), f"unknown field; allowed: {', '.join(names)}") for k in data if k not in names]
        if "kind" not in data:
            problems.append(("kind", f"missing; allowed: {', '.join(available_kinds())}"))
        values = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                  for f in dataclasses.fields(cls) if f.name != "kind"}
        values.update({k: v for k, v in data.items() if k in names})
        problems += _field_problems(values, skip=set() if "kind" in data else {"kind"})
        if problems:
            raise SpecError(problems)
        spec = cls.__new__(cls)  # already validated: skip __post_init__'s second pass
        spec.__dict__.update(values)
        return spec

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise SpecError([("spec", f"not valid JSON ({exc})")]) from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Path) -> "JobSpec":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError([("spec", f"cannot read {path}: {exc.strerror or exc}")]) from None
        except UnicodeDecodeError as exc:
            raise SpecError([("spec", f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                      f"{exc.start}); save the spec as UTF-8 JSON")]) from None
        return cls.from_json(text)

    @classmethod
    def trusted(cls, data: dict) -> "JobSpec":
        """A spec that was validated at submit (``spec.json`` of a queued run): fields and
        defaults only, no second validation (no config load, no scheme parse, no kind checks).
        Unknown fields are still refused, so a spec from another version fails loudly."""
        names = cls.field_names()
        unknown = [k for k in data if k not in names]
        if unknown or "kind" not in data:
            raise SpecError([(str(k), f"unknown field; allowed: {', '.join(names)}") for k in unknown]
                            or [("kind", "missing")])
        values = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                  for f in dataclasses.fields(cls) if f.name != "kind"}
        values.update(data)
        spec = cls.__new__(cls)
        spec.__dict__.update(values)
        return spec

    @classmethod
    def load_trusted(cls, path: Path) -> "JobSpec":
        """``trusted`` of the JSON file at ``path`` (the worker's view of its run's spec.json)."""
        try:
            return cls.trusted(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError([("spec", f"cannot read {path}: {exc}")]) from None

    # -- derived -----------------------------------------------------------------------------
    @property
    def nproc_per_node(self) -> int:
        return self.tp // self.nnodes

    def problems(self) -> list[tuple[str, str]]:
        return _field_problems(self.to_dict())


# -- validation ------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_in(p, name, v, lo, hi):
    if not _is_int(v):
        p.append((name, f"must be an integer, got {type(v).__name__} {v!r}"))
    elif not lo <= v <= hi:
        p.append((name, f"must be between {lo} and {hi}, got {v}"))


def _number_in(p, name, v, lo_exclusive, hi):
    if not _is_number(v):
        p.append((name, f"must be a finite number, got {type(v).__name__} {v!r}"))
    elif not lo_exclusive < v <= hi:
        p.append((name, f"must be > {lo_exclusive} and <= {hi:g}, got {v}"))


def _name_in(p, name, v, allowed):
    if not isinstance(v, str):
        p.append((name, f"must be a string, got {type(v).__name__}"))
    elif allowed is not None and v not in allowed:
        p.append((name, f"unknown {v!r}; allowed: {', '.join(allowed)}"))
    elif ".." in v or not NAME_PATTERN.match(v):
        p.append((name, f"{v!r} must be a plain name matching {NAME_PATTERN.pattern} (no paths)"))


def _model_problem(model) -> str | None:
    """Why ``model`` cannot be loaded here (known name, local directory or cached hub id)."""
    if not isinstance(model, str) or not model:
        return f"must be a non-empty string, got {model!r}"
    names = known_names()
    if model in names:
        return None
    allowed = f"allowed: {', '.join(names)}, or a local model directory with config.json"
    if "\x00" in model or len(model) > 512:
        return f"not a valid name or path; {allowed}"
    if ".." in Path(model).parts or model.startswith("~"):
        return f"{model!r}: path must not contain '..' or '~'; {allowed}"
    path = Path(model)
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"directory {model!r} has no config.json; {allowed}"
    if path.is_absolute() or model.startswith("."):
        return f"{model!r} is not an existing directory; {allowed}"
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", model):
        try:
            load_config(model)  # a hub id already in the local cache
            return None
        except Exception:  # noqa: BLE001 - any failure: not loadable offline
            pass
    return f"unknown model {model!r}; {allowed}"


def _field_problems(d: dict, skip: set[str] = frozenset()) -> list[tuple[str, str]]:
    p: list[tuple[str, str]] = []
    kind = d.get("kind")
    if "kind" not in skip:
        problem = kind_problem(kind)
        if problem:
            p.append(("kind", problem))
    kind_info = KINDS.get(kind) if isinstance(kind, str) else None

    model_ok = False
    if kind_info is None or kind_info.needs_model:
        problem = _model_problem(d["model"])
        if problem:
            p.append(("model", problem))
        model_ok = problem is None
    elif not isinstance(d["model"], str):
        p.append(("model", f"must be a string, got {type(d['model']).__name__}"))

    tp = d["tp"]
    _int_in(p, "tp", tp, 1, MAX_TP)
    tp_ok = _is_int(tp) and 1 <= tp <= MAX_TP
    if model_ok and tp_ok:
        try:
            check_tp_size(load_config(d["model"]), tp, d["model"])
        except TPSizeError as exc:
            p.append(("tp", str(exc).removeprefix("tp: ")))
        except Exception as exc:  # noqa: BLE001 - a config that cannot be read is a model problem
            p.append(("model", f"cannot read its config: {type(exc).__name__}: {exc}"))

    backend = d["backend"]
    if backend not in BACKENDS:
        p.append(("backend", f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}"))

    schemes = d["schemes"]
    if not isinstance(schemes, list):
        p.append(("schemes", f"must be a list of scheme strings, got {type(schemes).__name__}"))
    else:
        parse = _scheme_parser()
        for i, s in enumerate(schemes):
            if not isinstance(s, str) or not s.strip():
                p.append((f"schemes[{i}]", f"must be a non-empty string, got {s!r}"))
                continue
            if parse is not None:
                try:
                    parse(s)
                except ValueError as exc:
                    p.append((f"schemes[{i}]", f"{s!r}: {exc}"))

    sources, tasks = _known_data()
    _name_in(p, "calib_data", d["calib_data"], sources)
    _name_in(p, "eval_data", d["eval_data"], sources)
    _int_in(p, "calib_tokens", d["calib_tokens"], 0, MAX_TOKENS)
    _int_in(p, "eval_tokens", d["eval_tokens"], 0, MAX_TOKENS)
    if not isinstance(d["tasks"], list):
        p.append(("tasks", f"must be a list of task names, got {type(d['tasks']).__name__}"))
    else:
        for i, t in enumerate(d["tasks"]):
            _name_in(p, f"tasks[{i}]", t, tasks)
    _int_in(p, "items_per_task", d["items_per_task"], 0, MAX_ITEMS)

    prompt = d["prompt"]
    if prompt is not None and not isinstance(prompt, str):
        p.append(("prompt", f"must be a string or null, got {type(prompt).__name__}"))
    elif isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        p.append(("prompt", f"at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}"))
    elif isinstance(prompt, str) and kind == "generate" and not prompt.strip():
        p.append(("prompt", "must not be empty for generate"))
    _int_in(p, "max_new_tokens", d["max_new_tokens"], 1, MAX_NEW_TOKENS)
    _int_in(p, "seed", d["seed"], 0, 2**63 - 1)
    _number_in(p, "time_limit_s", d["time_limit_s"], 0, MAX_TIME_LIMIT_S)
    _number_in(p, "collective_timeout_s", d["collective_timeout_s"], 0, MAX_COLLECTIVE_TIMEOUT_S)

    link = d["link"]
    if not isinstance(link, str) or not (link == "loopback" or RATE_PATTERN.match(link)):
        p.append(("link", f"{link!r} is not a link; allowed: loopback or a rate like 1gbit, 100mbit, 500kbit"))

    executor = d["executor"]
    slurm = executor == "slurm"
    if executor not in EXECUTORS:
        p.append(("executor", f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}"))
    p.extend(_executor_problems(d, slurm))

    nnodes, node_rank, endpoint = d["nnodes"], d["node_rank"], d["rdzv_endpoint"]
    _int_in(p, "nnodes", nnodes, 1, MAX_TP)
    if _is_int(nnodes) and nnodes >= 1:
        _int_in(p, "node_rank", node_rank, 0, nnodes - 1)
        if tp_ok and tp % nnodes:
            p.append(("nnodes", f"tp {tp} must be a multiple of nnodes {nnodes} (same ranks on every node)"))
        if nnodes > 1 and endpoint is None and not slurm:
            p.append(("rdzv_endpoint", "required when nnodes > 1, as host:port"))
    if endpoint is not None:
        m = HOST_PORT_PATTERN.match(endpoint) if isinstance(endpoint, str) else None
        if not m or not 1 <= int(m.group("port")) <= 65535:
            p.append(("rdzv_endpoint", f"{endpoint!r} must be host:port with port 1-65535"))

    if backend == "nccl" and tp_ok and _is_int(nnodes) and nnodes >= 1 and not tp % nnodes:
        gpus, nproc = available_gpus(), tp // nnodes
        if slurm and _is_int(d["gpus_per_node"]):
            if nproc > d["gpus_per_node"]:
                p.append(("gpus_per_node", f"nccl needs one GPU per local rank: {nproc} ranks per node but "
                                           f"gpus_per_node {d['gpus_per_node']}; allowed: >= {nproc}, or backend gloo"))
        elif nproc > gpus:
            p.append(("backend", f"nccl needs one GPU per local rank: {nproc} ranks but {gpus} GPU(s) here; "
                                 f"allowed: gloo, auto, or tp <= {gpus * nnodes}"))

    for name in ("calib_from", "run_id"):
        if d[name] is not None:
            problem = run_id_problem(d[name])
            if problem:
                p.append((name, problem))

    params = d["params"]
    if not isinstance(params, dict):
        p.append(("params", f"must be an object, got {type(params).__name__}"))
    else:
        bad_keys = [k for k in params if not isinstance(k, str)]
        if bad_keys:
            p.append(("params", f"keys must be strings, got {bad_keys!r}"))
        try:
            size = len(json.dumps(params, allow_nan=False))
            if size > MAX_PARAMS_BYTES:
                p.append(("params", f"at most {MAX_PARAMS_BYTES} bytes of JSON, got {size}"))
        except (TypeError, ValueError) as exc:
            p.append(("params", f"must hold JSON values only ({exc})"))
        else:
            if kind_info is not None and not bad_keys:
                p.extend(kind_info.check_params(params))
    if kind_info is not None and model_ok and tp_ok and not p:
        p.extend(kind_info.check_spec(d))
    return p


def _executor_problems(d: dict, slurm: bool) -> list[tuple[str, str]]:
    """The Slurm fields' shapes (the cluster itself is asked at submit, ``launch.executors.slurm``):
    names are plain (no shell characters), counts in range, the time limit whole minutes (Slurm's
    unit: a value is never rounded silently); with the local executor they must stay unset."""
    p: list[tuple[str, str]] = []
    for name in ("partition", "account", "qos"):
        v = d[name]
        if v is not None and (not isinstance(v, str) or ".." in v or not NAME_PATTERN.match(v)):
            p.append((name, f"{v!r} must be a plain name matching {NAME_PATTERN.pattern} (no spaces or shell "
                            "characters), or null for the cluster's default"))
    _int_in(p, "gpus_per_node", d["gpus_per_node"], 0, MAX_GPUS_PER_NODE)
    _int_in(p, "max_concurrent", d["max_concurrent"], 1, MAX_CONCURRENT)
    if not slurm:
        for name, default in SLURM_ONLY.items():
            if d[name] != default and not any(f == name for f, _ in p):
                p.append((name, f"only for executor slurm (executor is {d['executor']!r}); leave it "
                                f"{json.dumps(default)}"))
        return p
    if d["rdzv_endpoint"] is not None:
        p.append(("rdzv_endpoint", "must be null with executor slurm: torchrun's rendezvous is on the first node "
                                   "of the allocation"))
    if d["node_rank"] != 0:
        p.append(("node_rank", "must be 0 with executor slurm: srun starts one torchrun per node"))
    if d["link"] != "loopback":
        p.append(("link", f"{d['link']!r}: emulated links are built on this machine (executor local); "
                          "allowed with executor slurm: loopback (the cluster's own network)"))
    limit = d["time_limit_s"]
    if _is_number(limit) and limit > 0 and limit % 60:
        p.append(("time_limit_s", f"Slurm counts time limits in whole minutes: give a multiple of 60 s, got {limit:g}"))
    return p


def start_problems(spec: JobSpec, root: Path | None = None) -> list[tuple[str, str]]:
    """What can change between submit and start of a validated spec: the calibration run it
    names (``calib_from``) may have been deleted. Cheap (file existence only)."""
    if not spec.calib_from:
        return []
    folder = calibration_folder(spec, root=root)
    if not (folder / "calibration.json").exists():
        return [("calib_from", f"run {spec.calib_from!r} has no calibration any more ({folder} is missing)")]
    return []


def _scheme_parser():
    try:
        return parse_scheme_map
    except Exception:  # noqa: BLE001 - the non-empty-string check above still applies
        return None
