"""The CPU production path: the torch reference restated as a few ``torch.compile`` graphs.

    PYTHONPATH=. .venv/bin/python -m bench.kernels --device cpu --tokens 8192 --hidden 576 --out /tmp/b.json

Same bytes and values as ``kernels.reference`` (the tests hold them bit-equal), several times
faster than running the reference eagerly. Why the reference is not simply compiled whole:
TorchInductor's CPU code generator turns every data-dependent index (the outlier columns, the
bit stream that crosses rows) into scalar gathers and then inlines the whole computation into
that scalar loop. So the work is cut where the indexing is irregular:

* ``quantize_pack``: graph 1 computes the dynamic scales over the full rows (outlier columns
  masked out) and the codes of every column at full width, where a group is a reshape; the
  outlier columns are then dropped by concatenating the kept runs of columns (ATen copies
  contiguous runs fast; the run bounds are host ints, never seen by a graph); graph 2 packs
  the realised code matrix as one flat stream and concatenates
  ``[scales | mins | codes | outliers]``. 3/5/6-bit codes use lowbit's bit packer eagerly.
* ``unpack_dequant_sum``: one graph unpacks every rank's stream, dequantizes, sums the ranks in
  rank order in fp32 and appends the summed outlier columns; an eager fp32 ``index_select``
  (vectorised in ATen) puts the columns back in feature order.

Tokens are a dynamic dimension (``mark_dynamic``), so one compiled graph serves every prompt
length >= 2 (1 token, the decode step, gets its own); every other size is specialised. The
first call of a (spec, hidden, outliers, tp, dtype) combination compiles for a few seconds;
the inductor cache keeps the result on disk for later processes.

The math per element is the reference's, in the same fp32 order, taken from ``lowbit.quant``
(``dynamic_qparams``, ``round_half_even``, ``qrange``). Inductor keeps IEEE division,
``nearbyint`` (round half to even) and no FMA contraction, which the tests check.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from kernels import reference as ref
from lowbit.wire.payload import Section
from lowbit.quant import dynamic_qparams, pack_bits, round_half_even, unpack_bits
from lowbit.scheme import QuantSpec

_FP32 = torch.float32
_FP32_MAX = torch.finfo(torch.float32).max

# capture_scalar_outputs: lowbit.quant.scale_constant rounds c with tensor.item(), which would
# otherwise break the graph. automatic_dynamic_shapes off: only the token dims marked dynamic
# below vary; hidden/outlier counts stay constants (cheap division by constants).
_DYNAMO_CONFIG = dict(capture_scalar_outputs=True, automatic_dynamic_shapes=False, recompile_limit=1024,
                      accumulated_recompile_limit=1 << 16)
# The config patch is process-global: ranks run as threads (lowbit's threaded fake group) would
# interleave its enter/exit and leave it patched, so compiled calls take turns.
_CONFIG_LOCK = threading.RLock()


@contextlib.contextmanager
def _compiling():
    with _CONFIG_LOCK, torch._dynamo.config.patch(**_DYNAMO_CONFIG):
        yield


def _codes_and_scales(x, keep_mask, scales_static, mins_static, quant: QuantSpec):
    """Graph 1: (codes [T, H] uint8 for every column, dynamic scale+min bytes [n] uint8).

    Works at full width so every index is affine (a group is a reshape, not a gather); the
    outlier columns get codes too, which the caller drops, and are masked out of the dynamic
    ranges as in the reference."""
    tokens, hidden = x.shape
    qmin, qmax = quant.code.qrange
    x32 = x.to(_FP32)
    x_in = torch.where(x32 != x32, 0.0, x32)  # NaN quantizes as 0.0 (x != x vectorises, isnan does not)
    if quant.granularity == "static":
        xs, s, m = x_in, scales_static, mins_static  # [H] broadcast over rows
        header = torch.empty(0, dtype=torch.uint8, device=x.device)
    else:
        valid = torch.isfinite(x32) & keep_mask
        width = hidden if quant.granularity == "token" else quant.group_size
        xs = x_in.reshape(tokens, -1, width)
        scales, mins = dynamic_qparams(xs, valid.reshape(tokens, -1, width), quant)
        parts = [scales.to(quant.scale_dtype).reshape(-1).view(torch.uint8)]
        if not quant.symmetric:
            parts.append(mins.to(quant.scale_dtype).reshape(-1).view(torch.uint8))
        header = torch.cat(parts)
        s = scales.unsqueeze(-1)
        m = None if mins is None else mins.unsqueeze(-1)
    zero_scale = s == 0
    safe_scale = torch.where(zero_scale, 1.0, s)
    shifted = xs if quant.symmetric else xs - m
    q = torch.clamp(round_half_even(shifted / safe_scale), qmin, qmax)
    q = torch.where(zero_scale, 0.0, q)
    return (q - qmin).to(torch.uint8).reshape(tokens, hidden), header


def _drop_columns(t: torch.Tensor, runs) -> torch.Tensor:
    """t[..., keep] as a concatenation of slices: ATen copies contiguous runs far faster than it
    gathers uint8 columns (host ints, so the compiled graphs never see the outlier positions)."""
    if len(runs) == 1 and runs[0] == (0, t.shape[-1]):
        return t
    return torch.cat([t[..., a:b] for a, b in runs], dim=-1)


def _pack_payload(header, codes, x_outliers, bits: int):
    """Graph 2: ``[header | packed codes | bf16 outliers]`` as one uint8 tensor.

    ``codes`` arrives realised and contiguous, so its flat view is affine and the packer reads
    ``cpb`` neighbouring codes per byte without any division by the row length."""
    flat = codes.reshape(-1)
    if bits != 8:
        cpb = 8 // bits
        flat = F.pad(flat, (0, (-flat.shape[0]) % cpb))  # unconditional: no guard on the token parity
        units = flat.reshape(-1, cpb)
        packed = units[:, 0]
        for j in range(1, cpb):
            packed = packed | (units[:, j] << (bits * j))  # disjoint bit fields: | == +
        flat = packed
    tail = x_outliers.to(torch.bfloat16).reshape(-1).view(torch.uint8)
    return torch.cat([header, flat, tail])


def _dequant_sum_kept(codes_bytes, token_ref, scales, mins, group_of_kept, scale_k, min_k, outliers,
                      quant: QuantSpec, kept: int, code_bits: int):
    """One graph: [T, K + n_out] fp32, the rank-order sums of the kept columns then the outliers.

    codes_bytes [tp, nbytes] (the code sections, ``code_bits`` per code; 8 = one code per
    byte, as 3/5/6-bit streams arrive after the eager ``unpack_bits``), token_ref [T] (carries
    the dynamic token count), scales/mins [tp, T, n_groups] fp32 or None, scale_k/min_k [tp, K] (static),
    outliers [tp, T, n_out] fp32 or None."""
    tp = codes_bytes.shape[0]
    tokens = token_ref.shape[0]
    qmin, _ = quant.code.qrange
    # One spare byte keeps the stream strictly longer than T*K codes for every T, so the slice
    # below guards on one inequality instead of specialising on whether T*K*bits fills the
    # last byte (a second graph for every other token count).
    codes_bytes = F.pad(codes_bytes, (0, 1))
    if code_bits == 8:
        codes = codes_bytes
    else:
        shifts = torch.arange(0, 8, code_bits, dtype=torch.uint8, device=codes_bytes.device)
        codes = ((codes_bytes.unsqueeze(-1) >> shifts) & (2**code_bits - 1)).reshape(tp, -1)
    q = codes[:, :tokens * kept].reshape(tp, tokens, kept).to(_FP32) + qmin
    if quant.granularity == "static":
        deq = q * scale_k.unsqueeze(1)
        if not quant.symmetric:
            deq = deq + min_k.unsqueeze(1)
    else:
        per_col = (lambda t: t) if quant.granularity == "token" else (lambda t: t[:, :, group_of_kept])
        deq = q * per_col(scales)
        if not quant.symmetric:
            deq = deq + per_col(mins)
    deq = torch.clamp(deq, -_FP32_MAX, _FP32_MAX)  # dequantize saturates (quant.dequantize)
    acc = torch.zeros(tokens, kept, dtype=_FP32, device=codes_bytes.device)
    for r in range(tp):  # rank order, as the reference and the collectives sum
        acc = acc + deq[r]
    if outliers is None:
        return acc
    acc_out = torch.zeros(tokens, outliers.shape[2], dtype=_FP32, device=codes_bytes.device)
    for r in range(tp):
        acc_out = acc_out + outliers[r]
    return torch.cat([acc, acc_out], dim=1)


_compiled: dict[str, object] = {}


def _graph(name: str):
    if name not in _compiled:
        fn = {"codes": _codes_and_scales, "pack": _pack_payload, "dequant": _dequant_sum_kept}[name]
        _compiled[name] = torch.compile(fn, fullgraph=True, dynamic=None)
    return _compiled[name]


def _dynamic_tokens(*tensors_and_dims):
    """Mark the token dims dynamic when there are >= 2 tokens (1 is a specialised size anyway)."""
    for t, dim in tensors_and_dims:
        if t is not None and t.shape[dim] >= 2:
            torch._dynamo.mark_dynamic(t, dim)


def quantize_pack(x, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None) -> torch.Tensor:
    """One rank's payload; the bytes of ``reference.quantize_pack_ref``."""
    feats, gk, scales, mins, lay = ref.prepare_quantize(x, quant, outlier_idx, static_min, static_max)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    x = x.contiguous()  # one copy for strided input instead of a graph per stride pattern
    x_out = x.index_select(1, feats.outliers)
    keep_mask = feats.colmap >= 0
    _dynamic_tokens((x, 0), (x_out, 0))
    with _compiling():
        codes, header = _graph("codes")(x, keep_mask, scales, mins, quant)
        codes = _drop_columns(codes, feats.kept_runs)
        if quant.bits in ref.WHOLE_BYTE_BITS:
            _dynamic_tokens((header, 0), (codes, 0), (x_out, 0))
            payload = _graph("pack")(header, codes, x_out, quant.bits)
        else:  # 3/5/6-bit codes straddle bytes: lowbit's bit packer, eagerly
            tail = x_out.to(torch.bfloat16).reshape(-1).view(torch.uint8)
            payload = torch.cat([header, pack_bits(codes, quant.bits), tail])
    assert payload.numel() == lay.total_bytes, (payload.numel(), lay)
    return payload


def _section_f32(payloads: torch.Tensor, sec: Section, dtype: torch.dtype, shape) -> torch.Tensor:
    return ref._fresh(payloads[:, sec.offset:sec.end]).view(dtype).to(_FP32).reshape(shape)


def unpack_dequant_sum(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx=None,
                       static_mins=None, static_maxs=None, out_dtype=torch.float32) -> torch.Tensor:
    """[T, H] in ``out_dtype``; the values of ``reference.unpack_dequant_sum_ref``."""
    feats, gk, scales, mins, lay = ref.prepare_unpack(payloads, tokens, hidden, quant, outlier_idx,
                                                      static_mins, static_maxs)
    ref.check_out_dtype(out_dtype)
    tp, n_out = payloads.shape[0], feats.n_outliers
    if tokens == 0:
        return torch.empty(0, hidden, dtype=out_dtype, device=payloads.device)
    kept = hidden - n_out
    sc = mn = None
    if quant.dynamic:
        n_groups = 1 if quant.granularity == "token" else hidden // quant.group_size
        sc = _section_f32(payloads, lay.scales, quant.scale_dtype, (tp, tokens, n_groups))
        if not quant.symmetric:
            mn = _section_f32(payloads, lay.mins, quant.scale_dtype, (tp, tokens, n_groups))
    outl = _section_f32(payloads, lay.outliers, torch.bfloat16, (tp, tokens, n_out)) if n_out else None
    codes = payloads[:, lay.codes.offset:lay.codes.end]
    code_bits = quant.bits
    if code_bits not in ref.WHOLE_BYTE_BITS:  # straddling codes: lowbit's unpacker, eagerly
        codes = torch.stack([unpack_bits(codes[r], code_bits, tokens * kept) for r in range(tp)])
        code_bits = 8
    token_ref = torch.empty(tokens, dtype=torch.uint8, device=payloads.device)
    scale_k = scales[:, feats.keep].contiguous()
    min_k = mins[:, feats.keep].contiguous()
    _dynamic_tokens((codes, 1), (token_ref, 0), (sc, 1), (mn, 1), (outl, 1))
    with _compiling():
        sums = _graph("dequant")(codes, token_ref, sc, mn, gk, scale_k, min_k, outl, quant, kept, code_bits)
    if n_out:
        sums = sums.index_select(1, ref.inverse_order(feats))
    return sums.to(out_dtype)


def unpack_dequant_sum_requant(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx,
                               static_mins, static_maxs, second: QuantSpec) -> torch.Tensor:
    """Two-shot leg 1 -> leg 2; the bytes of ``reference.unpack_dequant_sum_requant_ref``."""
    ref.check_second(second)
    reduced = unpack_dequant_sum(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs)
    return quantize_pack(reduced, second, outlier_idx)
