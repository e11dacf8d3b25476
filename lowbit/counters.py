"""What one message did to its values, counted per call: the failures users of shipping codecs report.

A call's stats (``CallRecord.extra``, written to the run files) carry these for the first leg and,
with the ``leg2_`` prefix, for the second leg's message (the owner's requantized sum):

======================  ==========================================================================
counter                 counts
======================  ==========================================================================
``beyond_range_in``     finite input values the cast makes non-finite or whose magnitude passes the
                        range of the cast or the format (``range_limit``: fp16's 65504 after
                        QuickReduce's cast, 448 for an unscaled e4m3); they overflow or clamp
                        (vLLM #55345, SGLang #34473)
``attenuated_groups``   groups whose decoded values keep less than half of the input's L2 norm
                        (finite values only) (SGLang #40084)
``underflowed_groups``  groups with a nonzero input whose every nonzero input decodes to 0
``groups``              groups of the message (the denominator)
``nonfinite_out``       (per call) non-finite values of this rank's reduced output
======================  ==========================================================================

``clamped`` and ``nonfinite`` (inputs) are ``lowbit.quant``'s counts, kept as they are. ``site_counters``
sums them per site over a run's calls: an evaluation's record carries it (``site_counters``). Definitions
follow docs/shipping.md ("Words used below").

    PYTHONPATH=. python -c "import torch; from lowbit.counters import message_counters; \\
        from lowbit.scheme import parse_scheme; q = parse_scheme('qint8-ilv32-sqr-f16').quant; \\
        x = torch.randn(1, 128) * 1e-5; from lowbit.quant import quantize, dequantize; r = quantize(x, q); \\
        print(message_counters(x, dequantize(r.codes, q, r.scales), q))"
"""
from __future__ import annotations

import torch

ATTENUATED = 0.5  # a group keeping under half of its input's L2 norm is attenuated
COUNTERS = ("beyond_range_in", "attenuated_groups", "underflowed_groups", "groups")


def range_limit(quant) -> float:
    """The largest |value| a message can carry finite and unclamped: the cast's limit, and for a
    dynamic format the code's largest ratio times the format's largest scale."""
    limit = quant.cast.max_finite
    if quant.dynamic:
        limit = min(limit, quant.code.max_ratio * quant.scale.max_scale(quant))
    return limit


def message_counters(x: torch.Tensor, decoded: torch.Tensor, quant) -> dict[str, int]:
    """``COUNTERS`` of one message: ``x`` the values handed to the quantizer [T, W] (before the cast),
    ``decoded`` what a receiver decodes from its payload (same shape)."""
    x, decoded = x.to(torch.float32), decoded.to(torch.float32)
    finite = torch.isfinite(x)
    made_nonfinite = ~torch.isfinite(quant.cast.apply(x))  # a cast without a stated range still overflows
    beyond = int((finite & (made_nonfinite | (x.abs() > range_limit(quant)))).sum())
    xs, valid = quant.grouping.group(torch.where(finite, x, 0.0), finite)
    ds, _ = quant.grouping.group(decoded, finite)
    xs = torch.where(valid, xs, 0.0)
    ds = torch.where(valid, ds, 0.0)  # a non-finite decode of a finite input is not "kept" signal
    in_norm = xs.double().pow(2).sum(-1)
    out_norm = torch.where(torch.isfinite(ds), ds, 0.0).double().pow(2).sum(-1)
    nonzero = xs != 0
    has_signal = nonzero.any(-1)
    attenuated = has_signal & (out_norm < ATTENUATED ** 2 * in_norm)
    underflowed = has_signal & ~(nonzero & (ds != 0)).any(-1)
    return dict(beyond_range_in=beyond, attenuated_groups=int(attenuated.sum()),
                underflowed_groups=int(underflowed.sum()), groups=int(xs.shape[:-1].numel()))


def add_counters(total: dict, counts: dict, prefix: str = "") -> None:
    """Sum ``counts`` into ``total`` under ``prefix`` + each name."""
    for key, value in counts.items():
        total[prefix + key] = total.get(prefix + key, 0) + value


def site_counters(calls) -> dict[str, dict[str, int]]:
    """Per site ("L<layer>.<module>"), the sum over its calls of ``lowbit.counters``' counts (both legs,
    ``nonfinite_out``) and of ``clamped`` / ``nonfinite``: where a format breaks, not only whether."""
    keys = ("clamped", "nonfinite", "nonfinite_out", *COUNTERS, "leg2_clamped", *(f"leg2_{k}" for k in COUNTERS))
    out: dict[str, dict[str, int]] = {}
    for c in calls:
        if "groups" not in c.extra:
            continue  # exact and gated calls quantize nothing
        site = out.setdefault(f"L{c.layer}.{c.module}", {})
        for k in keys:
            if k in c.extra:
                site[k] = site.get(k, 0) + int(c.extra[k])
    return out
