"""The one list of job kinds: what a JobSpec may name and what the worker can run.

Both ``launch.spec`` (validation, once, before any process starts) and ``launch.worker`` (inside
each rank) read ``KINDS``, so a kind that is not registered is refused in the same words by both.

A kind is one entry here naming, by string, its module in ``launch.kinds`` (parameter checks
``check_params(params)`` and ``check_spec(spec_dict)``, each returning (field, problem) pairs;
optionally ``fan_out`` and ``gather`` for a scheduler that runs it as many jobs) and
the function that runs on every rank, ``fn(ctx: JobContext) -> dict | None``. Nothing is imported
until a spec of that kind is validated or run, so this module stays cheap for the app and the CLI,
and the benchmark kinds can point at ``bench`` without launch importing it::

    KINDS["calibrate"] = Kind("launch.kinds.calibrate:run", "EMA feature ranges per layer/rank",
                              checks="launch.kinds.calibrate")

Kinds the product plans but nobody has registered yet are listed in ``PLANNED_KINDS`` so the
error message can say "not implemented yet" rather than "unknown".
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


def _load(target: str):
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


@dataclass(frozen=True)
class Kind:
    target: str                      # "package.module:function" run on every rank
    description: str
    needs_model: bool = True         # False: the model field is not loaded (e.g. selftest)
    checks: str | None = None        # module with check_params(params) / check_spec(spec), by name

    def _check(self, name: str, value) -> list[tuple[str, str]]:
        if self.checks is None:
            return []
        fn = getattr(_load(self.checks), name, None)
        return fn(value) if fn is not None else []

    def check_params(self, params: dict) -> list[tuple[str, str]]:
        """Problems of ``spec.params`` for this kind."""
        return self._check("check_params", params)

    def check_spec(self, spec: dict) -> list[tuple[str, str]]:
        """Checks that need the whole (already field-valid) spec, e.g. schemes against the model."""
        return self._check("check_spec", spec)

    def hook(self, name: str):
        """An optional function of the kind's module, e.g. ``fan_out`` / ``gather`` (a sweep run
        by a scheduler as one job per piece: ``launch.kinds.sweep``); None when it has none."""
        return getattr(_load(self.checks), name, None) if self.checks else None


KINDS: dict[str, Kind] = {
    "throughput": Kind("bench.throughput:throughput_job", "prefill/decode tokens/s and communication share per scheme",
                       checks="launch.kinds.throughput"),
    "calibrate": Kind("launch.kinds.calibrate:run", "EMA per-feature ranges of the partial sums per layer/module/rank",
                      checks="launch.kinds.calibrate"),
    "evaluate": Kind("launch.kinds.evaluate:run", "perplexity, KL, top-1, task accuracy and per-layer error per scheme",
                     checks="launch.kinds.evaluate"),
    "sweep": Kind("launch.kinds.sweep:run", "auto-tune: candidate schemes over a bits/value range, Pareto "
                                            "frontier of bits vs KL, resumable (lowbit.method.sweep)",
                  checks="launch.kinds.sweep"),
    "audit": Kind("launch.kinds.audit:run", "pre-flight audit: per format and site, non-finite outputs, inputs beyond "
                                            "range, clamped values, lost groups, SQNR; KL/top-1/perplexity; a "
                                            "verdict and the cheapest measured fix (lowbit.method.audit)",
                  checks="launch.kinds.audit"),
    "tp-check": Kind("launch.kinds.tp_check:run", "sharded vs unsharded logits and greedy text"),
    "generate": Kind("launch.kinds.generate:run", "greedy generation with the TP-sharded model"),
    "selftest": Kind("launch.kinds.selftest:run",
                     "launcher self-test: all-reduce loop for params.sleep_s seconds, optional deliberate "
                     "crash of params.crash_rank at params.crash_step (used by the launcher's tests)",
                     needs_model=False, checks="launch.kinds.selftest"),
    "collective-bench": Kind("bench.collectives:collective_bench",
                             "bf16 all_reduce vs quantized gather / two_shot by size, TP and link (bench.collectives)",
                             needs_model=False, checks="launch.kinds.collective_bench"),
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
    return _load(KINDS[name].target)
