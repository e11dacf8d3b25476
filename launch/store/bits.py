"""Bits and bytes for the Bits page and the Overview's traffic table: rows drawn from
``lowbit.wire.accounting`` (the only formulas), per site of a scheme map and per token of a model."""
from __future__ import annotations

import pandas as pd

from lowbit.scheme import parse_scheme_map
from lowbit.site import ROW_PARALLEL_MODULES
from lowbit.wire.accounting import bits_rows, site_traffic
from lowbit.wire.payload import BIT_PARTS

SCHEME_PARTS = BIT_PARTS
DEFAULT_TOKENS = 1024  # message length for layout-based accounting; bits/value barely depend on it


def bits_parts(scheme_text: str, hidden: int, tp: int, tokens: int = DEFAULT_TOKENS) -> pd.DataFrame:
    """The default scheme's bits per value by leg and part (payload, outliers, scales, indices)."""
    smap = parse_scheme_map(scheme_text)
    smap.validate_for(hidden, tp)
    rows = [dict(scheme=scheme_text, **r) for r in bits_rows(smap.default, hidden, tp, tokens)]
    return pd.DataFrame(rows, columns=["scheme", "leg", "part", "bits"])


def bits_per_site(scheme_text: str, hidden: int, layers: int, tp: int, tokens: int = DEFAULT_TOKENS) -> pd.DataFrame:
    """Bits per value at every (layer, module) of a scheme map (per-layer overrides differ)."""
    smap = parse_scheme_map(scheme_text)
    smap.validate_for(hidden, tp)
    cache: dict[str, list[dict]] = {}
    rows = []
    for layer in range(layers):
        for module in ROW_PARALLEL_MODULES:
            s = smap.for_site(layer, module)
            if str(s) not in cache:
                cache[str(s)] = bits_rows(s, hidden, tp, tokens)
            rows += [dict(layer=layer, module=module, scheme=str(s), **r) for r in cache[str(s)]]
    return pd.DataFrame(rows, columns=["layer", "module", "scheme", "leg", "part", "bits"])


def traffic_per_token(scheme_text: str, hidden: int, layers: int, tp: int, tokens: int = DEFAULT_TOKENS) -> dict:
    """Bytes per token: each rank's message (its partial, encoded) summed over the 2 sites of a
    layer and over all layers, and the bytes each rank sends with the scheme's collective
    (``lowbit.wire.accounting.site_traffic``: ring all-reduce, all-gather, or two-shot)."""
    smap = parse_scheme_map(scheme_text)
    smap.validate_for(hidden, tp)
    message = sent = bits = 0.0
    for layer in range(layers):
        for module in ROW_PARALLEL_MODULES:
            t = site_traffic(smap.for_site(layer, module), hidden, tp, tokens)
            message += t["message_bytes"] / tokens
            sent += t["sent_bytes"] / tokens
            bits += t["bits_per_value"]
    sites = layers * len(ROW_PARALLEL_MODULES)
    return dict(scheme=scheme_text, bits_per_value=bits / sites if sites else 0.0,
                message_bytes_per_layer=message / max(1, layers), message_bytes=message,
                sent_bytes_per_layer=sent / max(1, layers), sent_bytes=sent)
