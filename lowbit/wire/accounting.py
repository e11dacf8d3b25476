"""Bits and bytes: the ONLY formulas for what a site's message costs and what a collective moves.

    PYTHONPATH=. python -c "from lowbit.wire.accounting import scheme_bits_per_value as b; \\
        print(b('int4-static-top1/64', 576, 3), b('int4-token@twoshot+int4-token', 576, 3))"

Two questions, one owner each:

- **Bits per value of one site** (``scheme_bits_breakdown`` / ``scheme_bits_per_value``): over
  this rank's tokens x hidden values, the bytes it hands to collectives, split by part
  (``payload.BIT_PARTS``: payload codes, BF16 outliers, scales, indices), as the layouts of
  ``lowbit.wire.payload`` lay them out: gather's one message (rotated: all H codes plus the BF16
  outlier tail), two-shot's tp first-leg chunk messages and its one second-leg chunk payload
  padded to the largest.
- **Bytes on the wire per rank per call** (``wire_bytes``): what one rank sends (= receives) with
  the scheme's collective, in a ring model: exact all-reduce 2 (tp-1)/tp x the tensor; gather
  (tp-1) x its payload; two-shot (tp-1) first-leg chunks + (tp-1) padded second-leg chunks.

- **Fitted codebook tables** (``table_bytes``): an ``lm<B>[s]`` site's tables are built once per
  run from the calibration artifact on every rank, so they cost 0 bits per message; their size
  (2**B fp32 per site and sender, or per site when shared) is reported as its own number.

The communicators record these numbers per call (tests hold them equal to the bytes actually
handed to the collectives); the Bits page, the results store's traffic table, the collective
bench and the alpha-beta projection all call the functions here.
"""
from __future__ import annotations

from lowbit.scheme import PRESETS, QuantSpec, Scheme, SchemeError, SchemeMap, parse_scheme, parse_scheme_map
from lowbit.wire.payload import BIT_PARTS, layout, scheme_layout
from lowbit.wire.recipes import RECIPE_ALGOS, owners

METHODS = ("exact", "gather", "two_shot")  # the collectives a site's message can take
EXACT_BF16 = Scheme("exact", wire_dtype="bf16")  # what a gated message (``@min<size>``) sends


def effective(scheme: Scheme, tokens: int, hidden: int) -> Scheme:
    """The scheme a message of ``tokens`` x ``hidden`` really travels with: the exact BF16
    all-reduce when the scheme's size gate (``@min<size>``) holds it back, else the scheme."""
    return EXACT_BF16 if scheme.gated(tokens, hidden) else scheme


def two_shot_chunk_outliers(k: int, tp: int) -> list[int]:
    """Static outliers per two-shot chunk when ``k`` are spread evenly (the accounting's view;
    a real site's chunk counts come from its calibrated indices)."""
    return [k // tp + (1 if j < k % tp else 0) for j in range(tp)]


def _widest(tokens: int, width: int, second: QuantSpec, chunk_outliers: list[int]) -> int:
    return max(chunk_outliers, key=lambda c: layout(tokens, width, second, c).total_bytes)


def leg2_chunk_bytes(tokens: int, width: int, second: QuantSpec, chunk_outliers: list[int]) -> int:
    """Bytes of the padded second-leg chunk every owner all-gathers: the largest chunk payload."""
    return layout(tokens, width, second, _widest(tokens, width, second, chunk_outliers)).total_bytes


def scheme_bits_breakdown(scheme: Scheme | str, hidden: int, tp: int, tokens: int = 8) -> dict:
    """Bits per value of one site by leg and part: {"leg 1": {...}, "leg 2": {...} or None},
    each with the keys of ``PayloadLayout.bits_per_value``.

    Independent of the token count except for ``thr<T>c<K>``, whose index list is sent once per
    message (C uint16 per message: 16 C / (tokens H) bits per value); ``tokens=8`` keeps packed
    codes whole bytes. Two-shot with top/rand outliers counts them spread evenly over the chunks
    (``two_shot_chunk_outliers``; their real positions come from calibration). A message the
    size gate holds back counts as what it sends: 16 bits per value (``effective``)."""
    scheme = effective(parse_scheme(scheme) if isinstance(scheme, str) else scheme, tokens, hidden)
    values = tokens * hidden
    if scheme.is_exact:
        return {"leg 1": layout(tokens, hidden, scheme).bits_per_value, "leg 2": None}
    k = scheme.outliers.count(hidden)
    if scheme.algo == "gather":
        return {"leg 1": scheme_layout(scheme, tokens, hidden, k).bits_per_value, "leg 2": None}
    if scheme.algo in RECIPE_ALGOS:
        legs = recipe_parts(scheme, tokens, hidden, tp)
        return {leg: None if parts is None else {part: b * 8 / values for part, b in parts.items()}
                for leg, parts in zip(("leg 1", "leg 2"), legs)}
    per_chunk = two_shot_chunk_outliers(k, tp) if scheme.rotation is None else [0] * tp
    leg1, leg2 = two_shot_parts(scheme, tokens, hidden, tp, per_chunk)
    return {"leg 1": {part: b * 8 / values for part, b in leg1.items()},
            "leg 2": {part: b * 8 / values for part, b in leg2.items()}}


def two_shot_parts(scheme: Scheme, tokens: int, hidden: int, tp: int, chunk_outliers: list[int]
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Bytes by part of one rank's two-shot call: leg 1, its tp first-leg chunk messages (chunk j
    with ``chunk_outliers[j]`` static BF16 features); leg 2, its one padded second-leg chunk."""
    width = hidden // tp
    leg1: dict[str, float] = {}
    for c in chunk_outliers:
        for part, bits in scheme_layout(scheme, tokens, width, c).bits_per_value.items():
            leg1[part] = leg1.get(part, 0.0) + bits * tokens * width / 8
    widest = _widest(tokens, width, scheme.second, chunk_outliers)
    leg2 = {part: bits * tokens * width / 8 for part, bits in layout(tokens, width, scheme.second, widest)
            .bits_per_value.items()}
    return leg1, leg2


def recipe_parts(scheme: Scheme, tokens: int, hidden: int, tp: int, rank: int = 0
                 ) -> tuple[dict[str, float], dict[str, float] | None]:
    """Bytes by part of one rank's call of a shipping recipe (``lowbit.comm.recipes``): leg 1, one
    message per owner (``lowbit.wire.recipes.owners``; QuickReduce's tile padding included); leg 2,
    its requantized part padded to the largest owner's. NCCL's ring: the fp8 tensor it all-reduces."""
    n = tokens * hidden
    if scheme.algo == "ncclring":
        return {part: bits * n / 8 for part, bits in layout(1, n, scheme.quant).bits_per_value.items()}, None
    counts = [o.numel() for o in owners(scheme.algo, n, tp, scheme.quant.group_size or 1)]
    leg1: dict[str, float] = {}
    for c in counts:
        for part, bits in layout(1, c, scheme.quant).bits_per_value.items():
            leg1[part] = leg1.get(part, 0.0) + bits * c / 8
    widest = max(counts, key=lambda c: layout(1, c, scheme.quant).total_bytes)
    return leg1, {part: bits * widest / 8 for part, bits in layout(1, widest, scheme.quant).bits_per_value.items()}


def site_bytes(scheme: Scheme | str, tokens: int, hidden: int, tp: int,
               chunk_outliers: list[int] | None = None) -> tuple[int, int]:
    """(first-leg bytes, second-leg bytes) one rank hands to collectives in one call: exact, the
    tensor in its wire dtype; gather, its one message (rotated: all H codes + the BF16 tail);
    two-shot, its tp chunk messages (``chunk_outliers`` static BF16 features per chunk; default:
    spread evenly) and its padded second-leg chunk. A gated message: the BF16 tensor."""
    scheme = effective(parse_scheme(scheme) if isinstance(scheme, str) else scheme, tokens, hidden)
    if scheme.is_exact:
        return layout(tokens, hidden, scheme).total_bytes, 0
    k = scheme.outliers.count(hidden)
    if scheme.algo == "gather":
        return scheme_layout(scheme, tokens, hidden, k).total_bytes, 0
    if scheme.algo in RECIPE_ALGOS:
        leg1, leg2 = recipe_parts(scheme, tokens, hidden, tp)
        return round(leg1["total"]), 0 if leg2 is None else round(leg2["total"])
    width = hidden // tp
    if chunk_outliers is None:
        chunk_outliers = two_shot_chunk_outliers(k, tp) if scheme.rotation is None else [0] * tp
    leg1 = sum(scheme_layout(scheme, tokens, width, c).total_bytes for c in chunk_outliers)
    return leg1, leg2_chunk_bytes(tokens, width, scheme.second, chunk_outliers)


def scheme_bits_per_value(scheme: Scheme | str, hidden: int, tp: int, tokens: int = 8) -> float:
    """Bits per value this rank hands to collectives for one site under ``scheme`` (gather: one
    message; two-shot: both legs, padding included); see ``scheme_bits_breakdown``."""
    legs = scheme_bits_breakdown(scheme, hidden, tp, tokens)
    total = legs["leg 1"]["total"]
    if legs["leg 2"] is not None:
        total += legs["leg 2"]["total"]
    return total


def bits_rows(scheme: Scheme | str, hidden: int, tp: int, tokens: int = 8) -> list[dict]:
    """``scheme_bits_breakdown`` as rows (leg, part, bits) over ``BIT_PARTS``: the Bits page's table."""
    legs = scheme_bits_breakdown(scheme, hidden, tp, tokens)
    return [dict(leg=leg, part=p, bits=float(parts.get(p, 0.0)))
            for leg, parts in legs.items() if parts is not None for p in BIT_PARTS]


def method_of(scheme: Scheme) -> str:
    """Which collective a site's message takes: ``exact`` (all-reduce), ``gather`` or ``two_shot``; a
    shipping recipe (``lowbit.comm.recipes``) is a two-shot, NCCL's fp8 ring an all-reduce."""
    if scheme.is_exact or scheme.algo == "ncclring":
        return "exact"
    return "two_shot" if scheme.algo in RECIPE_ALGOS else scheme.algo


def wire_bytes(method: str, tp: int, leg1_bytes: float, leg2_bytes: float = 0.0) -> float:
    """Bytes one rank sends (= receives) per call in the ring model.

    ``leg1_bytes``: exact, the tensor in its wire dtype; gather, this rank's payload; two-shot,
    all tp first-leg chunk messages of this rank together. ``leg2_bytes``: two-shot's padded
    second-leg chunk (``leg2_chunk_bytes``)."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} not allowed; allowed: {', '.join(METHODS)}")
    if tp <= 1:
        return 0.0
    # products first, one division: integer byte counts stay exact (int() of the result floors)
    if method == "exact":
        return 2 * (tp - 1) * leg1_bytes / tp
    if method == "gather":
        return float((tp - 1) * leg1_bytes)
    return (tp - 1) * leg1_bytes / tp + (tp - 1) * leg2_bytes


def site_traffic(scheme: Scheme | str, hidden: int, tp: int, tokens: int) -> dict:
    """One site's call at ``tokens`` x ``hidden``: the message bytes each rank encodes (both legs)
    and the bytes it sends with the scheme's collective (``wire_bytes``)."""
    scheme = effective(parse_scheme(scheme) if isinstance(scheme, str) else scheme, tokens, hidden)
    leg1, leg2 = site_bytes(scheme, tokens, hidden, tp)
    return dict(message_bytes=leg1 + leg2, sent_bytes=wire_bytes(method_of(scheme), tp, leg1, leg2),
                bits_per_value=(leg1 + leg2) * 8 / (tokens * hidden) if tokens * hidden else 0.0)


def preset_rows(hidden: int = 576, tp: int = 3, tokens: int = 8) -> list[dict]:
    """One row per named preset (``lowbit.scheme.PRESETS``): its expansion, the bits per value of
    its format (the first leg's message: ``format_bits``) and of the whole call (``total_bits``,
    two-shot: both legs) at ``hidden`` / ``tp``, from the payload layouts; ``note`` says why a
    preset cannot run there (a group that does not divide the hidden size or the two-shot chunk)."""
    rows = []
    for name, expansion in PRESETS.items():
        scheme = parse_scheme(expansion)
        row = dict(preset=name, expansion=expansion, hidden=hidden, tp=tp, format_bits=None, total_bits=None,
                   note="")
        try:
            scheme.validate_for(hidden, tp)
        except SchemeError as exc:
            row["note"] = str(exc)
            rows.append(row)
            continue
        legs = scheme_bits_breakdown(scheme, hidden, tp, tokens)
        # a recipe's first leg is several messages (QuickReduce's tile padding too): its format is one message's
        row["format_bits"] = (layout(tokens, hidden, scheme.quant).bits_per_value["total"]
                              if scheme.algo in RECIPE_ALGOS else legs["leg 1"]["total"])
        row["total_bits"] = scheme_bits_per_value(scheme, hidden, tp, tokens)
        rows.append(row)
    return rows


def table_bytes(scheme: Scheme | SchemeMap | str, sites: list[tuple[int, str]], hidden: int, tp: int) -> int:
    """One-time bytes of the fitted codebook tables a run with ``scheme`` (a scheme or a map) holds
    over ``sites`` (layer, module): per ``lm`` site, the sender's table (``PayloadLayout.table_bytes``)
    for each of the tp ranks, or once when the ranks share it (``lm<B>s``). Never sent per message."""
    smap = parse_scheme_map(scheme) if isinstance(scheme, str) else scheme
    if isinstance(smap, Scheme):
        smap = SchemeMap(smap)
    total = 0
    for layer, module in sites:
        s = smap.for_site(layer, module)
        if s.is_exact:
            continue
        total += layout(1, hidden, s.quant).table_bytes * s.quant.code.tables_per_site(tp)
    return total
