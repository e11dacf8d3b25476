"""Kind ``selftest``: the launcher's self-test, no model: an all-reduce loop, optionally a
deliberate crash of one rank (the launcher's tests use it)."""
from __future__ import annotations

import math
import os
import socket
import time

import torch

PARAMS = ("sleep_s", "step_s", "crash_rank", "crash_step")


def check_params(params: dict) -> list[tuple[str, str]]:
    problems = []
    for key in ("sleep_s", "step_s"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            problems.append((f"params.{key}", f"must be a number >= 0, got {value!r}"))
    for key in ("crash_rank", "crash_step"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problems.append((f"params.{key}", f"must be an integer >= 0, got {value!r}"))
    for key in sorted(set(params) - set(PARAMS)):
        problems.append((f"params.{key}", f"unknown selftest parameter; allowed: {', '.join(sorted(PARAMS))}"))
    return problems


def run(ctx) -> dict | None:
    """Launcher self-test (no model): all-reduce a known tensor every ``params.step_s`` seconds
    for ``params.sleep_s`` seconds, checking the sum. With ``params.crash_rank`` set, that rank
    raises at ``params.crash_step`` (default 0), to test failure reporting."""
    p = ctx.spec.params
    sleep_s, step_s = float(p.get("sleep_s", 0.0)), float(p.get("step_s", 0.1))
    crash_rank, crash_step = p.get("crash_rank"), int(p.get("crash_step", 0))
    group, world = ctx.group, ctx.group.world_size
    total = max(1, math.ceil(sleep_s / step_s)) if step_s > 0 else 1
    expected = float(sum(range(1, world + 1)))
    start, worst = time.perf_counter(), 0.0
    for step in range(total):
        if crash_rank == group.rank and step == crash_step:
            raise RuntimeError(f"selftest: deliberate crash on rank {group.rank} at step {step}")
        reduced = group.all_reduce(torch.full((4,), float(group.rank + 1)))
        worst = max(worst, (reduced - expected).abs().max().item())
        ctx.events.step(step + 1, total, f"all-reduce {step + 1}/{total}")
        time.sleep(step_s if sleep_s > 0 else 0.0)
    hosts = _hosts(group)
    if ctx.rank != 0:
        return None
    return dict(world_size=world, steps=total, expected_sum=expected, max_abs_error=worst,
                all_reduce_ok=worst == 0.0, seconds=time.perf_counter() - start, hosts=hosts)


def _hosts(group, width: int = 64) -> list[str]:
    """Where each rank ran: its Slurm node name ($SLURMD_NODENAME) or this machine's host name,
    gathered over the group (so a multi-node run shows it spans its nodes)."""
    name = (os.environ.get("SLURMD_NODENAME") or socket.gethostname()).encode()[:width]
    mine = torch.zeros(width, dtype=torch.uint8)
    mine[:len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in group.all_gather(mine)]
