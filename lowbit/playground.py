"""Playground math: what one scheme does to one real stored partial sum, computed at once.

The app's Playground, Two-shot and Where-it-pays pages call these (through ``launch.store``);
nothing here knows about Streamlit or the launcher. Every number comes from the library's own
code paths, never restated:

- one rank's message: the communicator's own first leg (``QuantCommunicator.first_leg``: its
  outlier set, rotation, chunks, fitted tables and stochastic rounding seed) and its decode;
- the sum over ranks: the real ``QuantCommunicator`` on a ``ThreadWorld`` of ``tp`` threads, one
  per rank, each reducing its own stored partial (two-shot's first-leg sum via
  ``keep_first_leg``);
- bits and bytes: ``lowbit.wire.accounting`` (the one accounting owner);
- times: ``lowbit.method.projection``'s alpha-beta formulas and codec model.

The input is a calibration artifact's ``sample``: the first ``SAMPLE_TOKENS`` tokens of each
site's partial on every rank (``lowbit.method.calibrate``).

    from lowbit.calibration import Calibration
    from lowbit import playground
    cal = Calibration.load("runs/<id>/calibration")
    out = playground.analyze(cal, 11, "down_proj", 2, "int4-token-rot64")
    out["rank"]["sqnr_db"], out["sum"]["sqnr_db"], out["bits"]
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from lowbit.calibration import Calibration, select_outliers
from lowbit.comm.collectives import QuantCommunicator
from lowbit.site import ROW_PARALLEL_MODULES, Site
from lowbit.wire.accounting import scheme_bits_breakdown, site_bytes, wire_bytes
from lowbit.wire.payload import BIT_PARTS
from lowbit.comm.dist import ThreadWorld
from lowbit.wire.payload import layout, scheme_layout
from lowbit.method.projection import (INTERCONNECTS, Gpu, Interconnect, allreduce_s, check_against, codec_s, gather_s,
                               two_shot_s)
from lowbit.groups.rows import PerToken, Static
from lowbit.quant import outside_static_range, quantize
from lowbit.rotation import unrotate
from lowbit.scheme import QuantSpec, Scheme, SchemeError, SchemeMap, parse_scheme

PARTS = BIT_PARTS
HIST_BINS = 81


class PlaygroundError(ValueError):
    """Bad input to the playground; the message starts with the field's name."""


# -- the other kind of scales -----------------------------------------------------------------
def counterpart(scheme_text: str) -> str:
    """The same scheme with the other kind of scales: static <-> per token (rotation and
    stochastic rounding dropped for static, which cannot rotate). Used for "static vs dynamic
    side by side"."""
    s = parse_scheme(scheme_text)
    if s.is_exact:
        raise PlaygroundError(f"scheme: {scheme_text!r} is exact; allowed: a quantized scheme")
    if not s.quant.dynamic:
        quant = replace(s.quant, grouping=PerToken())
        return str(replace(s, quant=quant))
    quant = replace(s.quant, grouping=Static(), rounding="nearest")
    return str(replace(s, quant=quant, rotation=None))


# -- inputs ------------------------------------------------------------------------------------
def _check_site(cal: Calibration, layer: int, module: str, rank: int | None = None) -> Site:
    if cal.sample is None:
        cal.site_sample(Site(0, ROW_PARALLEL_MODULES[0]), 0)  # raises the named "no samples" error
    if module not in ROW_PARALLEL_MODULES:
        raise PlaygroundError(f"module: {module!r} not allowed; allowed: {', '.join(ROW_PARALLEL_MODULES)}")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < cal.layers:
        raise PlaygroundError(f"layer: {layer!r} not allowed; allowed: 0..{cal.layers - 1}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                             or not 0 <= int(rank) < cal.tp):
        raise PlaygroundError(f"rank: {rank!r} not allowed; allowed: 0..{cal.tp - 1}")
    return Site(int(layer), module)


def _parse(scheme_text: str, hidden: int, tp: int) -> Scheme:
    try:
        scheme = parse_scheme(scheme_text)
        scheme.validate_for(hidden, tp)
    except SchemeError as exc:
        raise PlaygroundError(f"scheme: {exc}") from exc
    if scheme.per_message_outliers or (not scheme.is_exact and scheme.permute):
        raise PlaygroundError(f"scheme: {scheme_text!r} not allowed here; allowed: top/rand/no BF16 outliers "
                              "(sp, thr and perm are on the Layer error page)")
    return scheme


def site_partials(cal: Calibration, site: Site) -> torch.Tensor:
    """Every rank's stored partial at ``site``: [tp, S, H] fp32."""
    return torch.stack([cal.site_sample(site, r).float() for r in range(cal.tp)])


# -- one rank ----------------------------------------------------------------------------------
def _steps(res, spec: QuantSpec, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Per value: the step (scale) and offset (min, asymmetric) it was quantized with."""
    scales = res.scales.float()
    mins = res.mins.float() if res.mins is not None else torch.zeros_like(scales)
    return spec.grouping.expand(scales, shape), spec.grouping.expand(mins, shape)


def grid(spec: QuantSpec, levels=None) -> dict:
    """The quantization grid in units of the step: ``levels`` (the values codes dequantize to,
    divided by their scale) and ``edges`` (the range the scale was built for; beyond it values
    clamp to the end codes); ``levels`` is a fitted table (lm)."""
    return spec.code.grid(levels)


def rank_message(cal: Calibration, site: Site, rank: int, scheme: Scheme, x: torch.Tensor, seed: int = 0) -> dict:
    """One rank's partial ``x`` [S, H] through the scheme's first leg exactly as the communicator
    builds it (``QuantCommunicator.first_leg``: the same outlier set, rotation, chunks (two-shot:
    each of the ``tp`` chunks is a message), fitted tables and stochastic rounding seed as the sum's
    first call at this site), decoded back: the rank's reconstruction, what its quantizer saw and
    the per-value position on the grid.

    Returns ``recon`` [S, H] (original space), ``quantized`` [S, H] (the values the quantizer saw:
    rotated for ``-rot<R>``; outlier columns NaN), ``position`` [S, H] (quantized value in steps,
    (x - min) / scale; NaN at outlier columns), ``clamped`` [S, H] bool, ``clamped_count`` (encode's),
    ``outliers`` (BF16 feature indices), ``payload_bytes`` and ``levels`` (the rank's fitted table,
    lm codes; else None)."""
    tokens, hidden = x.shape
    comm = QuantCommunicator(ThreadWorld(cal.tp).group(int(rank)), SchemeMap(scheme), cal, record=False, seed=seed)
    messages = comm.first_leg(x, site)
    idx, rot, quant = comm.plan(site, hidden).outlier_idx, scheme.rotation, scheme.quant
    decoded = torch.empty(tokens, hidden)
    quantized = torch.empty(tokens, hidden)
    position = torch.empty(tokens, hidden)
    clamped = torch.zeros(tokens, hidden, dtype=torch.bool)
    for m in messages:
        values = m.values.float()
        decoded[:, m.cols] = comm.decode_message(m, site)
        quantized[:, m.cols] = values
        res = quantize(values, quant, *m.static, exclude=m.outlier_idx, seed=m.seed, levels=m.levels)
        step, offset = _steps(res, quant, values.shape)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        position[:, m.cols] = torch.where(step > 0, (values - offset) / safe, torch.zeros_like(values))
        if m.static[0] is not None:
            keep = torch.ones(values.shape[1], dtype=torch.bool)
            keep[m.outlier_idx] = False
            clamped[:, m.cols] = outside_static_range(values, quant, *m.static) & keep
    recon = decoded
    if rot is not None:
        recon = unrotate(decoded, rot)
        recon[:, idx] = x[:, idx].to(torch.bfloat16).float()  # the BF16 columns after the payload
    elif idx.numel():
        position[:, idx] = math.nan
        quantized[:, idx] = math.nan
    return dict(recon=recon, quantized=quantized, position=position, clamped=clamped,
                clamped_count=int(sum(m.stats["clamped"] for m in messages)), outliers=idx,
                payload_bytes=int(sum(m.payload.numel() for m in messages)), levels=messages[0].levels)


# -- every rank --------------------------------------------------------------------------------
def reduce_over_ranks(cal: Calibration, site: Site, scheme_text: str, partials: torch.Tensor | None = None,
                      seed: int = 0) -> dict:
    """The real communicator on ``tp`` threads: each rank reduces its stored partial.
    Returns ``sum`` [S, H] (what every rank gets), ``first_leg`` (two-shot's fp32 sum before the
    requantization, else None) and ``calls`` (rank 0's call record: bytes, bits, clamped)."""
    partials = site_partials(cal, site) if partials is None else partials

    def body(group):
        comm = QuantCommunicator(group, scheme_text, cal, keep_first_leg=True, seed=seed)
        out = comm.reduce(partials[group.rank].clone(), site)
        return out, comm.last_first_leg, comm.calls[-1].as_dict()

    out, first, call = ThreadWorld(cal.tp).run(body)[0]
    return dict(sum=out.float(), first_leg=None if first is None else first.float(), call=call)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(||reference||^2 / ||approx - reference||^2); inf when they are equal."""
    err = (approx.double() - reference.double()).pow(2).sum().item()
    sig = reference.double().pow(2).sum().item()
    if err == 0:
        return math.inf
    return 10 * math.log10(sig / err) if sig > 0 else -math.inf


def rel_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference|| / ||reference||."""
    norm = reference.double().norm().item()
    return (approx.double() - reference.double()).norm().item() / norm if norm > 0 else math.inf


def per_feature_rms(reference: torch.Tensor, approx: torch.Tensor) -> np.ndarray:
    """RMS over tokens of the error of every feature [H]."""
    return (approx.double() - reference.double()).pow(2).mean(0).sqrt().numpy()


def bits_breakdown(scheme_text: str, hidden: int, tp: int, tokens: int) -> dict:
    """{"leg 1": {part: bits}, "leg 2": {...} | None} from ``scheme_bits_breakdown``."""
    return scheme_bits_breakdown(parse_scheme(scheme_text), hidden, tp, tokens)


def histogram(position: torch.Tensor, clamped: torch.Tensor, spec: QuantSpec, bins: int = HIST_BINS,
              levels=None) -> dict:
    """Counts of the quantized values' positions (in steps) over ``bins`` bins spanning the grid
    and every value; split into in-range and clamped."""
    pos = position.reshape(-1).numpy()
    cl = clamped.reshape(-1).numpy()
    ok = np.isfinite(pos)
    g = grid(spec, levels)
    lo = min(g["edges"][0], float(pos[ok].min()) if ok.any() else 0.0)
    hi = max(g["edges"][1], float(pos[ok].max()) if ok.any() else 0.0)
    pad = (hi - lo) * 0.02 or 1.0
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    inside, _ = np.histogram(pos[ok & ~cl], bins=edges)
    outside, _ = np.histogram(pos[ok & cl], bins=edges)
    return dict(left=edges[:-1], right=edges[1:], inside=inside, clamped=outside)


def analyze(cal: Calibration, layer: int, module: str, rank: int, scheme_text: str, seed: int = 0,
            bins: int = HIST_BINS) -> dict:
    """Everything the Playground shows for one scheme on one stored site:

    - ``rank``: the chosen rank's message: ``sqnr_db``, ``rel_error``, ``clamped`` (count, as the
      encoder counts it), ``feature_rms`` [H], the ``histogram`` of its quantized values in steps
      with the ``grid`` (levels, edges), ``outliers`` (BF16 features), ``payload_bytes``;
    - ``sum``: the sum over ranks as the communicator computes it, against the exact fp32 sum:
      ``sqnr_db``, ``rel_error``, ``feature_rms`` [H], and ``first_leg_sqnr_db`` for two-shot;
    - ``bits``: bits per value by leg and part (``scheme_bits_breakdown``) and ``total``.
    With ``-sr`` the rank's view draws the same uniforms as the rank's message in the sum (the
    communicator's seed for its first call at this site, ``lowbit.comm.collectives.rounding_seed``).
    Raises PlaygroundError naming the field for a bad layer, module, rank or scheme."""
    site = _check_site(cal, layer, module, rank)
    scheme = _parse(scheme_text, cal.hidden, cal.tp)
    partials = site_partials(cal, site)
    tokens, hidden = partials.shape[1:]
    exact = partials.double().sum(0).float()
    bits = bits_breakdown(str(scheme), hidden, cal.tp, tokens)
    total = sum(bits["leg 1"][p] for p in PARTS) + (sum(bits["leg 2"][p] for p in PARTS) if bits["leg 2"] else 0.0)
    out = dict(scheme=str(scheme), layer=site.layer, module=site.module, rank=int(rank), tp=cal.tp,
               tokens=int(tokens), hidden=int(hidden), bits=dict(legs=bits, total=total))
    reduced = reduce_over_ranks(cal, site, str(scheme), partials, seed)
    out["sum"] = dict(sqnr_db=sqnr_db(exact, reduced["sum"]), rel_error=rel_error(exact, reduced["sum"]),
                      feature_rms=per_feature_rms(exact, reduced["sum"]), values=reduced["sum"],
                      exact=exact, first_leg_sqnr_db=None if reduced["first_leg"] is None or scheme.is_exact
                      else sqnr_db(exact, reduced["first_leg"]), clamped=reduced["call"]["extra"].get("clamped"))
    x = partials[int(rank)]
    if scheme.is_exact:
        recon = x.to(torch.bfloat16).float()
        out["rank"] = dict(sqnr_db=sqnr_db(x, recon), rel_error=rel_error(x, recon), clamped=0,
                           feature_rms=per_feature_rms(x, recon), histogram=None, grid=None,
                           outliers=[], payload_bytes=tokens * hidden * 2, recon=recon, values=x)
        return out
    msg = rank_message(cal, site, int(rank), scheme, x, seed)
    out["rank"] = dict(sqnr_db=sqnr_db(x, msg["recon"]), rel_error=rel_error(x, msg["recon"]),
                       clamped=msg["clamped_count"], clamped_marked=int(msg["clamped"].sum()),
                       feature_rms=per_feature_rms(x, msg["recon"]),
                       histogram=histogram(msg["position"], msg["clamped"], scheme.quant, bins, msg["levels"]),
                       grid=grid(scheme.quant, msg["levels"]), outliers=[int(i) for i in msg["outliers"]],
                       payload_bytes=msg["payload_bytes"], recon=msg["recon"], values=x)
    return out


# -- two-shot, step by step --------------------------------------------------------------------
def two_shot_steps(cal: Calibration, layer: int, module: str, scheme_text: str, seed: int = 0) -> dict:
    """The two-shot all-reduce of one stored site, phase by phase, next to the BF16 ring
    all-reduce and the gather of the same first-leg code:

    - ``links``: rows (sender, receiver, phase, bytes) -- phase 1 the all-to-all of each rank's
      quantized chunks (its own chunk stays local), phase 2 the all-gather of every owner's
      requantized chunk (padded to the largest, as sent);
    - ``phases``: error of the sum after each step against the exact fp32 sum (``sqnr_db``,
      ``rel_error``): after phase 1 (the owners' fp32 sums), after the requantization = after
      phase 2 (what every rank holds), and for ``bf16`` (ring all-reduce) and ``gather``;
    - ``sent``: bytes each rank sends per method.
    Raises PlaygroundError unless ``scheme_text`` is a two-shot scheme that fits this site."""
    site = _check_site(cal, layer, module)
    scheme = _parse(scheme_text, cal.hidden, cal.tp)
    if scheme.is_exact or scheme.algo != "two_shot":
        raise PlaygroundError(f"scheme: {scheme_text!r} is not two-shot; allowed: a scheme ending @twoshot[+...]")
    partials = site_partials(cal, site)
    tp, (tokens, hidden) = cal.tp, partials.shape[1:]
    width = hidden // tp
    exact = partials.double().sum(0).float()
    idx = select_outliers(cal, site, scheme.outliers, hidden) if scheme.rotation is None else \
        torch.empty(0, dtype=torch.long)
    local = [idx[(idx >= j * width) & (idx < (j + 1) * width)] - j * width for j in range(tp)]
    leg1 = [scheme_layout(scheme, tokens, width, local[j].numel()).total_bytes for j in range(tp)]
    leg2 = max(layout(tokens, width, scheme.second, local[j].numel()).total_bytes for j in range(tp))
    links = [dict(phase=1, sender=r, receiver=j, chunk=j, bytes=leg1[j]) for r in range(tp) for j in range(tp)
             if r != j]
    links += [dict(phase=2, sender=j, receiver=r, chunk=j, bytes=leg2) for j in range(tp) for r in range(tp)
              if r != j]
    two = reduce_over_ranks(cal, site, str(scheme), partials, seed)
    gather_scheme = str(replace(scheme, algo="gather", second=None))
    gathered = reduce_over_ranks(cal, site, gather_scheme, partials, seed)
    ring = reduce_over_ranks(cal, site, "bf16", partials, seed)

    def err(name, approx, step):
        return dict(step=step, method=name, sqnr_db=sqnr_db(exact, approx), rel_error=rel_error(exact, approx))

    phases = [err("two-shot", two["first_leg"], "after phase 1: owners' fp32 sums"),
              err("two-shot", two["sum"], "after requantization and phase 2 (all-gather)"),
              err("bf16 ring all-reduce", ring["sum"], "ring all-reduce (BF16)"),
              err(f"gather ({gather_scheme})", gathered["sum"], "gather of quantized partials")]
    # bytes each rank puts on links (its own chunk stays local): two-shot from the link table,
    # gather its payload to tp-1 peers, the bf16 ring 2 (tp-1)/tp of the message
    sent = {"two-shot": max(sum(r["bytes"] for r in links if r["sender"] == s) for s in range(tp)),
            f"gather ({gather_scheme})": wire_bytes("gather", tp, int(gathered["call"]["bytes_sent"])),
            "bf16 ring all-reduce": wire_bytes("exact", tp, tokens * hidden * 2)}
    return dict(scheme=str(scheme), gather_scheme=gather_scheme, tp=tp, tokens=int(tokens), hidden=int(hidden),
                width=width, chunk_outliers=[int(c.numel()) for c in local], leg1_bytes=leg1, leg2_bytes=leg2,
                links=links, phases=phases, sent=sent, exact=exact, first_leg=two["first_leg"], final=two["sum"])


def bytes_per_rank_by_tp(scheme_text: str, hidden: int, tokens: int, tps=range(2, 17)) -> list[dict]:
    """Bytes each rank sends for one all-reduce of ``tokens`` x ``hidden`` values, per TP size
    (those whose chunks split ``hidden`` evenly): bf16 ring, gather of the first-leg payload,
    two-shot of both legs, all as ``lowbit.wire.accounting`` counts them (``site_bytes``,
    ``wire_bytes``). ``ratio_vs_bf16`` = method bytes / bf16 bytes."""
    scheme = parse_scheme(scheme_text)
    if scheme.is_exact:
        raise PlaygroundError(f"scheme: {scheme_text!r} is exact; allowed: a quantized scheme")
    gather_scheme = replace(scheme, algo="gather", second=None)
    two_scheme = scheme if scheme.algo == "two_shot" else replace(scheme, algo="two_shot", second=None)
    values = tokens * hidden
    rows = []
    for n in tps:
        try:
            two_scheme.validate_for(hidden, n)
        except SchemeError:
            continue
        bf16 = wire_bytes("exact", n, values * 2)
        gather = wire_bytes("gather", n, site_bytes(gather_scheme, tokens, hidden, n)[0])
        two = wire_bytes("two_shot", n, *site_bytes(two_scheme, tokens, hidden, n))
        rows.append(dict(tp=n, method="bf16 ring all-reduce", bytes=bf16, ratio_vs_bf16=1.0))
        rows.append(dict(tp=n, method=f"gather ({gather_scheme})", bytes=gather, ratio_vs_bf16=gather / bf16))
        rows.append(dict(tp=n, method=f"two-shot ({two_scheme})", bytes=two, ratio_vs_bf16=two / bf16))
    return rows


# -- where it pays -----------------------------------------------------------------------------
# The rate-limited links of launch.cluster (tc tbf on veth pairs). beta: the nominal rate;
# efficiency 0.956: TCP goodput through tbf (docs/collectives.md, "Does the link behave like a link?");
# alpha: fitted to the bf16 all-reduce records of bench/results/collectives-tp3-576-links.json
# with lowbit.method.projection.check_against (TP 3, gloo, 1-2048 tokens x 576).
EMULATED_LINKS = {
    "emu1gbit": Interconnect("emulated 1 Gbit/s (tc tbf)", 0.125, 0.956, 2050.0,
                             "launch.cluster rate; alpha fitted to bench/results/collectives-tp3-576-links.json"),
    "emu100mbit": Interconnect("emulated 100 Mbit/s (tc tbf)", 0.0125, 0.956, 1065.0,
                               "launch.cluster rate; alpha fitted to bench/results/collectives-tp3-576-links.json"),
}
LINKS = {**INTERCONNECTS, **EMULATED_LINKS}
BENCH_LINK_KEYS = {"1gbit": "emu1gbit", "100mbit": "emu100mbit"}


def link_for(key) -> Interconnect:
    if isinstance(key, Interconnect):
        return key
    if key not in LINKS:
        raise PlaygroundError(f"link: {key!r} not allowed; allowed: {', '.join(LINKS)}")
    return LINKS[key]


def fitted_link(records: list[dict], link: str, tp: int) -> Interconnect | None:
    """alpha and beta fitted to measured bf16 all-reduce records of ``link`` at ``tp``
    (``lowbit.method.projection.check_against``: least squares over message sizes), efficiency 1;
    None with fewer than two bf16 sizes."""
    mine = [r for r in records if r.get("link") == link and r.get("tp") == tp]
    fit = check_against(mine)
    if not fit:
        return None
    return Interconnect(f"{link} fitted (TP {tp})", fit[0]["beta_gbps"], 1.0, fit[0]["alpha_us"],
                        f"fitted to {len(mine)} collective-bench record(s) in the results store")


def comm_times(link_key, tp: int, hidden: int, schemes: list[str], tokens_list, codec_gbps: float) -> list[dict]:
    """Modelled time of one all-reduce of ``tokens`` x ``hidden`` values per rank (message
    ``tokens * hidden * 2`` BF16 bytes) on ``link_key`` at TP ``tp``: bf16 ring, and each
    quantized scheme by its own algorithm (gather / two-shot) plus the codec at ``codec_gbps``
    GB/s (``lowbit.method.projection.codec_s`` with that bandwidth). Rows: scheme, tokens,
    message_bytes, seconds, comm_seconds, codec_seconds."""
    link = link_for(link_key)
    if not isinstance(codec_gbps, (int, float)) or not codec_gbps > 0:
        raise PlaygroundError(f"codec_gbps: {codec_gbps!r} not allowed; allowed: a number > 0 (GB/s)")
    if not isinstance(tp, int) or tp < 2:
        raise PlaygroundError(f"tp: {tp!r} not allowed; allowed: an integer >= 2")
    gpu = Gpu(hbm_gbps=float(codec_gbps), codec_eff=1.0)
    alpha, beta = link.alpha_us * 1e-6, link.beta
    parsed = []
    for text in schemes:
        try:
            s = parse_scheme(text)
            s.validate_for(hidden, tp)
        except SchemeError as exc:
            raise PlaygroundError(f"scheme: {text!r}: {exc}") from exc
        parsed.append(s)
    rows = []
    for tokens in tokens_list:
        values = int(tokens) * hidden
        exact = allreduce_s(tp, values * 2, alpha, beta)
        rows.append(dict(scheme="bf16", tokens=int(tokens), message_bytes=values * 2, seconds=exact,
                         comm_seconds=exact, codec_seconds=0.0))
        for s in parsed:
            if s.is_exact:
                continue
            legs = scheme_bits_breakdown(s, hidden, tp, 8)
            b1 = legs["leg 1"]["total"]
            if s.algo == "gather":
                comm = gather_s(tp, values * b1 / 8, alpha, beta)
                codec = codec_s(tp, values, b1, gpu, "gather")
            else:
                b2 = legs["leg 2"]["total"] * tp  # the whole requantized tensor, as two_shot_s counts it
                comm = two_shot_s(tp, values * b1 / 8, values * b2 / 8, alpha, beta)
                codec = codec_s(tp, values, b1, gpu, "two_shot")
            rows.append(dict(scheme=str(s), tokens=int(tokens), message_bytes=values * 2, seconds=comm + codec,
                             comm_seconds=comm, codec_seconds=codec))
    return rows


def crossover(rows: list[dict], scheme: str) -> dict | None:
    """The smallest message (of the given rows' sizes) from which ``scheme`` stays faster than
    bf16, with the two times there; None when it never wins at the sizes given."""
    by_tokens = {}
    for r in rows:
        by_tokens.setdefault(r["tokens"], {})[r["scheme"]] = r
    sizes = sorted(by_tokens)
    wins = [t for t in sizes if scheme in by_tokens[t] and by_tokens[t][scheme]["seconds"] < by_tokens[t]["bf16"]["seconds"]]
    if not wins:
        return None
    for i, t in enumerate(sizes):
        if all(u in wins for u in sizes[i:]):
            r = by_tokens[t]
            return dict(tokens=t, message_bytes=r["bf16"]["message_bytes"], bf16_seconds=r["bf16"]["seconds"],
                        seconds=r[scheme]["seconds"])
    return None


def message_tokens(prompt_tokens: int = 2048, batch: int = 1) -> dict:
    """Tokens per all-reduce message of one decode step (``batch`` sequences, one token each)
    and of a prefill (``batch`` x ``prompt_tokens``)."""
    for name, v in (("prompt_tokens", prompt_tokens), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlaygroundError(f"{name}: {v!r} not allowed; allowed: an integer >= 1")
    return dict(decode=batch, prefill=batch * prompt_tokens)
