"""Scale formats: what a dynamic scale travels as (``-s<fmt>``); see ``lowbit.scales.base`` for the
interface and ``lowbit.scales.formats`` for bf16, fp32, fp16, e8m0 and e4m3."""
from lowbit.scales.base import SCALES, ScaleFormat, by_dtype, default_scale, parse  # noqa: F401 - the public names
