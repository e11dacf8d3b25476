"""Kind ``collective-bench``: its parameters, their checks and its spec; the body that measures
is ``bench.collectives:collective_bench`` (loaded by the worker from the registry's string target)."""
from __future__ import annotations

import math

from launch.cluster import link_problem
from launch.kinds import codec
from lowbit.scheme import parse_scheme

DEFAULT_TOKENS = [1, 16, 256, 2048, 8192]
DEFAULT_HIDDEN = [576, 5120]
# bf16 baseline; gather and two_shot at int8 / int4 + 1/64 BF16 outliers / int2. The int4
# two-shot runs twice: with an int4 second leg (~4.2 bits both legs, the speed target) and the
# default int8 second leg (DESIGN: 4-bit requantization adds error, 8 bits almost none).
DEFAULT_SCHEMES = [
    "bf16",
    "int8-static", "int4-static-top1/64", "int2-static",
    "int8-static@twoshot+int8-token", "int4-static-top1/64@twoshot+int4-token",
    "int4-static-top1/64@twoshot+int8-token", "int2-static@twoshot+int2-token",
]
DTYPES = ("bf16", "fp32")
PARAM_LIMITS = dict(repeats=(1, 1000), min_repeats=(1, 1000), warmup=(0, 100), seed=(0, 2**31 - 1),
                    compute_repeats=(0, 100))
MAX_SIZE = 1 << 16
DEFAULT_PARAMS = dict(tokens=DEFAULT_TOKENS, hidden=DEFAULT_HIDDEN, schemes=DEFAULT_SCHEMES, repeats=15,
                      min_repeats=5, warmup=2, budget_s=20.0, seed=0, dtype="bf16", codec="kernels",
                      compute_repeats=3)


def check_params(params: dict) -> list[tuple[str, str]]:
    """Problems of a collective-bench job's ``params`` as (field, message) pairs."""
    problems = []
    for key in sorted(set(params) - set(DEFAULT_PARAMS)):  # an old params.fused_kernels is unknown here too
        problems.append((f"params.{key}", f"unknown collective-bench parameter; allowed: "
                                          f"{', '.join(sorted(DEFAULT_PARAMS))}"))
    for key in ("tokens", "hidden"):
        value = params.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE for v in value):
            problems.append((f"params.{key}", f"must be a non-empty list of integers 1..{MAX_SIZE}, got {value!r}"))
    schemes = params.get("schemes")
    if schemes is not None:
        if not isinstance(schemes, list) or not schemes:
            problems.append(("params.schemes", f"must be a non-empty list of scheme strings, got {schemes!r}"))
        else:
            for i, text in enumerate(schemes):
                try:
                    if not isinstance(text, str):
                        raise ValueError(f"must be a string, got {type(text).__name__}")
                    parse_scheme(text)
                except ValueError as exc:
                    problems.append((f"params.schemes[{i}]", f"{text!r}: {exc}"))
    for key, (lo, hi) in PARAM_LIMITS.items():
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
            problems.append((f"params.{key}", f"must be an integer {lo}..{hi}, got {value!r}"))
    budget = params.get("budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or not 0 < budget <= 3600):
        problems.append(("params.budget_s", f"must be a number > 0 and <= 3600 (seconds per size), got {budget!r}"))
    value = params.get("dtype")
    if value is not None and value not in DTYPES:
        problems.append(("params.dtype", f"{value!r} not allowed; allowed: {', '.join(DTYPES)}"))
    problems += [p for p in codec.check(params) if p[0] != "params.fused_kernels"]
    return problems


def check_spec(spec: dict) -> list[tuple[str, str]]:
    """Whole-spec checks: an emulated link needs network namespaces (root); the bench's TP
    size needs every scheme to be valid at some hidden size."""
    problems = []
    problem = link_problem(spec["link"])
    if problem:
        problems.append(("link", problem))
    if spec["nnodes"] != 1:
        problems.append(("nnodes", "collective-bench runs on one machine (an emulated link makes one node per "
                                   "rank itself); allowed: 1"))
    return problems


def job_spec(tp: int, link: str, params: dict, time_limit_s: float = 3600.0, backend: str = "auto") -> dict:
    """The collective-bench job spec (a plain dict, validated by launch.spec.JobSpec)."""
    return dict(kind="collective-bench", model="none", tp=tp, backend=backend, link=link, params=params,
                collective_timeout_s=600.0, time_limit_s=time_limit_s)
