"""Shared inputs for collective tests: seeded partial sums with a few outlier features, a
calibration artifact built from them, and the single-process math each scheme must equal."""
from __future__ import annotations

import torch

from lowbit.method.calibrate import Calibration, select_outliers
from lowbit.site import Site
from lowbit.wire.payload import decode, encode
from lowbit.scheme import parse_scheme

TOKENS, HIDDEN, LAYERS = 5, 96, 2
SCHEMES = ["int4-static-top1/32", "int8-token", "int4-group16-rand1/32s3", "int3a-token",
           "int4-static-top1/32@twoshot+int8-token", "int4-group16@twoshot+int4-group8"]


def partials(tp: int, tokens: int = TOKENS, hidden: int = HIDDEN) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    xs = []
    for _ in range(tp):
        x = torch.randn(tokens, hidden, generator=gen)
        x[:, [3, 40, 77]] *= 30  # consistent outlier features
        xs.append(x)
    return xs


def fake_calibration(tp: int, hidden: int = HIDDEN) -> Calibration:
    """Ranges from the partials themselves (so nothing clamps), for every layer and module."""
    xs = torch.stack(partials(tp, hidden=hidden))  # [tp, T, H]
    mn, mx = xs.amin(1), xs.amax(1)  # [tp, H]
    ema_min = mn.expand(LAYERS, 2, tp, hidden).clone()
    ema_max = mx.expand(LAYERS, 2, tp, hidden).clone()
    total = xs.sum(0)  # the exact reduced sum [T, H]: a static second leg's ranges
    sum_min = total.amin(0).expand(LAYERS, 2, hidden).clone()
    sum_max = total.amax(0).expand(LAYERS, 2, hidden).clone()
    return Calibration(ema_min, ema_max, ema_min[None].clone(), ema_max[None].clone(),
                       dict(model="test", tp=tp), None, sum_min, sum_max)


def single_process_gather(scheme_text: str, tp: int, site: Site = Site(1, "down_proj")) -> torch.Tensor:
    """The paper's math in one process: dequantize every rank's payload and sum in fp32."""
    scheme = parse_scheme(scheme_text)
    cal, xs = fake_calibration(tp), partials(tp)
    idx = select_outliers(cal, site, scheme.outliers, HIDDEN)
    out = torch.zeros(TOKENS, HIDDEN)
    for r, x in enumerate(xs):
        smin, smax = cal.rank_range(site, r) if scheme.quant.granularity == "static" else (None, None)
        out += decode(encode(x, scheme.quant, idx, smin, smax)[0], TOKENS, HIDDEN, scheme.quant, idx, smin, smax)
    return out


def single_process_two_shot(scheme_text: str, tp: int, site: Site = Site(1, "down_proj")) -> torch.Tensor:
    """Two-shot in one process: per feature chunk, sum the dequantized chunks of every rank,
    requantize the sum with the second leg, dequantize."""
    scheme = parse_scheme(scheme_text)
    cal, xs = fake_calibration(tp), partials(tp)
    idx = select_outliers(cal, site, scheme.outliers, HIDDEN)
    width = HIDDEN // tp
    out = torch.zeros(TOKENS, HIDDEN)
    for j in range(tp):
        cols = slice(j * width, (j + 1) * width)
        local = idx[(idx >= cols.start) & (idx < cols.stop)] - cols.start
        reduced = torch.zeros(TOKENS, width)
        for r, x in enumerate(xs):
            if scheme.quant.granularity == "static":
                smin, smax = (t[cols] for t in cal.rank_range(site, r))
            else:
                smin = smax = None
            reduced += decode(encode(x[:, cols].contiguous(), scheme.quant, local, smin, smax)[0], TOKENS, width,
                              scheme.quant, local, smin, smax)
        out[:, cols] = decode(encode(reduced, scheme.second, local)[0], TOKENS, width, scheme.second, local)
    return out


def single_process(scheme_text: str, tp: int) -> torch.Tensor:
    scheme = parse_scheme(scheme_text)
    return single_process_two_shot(scheme_text, tp) if scheme.algo == "two_shot" else single_process_gather(scheme_text, tp)


def reduce_on_threads(scheme: str, tp: int, xs=None, hidden: int = HIDDEN, calibration="fake",
                      site: Site = Site(1, "down_proj"), **comm_kwargs):
    """Every rank's (reduced output, CallRecord) of one ``QuantCommunicator`` call on threaded
    ranks. ``xs``: the ranks' partials (default ``partials``); ``calibration``: "fake" (from the
    partials), None, or an artifact; ``comm_kwargs`` go to the communicator (codec, prerotated...)."""
    from lowbit.comm.collectives import QuantCommunicator
    from lowbit.comm.dist import ThreadWorld
    xs = partials(tp, hidden=hidden) if xs is None else xs
    cal = fake_calibration(tp, hidden=hidden) if isinstance(calibration, str) and calibration == "fake" \
        else calibration

    def body(group):
        comm = QuantCommunicator(group, scheme, cal, **comm_kwargs)
        return comm.reduce(xs[group.rank], site), comm.calls[-1]
    return ThreadWorld(tp).run(body)
