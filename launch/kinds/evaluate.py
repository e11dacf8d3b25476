"""Kind ``evaluate``: perplexity, KL, top-1, task accuracy and per-layer error per scheme.

The calibration comes from the calibrate run ``spec.calib_from`` when given, else from the shared
cache under $LOWBIT_CACHE (made on the fly from ``calib_data``/``calib_tokens``). With
``params.codec`` (``launch.kinds.codec``: ``kernels`` or ``reference``, the default) picks what
runs inside the communicators: the job layer injects the codec, lowbit never imports kernels.
The result names the codec path each site took (``codec_paths`` of each record); a change of
path is a ``codec`` event in the run's events.
"""
from __future__ import annotations

from launch.kinds import codec as kind_codec
from launch.kinds import method
from lowbit.method.evaluate import EVALUATE_DEFAULTS, evaluate

check_params = method.check_params
check_spec = method.check_spec


def run(ctx) -> dict | None:
    spec = ctx.spec
    params = method.lowbit_params(ctx)
    params.update({k: spec.params.get(k, EVALUATE_DEFAULTS[k]) for k in ("layer_error", "layer_error_chunks")})
    params.update(schemes=list(spec.schemes), eval_source=spec.eval_data,
                  eval_chunks=max(1, spec.eval_tokens // params["seq_len"]), tasks=list(spec.tasks),
                  items=spec.items_per_task, seed=spec.seed)
    _, codec = kind_codec.make(kind_codec.codec_name(spec.params, "reference"))
    plan = method.plan(ctx)
    ctx.events.plan([*(["calibrate"] if plan.needs_calibration else []), "text",
                     *(["tasks"] if spec.tasks and spec.items_per_task else []),
                     *(["layer-error"] if params["layer_error"] else [])])
    ctx.events.loading(f"loading {spec.model} sharded {ctx.group.world_size} ways")
    result = evaluate(ctx.group, params, method.progress(ctx), codec=codec, plan=plan)
    if result is not None:
        result["link"] = spec.link  # communication times were measured over this link
        if getattr(ctx, "gates", None):
            result["gates"] = ctx.gates  # what each @minauto became, and from which records
    return result
