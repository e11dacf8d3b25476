"""The teaching pages' frames (Playground, Two-shot, Where it pays): thin wrappers that call
``lowbit.playground`` (the math on one stored partial, the two-shot phases, the alpha-beta times)
and return DataFrames."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from launch.store.bench import collective_frame
from launch.store.machine import model_shape
from lowbit.playground import BENCH_LINK_KEYS, LINKS, PARTS, analyze, bytes_per_rank_by_tp, comm_times, counterpart, crossover, fitted_link, message_tokens, two_shot_steps
from lowbit.method.projection import SHAPES


def playground_view(calibration, layer: int, module: str, rank: int, scheme: str, seed: int = 0) -> dict:
    """One scheme on one stored partial (``lowbit.playground.analyze``), as frames for the page:
    ``summary`` (one row: SQNR and relative error of the rank's message and of the sum over ranks,
    clamped count, bits), ``histogram`` (bin, count, kind in-range / clamped), ``grid`` (levels,
    edges in steps), ``features`` (feature, rank error, sum error, bf16 outlier flag) and ``bits``
    (leg, part, bits). Raises PlaygroundError / CalibrationError naming the field."""
    out = analyze(calibration, layer, module, rank, scheme, seed)
    r, s = out["rank"], out["sum"]
    summary = pd.DataFrame([dict(scheme=out["scheme"], layer=out["layer"], module=out["module"], rank=out["rank"],
                                 tp=out["tp"], tokens=out["tokens"], hidden=out["hidden"],
                                 rank_sqnr_db=r["sqnr_db"], rank_rel_error=r["rel_error"], clamped=r["clamped"],
                                 sum_sqnr_db=s["sqnr_db"], sum_rel_error=s["rel_error"],
                                 first_leg_sqnr_db=s["first_leg_sqnr_db"], bits_per_value=out["bits"]["total"],
                                 outliers=len(r["outliers"]), payload_bytes=r["payload_bytes"])])
    hist = pd.DataFrame(columns=["left", "right", "center", "count", "kind"])
    if r["histogram"] is not None:
        h = r["histogram"]
        center = (h["left"] + h["right"]) / 2
        hist = pd.concat([pd.DataFrame(dict(left=h["left"], right=h["right"], center=center, count=h["inside"],
                                            kind="in range")),
                          pd.DataFrame(dict(left=h["left"], right=h["right"], center=center, count=h["clamped"],
                                            kind="clamped"))], ignore_index=True)
    outl = set(r["outliers"])
    features = pd.DataFrame(dict(feature=np.arange(out["hidden"]), rank_rms_error=r["feature_rms"],
                                 sum_rms_error=s["feature_rms"],
                                 bf16=[f in outl for f in range(out["hidden"])]))
    bits = pd.DataFrame([dict(leg=leg, part=p, bits=float(parts[p])) for leg, parts in out["bits"]["legs"].items()
                         if parts is not None for p in PARTS], columns=["leg", "part", "bits"])
    return dict(summary=summary, histogram=hist, grid=r["grid"], features=features, bits=bits)


def two_shot_view(calibration, layer: int, module: str, scheme: str, seed: int = 0) -> dict:
    """``lowbit.playground.two_shot_steps`` as frames: ``links`` (phase, sender, receiver, chunk,
    bytes), ``phases`` (step, method, sqnr_db, rel_error), ``sent`` (method, bytes per rank), and
    the scalars (scheme, gather_scheme, tp, tokens, hidden, width, chunk_outliers, leg1_bytes,
    leg2_bytes)."""
    out = two_shot_steps(calibration, layer, module, scheme, seed)
    frames = dict(links=pd.DataFrame(out["links"], columns=["phase", "sender", "receiver", "chunk", "bytes"]),
                  phases=pd.DataFrame(out["phases"], columns=["step", "method", "sqnr_db", "rel_error"]),
                  sent=pd.DataFrame([dict(method=k, bytes=float(v)) for k, v in out["sent"].items()]))
    frames.update({k: out[k] for k in ("scheme", "gather_scheme", "tp", "tokens", "hidden", "width", "chunk_outliers",
                                       "leg1_bytes", "leg2_bytes")})
    return frames


def bytes_by_tp(scheme: str, hidden: int, tokens: int) -> pd.DataFrame:
    """Bytes each rank sends per all-reduce by TP size: bf16 ring, gather, two-shot."""
    return pd.DataFrame(bytes_per_rank_by_tp(scheme, hidden, tokens), columns=["tp", "method", "bytes", "ratio_vs_bf16"])


def link_choices() -> dict[str, str]:
    """key -> name of every link the projection knows (named interconnects and emulated links)."""
    return {k: v.name for k, v in LINKS.items()}


def projection_frame(link, tp: int, hidden: int, schemes: list[str], codec_gbps: float,
                     max_tokens: int = 65536) -> pd.DataFrame:
    """Modelled time per all-reduce against message size (powers of two tokens up to
    ``max_tokens``) for bf16 and each scheme (``lowbit.playground.comm_times``); ``link`` a key of
    ``link_choices()`` or an ``Interconnect`` (e.g. from ``fitted_links``)."""
    sizes = [2 ** k for k in range(int(math.log2(max_tokens)) + 1)]
    rows = comm_times(link, int(tp), int(hidden), list(schemes), sizes, float(codec_gbps))
    frame = pd.DataFrame(rows, columns=["scheme", "tokens", "message_bytes", "seconds", "comm_seconds",
                                        "codec_seconds"])
    frame["us"] = frame["seconds"] * 1e6
    frame["message_mib"] = frame["message_bytes"] / 2**20
    return frame


def crossovers(frame: pd.DataFrame) -> pd.DataFrame:
    """Per scheme of a projection frame: the smallest message from which it beats bf16 (or none)."""
    rows = frame.to_dict("records")
    out = []
    for scheme in [s for s in dict.fromkeys(frame["scheme"]) if s != "bf16"]:
        c = crossover(rows, scheme)
        out.append(dict(scheme=scheme, tokens=c["tokens"] if c else None,
                        message_mib=c["message_bytes"] / 2**20 if c else None,
                        bf16_us=c["bf16_seconds"] * 1e6 if c else None, scheme_us=c["seconds"] * 1e6 if c else None))
    return pd.DataFrame(out, columns=["scheme", "tokens", "message_mib", "bf16_us", "scheme_us"])


def message_sizes(model: str, prompt_tokens: int = 2048, batch: int = 1) -> dict:
    """Decode- and prefill-sized messages of ``model``: tokens and MiB (BF16) per all-reduce."""
    hidden = projection_hidden(model)
    tokens = message_tokens(int(prompt_tokens), int(batch))
    return {k: dict(tokens=v, mib=v * hidden * 2 / 2**20) for k, v in tokens.items()}


def measured_link_records(frame: pd.DataFrame, root=None) -> pd.DataFrame:
    """Collective-bench records in the store with the projection's link key (loopback has
    none: it is drawn against its own fit only), for drawing over the model lines."""
    bench = collective_frame(frame, root)
    bench["link_key"] = bench["link"].map(BENCH_LINK_KEYS)
    return bench


def fitted_links(bench: pd.DataFrame, tp: int) -> dict:
    """name -> ``Interconnect`` fitted to the store's bf16 all-reduce records of each link at ``tp``."""
    records = bench.to_dict("records")
    out = {}
    for link in sorted(bench["link"].dropna().astype(str).unique()) if len(bench) else []:
        fit = fitted_link(records, link, int(tp))
        if fit is not None:
            out[fit.name] = fit
    return out


def playground_counterpart(scheme: str) -> str:
    """The same scheme with the other kind of scales (static <-> per token)."""
    return counterpart(scheme)


def projection_hidden(model: str) -> int:
    """Hidden size for the projection: the paper's models from ``lowbit.projection.SHAPES``,
    the app's models from their config."""
    return SHAPES[model].hidden if model in SHAPES else model_shape(model)["hidden"]
