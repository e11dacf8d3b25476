# Size: ~450 lines: three kernels and their host wrappers share one packing scheme.
"""Triton kernels for the quantized all-reduce: quantize+pack before sending, unpack+dequantize+sum
after receiving, and the two-shot requantization. Held byte-equal to ``kernels.reference``.

    TRITON_INTERPRET=1 PYTHONPATH=. python -c "import torch; from kernels import triton_quant as k; \\
        from lowbit.scheme import QuantSpec; print(k.quantize_pack(torch.randn(7, 200), QuantSpec(4, True, 'token')))"

Import this module only through ``kernels.dispatch`` (or with ``TRITON_INTERPRET=1`` already set
for the interpreter): Triton decides at decoration time whether a kernel is compiled or
interpreted.

What each kernel does (one payload per rank, layout owned by ``lowbit.wire.payload``)::

    | scales (dynamic) | mins (asym dynamic) | codes: T x K packed, row-major | bf16 outliers T x k |

``_quantize_pack_kernel`` -- one program per ``ROWS`` tokens, three phases:
  A. (dynamic scales) the program's rows are loaded as one [rows, n_groups, group] tile (a
     token scale is one group of width H), outlier columns and non-finite values masked out, the range reduced,
     the scale (and min) rounded toward +inf (-inf) to the scale dtype exactly as
     ``lowbit.quant.dynamic_qparams``, and stored into the payload's scale section.
  B. the program writes the code bytes whose first code lies in its rows. A byte holds
     ``8 // bits`` codes of the flat kept-column stream, so where ``K * bits`` is not a multiple
     of 8 the last byte also holds the first codes of the next row: phase A therefore also
     computes the scales of that one extra row (same values as its owner writes). Each code
     is ``x[t, keep[k]]`` (a gather that hits the cache lines phase A just read), scaled,
     rounded half to even, clamped and shifted into its byte.
  C. the outlier columns are rounded to bf16 (round to nearest even, NaN as torch writes it on
     this device) and stored byte by byte (the section is unaligned).
``_dequant_sum_kernel`` -- one program per [BLOCK_T, BLOCK_H] output tile: for every rank in
  rank order, fetch each column's code (or bf16 outlier), dequantize with that rank's static
  scale or the scale in its payload, saturate to finite fp32, add into an fp32 accumulator
  that starts at 0, then write the output dtype.
Two-shot requantization: ``_dequant_sum_kernel`` into an fp32 chunk, then
``_quantize_pack_kernel`` with the second leg's dynamic spec.

Bit widths: 2, 4 and 8 (a byte holds whole codes; ``kernels.registry``). 3, 5 and 6-bit codes
straddle bytes; they stay on the torch path (``kernels.dispatch`` asks the registry) and these
wrappers raise.

Status: verified byte-equal under the Triton interpreter only; no GPU was available when they
were written, so compiled-mode runs and the GB/s targets (``bench.kernels``) are still to do.

Rounding identical to the reference: IEEE division (``div_rn``), round half to even written
with ``floor`` (no libdevice, so it runs in the interpreter), no FMA contraction
(``enable_fp_fusion=False`` on GPUs: quant.py's ``q * scale + lo`` is two roundings).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from kernels import reference as ref
from kernels import registry
from lowbit.scheme import QuantSpec

_FP32 = torch.float32
_GRAN = {"static": 0, "token": 1, "group": 2}
_INF = tl.constexpr(float("inf"))


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _round_half_even(v):
    """torch.round for |v| < 2**23 (callers clamp to the code range first)."""
    r = tl.floor(v)
    d = v - r  # exact: v and floor(v) share the exponent range
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _round_toward_bf16(t, UP: tl.constexpr):
    """lowbit.scales.formats.BF16().round(t, up): bf16 rounding toward +inf (UP) or -inf,
    never to inf, as fp32; zero (either sign) stays as it is."""
    mag = (tl.abs(t).to(tl.int32, bitcast=True)).to(tl.int64)
    if UP:
        away = t > 0.0
    else:
        away = t < 0.0
    mag = tl.where(away, (mag + 0xFFFF) & 0x7FFF0000, mag & 0x7FFF0000)
    mag = tl.minimum(mag, 0x7F7F0000)
    out = mag.to(tl.int32).to(tl.float32, bitcast=True)
    out = tl.where(t < 0.0, -out, out)
    return tl.where(t == 0.0, t, out)


@triton.jit
def _scale_round(t, UP: tl.constexpr, SCALE_BYTES: tl.constexpr):
    if SCALE_BYTES == 2:
        return _round_toward_bf16(t, UP)
    return t


@triton.jit
def _bf16_bits(v, NAN_BITS: tl.constexpr):
    """fp32 -> bf16 bit pattern (int32 in 0..65535), round to nearest even like torch."""
    u = v.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where(v != v, NAN_BITS, r).to(tl.int32)


@triton.jit
def _store_scalar_bytes(ptr, bits, mask, NBYTES: tl.constexpr):
    """Store the low NBYTES bytes of int64 ``bits`` little-endian at ``ptr`` (unaligned-safe)."""
    for b in tl.static_range(NBYTES):
        tl.store(ptr + b, ((bits >> (8 * b)) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _load_f32_bytes(ptr, mask, NBYTES: tl.constexpr):
    """fp32 from NBYTES little-endian bytes: 2 = bf16 (upper half of fp32), 4 = fp32."""
    bits = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    for b in tl.static_range(1, NBYTES):
        bits = bits | (tl.load(ptr + b, mask=mask, other=0).to(tl.int32) << (8 * b))
    if NBYTES == 2:
        bits = bits << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_x(x_ptr, t, col, stride_t, stride_h, mask, IN_BF16: tl.constexpr):
    ptrs = x_ptr + t.to(tl.int64) * stride_t + col.to(tl.int64) * stride_h
    if IN_BF16:  # bits of bf16, widened exactly (keeps the outlier copy bit-exact)
        raw = tl.load(ptrs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (raw << 16).to(tl.float32, bitcast=True)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_scales(x_ptr, stride_t, stride_h, colmap_ptr, pay_ptr, mins_off, c, t_first, t_stop,
                G: tl.constexpr, NG: tl.constexpr, NG_PAD: tl.constexpr, G_PAD: tl.constexpr,
                NROWS: tl.constexpr, SYMMETRIC: tl.constexpr, SCALE_BYTES: tl.constexpr, IN_BF16: tl.constexpr):
    """Dynamic scales (and mins) of rows [t_first, t_stop) (at most NROWS), loaded as an
    [NROWS, n_groups, group] tile, stored into the payload header as lowbit.quant rounds them."""
    t = t_first + tl.arange(0, NROWS)[:, None, None]
    g = tl.arange(0, NG_PAD)[None, :, None]
    j = tl.arange(0, G_PAD)[None, None, :]
    col = g * G + j
    in_row = (t < t_stop) & (g < NG) & (j < G)
    kept_col = tl.load(colmap_ptr + col, mask=(g < NG) & (j < G), other=-1) >= 0
    xv = _load_x(x_ptr, t, col, stride_t, stride_h, in_row, IN_BF16)
    valid = in_row & kept_col & (tl.abs(xv) < _INF)  # finite and kept: NaN fails too
    if SYMMETRIC:
        absmax = tl.max(tl.where(valid, tl.abs(xv), 0.0), axis=2)
        scale = _scale_round(absmax * c, True, SCALE_BYTES)
    else:
        any_valid = tl.max(valid.to(tl.int32), axis=2) > 0
        lo = tl.min(tl.where(valid, xv, _INF), axis=2)
        hi = tl.max(tl.where(valid, xv, -_INF), axis=2)
        lo = tl.where(any_valid, lo, 0.0)
        hi = tl.where(any_valid, hi, 0.0)
        lo = _scale_round(lo, False, SCALE_BYTES)
        scale = _scale_round(hi * c - lo * c, True, SCALE_BYTES)
    t2 = t_first + tl.arange(0, NROWS)[:, None]
    g2 = tl.arange(0, NG_PAD)[None, :]
    smask = (t2 < t_stop) & (g2 < NG)
    sidx = t2 * NG + g2
    shift: tl.constexpr = 16 if SCALE_BYTES == 2 else 0
    sbits = scale.to(tl.int32, bitcast=True).to(tl.int64) >> shift
    _store_scalar_bytes(pay_ptr + sidx * SCALE_BYTES, sbits, smask, SCALE_BYTES)
    if not SYMMETRIC:
        mbits = lo.to(tl.int32, bitcast=True).to(tl.int64) >> shift
        _store_scalar_bytes(pay_ptr + mins_off + sidx * SCALE_BYTES, mbits, smask, SCALE_BYTES)


# ---------------------------------------------------------------------------------------------
# quantize + pack
# ---------------------------------------------------------------------------------------------

# Token-dependent sizes and offsets are not specialised (a new variant per token count % 16).
@triton.jit(do_not_specialize=["T", "mins_off", "codes_off", "outl_off", "total_codes_bytes"])
def _quantize_pack_kernel(
    x_ptr, stride_t, stride_h, colmap_ptr, keep_ptr, outl_ptr, sscale_ptr, smin_ptr, pay_ptr,
    T, H, K, N_OUT, mins_off, codes_off, outl_off, total_codes_bytes, c,
    BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr,
    GRAN: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, NG_PAD: tl.constexpr, G_PAD: tl.constexpr,
    SCALE_BYTES: tl.constexpr, ROWS: tl.constexpr, HALO: tl.constexpr, BLOCK_B: tl.constexpr,
    OUT_PAD: tl.constexpr, IN_BF16: tl.constexpr, NAN_BITS: tl.constexpr,
):
    CPB: tl.constexpr = 8 // BITS
    pid = tl.program_id(0)
    t0 = pid * ROWS
    t1 = tl.minimum(t0 + ROWS, T)

    # Phase A: dynamic scales of rows [t0, t1) (+ one halo row), into the payload's header.
    if GRAN != 0:
        _row_scales(x_ptr, stride_t, stride_h, colmap_ptr, pay_ptr, mins_off, c, t0, t1,
                    G, NG, NG_PAD, G_PAD, ROWS, SYMMETRIC, SCALE_BYTES, IN_BF16)
        if HALO:
            if t1 < T:
                _row_scales(x_ptr, stride_t, stride_h, colmap_ptr, pay_ptr, mins_off, c, t1, t1 + 1,
                            G, NG, NG_PAD, G_PAD, 1, SYMMETRIC, SCALE_BYTES, IN_BF16)
        tl.debug_barrier()  # phase B reads these scales back (this program's own writes)

    # Phase B: code bytes whose first code lies in rows [t0, t1).
    b_start = (t0 * K + CPB - 1) // CPB
    b_stop = tl.minimum((t1 * K + CPB - 1) // CPB, total_codes_bytes)
    slot = tl.arange(0, CPB)[None, :]
    n_codes = T * K
    for b0 in range(b_start, b_stop, BLOCK_B):
        byte = b0 + tl.arange(0, BLOCK_B)[:, None]
        i = byte * CPB + slot
        ok = (byte < b_stop) & (i < n_codes)
        t = i // K
        k = i - t * K
        col = tl.load(keep_ptr + k, mask=ok, other=0)
        xv = _load_x(x_ptr, t, col, stride_t, stride_h, ok, IN_BF16)
        xv = tl.where(xv != xv, 0.0, xv)  # NaN quantizes as 0.0
        if GRAN == 0:
            s = tl.load(sscale_ptr + col, mask=ok, other=1.0)
            m = tl.load(smin_ptr + col, mask=ok, other=0.0)
        else:
            sidx = t * NG + col // G
            s = _load_f32_bytes(pay_ptr + sidx * SCALE_BYTES, ok, SCALE_BYTES)
            if SYMMETRIC:
                m = 0.0
            else:
                m = _load_f32_bytes(pay_ptr + mins_off + sidx * SCALE_BYTES, ok, SCALE_BYTES)
        zero_scale = s == 0.0
        safe = tl.where(zero_scale, 1.0, s)
        if SYMMETRIC:
            v = tl.div_rn(xv, safe)
        else:
            v = tl.div_rn(xv - m, safe)
        v = tl.minimum(tl.maximum(v, QMIN * 1.0), QMAX * 1.0)  # clamp then round == round then clamp
        q = tl.where(zero_scale, 0.0, _round_half_even(v))
        code = (q - QMIN).to(tl.int32)
        code = tl.where(ok, code, 0)
        packed = tl.sum(code << (slot * BITS), axis=1)  # disjoint bit fields
        byte1 = b0 + tl.arange(0, BLOCK_B)
        tl.store(pay_ptr + codes_off + byte1, packed.to(tl.uint8), mask=byte1 < b_stop)

    # Phase C: bf16 outlier columns of rows [t0, t1), row-major, byte by byte.
    if OUT_PAD > 0:
        r_idx = t0 + tl.arange(0, ROWS)[:, None]
        o_idx = tl.arange(0, OUT_PAD)[None, :]
        om = (r_idx < t1) & (o_idx < N_OUT)
        ocol = tl.load(outl_ptr + o_idx, mask=o_idx < N_OUT, other=0)
        if IN_BF16:
            ptrs = x_ptr + r_idx.to(tl.int64) * stride_t + ocol.to(tl.int64) * stride_h
            bits = (tl.load(ptrs, mask=om, other=0).to(tl.int32) & 0xFFFF).to(tl.int64)
        else:
            ov = _load_x(x_ptr, r_idx + ocol * 0, ocol, stride_t, stride_h, om, IN_BF16)
            bits = _bf16_bits(ov, NAN_BITS).to(tl.int64)
        _store_scalar_bytes(pay_ptr + outl_off + (r_idx * N_OUT + o_idx) * 2, bits, om, 2)


# ---------------------------------------------------------------------------------------------
# unpack + dequantize + sum
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["pay_stride", "stride_ot", "T", "mins_off", "codes_off", "outl_off"])
def _dequant_sum_kernel(
    pay_ptr, pay_stride, tp, colmap_ptr, sscale_ptr, smin_ptr, out_ptr, stride_ot, stride_oh,
    T, H, K, N_OUT, mins_off, codes_off, outl_off,
    BITS: tl.constexpr, QMIN: tl.constexpr, SYMMETRIC: tl.constexpr, GRAN: tl.constexpr, G: tl.constexpr,
    NG: tl.constexpr, SCALE_BYTES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    OUT_KIND: tl.constexpr, NAN_BITS: tl.constexpr,
):
    CPB: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    FMAX: tl.constexpr = 3.4028234663852886e38
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    inside = (t < T) & (h < H)
    cm = tl.load(colmap_ptr + h, mask=h < H, other=0)
    is_kept = inside & (cm >= 0)
    is_out = inside & (cm < 0)
    i = t * K + cm
    code_byte = i // CPB
    shift = (i - code_byte * CPB) * BITS
    oidx = t * N_OUT + (-cm - 1)
    if GRAN != 0:
        sidx = t * NG + h // G
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for r in range(tp):  # rank order, as the reference and the collectives sum
        base = pay_ptr + r * pay_stride
        raw = tl.load(base + codes_off + code_byte, mask=is_kept, other=0).to(tl.int32)
        q = ((raw >> shift) & MASK).to(tl.float32) + QMIN
        if GRAN == 0:
            s = tl.load(sscale_ptr + r * H + h, mask=h < H, other=0.0)
            deq = q * s
            if not SYMMETRIC:
                deq = deq + tl.load(smin_ptr + r * H + h, mask=h < H, other=0.0)
        else:
            s = _load_f32_bytes(base + sidx * SCALE_BYTES, is_kept, SCALE_BYTES)
            deq = q * s
            if not SYMMETRIC:
                deq = deq + _load_f32_bytes(base + mins_off + sidx * SCALE_BYTES, is_kept, SCALE_BYTES)
        deq = tl.minimum(tl.maximum(deq, -FMAX), FMAX)  # dequantize saturates (quant.dequantize)
        ov = _load_f32_bytes(base + outl_off + oidx * 2, is_out, 2)
        acc = acc + tl.where(cm >= 0, deq, ov)
    optr = out_ptr + t.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
    if OUT_KIND == 0:
        tl.store(optr, acc, mask=inside)
    elif OUT_KIND == 1:  # bf16 bits through an int16 view: torch's rounding and NaN pattern
        tl.store(optr, _bf16_bits(acc, NAN_BITS).to(tl.int16), mask=inside)
    else:
        tl.store(optr, acc.to(tl.float16), mask=inside)


# ---------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------

def _check_bits(quant: QuantSpec) -> None:
    """The widths the registry lists for these kernels (``kernels.registry``: a byte holds whole codes)."""
    reason = registry.implementation(quant, "triton") is None and registry.refusal(quant, "triton")
    if reason:
        raise ValueError(reason)


def _launch_options(device: torch.device) -> dict:
    # Interpreter: numpy fp32 has no FMA to disable. Compiled: keep q*scale + lo two roundings.
    return {} if device.type == "cpu" else {"enable_fp_fusion": False}


@contextlib.contextmanager
def _launching(kernel):
    """The interpreter imports parts of Triton lazily at launch and they check
    TRITON_INTERPRET again, so an interpreted kernel runs with it set (and then restored)."""
    if type(kernel).__name__ != "InterpretedFunction" or os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


_NAN_BITS: dict = {}


def nan_bf16_bits(dtype: torch.dtype, device: torch.device) -> int:
    """The bf16 bit pattern torch writes for NaN converted from ``dtype`` on this device."""
    key = (dtype, device.type)
    if key not in _NAN_BITS:
        nan = torch.full((8,), float("nan"), dtype=dtype, device=device).to(torch.bfloat16)
        _NAN_BITS[key] = int(nan.view(torch.int16)[0].item()) & 0xFFFF
    return _NAN_BITS[key]


def _geometry(quant: QuantSpec, hidden: int):
    """(G, NG, NG_PAD, G_PAD): a row as [n_groups, group] (token: one group of width H)."""
    if quant.granularity == "group":
        g, ng = quant.group_size, hidden // quant.group_size
    else:
        g, ng = hidden, 1
    return g, ng, triton.next_power_of_2(ng), triton.next_power_of_2(g)


def _launch_quantize(x, quant, feats, scales, mins, lay, payload, rows_per_program=None):
    tokens, hidden = x.shape
    kept = hidden - feats.n_outliers
    qmin, qmax = quant.code.qrange
    g, ng, ng_pad, g_pad = _geometry(quant, hidden)
    if rows_per_program is None:
        # interpreter: one program for the small test shapes; GPU: a tile of <= 8192 values
        tile = ng_pad * g_pad if quant.dynamic else triton.next_power_of_2(hidden)
        rows_per_program = 8 if x.device.type == "cpu" else max(1, min(16, 8192 // tile))
    halo = 1 if (kept * quant.bits) % 8 else 0
    x_arg = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    grid = (triton.cdiv(tokens, rows_per_program),)
    with _launching(_quantize_pack_kernel):
        _quantize_pack_kernel[grid](
            x_arg, x.stride(0), x.stride(1), feats.colmap, feats.keep, feats.outliers, scales, mins, payload,
            tokens, hidden, kept, feats.n_outliers, lay.mins.offset, lay.codes.offset, lay.outliers.offset,
            lay.codes.nbytes, quant.code.scale_constant,
            BITS=quant.bits, QMIN=qmin, QMAX=qmax, SYMMETRIC=quant.symmetric, GRAN=_GRAN[quant.granularity],
            G=g, NG=ng, NG_PAD=ng_pad, G_PAD=g_pad, SCALE_BYTES=quant.scale_dtype.itemsize,
            ROWS=rows_per_program, HALO=halo, BLOCK_B=1024,
            OUT_PAD=triton.next_power_of_2(feats.n_outliers) if feats.n_outliers else 0,
            IN_BF16=x.dtype == torch.bfloat16, NAN_BITS=nan_bf16_bits(x.dtype, x.device),
            **_launch_options(x.device),
        )


def quantize_pack(x, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None,
                  rows_per_program: int | None = None) -> torch.Tensor:
    """One rank's payload (uint8 [total_bytes]); the bytes of ``reference.quantize_pack_ref``."""
    feats, scales, mins, lay = ref.prepare_quantize(x, quant, outlier_idx, static_min, static_max)
    _check_bits(quant)
    if rows_per_program is not None and (rows_per_program < 1 or rows_per_program & (rows_per_program - 1)):
        raise ValueError(f"rows_per_program must be a power of two, got {rows_per_program}")
    payload = torch.empty(lay.total_bytes, dtype=torch.uint8, device=x.device)
    if x.shape[0] and lay.total_bytes:
        _launch_quantize(x, quant, feats, scales, mins, lay, payload, rows_per_program)
    return payload


def _launch_dequant(payloads, quant, feats, scales, mins, lay, out, block_t=None, block_h=None):
    tp = payloads.shape[0]
    tokens, hidden = out.shape
    qmin, _ = quant.code.qrange
    g, ng, _, _ = _geometry(quant, hidden)
    cpu = payloads.device.type == "cpu"
    block_t = block_t or (8 if cpu else 16)
    block_h = block_h or min(triton.next_power_of_2(hidden), 256)
    out_kind = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[out.dtype]
    out_arg = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_h))
    with _launching(_dequant_sum_kernel):
        _dequant_sum_kernel[grid](
            payloads, payloads.stride(0), tp, feats.colmap, scales, mins, out_arg, out.stride(0), out.stride(1),
            tokens, hidden, hidden - feats.n_outliers, feats.n_outliers, lay.mins.offset, lay.codes.offset,
            lay.outliers.offset,
            BITS=quant.bits, QMIN=qmin, SYMMETRIC=quant.symmetric, GRAN=_GRAN[quant.granularity], G=g, NG=ng,
            SCALE_BYTES=quant.scale_dtype.itemsize, BLOCK_T=block_t, BLOCK_H=block_h, OUT_KIND=out_kind,
            NAN_BITS=nan_bf16_bits(torch.float32, payloads.device),
            **_launch_options(payloads.device),
        )


def unpack_dequant_sum(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx=None,
                       static_mins=None, static_maxs=None, out_dtype=torch.float32,
                       block_t: int | None = None, block_h: int | None = None) -> torch.Tensor:
    """[T, H] in ``out_dtype``: the values of ``reference.unpack_dequant_sum_ref``.
    ``block_t`` x ``block_h`` (powers of two): the output tile of one program."""
    feats, scales, mins, lay = ref.prepare_unpack(payloads, tokens, hidden, quant, outlier_idx,
                                                     static_mins, static_maxs)
    ref.check_out_dtype(out_dtype)
    _check_bits(quant)
    out = torch.empty(tokens, hidden, dtype=out_dtype, device=payloads.device)
    if tokens and hidden:
        if payloads.stride(1) != 1:
            payloads = payloads.contiguous()
        _launch_dequant(payloads, quant, feats, scales, mins, lay, out, block_t, block_h)
    return out


def unpack_dequant_sum_requant(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx,
                               static_mins, static_maxs, second: QuantSpec) -> torch.Tensor:
    """Two-shot leg 1 -> leg 2: the bytes of ``reference.unpack_dequant_sum_requant_ref``.

    The fp32 reduced chunk goes through memory once between the two kernels (T x H/tp x 4
    bytes, small next to the payloads it is summed from)."""
    ref.check_second(second)
    _check_bits(second)
    reduced = unpack_dequant_sum(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs)
    return quantize_pack(reduced, second, outlier_idx)
