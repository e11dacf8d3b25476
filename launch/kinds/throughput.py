"""Kind ``throughput``: prefill/decode tokens/s and communication share per scheme. Its parameters
and checks live here; the body that measures is ``bench.throughput:throughput_job`` (the
registry's string target, loaded by the worker)."""
from __future__ import annotations

from launch.kinds import codec, method

DEFAULTS = dict(prompt_tokens=512, new_tokens=32, rounds=3, batch=1, codec="kernels")  # codec: launch.kinds.codec
check_spec = method.check_spec


def check_params(params: dict) -> list[tuple[str, str]]:
    problems = codec.check(params)
    for key, value in params.items():
        if key in ("codec", "fused_kernels"):
            continue
        if key not in DEFAULTS:
            problems.append((f"params.{key}", f"unknown parameter; allowed: {', '.join(sorted(DEFAULTS))}"))
        elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
            problems.append((f"params.{key}", f"must be an integer in 1..65536, got {value!r}"))
    return problems
