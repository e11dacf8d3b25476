"""The one list of job kinds: what a JobSpec may name and what the worker can run.

Both ``launch.spec`` (validation, before any process starts) and ``launch.worker`` (inside each
rank) read ``KINDS``, so a kind that is not registered is refused in the same words by both.

Registering a kind is one entry here, pointing at a function ``fn(ctx: JobContext) -> dict | None``
(see ``launch.worker.JobContext``); the target is imported only inside the ranks, so this module
stays cheap to import for the app and the CLI::

    KINDS["calibrate"] = Kind("lowbit.method.calibrate:calibrate_job", "EMA feature ranges per layer/rank")

Kinds the product plans but nobody has registered yet are listed in ``PLANNED_KINDS`` so the
error message can say "not implemented yet" rather than "unknown".
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from bench.collectives import check_params as bench_params, check_spec as bench_spec  # stdlib-only at import


@dataclass(frozen=True)
class Kind:
    target: str                      # "package.module:function" run on every rank
    description: str
    needs_model: bool = True         # False: the model field is not loaded (e.g. selftest)
    # Extra checks of ``spec.params`` for this kind: returns (field, problem) pairs.
    check_params: Callable[[dict], list[tuple[str, str]]] | None = field(default=None, compare=False)
    # Checks that need the whole (already field-valid) spec dict, e.g. schemes against the
    # model's hidden size and the TP size: returns (field, problem) pairs.
    check_spec: Callable[[dict], list[tuple[str, str]]] | None = field(default=None, compare=False)


def _check_selftest_params(params: dict) -> list[tuple[str, str]]:
    problems = []
    for key in ("sleep_s", "step_s"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            problems.append((f"params.{key}", f"must be a number >= 0, got {value!r}"))
    for key in ("crash_rank", "crash_step"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problems.append((f"params.{key}", f"must be an integer >= 0, got {value!r}"))
    allowed = {"sleep_s", "step_s", "crash_rank", "crash_step"}
    for key in sorted(set(params) - allowed):
        problems.append((f"params.{key}", f"unknown selftest parameter; allowed: {', '.join(sorted(allowed))}"))
    return problems


def _check_method_params(params: dict) -> list[tuple[str, str]]:
    """params of calibrate / evaluate: seq_len, batch_size, gamma, layer_error, layer_error_chunks, force,
    fused_kernels (evaluate: run kernels.dispatch inside the communicators)."""
    from launch.kinds import METHOD_PARAMS
    problems = []
    for key, value in params.items():
        if key not in METHOD_PARAMS:
            problems.append((f"params.{key}", f"unknown parameter; allowed: {', '.join(sorted(METHOD_PARAMS))}"))
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


def _check_method_spec(spec: dict) -> list[tuple[str, str]]:
    """Schemes against the model and TP size; token counts against seq_len; calib_from exists."""
    from launch.layout import RunPaths, runs_root
    from lowbit.model.models import load_config
    from lowbit.scheme import SchemeError, parse_scheme_map
    from lowbit.model.tp import text_config
    problems = []
    hidden = text_config(load_config(spec["model"])).hidden_size
    for i, text in enumerate(spec["schemes"]):
        try:
            parse_scheme_map(text).validate_for(hidden, spec["tp"])
        except SchemeError as exc:
            problems.append((f"schemes[{i}]", f"{text!r}: {exc}"))
    seq_len = spec["params"].get("seq_len", 256)
    for name in ("calib_tokens", "eval_tokens") if spec["kind"] == "evaluate" else ("calib_tokens",):
        if isinstance(seq_len, int) and spec[name] < seq_len:
            problems.append((name, f"must be at least params.seq_len ({seq_len}) tokens, got {spec[name]}"))
    if spec["kind"] == "evaluate":
        if not spec["schemes"]:
            problems.append(("schemes", "evaluate needs at least one scheme, e.g. int4-static-top1/64"))
        if spec.get("calib_from"):
            folder = RunPaths(runs_root(), spec["calib_from"]).dir / "calibration"
            try:
                from lowbit.method.calibrate import Calibration
                Calibration.load(folder).check_matches(spec["model"], spec["tp"])
            except Exception as exc:  # noqa: BLE001 - any unreadable artifact is this field's problem
                problems.append(("calib_from", f"run {spec['calib_from']!r} has no usable calibration for "
                                               f"{spec['model']} at TP {spec['tp']}: {exc}"))
    return problems


def _check_throughput_params(params: dict) -> list[tuple[str, str]]:
    from bench.throughput import check_params
    return check_params(params)


def _check_sweep_params(params: dict) -> list[tuple[str, str]]:
    from lowbit.method.sweep import check_params
    return check_params(params)


def _check_sweep_spec(spec: dict) -> list[tuple[str, str]]:
    from lowbit.method.sweep import check_spec
    return check_spec(spec)


KINDS: dict[str, Kind] = {
    "throughput": Kind("bench.throughput:throughput_job", "prefill/decode tokens/s and communication share per scheme",
                       check_params=_check_throughput_params, check_spec=_check_method_spec),
    "calibrate": Kind("launch.kinds:calibrate", "EMA per-feature ranges of the partial sums per layer/module/rank",
                      check_params=_check_method_params, check_spec=_check_method_spec),
    "evaluate": Kind("launch.kinds:evaluate", "perplexity, KL, top-1, task accuracy and per-layer error per scheme",
                     check_params=_check_method_params, check_spec=_check_method_spec),
    "sweep": Kind("lowbit.method.sweep:sweep_job", "auto-tune: candidate schemes over a bits/value range, Pareto "
                                            "frontier of bits vs KL, resumable (lowbit.method.sweep)",
                  check_params=_check_sweep_params, check_spec=_check_sweep_spec),
    "tp-check": Kind("launch.kinds:tp_check", "sharded vs unsharded logits and greedy text"),
    "generate": Kind("launch.kinds:generate", "greedy generation with the TP-sharded model"),
    "selftest": Kind("launch.kinds:selftest",
                     "launcher self-test: all-reduce loop for params.sleep_s seconds, optional deliberate "
                     "crash of params.crash_rank at params.crash_step (used by the launcher's tests)",
                     needs_model=False, check_params=_check_selftest_params),
    "collective-bench": Kind("bench.collectives:collective_bench",
                             "bf16 all_reduce vs quantized gather / two_shot by size, TP and link (bench.collectives)",
                             needs_model=False, check_params=bench_params, check_spec=bench_spec),
}

PLANNED_KINDS: tuple[str, ...] = ()


def available_kinds() -> list[str]:
    return sorted(KINDS)


def kind_problem(name: object) -> str | None:
    """Why ``name`` cannot be run, or None."""
    allowed = f"allowed: {', '.join(available_kinds())}"
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}; {allowed}"
    if name in KINDS:
        return None
    if name in PLANNED_KINDS:
        return f"{name!r} is planned but not implemented yet; {allowed}"
    return f"unknown kind {name!r}; {allowed}"


def kind_function(name: str):
    """Import and return the function that runs kind ``name`` (inside a rank)."""
    problem = kind_problem(name)
    if problem:
        raise ValueError(f"kind: {problem}")
    module_name, _, attr = KINDS[name].target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
