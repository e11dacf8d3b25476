"""What the method's kinds (calibrate, evaluate, sweep, throughput) share: their params table and
checks, the spec -> lowbit parameter mapping, the scheme plan, the progress adapter."""
from __future__ import annotations

from launch.kinds import codec
from launch.layout import RunPaths, calibration_folder, calibration_params, runs_root
from launch.store.bench import gate_crossover, gate_records
from lowbit.calibration import Calibration
from lowbit.model.models import load_config
from lowbit.model.tp import text_config
from lowbit.scheme import SchemeError
from lowbit.scheme.plan import SchemePlan

METHOD_PARAMS = dict(seq_len=(int, 1, 8192), batch_size=(int, 1, 1024), gamma=(float, 0.0, 1.0),
                     layer_error=(bool, None, None), layer_error_chunks=(int, 0, 1024), force=(bool, None, None),
                     task_tokens=(int, 1, 1 << 20), legacy_scoring=(bool, None, None))


def check_params(params: dict) -> list[tuple[str, str]]:
    """params of calibrate / evaluate: seq_len, batch_size, gamma, layer_error, layer_error_chunks,
    force, codec (evaluate: ``launch.kinds.codec``, the kernels inside the communicators), task_tokens
    (evaluate: padded tokens per task forward) and legacy_scoring (evaluate: the task scorer before
    the packed one, for bench.scoring's comparison)."""
    problems = codec.check(params)
    for key, value in params.items():
        if key in ("codec", "fused_kernels"):
            continue
        if key not in METHOD_PARAMS:
            problems.append((f"params.{key}", f"unknown parameter; allowed: {', '.join(sorted([*METHOD_PARAMS, 'codec']))}"))
            continue
        kind, lo, hi = METHOD_PARAMS[key]
        if kind is bool:
            if not isinstance(value, bool):
                problems.append((f"params.{key}", f"must be true or false, got {value!r}"))
        elif isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            problems.append((f"params.{key}", f"must be {'a number' if kind is float else 'an integer'}, got {value!r}"))
        elif not ((lo < value) if kind is float else (lo <= value)) or value > hi:
            bound = f"> {lo}" if kind is float else f">= {lo}"
            problems.append((f"params.{key}", f"must be {bound} and <= {hi}, got {value!r}"))
    return problems


def check_schemes(spec: dict) -> list[tuple[str, str]]:
    """Every scheme string of the spec against the model's hidden size and the TP size; an
    ``@minauto`` gate needs collective-bench records for the spec's link and TP size."""
    problems = []
    hidden = text_config(load_config(spec["model"])).hidden_size
    records = None
    for i, text in enumerate(spec["schemes"]):
        try:
            plan = SchemePlan([text])
            plan.validate_for(hidden, spec["tp"])
        except SchemeError as exc:
            problems.append((f"schemes[{i}]", f"{text!r}: {exc}"))
            continue
        for scheme in plan.auto_gated:
            records = gate_records() if records is None else records
            nbytes, source = gate_crossover(scheme, spec["link"], spec["tp"], records)
            if nbytes is None:
                problems.append((f"schemes[{i}]", f"{text!r}: @minauto needs a measured crossover, but {source}; "
                                                  f"run `python -m bench.collectives --tp {spec['tp']} --link "
                                                  f"{spec['link']}` first, or give @min<size>"))
    return problems


def check_calib_from(spec: dict) -> list[tuple[str, str]]:
    """``calib_from`` names a run whose calibration fits the model and TP size."""
    if not spec.get("calib_from"):
        return []
    folder = RunPaths(runs_root(), spec["calib_from"]).dir / "calibration"
    try:
        Calibration.load(folder).check_matches(spec["model"], spec["tp"])
    except Exception as exc:  # noqa: BLE001 - any unreadable artifact is this field's problem
        return [("calib_from", f"run {spec['calib_from']!r} has no usable calibration for "
                               f"{spec['model']} at TP {spec['tp']}: {exc}")]
    return []


def check_spec(spec: dict) -> list[tuple[str, str]]:
    """Schemes against the model and TP size; token counts against seq_len; evaluate: at least
    one scheme, and calib_from exists."""
    problems = check_schemes(spec)
    seq_len = spec["params"].get("seq_len", 256)
    for name in ("calib_tokens", "eval_tokens") if spec["kind"] == "evaluate" else ("calib_tokens",):
        if isinstance(seq_len, int) and spec[name] < seq_len:
            problems.append((name, f"must be at least params.seq_len ({seq_len}) tokens, got {spec[name]}"))
    if spec["kind"] == "evaluate":
        if not spec["schemes"]:
            problems.append(("schemes", "evaluate needs at least one scheme, e.g. int4-static-top1/64"))
        problems += check_calib_from(spec)
    return problems


def progress(ctx):
    """lowbit's progress callback -> one event per step, its stage named by lowbit (calibrate,
    text, tasks, layer-error), so the bar reads e.g. ``tasks 12/40: arc_easy: item 12/20``."""
    def report(stage, step, total, message, metrics):
        ctx.events.emit(stage, message, step, total, **(metrics or {}))
    return report


def plan(ctx) -> SchemePlan:
    """The job's scheme strings parsed once (they were validated at submit), every ``@minauto``
    resolved to the crossover the newest collective-bench records show for the spec's link and
    TP size (``launch.store.bench.gate_crossover``; the same answer on every rank: the records
    are files). ``ctx.gates`` keeps {scheme: (bytes, source)} for the run's result."""
    p = SchemePlan(ctx.spec.schemes)
    if p.auto_gated:
        records, sources = gate_records(ctx.paths.root), {}

        def threshold(scheme):
            nbytes, source = gate_crossover(scheme, ctx.spec.link, ctx.group.world_size, records)
            if nbytes is None:
                raise SchemeError("min_message", f"{scheme}: {source}")
            sources[str(scheme)] = source
            return nbytes
        resolved = p.resolve_gates(threshold)
        ctx.gates = {text: dict(bytes=n, source=sources[text]) for text, n in resolved.items()}
    return p


def lowbit_params(ctx) -> dict:
    """The spec as lowbit's runner parameters: calibration (folder included) plus evaluation."""
    spec = ctx.spec
    p = calibration_params(spec)
    p.update(calibration=str(calibration_folder(spec, ctx.paths.run_id, ctx.paths.root)))
    return p
