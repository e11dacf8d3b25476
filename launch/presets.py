"""Ready-made job specs the app and CLI offer: the classroom demo and its pieces.

    from launch.presets import demo_spec
    JobQueue().submit(demo_spec())        # calibrates on the fly, evaluates 4 schemes
    JobQueue().submit(capture_spec())     # stores sample partials for the Playground (~30 s)

The demo is one ``evaluate`` run of an embedded model (SmolLM2-135M at TP 3, or Gemma 3 270M at
TP 2: its 4 query heads / 1 KV head allow 1, 2 and 4; ``DEMO_TP``): the exact all-reduce against
int4 for every feature, int4 with 1/64 random features kept in BF16 and int4 with the top 1/64
features (by calibrated range) in BF16 -- the paper's comparison. It calibrates on the fly into
the shared cache when no calibration exists yet (``lowbit.jobs``), so a second demo reuses it.
Its sizes are chosen to finish within about 3 minutes on a 2-core CPU (the target; the measured
times are in docs/teaching.md); ``DEMO_LONGER`` says what a longer run adds.
"""
from __future__ import annotations

DEMO_SCHEMES = ["bf16", "int4-static", "int4-static-rand1/64", "int4-static-top1/64"]

# Tuned on the 2-core CPU machine: docs/teaching.md, "The demo, timed", has the measured wall times.
# Zero-shot tasks are left out: a few items of a task take minutes of a 2-core CPU, and at such n
# their standard error (~12 points at n = 16) is larger than the differences.
DEMO_SIZES = dict(calib_tokens=2048, eval_tokens=1024, tasks=[], items_per_task=0,
                  params=dict(seq_len=128, batch_size=4, layer_error=True, layer_error_chunks=1))

DEMO_LONGER = ("The demo measures KL, top-1 agreement and perplexity on held-out text, which already "
               "separate the schemes clearly. A longer run (Runs page or `python -m bench.accuracy`) adds "
               "zero-shot task accuracy (\"% kept\", as the paper reports it); with 200+ items per task "
               "its standard error drops to about ±3 points, small enough to see differences between schemes.")


# The TP size each embedded model's demo is offered at (the Overview preselects it).
DEMO_TP = {"smollm2-135m": 3, "gemma3-270m": 2}


def demo_tp(model: str, sizes: list[int] | None = None) -> int:
    """The demo's TP size for ``model``: its ``DEMO_TP`` entry, else the largest of ``sizes``
    up to 4 (the tiny test models: 2 of 1/2/4), else 1."""
    if model in DEMO_TP and (sizes is None or DEMO_TP[model] in sizes):
        return DEMO_TP[model]
    fitting = [s for s in sizes or [] if 1 < s <= 4]
    return fitting[0] if fitting else 1


# A calibrate job small enough for a class: it keeps the first 16 tokens of every site's partial on
# every rank, which is all the teaching pages (Playground, Two-shot) need; its time limit is far above what
# it takes and within the class ceiling (launch.ceiling).
CAPTURE = dict(kind="calibrate", model="smollm2-135m", tp=3, calib_data="wikipedia", calib_tokens=128,
               params=dict(seq_len=64, batch_size=2), time_limit_s=600.0)


def capture_spec() -> dict:
    """The teaching pages' one-click sample capture (``CAPTURE``) as a fresh spec dict."""
    return dict(CAPTURE, params=dict(CAPTURE["params"]))


def demo_spec(model: str = "smollm2-135m", tp: int = 3, **overrides) -> dict:
    """The classroom demo as an evaluate job spec (a plain dict, validated by ``JobSpec``)."""
    spec = dict(kind="evaluate", model=model, tp=tp, backend="auto", schemes=list(DEMO_SCHEMES),
                calib_data="wikipedia", eval_data="wikipedia", seed=0, time_limit_s=900.0,
                **{k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                   for k, v in DEMO_SIZES.items()})
    spec.update(overrides)
    return spec
