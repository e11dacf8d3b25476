"""The one list of job kinds: what a JobSpec may name and what the worker can run.

Both ``launch.spec`` (validation, before any process starts) and ``launch.worker`` (inside each
rank) read ``KINDS``, so a kind that is not registered is refused in the same words by both.

Registering a kind is one entry here, pointing at a function ``fn(ctx: JobContext) -> dict | None``
(see ``launch.worker.JobContext``); the target is imported only inside the ranks, so this module
stays cheap to import for the app and the CLI::

    KINDS["calibrate"] = Kind("lowbit.calibrate:calibrate_job", "EMA feature ranges per layer/rank")

Kinds the product plans but nobody has registered yet are listed in ``PLANNED_KINDS`` so the
error message can say "not implemented yet" rather than "unknown".
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Kind:
    target: str                      # "package.module:function" run on every rank
    description: str
    needs_model: bool = True         # False: the model field is not loaded (e.g. selftest)
    # Extra checks of ``spec.params`` for this kind: returns (field, problem) pairs.
    check_params: Callable[[dict], list[tuple[str, str]]] | None = field(default=None, compare=False)


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


KINDS: dict[str, Kind] = {
    "tp-check": Kind("launch.kinds:tp_check", "sharded vs unsharded logits and greedy text"),
    "generate": Kind("launch.kinds:generate", "greedy generation with the TP-sharded model"),
    "selftest": Kind("launch.kinds:selftest",
                     "launcher self-test: all-reduce loop for params.sleep_s seconds, optional deliberate "
                     "crash of params.crash_rank at params.crash_step (used by the launcher's tests)",
                     needs_model=False, check_params=_check_selftest_params),
}

PLANNED_KINDS = ("calibrate", "evaluate", "sweep", "collective-bench")


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
