"""The byte layout of one rank's message, and the exact bit accounting of it.

This module is the ONE owner of the payload layout; collectives encode/decode through it and
the Bits page reads its accounting. One contiguous uint8 tensor per rank per message::

    offset 0                                                                   total_bytes
    | scales            | mins               | codes                   | outliers          |
    | dynamic only:     | asymmetric dynamic | packed low-bit codes of | BF16 [T, k], the   |
    | [T] or [T, H/G]   | only, same shape   | the T x (H - k) non-    | kept features in   |
    | in scale_dtype    | and dtype          | outlier values, row-    | outlier_idx order  |
    |                   |                    | major, pack_bits order  |                    |

Sections are unaligned (no padding between them, so the byte count is the bit count / 8
rounded up once); readers copy a section before reinterpreting its dtype. Static scales and
mins (fp32 [H] per sending rank) and the outlier index list are fixed by calibration and held
by every receiver: they are not sent, so they cost 0 bits per value and are reported apart
as ``static_bytes``.

    PYTHONPATH=. python -c "from lowbit.payload import layout; from lowbit.scheme import parse_scheme as p; \\
        print(layout(8, 576, p('int4-static-top1/64'), 9).bits_per_value)"   # total 4.1875
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant import dequantize, pack_bits, packed_nbytes, qrange, quantize, static_qparams, unpack_bits
from lowbit.scheme import QuantSpec, Scheme

_WIRE_BYTES = {"bf16": 2, "fp32": 4}
_OUTLIER_DTYPE = torch.bfloat16
_INDEX_BYTES = 8  # receivers hold outlier indices as int64


@dataclass(frozen=True)
class Section:
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class PayloadLayout:
    """Byte offsets and sizes of one message's sections, and its bit accounting.

    bits_per_value: bits over all T*H values, split into ``payload`` (the low-bit codes, or the
    whole tensor for an exact scheme), ``outliers`` (BF16 kept features), ``scales`` (dynamic
    scales and mins), ``indices`` (0: outlier sets are static) and ``total`` (their sum).
    For a two-shot scheme this is the first leg; lay out the second with ``scheme.second``.
    """

    tokens: int
    hidden: int
    n_outliers: int
    bits: int
    scales: Section
    mins: Section
    codes: Section
    outliers: Section
    static_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.outliers.end

    @property
    def bits_per_value(self) -> dict[str, float]:
        n = self.tokens * self.hidden
        if n == 0:
            return {"payload": 0.0, "outliers": 0.0, "scales": 0.0, "indices": 0.0, "total": 0.0}
        out = {
            "payload": self.codes.nbytes * 8 / n,
            "outliers": self.outliers.nbytes * 8 / n,
            "scales": (self.scales.nbytes + self.mins.nbytes) * 8 / n,
            "indices": 0.0,
        }
        out["total"] = self.total_bytes * 8 / n
        return out


def layout(tokens: int, hidden: int, spec: Scheme | QuantSpec, n_outliers: int = 0) -> PayloadLayout:
    """The layout of one rank's message of ``tokens`` x ``hidden`` values.

    ``spec`` is a QuantSpec (the quantized leg) or a Scheme (its first leg; an exact scheme is
    one section of raw wire-dtype values). ``n_outliers`` features travel in BF16.
    """
    if isinstance(spec, Scheme) and spec.is_exact:
        nbytes = tokens * hidden * _WIRE_BYTES[spec.wire_dtype]
        empty = Section(0, 0)
        return PayloadLayout(
            tokens, hidden, 0, 8 * _WIRE_BYTES[spec.wire_dtype], empty, empty, Section(0, nbytes), Section(nbytes, 0), 0
        )
    quant = spec.quant if isinstance(spec, Scheme) else spec
    if not 0 <= n_outliers <= hidden:
        raise ValueError(f"n_outliers: {n_outliers} not allowed; allowed: 0..{hidden}")
    quant.validate_for(hidden)
    n_scales = 0
    if quant.granularity == "token":
        n_scales = tokens
    elif quant.granularity == "group":
        n_scales = tokens * (hidden // quant.group_size)
    scale_bytes = n_scales * quant.scale_dtype.itemsize
    scales = Section(0, scale_bytes)
    mins = Section(scales.end, 0 if quant.symmetric else scale_bytes)
    codes = Section(mins.end, packed_nbytes(tokens * (hidden - n_outliers), quant.bits))
    outliers = Section(codes.end, tokens * n_outliers * _OUTLIER_DTYPE.itemsize)
    static_bytes = n_outliers * _INDEX_BYTES
    if quant.granularity == "static":
        static_bytes += hidden * 4 * (1 if quant.symmetric else 2)  # fp32 scales (+ mins) per sender
    return PayloadLayout(tokens, hidden, n_outliers, quant.bits, scales, mins, codes, outliers, static_bytes)


def _keep_mask(hidden: int, outlier_idx: torch.Tensor | None, device) -> torch.Tensor | None:
    if outlier_idx is None or outlier_idx.numel() == 0:
        return None
    keep = torch.ones(hidden, dtype=torch.bool, device=device)
    keep[outlier_idx] = False
    if int((~keep).sum()) != outlier_idx.numel():
        raise ValueError("outlier_idx must not repeat a feature")
    return keep


def _as_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(payload: torch.Tensor, section: Section, dtype: torch.dtype) -> torch.Tensor:
    return payload[section.offset : section.end].clone().view(dtype)


def encode(
    x: torch.Tensor,
    quant: QuantSpec,
    outlier_idx: torch.Tensor | None = None,
    static_min: torch.Tensor | None = None,
    static_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Encode x [T, H] into one uint8 payload; stats = {clamped, nonfinite} over the whole x."""
    tokens, hidden = x.shape
    keep = _keep_mask(hidden, outlier_idx, x.device)
    n_out = 0 if keep is None else outlier_idx.numel()
    lay = layout(tokens, hidden, quant, n_out)
    res = quantize(x, quant, static_min, static_max, exclude=outlier_idx if keep is not None else None)
    codes = res.codes if keep is None else res.codes[:, keep]
    parts = []
    if quant.dynamic:
        parts.append(_as_bytes(res.scales, quant.scale_dtype))
        if not quant.symmetric:
            parts.append(_as_bytes(res.mins, quant.scale_dtype))
    parts.append(pack_bits(codes, quant.bits))
    if keep is not None:
        parts.append(_as_bytes(x[:, outlier_idx], _OUTLIER_DTYPE))
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=x.device)
    assert payload.numel() == lay.total_bytes, (payload.numel(), lay)
    nonfinite = int((~torch.isfinite(x)).sum())
    return payload, {"clamped": res.clamped, "nonfinite": nonfinite}


def decode(
    payload: torch.Tensor,
    tokens: int,
    hidden: int,
    quant: QuantSpec,
    outlier_idx: torch.Tensor | None = None,
    static_min: torch.Tensor | None = None,
    static_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 [T, H] from one payload: outlier columns from BF16, the rest dequantized."""
    keep = _keep_mask(hidden, outlier_idx, payload.device)
    n_out = 0 if keep is None else outlier_idx.numel()
    lay = layout(tokens, hidden, quant, n_out)
    if payload.numel() != lay.total_bytes:
        raise ValueError(f"payload has {payload.numel()} bytes; layout expects {lay.total_bytes}")
    if quant.dynamic:
        shape = (tokens,) if quant.granularity == "token" else (tokens, hidden // quant.group_size)
        scales = _from_bytes(payload, lay.scales, quant.scale_dtype).float().reshape(shape)
        mins = None if quant.symmetric else _from_bytes(payload, lay.mins, quant.scale_dtype).float().reshape(shape)
    else:
        if static_min is None or static_max is None:
            raise ValueError("static granularity needs static_min and static_max to decode")
        scales, mins = static_qparams(quant, static_min.to(payload.device), static_max.to(payload.device))
    flat = unpack_bits(payload[lay.codes.offset : lay.codes.end], quant.bits, tokens * (hidden - n_out))
    if keep is None:
        codes = flat.reshape(tokens, hidden)
    else:
        qmin, _ = qrange(quant.bits, quant.symmetric)
        codes = torch.full((tokens, hidden), -qmin, dtype=torch.uint8, device=payload.device)
        codes[:, keep] = flat.reshape(tokens, hidden - n_out)
    out = dequantize(codes, quant, scales, mins)
    if keep is not None:
        out[:, outlier_idx] = _from_bytes(payload, lay.outliers, _OUTLIER_DTYPE).reshape(tokens, n_out).float()
    return out
