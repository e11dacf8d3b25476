"""Kind ``calibrate``: EMA per-feature ranges of the partial sums into ``runs/<id>/calibration/``."""
from __future__ import annotations

from launch.kinds import method
from launch.layout import calibration_folder, calibration_params
from lowbit.method.calibrate import calibrate
from lowbit.provenance import portable_path

check_params = method.check_params
check_spec = method.check_spec


def run(ctx) -> dict | None:
    """Calibrate (``lowbit.method.calibrate.calibrate``) into the run's own folder."""
    ctx.events.loading(f"loading {ctx.spec.model} sharded {ctx.group.world_size} ways")
    params = dict(calibration_params(ctx.spec), out=str(calibration_folder(ctx.spec, ctx.paths.run_id,
                                                                             ctx.paths.root)), force=True)
    result = calibrate(ctx.group, params, method.progress(ctx))
    if result is not None:  # rank 0: the folder as runs/<id>/calibration, not this machine's path
        result["artifact"] = portable_path(result["artifact"], roots=dict(runs=ctx.paths.root))
    return result
