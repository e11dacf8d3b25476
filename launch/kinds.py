"""The job kinds implemented in launch/ (registered in ``launch.registry.KINDS``).

Each runs on every rank with a ``launch.worker.JobContext`` and returns rank 0's JSON-able
result (other ranks return None). Progress goes through ``ctx.events``.
"""
from __future__ import annotations

import math
import time


def tp_check(ctx) -> dict | None:
    """Sharded vs unsharded logits and greedy text (lowbit.model.tpcheck)."""
    from lowbit.model.tpcheck import DEFAULT_PROMPT, run_tp_check
    ctx.events.step(0, 1, f"tp-check of {ctx.spec.model} at TP {ctx.group.world_size}")
    report = run_tp_check(ctx.group, ctx.spec.model, ctx.spec.prompt or DEFAULT_PROMPT, ctx.spec.max_new_tokens)
    ctx.events.step(1, 1, "compared", ok=None if report is None else report["ok"])
    return report


def generate(ctx) -> dict | None:
    """Greedy generation with the TP-sharded model: tokens, text and timings."""
    from lowbit.model.engine import build_tp_model, greedy_generate
    spec = ctx.spec
    ctx.events.loading(f"loading {spec.model} sharded {ctx.group.world_size} ways")
    tp = build_tp_model(spec.model, ctx.group)
    ids = tp.tokenizer(spec.prompt or "", return_tensors="pt").input_ids
    ctx.events.step(0, 1, f"generating {spec.max_new_tokens} tokens after a {ids.shape[1]}-token prompt")
    out = greedy_generate(tp.model, ids, spec.max_new_tokens)
    tokens = out["tokens"][0].tolist()
    decode_tps = out["decode_tokens"] / out["decode_seconds"] if out["decode_seconds"] > 0 else None
    ctx.events.step(1, 1, "generated", tokens=len(tokens), decode_tokens_per_s=decode_tps)
    if ctx.rank != 0:
        return None
    return dict(model=spec.model, tp=ctx.group.world_size, backend=getattr(ctx.group, "backend", "?"),
                prompt=spec.prompt, prompt_tokens=int(ids.shape[1]), tokens=tokens,
                text=tp.tokenizer.decode(tokens), load_seconds=tp.load_seconds,
                prefill_seconds=out["prefill_seconds"], decode_seconds=out["decode_seconds"],
                decode_tokens=out["decode_tokens"], decode_tokens_per_s=decode_tps)


def selftest(ctx) -> dict | None:
    """Launcher self-test (no model): all-reduce a known tensor every ``params.step_s`` seconds
    for ``params.sleep_s`` seconds, checking the sum. With ``params.crash_rank`` set, that rank
    raises at ``params.crash_step`` (default 0), to test failure reporting."""
    import torch
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
    if ctx.rank != 0:
        return None
    return dict(world_size=world, steps=total, expected_sum=expected, max_abs_error=worst,
                all_reduce_ok=worst == 0.0, seconds=time.perf_counter() - start)


# -- the method's jobs (lowbit.jobs) -----------------------------------------------------------
METHOD_PARAMS = dict(seq_len=(int, 1, 8192), batch_size=(int, 1, 1024), gamma=(float, 0.0, 1.0),
                     layer_error=(bool, None, None), layer_error_chunks=(int, 0, 1024), force=(bool, None, None),
                     fused_kernels=(bool, None, None))


def _progress(ctx):
    """lowbit's progress callback -> one event per step, its stage named by lowbit (calibrate,
    text, tasks, layer-error), so the bar reads e.g. ``tasks 12/40: arc_easy: item 12/20``."""
    def report(stage, step, total, message, metrics):
        ctx.events.emit(stage, message, step, total, **(metrics or {}))
    return report


def _chunks(tokens: int, seq_len: int) -> int:
    return max(1, tokens // seq_len)


def calibration_folder(ctx) -> "Path":
    """Where a calibrate run keeps its artifact (inside the run directory)."""
    return ctx.paths.dir / "calibration"


def _calibrate_params(spec) -> dict:
    from lowbit.jobs import CALIBRATE_DEFAULTS
    p = {k: spec.params.get(k, v) for k, v in CALIBRATE_DEFAULTS.items() if k != "chunks"}
    p.update(model=spec.model, source=spec.calib_data, chunks=_chunks(spec.calib_tokens, p["seq_len"]))
    return p


def calibrate(ctx) -> dict | None:
    """Calibrate the EMA feature ranges (lowbit.jobs.calibrate) into ``runs/<id>/calibration/``."""
    from lowbit.jobs import calibrate as run
    ctx.events.loading(f"loading {ctx.spec.model} sharded {ctx.group.world_size} ways")
    params = dict(_calibrate_params(ctx.spec), out=str(calibration_folder(ctx)), force=True)
    return run(ctx.group, params, _progress(ctx))


def evaluate(ctx) -> dict | None:
    """Evaluate every scheme of the spec against the exact run (lowbit.jobs.evaluate).

    The calibration comes from the calibrate run ``spec.calib_from`` when given, else from the
    shared cache under $LOWBIT_CACHE (made on the fly from ``calib_data``/``calib_tokens``)."""
    from launch.layout import RunPaths
    from lowbit.jobs import EVALUATE_DEFAULTS
    from lowbit.jobs import evaluate as run
    spec = ctx.spec
    params = _calibrate_params(spec)
    params.update({k: spec.params.get(k, EVALUATE_DEFAULTS[k])
                   for k in ("layer_error", "layer_error_chunks", "fused_kernels")})
    params.update(schemes=list(spec.schemes), eval_source=spec.eval_data,
                  eval_chunks=_chunks(spec.eval_tokens, params["seq_len"]), tasks=list(spec.tasks),
                  items=spec.items_per_task, seed=spec.seed)
    if spec.calib_from:
        params["calibration"] = str(RunPaths(ctx.paths.root, spec.calib_from).dir / "calibration")
    ctx.events.loading(f"loading {spec.model} sharded {ctx.group.world_size} ways")
    return run(ctx.group, params, _progress(ctx))
