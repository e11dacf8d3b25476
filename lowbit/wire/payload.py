"""The byte layout of one rank's message, and the exact bit accounting of it.

This module is the ONE owner of the payload layout; collectives encode/decode through it and
the Bits page reads its accounting. One contiguous uint8 tensor per rank per message::

    offset 0                                                                          total_bytes
    | scales       | mins          | codes              | outliers          | thr index | sparse    | sparse   |
    | dynamic only:| asymmetric    | packed low-bit     | BF16 [T, k]: the  | thr only: | index     | values   |
    | [T] or       | dynamic only, | codes, row-major,  | kept features in  | C uint16, | sp only:  | sp only: |
    | [T, H/G] in  | same shape    | pack_bits order:   | outlier_idx order;| ascending,| [T, n]    | [T, n]   |
    | scale_dtype  | and dtype     | T x (H - k) values | thr: [T, C], the  | unused =  | uint16    | BF16     |
    |              |               | (thr, sp: T x H)   | columns of the    | 0xFFFF    |           |          |
    |              |               |                    | thr index order   |           |           |          |

The scales section holds ``scale_dtype`` values (``-s<fmt>``: fp32 4 bytes, bf16/fp16 2, e8m0/e4m3
1 each); with e4m3 scales it starts with the message's fp32 second-level scale (4 bytes, NVFP4
style, ``lowbit.quant``). fp codes are their format's bit patterns in the codes section (fp4: 2
per byte, low nibble first; fp6: 4 per 3 bytes).

Sections are unaligned (no padding between them, so the byte count is the bit count / 8
rounded up once); readers copy a section before reinterpreting its dtype. uint16 indices are
little-endian. Static scales and mins (fp32 [H] per sending rank), the static outlier index
list and the channel permutation (``-perm``: H uint16) are fixed by calibration and held by
every receiver: they are not sent, so they cost 0 bits per value and are reported apart as
``static_bytes``. A fitted codebook (``lm<B>[s]``) is the same kind of cost, but once per run
rather than per site's message: each sender's table is 2**B fp32 entries (``table_bytes``, kept
apart from ``static_bytes``; ``lowbit.wire.accounting.table_bytes`` sums it over sites and ranks).

The per-message outliers (the neighbouring-work schemes; see ``lowbit.scheme``):

- ``sp<n>`` (sparse values): per token the ``n`` values of largest |x| (NaN ranks above +Inf,
  which ranks above every finite value; equal magnitudes: lower column first) are taken out:
  their (column, BF16 value) pairs travel in the two sparse sections, their positions are
  zeroed before quantizing (so they widen no dynamic scale and count as no clamp), and the
  receiver overwrites the dequantized value there with the BF16 value. A NaN or Inf therefore
  travels as itself in one pair and touches nothing else.
- ``thr<T>c<K>`` (dynamic threshold): a feature is selected when its largest |x| over the
  message's tokens exceeds T (a NaN or Inf counts as exceeding); at most C = floor(K * H)
  go, the largest first (equal scores: lower column first). The message size is fixed: C index
  slots (unused ones 0xFFFF), C BF16 columns (unused ones zero), codes for all H features (the
  selected ones hold the zero code and take no part in dynamic ranges or clamp counts).
  Features beyond the capacity are quantized as usual and counted in ``thr_overflow``.

    PYTHONPATH=. python -c "from lowbit.wire.payload import layout; from lowbit.scheme import parse_scheme as p; \\
        print(layout(8, 576, p('int4-static-top1/64'), 9).bits_per_value)"   # total 4.1875
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant import dequantize, pack_bits, quantize, static_qparams, unpack_bits
from lowbit.outliers import sparse_picks, threshold_select
from lowbit.scheme import WIRE_DTYPES, QuantSpec, Scheme

OUTLIER_DTYPE = torch.bfloat16  # the one declaration of the BF16 outlier dtype (static, sp, thr, rotated tail)
BIT_PARTS = ("payload", "outliers", "scales", "indices")  # the keys of bits_per_value, besides "total"
_INDEX_BYTES = 8  # receivers hold outlier indices as int64
_U16_BYTES = 2  # sp/thr indices on the wire; also the static bytes of one -perm entry
UNUSED_SLOT = 0xFFFF  # a thr index slot that carries no feature


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
    whole tensor for an exact scheme), ``outliers`` (BF16 values: kept features, thr columns,
    sparse values), ``scales`` (dynamic scales and mins), ``indices`` (the thr index list and
    the sparse column indices; 0 for the static outlier sets) and ``total`` (their sum).
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
    thr_index: Section | None = None
    sparse_index: Section | None = None
    sparse_values: Section | None = None
    sparse: int = 0
    capacity: int = 0
    table_bytes: int = 0  # lm codes: the sender's fitted table (2**B fp32), held by receivers, never sent per message

    @property
    def total_bytes(self) -> int:
        return max(s.end for s in self._sections())

    def _sections(self) -> list[Section]:
        return [s for s in (self.scales, self.mins, self.codes, self.outliers, self.thr_index,
                            self.sparse_index, self.sparse_values) if s is not None]

    @property
    def index_bytes(self) -> int:
        return sum(s.nbytes for s in (self.thr_index, self.sparse_index) if s is not None)

    @property
    def bits_per_value(self) -> dict[str, float]:
        n = self.tokens * self.hidden
        if n == 0:
            return dict.fromkeys((*BIT_PARTS, "total"), 0.0)
        values = self.outliers.nbytes + (self.sparse_values.nbytes if self.sparse_values is not None else 0)
        out = {
            "payload": self.codes.nbytes * 8 / n,
            "outliers": values * 8 / n,
            "scales": (self.scales.nbytes + self.mins.nbytes) * 8 / n,
            "indices": self.index_bytes * 8 / n,
        }
        out["total"] = self.total_bytes * 8 / n
        return out


def layout(tokens: int, hidden: int, spec: Scheme | QuantSpec, n_outliers: int = 0, *, sparse: int = 0,
           capacity: int = 0, permuted: bool = False, coded_outliers: bool = False) -> PayloadLayout:
    """The layout of one rank's message of ``tokens`` x ``hidden`` values.

    ``spec`` is a QuantSpec (the quantized leg) or a Scheme (its first leg; an exact scheme is
    one section of raw wire-dtype values). ``n_outliers`` features travel in BF16 at static
    indices; ``sparse`` values per token as (index, BF16) pairs; ``capacity`` thr slots
    (see the module docstring). ``permuted`` adds the -perm permutation to ``static_bytes``.
    ``coded_outliers``: the BF16 features are coded as well (a rotated message: all H rotated
    features are coded, the outlier columns follow as a BF16 tail: ``append_outlier_columns``).
    Each part of the spec contributes its own sections (the grouping the number of scales, the
    scale format their bytes, the code its packed bytes and its table).
    """
    if isinstance(spec, Scheme) and spec.is_exact:
        itemsize = WIRE_DTYPES[spec.wire_dtype].itemsize
        nbytes = tokens * hidden * itemsize
        empty = Section(0, 0)
        return PayloadLayout(tokens, hidden, 0, 8 * itemsize, empty, empty, Section(0, nbytes), Section(nbytes, 0), 0)
    quant = spec.quant if isinstance(spec, Scheme) else spec
    if not 0 <= n_outliers <= hidden:
        raise ValueError(f"n_outliers: {n_outliers} not allowed; allowed: 0..{hidden}")
    if (n_outliers > 0) + (sparse > 0) + (capacity > 0) > 1:
        raise ValueError("n_outliers, sparse, capacity: at most one of them may be nonzero")
    if not 0 <= sparse <= hidden or not 0 <= capacity <= hidden:
        raise ValueError(f"sparse {sparse}, capacity {capacity}: allowed 0..{hidden}")
    quant.validate_for(hidden)
    n_scales = quant.grouping.n_scales(tokens, hidden)  # each part contributes its own sections
    scales = Section(0, quant.scale.section_bytes(n_scales))
    mins = Section(scales.end, 0 if quant.symmetric else quant.scale.mins_bytes(n_scales))
    coded = tokens * (hidden - (0 if coded_outliers else n_outliers)) + quant.grouping.padding(tokens, hidden)
    codes = Section(mins.end, quant.code.code_bytes(coded))
    outliers = Section(codes.end, tokens * (n_outliers + capacity) * OUTLIER_DTYPE.itemsize)
    thr_index = Section(outliers.end, capacity * _U16_BYTES)
    sparse_index = Section(thr_index.end, tokens * sparse * _U16_BYTES)
    sparse_values = Section(sparse_index.end, tokens * sparse * OUTLIER_DTYPE.itemsize)
    static_bytes = (n_outliers * _INDEX_BYTES + (hidden * _U16_BYTES if permuted else 0)
                    + quant.grouping.static_bytes(hidden, quant.symmetric))
    return PayloadLayout(tokens, hidden, n_outliers, quant.bits, scales, mins, codes, outliers, static_bytes,
                         thr_index, sparse_index, sparse_values, sparse, capacity, quant.code.table_bytes)


def scheme_layout(scheme: Scheme, tokens: int, width: int, n_outliers: int = 0) -> PayloadLayout:
    """The first-leg layout of one message of ``width`` features under ``scheme`` (a whole
    partial for gather, one chunk for two-shot): sparse count, thr capacity and the rotated BF16
    tail from the scheme."""
    if scheme.is_exact:
        return layout(tokens, width, scheme)
    capacity = scheme.threshold.capacity(width) if scheme.threshold is not None else 0
    return layout(tokens, width, scheme.quant, n_outliers, sparse=scheme.sparse, capacity=capacity,
                  permuted=scheme.permute, coded_outliers=scheme.rotation is not None)


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


def _u16_bytes(idx: torch.Tensor) -> torch.Tensor:
    """Little-endian uint16 bytes of non-negative int indices (< 65536)."""
    idx = idx.reshape(-1).to(torch.int64)
    return torch.stack([idx & 0xFF, idx >> 8], -1).reshape(-1).to(torch.uint8)


def _u16_from(payload: torch.Tensor, section: Section) -> torch.Tensor:
    b = payload[section.offset : section.end].to(torch.int64).reshape(-1, 2)
    return b[:, 0] | (b[:, 1] << 8)


def encode(
    x: torch.Tensor,
    quant: QuantSpec,
    outlier_idx: torch.Tensor | None = None,
    static_min: torch.Tensor | None = None,
    static_max: torch.Tensor | None = None,
    *,
    sparse: int = 0,
    threshold: float | None = None,
    capacity: int = 0,
    seed: int = 0,
    levels=None,
    header: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Encode x [T, H] into one uint8 payload; stats = {clamped, nonfinite} over the whole x,
    plus ``thr_selected`` / ``thr_overflow`` when ``capacity`` is set (thr) and ``sparse`` the
    pairs sent when ``sparse`` is set (sp). ``seed``, ``levels`` and ``header`` are this call's
    stochastic rounding seed, fitted table and fixed message header (``lowbit.quant.quantize``)."""
    tokens, hidden = x.shape
    keep = _keep_mask(hidden, outlier_idx, x.device)
    n_out = 0 if keep is None else outlier_idx.numel()
    lay = layout(tokens, hidden, quant, n_out, sparse=sparse, capacity=capacity)
    extra_stats = {}
    exclude = outlier_idx if keep is not None else None
    xq = x
    chosen = picks = None
    if capacity:
        if threshold is None:
            raise ValueError("capacity needs a threshold")
        chosen, overflow = threshold_select(x.float(), threshold, capacity)
        exclude = chosen if chosen.numel() else None
        extra_stats = {"thr_selected": int(chosen.numel()), "thr_overflow": overflow}
    if sparse:
        picks = sparse_picks(x.float(), sparse)
        xq = x.float().scatter(1, picks, 0.0)
        extra_stats = {"sparse": tokens * sparse}
    res = quantize(xq, quant, static_min, static_max, exclude=exclude, seed=seed, levels=levels, header=header)
    codes = res.codes if keep is None else res.codes[:, keep]
    parts = []
    if quant.dynamic:
        parts += quant.scale.write(res.scales, res.wire_scales, res.message_scale, quant)
        if not quant.symmetric:
            parts.append(_as_bytes(res.mins, quant.scale_dtype))
    pad = quant.grouping.padding(tokens, hidden)  # a padded last group's codes travel too (the zero code)
    if pad:
        codes = torch.cat([codes.reshape(-1), torch.full((pad,), quant.code.zero_code, dtype=torch.uint8,
                                                         device=codes.device)])
    parts.append(pack_bits(codes, quant.bits))
    if keep is not None:
        parts.append(_as_bytes(x[:, outlier_idx], OUTLIER_DTYPE))
    if capacity:
        cols = torch.zeros(tokens, capacity, dtype=OUTLIER_DTYPE, device=x.device)
        cols[:, :chosen.numel()] = x[:, chosen].to(OUTLIER_DTYPE)
        slots = torch.full((capacity,), UNUSED_SLOT, dtype=torch.int64, device=x.device)
        slots[:chosen.numel()] = chosen
        parts += [_as_bytes(cols, OUTLIER_DTYPE), _u16_bytes(slots)]
    if sparse:
        parts += [_u16_bytes(picks), _as_bytes(x.gather(1, picks), OUTLIER_DTYPE)]
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=x.device)
    assert payload.numel() == lay.total_bytes, (payload.numel(), lay)
    nonfinite = int((~torch.isfinite(x)).sum())
    return payload, {"clamped": res.clamped, "nonfinite": nonfinite, **extra_stats}


def decode(
    payload: torch.Tensor,
    tokens: int,
    hidden: int,
    quant: QuantSpec,
    outlier_idx: torch.Tensor | None = None,
    static_min: torch.Tensor | None = None,
    static_max: torch.Tensor | None = None,
    *,
    sparse: int = 0,
    capacity: int = 0,
    levels=None,
) -> torch.Tensor:
    """fp32 [T, H] from one payload: outlier / thr columns and sparse values from BF16, the rest
    dequantized. ``sparse``, ``capacity`` and ``levels`` (the sender's fitted table) must be the
    encoder's."""
    keep = _keep_mask(hidden, outlier_idx, payload.device)
    n_out = 0 if keep is None else outlier_idx.numel()
    lay = layout(tokens, hidden, quant, n_out, sparse=sparse, capacity=capacity)
    codes, scales, mins = _codes_and_scales(payload, lay, tokens, hidden, quant, keep, static_min, static_max)
    out = dequantize(codes, quant, scales, mins, levels=levels)
    if keep is not None:
        out[:, outlier_idx] = _from_bytes(payload, lay.outliers, OUTLIER_DTYPE).reshape(tokens, n_out).float()
    if capacity:
        slots = _u16_from(payload, lay.thr_index)
        used = slots != UNUSED_SLOT
        if (slots[used] >= hidden).any():
            raise ValueError(f"thr index list names a feature >= hidden size {hidden}")
        cols = _from_bytes(payload, lay.outliers, OUTLIER_DTYPE).reshape(tokens, capacity).float()
        out[:, slots[used]] = cols[:, used]
    if sparse:
        picks = _u16_from(payload, lay.sparse_index).reshape(tokens, sparse)
        if (picks >= hidden).any():
            raise ValueError(f"sparse index names a column >= hidden size {hidden}")
        values = _from_bytes(payload, lay.sparse_values, OUTLIER_DTYPE).reshape(tokens, sparse).float()
        out.scatter_(1, picks, values)
    return out


def _codes_and_scales(payload: torch.Tensor, lay: PayloadLayout, tokens: int, hidden: int, quant: QuantSpec,
                      keep: torch.Tensor | None, static_min, static_max):
    """(uint8 codes [T, H] with the zero code at BF16 features, fp32 scales as the receiver uses
    them, mins or None) of one payload laid out as ``lay``."""
    if payload.numel() != lay.total_bytes:
        raise ValueError(f"payload has {payload.numel()} bytes; layout expects {lay.total_bytes}")
    if quant.dynamic:
        shape = quant.grouping.scale_shape(tokens, hidden)
        scales = quant.scale.read(payload[lay.scales.offset:lay.scales.end], shape, quant)
        mins = None if quant.symmetric else _from_bytes(payload, lay.mins, quant.scale_dtype).float().reshape(shape)
    else:
        if static_min is None or static_max is None:
            raise ValueError("static granularity needs static_min and static_max to decode")
        scales, mins = static_qparams(quant, static_min.to(payload.device), static_max.to(payload.device))
    n_out = 0 if keep is None else hidden - int(keep.sum())
    flat = unpack_bits(payload[lay.codes.offset : lay.codes.end], quant.bits, tokens * (hidden - n_out))
    if keep is None:
        return flat.reshape(tokens, hidden), scales, mins
    codes = torch.full((tokens, hidden), quant.code.zero_code, dtype=torch.uint8, device=payload.device)
    codes[:, keep] = flat.reshape(tokens, hidden - n_out)
    return codes, scales, mins


def decode_terms(payload: torch.Tensor, tokens: int, hidden: int, quant: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(the code values q, the scale of each value), fp32 [T, H], of one dynamic payload without
    BF16 features: the two factors a kernel that fuses its decode into an FMA multiplies
    (FlashInfer's leg-1 sum, ``lowbit.comm.recipes``)."""
    codes, scales, _ = _codes_and_scales(payload, layout(tokens, hidden, quant), tokens, hidden, quant, None, None, None)
    return quant.code.decode(codes), quant.grouping.expand(scales.to(torch.float32), codes.shape)


# -- the rotated message's tail -------------------------------------------------------------------
# With ``-rot<R>`` and BF16 outliers the message is the payload of all H rotated features (no
# outlier section) followed by the outlier columns [T, k] in OUTLIER_DTYPE, cut out in the
# original space (``lowbit.comm.collectives``): ``layout(..., coded_outliers=True)`` lays it out.
def append_outlier_columns(payload: torch.Tensor, x: torch.Tensor, outlier_idx: torch.Tensor) -> torch.Tensor:
    """``payload`` followed by the columns ``outlier_idx`` of ``x`` [T, H] as BF16 bytes."""
    if outlier_idx.numel() == 0:
        return payload
    return torch.cat([payload, _as_bytes(x[:, outlier_idx], OUTLIER_DTYPE)])


def outlier_tail_sum(gathered: torch.Tensor, n_codes: int, tokens: int, k: int) -> torch.Tensor:
    """fp32 sum over ranks (rows of ``gathered``, in rank order) of the [T, k] BF16 tails that
    ``append_outlier_columns`` put after ``n_codes`` payload bytes."""
    out = torch.zeros(tokens, k, dtype=torch.float32, device=gathered.device)
    for r in range(gathered.shape[0]):
        out += gathered[r, n_codes:].clone().view(OUTLIER_DTYPE).reshape(tokens, k).float()
    return out
