# Size: ~650 lines: numba compiles the kernels and the packing/scale helpers they call together, one module.
"""The CPU codec as numba kernels: quantize + pack, unpack + dequantize + rank-order sum, and the
two-shot owner step, one pass over the data each, single-threaded (ranks are processes).

The owner step (``unpack_dequant_sum_requant_counts``) unpacks the tp leg-1 payloads of the
owner's chunk, sums each row in fp32, requantizes it with the second spec (dynamic, or static with
the reduced sum's calibrated range) and packs it, ``BLOCK_ROWS`` rows at a time: the sum lives in
one row buffer, with no torch chunk copy, [T, H] sum or output assembly in between. The row steps
(``_sum_row``, ``_quantize_row``) are the ones the two separate kernels run, so the fused bytes are
theirs by construction (and tested against the reference). Inputs and sums may be column slices of
a wider tensor (read / written in place through their row stride).

    PYTHONPATH=. .venv/bin/python -c "import torch; from kernels import native_cpu; from lowbit.scheme import \\
        QuantSpec; print(native_cpu.quantize_pack(torch.randn(3, 64), QuantSpec(4, True, 'token')))"
    PYTHONPATH=. .venv/bin/python -m bench.kernels --native --tokens 8192 --hidden 576 --out test-output/b.json

Same bytes and values as ``kernels.reference`` (``tests/test_kernels_native.py`` holds them
equal): every uniform-grid scheme (2/3/4/5/6/8 bits, symmetric or asymmetric, static / token /
group scales, BF16 outlier columns at fixed indices). The per-element math is the reference's, in
fp32 and in its order: NaN -> 0.0, IEEE division by the (zero-safe) scale, ``rint`` (round half to
even), clamp to the code range, the zero code where the scale is 0; the dynamic scales use
``lowbit.scales.formats.BF16``'s bf16 bit arithmetic (lo toward -inf, then the scale toward +inf);
dequantize is ``q * scale`` then ``+ lo`` (two roundings), saturated to the finite fp32 range, and
summed from 0.0 in rank order. The kernels are compiled without ``fastmath`` (LLVM then never
contracts ``a * b + c`` into an FMA nor reorders a sum) and with ``error_model="numpy"`` (no
Python zero-division check in the inner loops, so they vectorise; no divisor is ever 0).

What stays in torch on the host, because it is torch's own conversion and the bytes must be
torch's: fp32 -> bf16 of the outlier columns (torch writes NaN as 0xFFFF in its vectorised loop
and 0x7FC0 in its scalar one), the final cast of a sum to bf16/fp16, and the static scales
(``reference.static_tables``, [H] values). The checks are the reference's ``prepare_*`` (same
TypeError / ValueError). Tensors reach the kernels as numpy views (no copy): fp32 input as its
uint32 bits, bf16 input as its uint16 bits (widened to fp32 in the kernel), fp16 input converted
once to fp32.

One divergence the reference itself leaves open: when an asymmetric dynamic range's min or max is
a zero of both signs (+0.0 and -0.0 in one group), torch's reduction returns whichever zero its
loop meets first; here -0.0 < +0.0. Only the sign bit of that zero min/scale in the header can
differ; codes and sums are equal (a sum starts from +0.0).

Cost of the first call: numba compiles each kernel for the CPU it runs on and caches the machine
code on disk; a later process only loads it. Speed against both torch paths: docs/kernels.md
(rendered from bench/results/kernels-cpu-native.json, made by bench/kernels.py --native).

Not here: the nf codebook, sp / thr per-message outliers and stochastic rounding are refused by
every kernel (``reference.check_code`` / ``check_input``; the communicator keeps them on
``lowbit.wire.payload``), so there is no reference to hold a native version to; -perm and -rot need
nothing from the codec (the communicator permutes / rotates in torch, the codec quantizes the
result). The block Hadamard rotation is not routed through ``kernels.dispatch`` (CPU ranks use
``lowbit.rotation``'s torch matmul, CUDA ranks ``kernels.hadamard``), so it has no native path.

Why numba and not a torch C++ extension: the repository builds nothing today (no setup.py, no
compiler step in ``make setup``); a C++ extension would need a compiler and torch headers on every
machine and a build per torch version, while numba is one wheel from PyPI whose LLVM compiles the
loops on first use and caches them on disk (``cache=True``: ``__pycache__`` next to this file), and
the kernels stay readable Python next to the reference they restate.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kernels import reference as ref
from lowbit.scheme import QuantSpec

_OPTS = dict(cache=True, nogil=True, fastmath=False, error_model="numpy", boundscheck=False)
STATIC, TOKEN, GROUP = 0, 1, 2
_GRAN = {"static": STATIC, "token": TOKEN, "group": GROUP}
BLOCK_ROWS = 8  # rows per packing block: 8 rows of K codes are K * bits whole bytes, so blocks start on a byte


# -- kernels -------------------------------------------------------------------------------------
@intrinsic
def _bits(typingctx, value):
    """The uint32 bits of a float32 (an LLVM bitcast: no memory round trip)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, bits):
    """The float32 whose bits are a uint32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(inline='always', **_OPTS)
def _round_toward_bf16(t, up):
    """``lowbit.scales.formats.BF16().round(t, up)`` for one fp32 value."""
    if t == 0:
        return t
    mag = np.int64(_bits(abs(t)))
    if (t > 0) == up:
        mag = (mag + 0xFFFF) & 0x7FFF0000
    else:
        mag = mag & 0x7FFF0000
    if mag > 0x7F7F0000:
        mag = 0x7F7F0000
    out = _float(np.uint32(mag))
    if t < 0:
        out = -out
    return out


@njit(**_OPTS)
def _pack(codes, n, bits, out, pos):
    """codes[:n] (uint8, < 2**bits) -> out[pos:pos + ceil(n*bits/8)]: the ``pack_bits`` stream
    (code i at stream bits [i*bits, (i+1)*bits), little endian, zero padded). Indices are
    offsets into slices (non-negative loop counters): an index like ``pos + i`` makes numba add a
    negative-index fix-up that stops LLVM from vectorising the loop."""
    out = out[pos:pos + (n * bits + 7) // 8]
    if bits == 8:
        for i in range(n):
            out[i] = codes[i]
    elif bits == 4:
        half = n // 2
        for i in range(half):
            out[i] = codes[2 * i] | (codes[2 * i + 1] << 4)
        if n & 1:
            out[half] = codes[n - 1]
    elif bits == 2:
        quarter = n // 4
        for i in range(quarter):
            out[i] = (codes[4 * i] | (codes[4 * i + 1] << 2) | (codes[4 * i + 2] << 4)
                      | (codes[4 * i + 3] << 6))
        rem = n - 4 * quarter
        if rem:
            v = 0
            for j in range(rem):
                v |= np.int64(codes[4 * quarter + j]) << (2 * j)
            out[quarter] = v
    else:  # 3/5/6 bits: 8 codes fill `bits` whole bytes
        groups = n // 8
        for g in range(groups):
            acc = np.uint64(0)
            for j in range(8):
                acc |= np.uint64(codes[8 * g + j]) << np.uint64(bits * j)
            for b in range(bits):
                out[g * bits + b] = np.uint8((acc >> np.uint64(8 * b)) & np.uint64(0xFF))
        rem = n - 8 * groups
        if rem:
            acc = np.uint64(0)
            for j in range(rem):
                acc |= np.uint64(codes[8 * groups + j]) << np.uint64(bits * j)
            for b in range((rem * bits + 7) // 8):
                out[groups * bits + b] = np.uint8((acc >> np.uint64(8 * b)) & np.uint64(0xFF))


@njit(**_OPTS)
def _unpack(src, pos, bits, n, codes):
    """The first n codes of the stream starting at src[pos] -> codes[:n] (reads ceil(n*bits/8) bytes)."""
    src = src[pos:pos + (n * bits + 7) // 8]
    if bits == 8:
        for i in range(n):
            codes[i] = src[i]
    elif bits == 4:
        half = n // 2
        for i in range(half):
            b = src[i]
            codes[2 * i] = b & 15
            codes[2 * i + 1] = b >> 4
        if n & 1:
            codes[n - 1] = src[half] & 15
    elif bits == 2:
        quarter = n // 4
        for i in range(quarter):
            b = src[i]
            codes[4 * i] = b & 3
            codes[4 * i + 1] = (b >> 2) & 3
            codes[4 * i + 2] = (b >> 4) & 3
            codes[4 * i + 3] = b >> 6
        for j in range(n - 4 * quarter):
            codes[4 * quarter + j] = (src[quarter] >> (2 * j)) & 3
    else:
        mask = np.uint64((1 << bits) - 1)
        groups = n // 8
        for g in range(groups):
            acc = np.uint64(0)
            for b in range(bits):
                acc |= np.uint64(src[g * bits + b]) << np.uint64(8 * b)
            for j in range(8):
                codes[8 * g + j] = np.uint8((acc >> np.uint64(bits * j)) & mask)
        rem = n - 8 * groups
        if rem:
            acc = np.uint64(0)
            for b in range((rem * bits + 7) // 8):
                acc |= np.uint64(src[groups * bits + b]) << np.uint64(8 * b)
            for j in range(rem):
                codes[8 * groups + j] = np.uint8((acc >> np.uint64(bits * j)) & mask)


@njit(inline='always', **_OPTS)
def _put_scale(out, pos, value, bf16):
    """The little-endian bytes of ``value`` in the scale dtype (bf16: exact, its low half is 0)."""
    u = _bits(value)
    if bf16:
        out[pos] = np.uint8((u >> 16) & 0xFF)
        out[pos + 1] = np.uint8(u >> 24)
    else:
        for b in range(4):
            out[pos + b] = np.uint8((u >> (8 * b)) & 0xFF)


@njit(inline='always', **_OPTS)
def _get_scale(src, pos, bf16):
    """fp32 value of a scale stored at src[pos] (bf16: 2 bytes, fp32: 4 bytes, little endian)."""
    if bf16:
        u = (np.uint32(src[pos]) << 16) | (np.uint32(src[pos + 1]) << 24)
    else:
        u = (np.uint32(src[pos]) | (np.uint32(src[pos + 1]) << 8) | (np.uint32(src[pos + 2]) << 16)
                    | (np.uint32(src[pos + 3]) << 24))
    return _float(np.uint32(u))


@njit(inline='always', **_OPTS)
def _row_qparams(rowu, keepmask, a, width, symmetric, c, bf16):
    """``lowbit.quant.dynamic_qparams`` of features [a, a + width) of one row: (scale, lo).

    The range is reduced on the fp32 bits (finite and kept values only): |x| bits order like the
    values, and for signed values ``s ^ ((s >> 31) & 0x7FFFFFFF)`` does; integer max/min vectorise."""
    ru = rowu[a:a + width]
    km = keepmask[a:a + width]
    if symmetric:
        m = np.uint32(0)
        for j in range(width):
            b = ru[j] & np.uint32(0x7FFFFFFF)
            ok = km[j] & (b < np.uint32(0x7F800000))
            m = max(m, b if ok else np.uint32(0))
        absmax = _float(m)
        scale = absmax * c
        if bf16:
            scale = _round_toward_bf16(scale, True)
        return scale, np.float32(0.0)
    lo_k = np.int32(0x7FFFFFFF)
    hi_k = np.int32(-0x80000000)
    n_ok = 0
    for j in range(width):
        u = ru[j]
        ok = km[j] & ((u & np.uint32(0x7FFFFFFF)) < np.uint32(0x7F800000))
        s = np.int32(u)
        key = s ^ ((s >> 31) & np.int32(0x7FFFFFFF))
        lo_k = min(lo_k, key if ok else np.int32(0x7FFFFFFF))
        hi_k = max(hi_k, key if ok else np.int32(-0x80000000))
        n_ok += ok
    if n_ok == 0:
        lo = np.float32(0.0)
        hi = np.float32(0.0)
    else:
        lo = _float(np.uint32((lo_k ^ ((lo_k >> 31) & 0x7FFFFFFF)) & 0xFFFFFFFF))
        hi = _float(np.uint32((hi_k ^ ((hi_k >> 31) & 0x7FFFFFFF)) & 0xFFFFFFFF))
    if bf16:
        lo = _round_toward_bf16(lo, False)
    scale = hi * c - lo * c
    if bf16:
        scale = _round_toward_bf16(scale, True)
    return scale, lo


@njit(inline='always', **_OPTS)
def _quantize_row(rowu, rowf, t, runs, keepmask, srow, mrow, n_groups, width, symmetric, qmin, qmax, c, bf16, out,
                  scales_off, mins_off, blk, base, count_clamped, clamp_lo, clamp_hi):
    """One row (``rowu`` its fp32 bits, ``rowf`` the same memory as fp32): its dynamic scales into
    the header of ``out`` (``n_groups`` of ``width`` features; none for static scales, whose
    ``srow`` / ``mrow`` are the static tables), its kept features' codes into ``blk[base:]``.
    Returns how many kept finite values lie beyond ``clamp_lo`` / ``clamp_hi`` (when ``count_clamped``)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    step = 2 if bf16 else 4
    for g in range(n_groups):
        a = g * width
        scale, lo = _row_qparams(rowu, keepmask, a, width, symmetric, c, bf16)
        _put_scale(out, scales_off + step * (t * n_groups + g), scale, bf16)
        if not symmetric:
            _put_scale(out, mins_off + step * (t * n_groups + g), lo, bf16)
        srow[a:a + width] = scale
        mrow[a:a + width] = lo
    for r in range(runs.shape[0]):  # slices per run: see _pack on why no `ra + j` indices
        ra = runs[r, 0]
        n = runs[r, 1] - ra
        sv, mv, xv, bv = srow[ra:ra + n], mrow[ra:ra + n], rowf[ra:ra + n], blk[base:base + n]
        for j in range(n):
            s = sv[j]
            is_zero = s == zero
            safe = one if is_zero else s
            v = xv[j]
            v = zero if v != v else v
            if not symmetric:
                v = v - mv[j]
            q = np.rint(v / safe)
            q = qmin if q < qmin else q
            q = qmax if q > qmax else q
            q = zero if is_zero else q
            bv[j] = np.uint8(q - qmin)
        base += n
    n_clamped = 0
    if count_clamped:
        for r in range(runs.shape[0]):
            ra = runs[r, 0]
            n = runs[r, 1] - ra
            uv, xv, lv, hv = rowu[ra:ra + n], rowf[ra:ra + n], clamp_lo[ra:ra + n], clamp_hi[ra:ra + n]
            for j in range(n):
                finite = (uv[j] & np.uint32(0x7FFFFFFF)) < np.uint32(0x7F800000)
                n_clamped += finite & ((xv[j] < lv[j]) | (xv[j] > hv[j]))
    return n_clamped


@njit(inline='always', **_OPTS)
def _n_kept(runs):
    """How many features the (start, stop) runs keep (coded features per row)."""
    kept = 0
    for r in range(runs.shape[0]):
        kept += runs[r, 1] - runs[r, 0]
    return kept


@njit(inline='always', **_OPTS)
def _grouping(gran, group, hidden):
    """(features per scale, dynamic scale groups per row; 0 for static scales)."""
    width = hidden if gran == TOKEN else group
    return width, 0 if gran == STATIC else hidden // width


@njit(inline='always', **_OPTS)
def _unpack_block(payloads, codes_off, bits, kept, t0, tokens, cbuf):
    """The codes of the packing block starting at row ``t0`` of every payload into ``cbuf`` [tp, ...];
    returns its row count."""
    nrows = min(BLOCK_ROWS, tokens - t0)
    for r in range(payloads.shape[0]):
        _unpack(payloads[r], codes_off + (t0 // BLOCK_ROWS) * kept * bits, bits, nrows * kept, cbuf[r])
    return nrows


@njit(inline='always', **_OPTS)
def _sum_row(payloads, cbuf, i, t, runs, out_cols, s_static, m_static, n_groups, width, symmetric, qmin, bf16,
             scales_off, mins_off, outl_off, srow, mrow, acc):
    """Row t (row i of the unpacked block ``cbuf`` [tp, ...]) of every payload, dequantized and
    summed into ``acc``: 0.0 + rank 0 + rank 1 + ..., kept features from their codes (static
    tables [tp, H] when ``n_groups`` is 0, else the header's scales), ``out_cols`` from BF16."""
    fmax = np.float32(3.4028234663852886e38)
    step = 2 if bf16 else 4
    n_out = out_cols.shape[0]
    kept = acc.shape[0] - n_out
    for cc in range(acc.shape[0]):
        acc[cc] = 0.0
    for r in range(payloads.shape[0]):
        p = payloads[r]
        if n_groups == 0:
            sr = s_static[r]
            mr = m_static[r]
        else:
            for g in range(n_groups):
                s = _get_scale(p, scales_off + step * (t * n_groups + g), bf16)
                lo = np.float32(0.0)
                if not symmetric:
                    lo = _get_scale(p, mins_off + step * (t * n_groups + g), bf16)
                srow[g * width:(g + 1) * width] = s
                mrow[g * width:(g + 1) * width] = lo
            sr = srow
            mr = mrow
        codes = cbuf[r]
        base = i * kept
        for k in range(runs.shape[0]):
            ra = runs[k, 0]
            n = runs[k, 1] - ra
            sv, mv, cv, av = sr[ra:ra + n], mr[ra:ra + n], codes[base:base + n], acc[ra:ra + n]
            for j in range(n):
                d = (np.float32(cv[j]) + qmin) * sv[j]
                if not symmetric:
                    d = d + mv[j]
                d = -fmax if d < -fmax else d
                d = fmax if d > fmax else d
                av[j] += d
            base += n
        for j in range(n_out):
            pos = outl_off + 2 * (t * n_out + j)
            u = (np.uint32(p[pos]) << 16) | (np.uint32(p[pos + 1]) << 24)
            acc[out_cols[j]] += _float(np.uint32(u))


@njit(**_OPTS)
def _quantize_kernel(x, row_stride, tokens, hidden, shift, runs, keepmask, s_static, m_static, gran, group,
                     symmetric, bits, qmin, qmax, c, bf16, out, scales_off, mins_off, codes_off, count_clamped,
                     clamp_lo, clamp_hi, counts):
    """x: the [T, H] input as a flat uint32 (fp32 bits, shift 0) or uint16 (bf16 bits, shift 16)
    array whose row t starts at ``t * row_stride`` (a column slice of a wider tensor is read in
    place) -> the header and code sections of the payload ``out``. ``runs`` [R, 2]: the kept
    features as (start, stop) runs.

    ``counts`` [2] int64 <- (clamped, nonfinite), ``lowbit.quant.input_counts``' definitions:
    kept finite values below ``clamp_lo`` or above ``clamp_hi`` (when ``count_clamped``), and
    non-finite values of all of x (the outlier columns too, as the communicator counts them)."""
    n_clamped = 0
    n_nonfinite = 0
    kept = _n_kept(runs)
    width, n_groups = _grouping(gran, group, hidden)
    rowu = np.empty(hidden, np.uint32)
    rowf = rowu.view(np.float32)
    srow = s_static.copy()
    mrow = m_static.copy()
    blk = np.zeros(BLOCK_ROWS * max(kept, 1), np.uint8)
    for t0 in range(0, tokens, BLOCK_ROWS):
        nrows = min(BLOCK_ROWS, tokens - t0)
        for i in range(nrows):
            t = t0 + i
            xr = x[t * row_stride:t * row_stride + hidden]
            for cc in range(hidden):
                u = np.uint32(xr[cc]) << shift
                rowu[cc] = u
                n_nonfinite += (u & np.uint32(0x7FFFFFFF)) >= np.uint32(0x7F800000)
            n_clamped += _quantize_row(rowu, rowf, t, runs, keepmask, srow, mrow, n_groups, width, symmetric, qmin,
                                       qmax, c, bf16, out, scales_off, mins_off, blk, i * kept, count_clamped,
                                       clamp_lo, clamp_hi)
        _pack(blk, nrows * kept, bits, out, codes_off + (t0 // BLOCK_ROWS) * kept * bits)
    counts[0] = n_clamped
    counts[1] = n_nonfinite


@njit(**_OPTS)
def _dequant_sum_kernel(payloads, tokens, hidden, runs, out_cols, s_static, m_static, gran, group, symmetric, bits,
                        qmin, bf16, scales_off, mins_off, codes_off, outl_off, out, row_stride):
    """payloads [tp, nbytes] -> the [T, H] fp32 sum, written to the flat ``out`` whose row t
    starts at ``t * row_stride`` (a column slice of a wider tensor is written in place): 0.0 +
    rank 0 + rank 1 + ..., per element in rank order; kept features dequantized, ``out_cols``
    features from their BF16 values."""
    tp = payloads.shape[0]
    kept = _n_kept(runs)
    width, n_groups = _grouping(gran, group, hidden)
    cbuf = np.empty((tp, BLOCK_ROWS * max(kept, 1)), np.uint8)
    srow = np.zeros(hidden, np.float32)
    mrow = np.zeros(hidden, np.float32)
    for t0 in range(0, tokens, BLOCK_ROWS):
        nrows = _unpack_block(payloads, codes_off, bits, kept, t0, tokens, cbuf)
        for i in range(nrows):
            t = t0 + i
            _sum_row(payloads, cbuf, i, t, runs, out_cols, s_static, m_static, n_groups, width, symmetric, qmin, bf16,
                     scales_off, mins_off, outl_off, srow, mrow, out[t * row_stride:t * row_stride + hidden])


@njit(**_OPTS)
def _owner_step_kernel(payloads, tokens, hidden, runs, keepmask, out_cols, s_static, m_static, gran, group, symmetric,
                       bits, qmin, bf16, scales_off, mins_off, codes_off, outl_off,
                       s2_static, m2_static, gran2, group2, symmetric2, bits2, qmin2, qmax2, c2, bf16_2,
                       out2, scales2_off, mins2_off, codes2_off, count_clamped, clamp_lo, clamp_hi, outliers, counts):
    """The two-shot owner step in one pass, a block of ``BLOCK_ROWS`` rows at a time: unpack the
    tp leg-1 payloads, sum each row in fp32 (``_dequant_sum_kernel``'s row), requantize it with the
    second spec and pack it into ``out2`` (``_quantize_kernel``'s row); the reduced sum lives in
    one row buffer only. The sum's outlier columns go to ``outliers`` [T, k] fp32 (the host
    converts them to BF16 as torch does); ``counts`` <- (clamped, nonfinite) of the sum."""
    tp = payloads.shape[0]
    kept = _n_kept(runs)
    n_out = out_cols.shape[0]
    width, n_groups = _grouping(gran, group, hidden)
    width2, n_groups2 = _grouping(gran2, group2, hidden)
    cbuf = np.empty((tp, BLOCK_ROWS * max(kept, 1)), np.uint8)
    srow = np.zeros(hidden, np.float32)
    mrow = np.zeros(hidden, np.float32)
    srow2 = s2_static.copy()
    mrow2 = m2_static.copy()
    rowu = np.empty(hidden, np.uint32)
    rowf = rowu.view(np.float32)
    blk = np.zeros(BLOCK_ROWS * max(kept, 1), np.uint8)
    n_clamped = 0
    n_nonfinite = 0
    for t0 in range(0, tokens, BLOCK_ROWS):
        nrows = _unpack_block(payloads, codes_off, bits, kept, t0, tokens, cbuf)
        for i in range(nrows):
            t = t0 + i
            _sum_row(payloads, cbuf, i, t, runs, out_cols, s_static, m_static, n_groups, width, symmetric, qmin, bf16,
                     scales_off, mins_off, outl_off, srow, mrow, rowf)
            for cc in range(hidden):
                n_nonfinite += (rowu[cc] & np.uint32(0x7FFFFFFF)) >= np.uint32(0x7F800000)
            orow = outliers[t]
            for j in range(n_out):
                orow[j] = rowf[out_cols[j]]
            n_clamped += _quantize_row(rowu, rowf, t, runs, keepmask, srow2, mrow2, n_groups2, width2, symmetric2,
                                       qmin2, qmax2, c2, bf16_2, out2, scales2_off, mins2_off, blk, i * kept,
                                       count_clamped, clamp_lo, clamp_hi)
        _pack(blk, nrows * kept, bits2, out2, codes2_off + (t0 // BLOCK_ROWS) * kept * bits2)
    counts[0] = n_clamped
    counts[1] = n_nonfinite


# -- host side -----------------------------------------------------------------------------------
_tables: dict = {}
_NO_BOUND = np.zeros(1, np.float32)  # clamp bounds when nothing is counted (never read)


def _feature_tables(feats: ref.Features, hidden: int):
    """(runs [R, 2] int64, keep mask [H] bool, outlier columns [n] int64) as numpy, cached per
    (hidden, outlier list): built from ``reference.features`` output, never changed after."""
    key = (hidden, tuple(feats.outliers.tolist()))
    if key not in _tables:
        runs = np.array(feats.kept_runs, dtype=np.int64).reshape(-1, 2)
        keepmask = (feats.colmap >= 0).numpy().copy()
        _tables[key] = (runs, keepmask, feats.outliers.numpy().astype(np.int64))
    return _tables[key]


@functools.lru_cache(maxsize=256)
def _spec_args(quant: QuantSpec):
    qmin, qmax = quant.code.qrange
    return (_GRAN[quant.granularity], quant.group_size or 0, bool(quant.symmetric), int(quant.bits),
            np.float32(qmin), np.float32(qmax), np.float32(quant.code.scale_constant),
            quant.scale_dtype == torch.bfloat16)


def _flat_rows(t: torch.Tensor):
    """(a flat numpy view of a 2-D tensor's memory from its first element to its last, the stride
    between its rows): no copy when each row is contiguous, so a column slice of a wider tensor (a
    two-shot chunk of a partial, or of the output) is read or written in place."""
    tokens, width = t.shape
    if not _rows_contiguous(t):
        t = t.contiguous()
    stride = t.stride(0) if tokens > 1 else width
    return torch.as_strided(t, ((tokens - 1) * stride + width,), (1,), t.storage_offset()).numpy(), stride


def _rows_contiguous(t: torch.Tensor) -> bool:
    tokens, width = t.shape
    return (width <= 1 or t.stride(1) == 1) and (tokens <= 1 or t.stride(0) >= width)


def _bits_view(x: torch.Tensor):
    """(flat numpy view of x's bits, row stride, shift to fp32 bits): no copy for fp32 / bf16
    input whose rows are contiguous."""
    x = x.detach()
    if x.dtype == torch.float16:
        x = x.float()
    if x.dtype == torch.bfloat16:
        flat, stride = _flat_rows(x.view(torch.int16))
        return flat.view(np.uint16), stride, 16
    flat, stride = _flat_rows(x)
    return flat.view(np.uint32), stride, 0


def _check_cpu(t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"kernels.native_cpu runs on CPU tensors, got {t.device.type}")


def _clamp_bounds(quant: QuantSpec, static_min, static_max):
    """(lo, hi) [H] fp32 beyond which a kept finite value counts as clamped: lowbit.quant's
    outside_static_range in fp32 (symmetric: |x| > max(|lo|, |hi|) is x outside +-bound)."""
    lo32, hi32 = (torch.as_tensor(t).to(torch.float32).reshape(-1).numpy() for t in (static_min, static_max))
    if quant.symmetric:
        hi = np.maximum(np.abs(lo32), np.abs(hi32))
        return -hi, hi
    return lo32, hi32


def _outlier_bytes(payload: torch.Tensor, lay, columns: torch.Tensor) -> None:
    """The BF16 outlier section of ``payload`` from ``columns`` [T, k] by torch's own conversion
    (see the module docstring), as the reference writes it."""
    payload[lay.outliers.offset:lay.outliers.end] = columns.to(torch.bfloat16).reshape(-1).view(torch.uint8)


def quantize_pack_counts(x, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None,
                         _count: bool = True):
    """(payload, {"clamped", "nonfinite"}): ``quantize_pack``'s bytes and, from the same pass over x,
    the counts the communicator records (``lowbit.quant.input_counts``' ``clamped``: kept finite
    values beyond the static range; ``nonfinite``: non-finite values of all of x). x may be a
    column slice of a wider tensor (read in place)."""
    feats, scales, mins, lay = ref.prepare_quantize(x, quant, outlier_idx, static_min, static_max)
    _check_cpu(x)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.uint8), {"clamped": 0, "nonfinite": 0}
    tokens, hidden = x.shape
    runs, keepmask, _ = _feature_tables(feats, hidden)
    payload = torch.empty(lay.total_bytes, dtype=torch.uint8)
    bits_np, row_stride, shift = _bits_view(x)
    gran, group, sym, bits, qmin, qmax, c, bf16 = _spec_args(quant)
    count_clamped = _count and not quant.dynamic
    clamp_lo, clamp_hi = _clamp_bounds(quant, static_min, static_max) if count_clamped else (_NO_BOUND, _NO_BOUND)
    counts = np.zeros(2, np.int64)
    _quantize_kernel(bits_np, row_stride, tokens, hidden, shift, runs, keepmask, scales.numpy(), mins.numpy(), gran,
                     group, sym, bits, qmin, qmax, c, bf16, payload.numpy(), lay.scales.offset, lay.mins.offset,
                     lay.codes.offset, count_clamped, clamp_lo, clamp_hi, counts)
    if feats.n_outliers:
        _outlier_bytes(payload, lay, x[:, feats.outliers])
    return payload, {"clamped": int(counts[0]), "nonfinite": int(counts[1])}


def quantize_pack(x, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None) -> torch.Tensor:
    """One rank's payload; the bytes of ``reference.quantize_pack_ref``."""
    return quantize_pack_counts(x, quant, outlier_idx, static_min, static_max, _count=False)[0]


def unpack_dequant_sum(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx=None, static_mins=None,
                       static_maxs=None, out_dtype=torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H] in ``out_dtype``; the values of ``reference.unpack_dequant_sum_ref``. ``out``: the
    tensor to write them to (fp32: in place, also a column slice of a wider tensor)."""
    feats, scales, mins, lay = ref.prepare_unpack(payloads, tokens, hidden, quant, outlier_idx, static_mins,
                                                  static_maxs)
    ref.check_out_dtype(out_dtype)
    ref.check_out(out, tokens, hidden, out_dtype, payloads.device)
    _check_cpu(payloads)
    if tokens == 0:
        return torch.zeros(0, hidden, dtype=out_dtype) if out is None else out
    runs, _, out_cols = _feature_tables(feats, hidden)
    in_place = out is not None and out_dtype == torch.float32 and _rows_contiguous(out)
    acc = out if in_place else torch.empty(tokens, hidden, dtype=torch.float32)
    flat, row_stride = _flat_rows(acc)
    gran, group, sym, bits, qmin, _, _, bf16 = _spec_args(quant)
    _dequant_sum_kernel(payloads.contiguous().numpy(), tokens, hidden, runs, out_cols, scales.numpy(), mins.numpy(),
                        gran, group, sym, bits, qmin, bf16, lay.scales.offset, lay.mins.offset, lay.codes.offset,
                        lay.outliers.offset, flat, row_stride)
    result = acc if out_dtype == torch.float32 else acc.to(out_dtype)
    if out is None or in_place:
        return result
    return out.copy_(result)


def unpack_dequant_sum_requant_counts(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx, static_mins,
                                      static_maxs, second: QuantSpec, second_min=None, second_max=None):
    """The two-shot owner step in one pass (``_owner_step_kernel``): (the leg-2 payload, its
    {"clamped", "nonfinite"}), the bytes and counts of
    ``reference.unpack_dequant_sum_requant_counts_ref``. ``second_min`` / ``second_max`` [H]: the
    reduced sum's calibrated range, for a static second leg."""
    feats, scales, mins, lay = ref.prepare_unpack(payloads, tokens, hidden, quant, outlier_idx, static_mins,
                                                  static_maxs)
    scales2, mins2, lay2 = ref.prepare_second(tokens, hidden, feats, second, second_min, second_max, payloads.device)
    _check_cpu(payloads)
    if tokens == 0:
        return torch.empty(0, dtype=torch.uint8), {"clamped": 0, "nonfinite": 0}
    runs, keepmask, out_cols = _feature_tables(feats, hidden)
    gran, group, sym, bits, qmin, _, _, bf16 = _spec_args(quant)
    gran2, group2, sym2, bits2, qmin2, qmax2, c2, bf16_2 = _spec_args(second)
    count_clamped = not second.dynamic
    clamp_lo, clamp_hi = _clamp_bounds(second, second_min, second_max) if count_clamped else (_NO_BOUND, _NO_BOUND)
    payload = torch.empty(lay2.total_bytes, dtype=torch.uint8)
    outliers = torch.empty(tokens, feats.n_outliers, dtype=torch.float32)
    counts = np.zeros(2, np.int64)
    _owner_step_kernel(payloads.contiguous().numpy(), tokens, hidden, runs, keepmask, out_cols, scales.numpy(),
                       mins.numpy(), gran, group, sym, bits, qmin, bf16, lay.scales.offset, lay.mins.offset,
                       lay.codes.offset, lay.outliers.offset, scales2.numpy(), mins2.numpy(), gran2, group2, sym2,
                       bits2, qmin2, qmax2, c2, bf16_2, payload.numpy(), lay2.scales.offset, lay2.mins.offset,
                       lay2.codes.offset, count_clamped, clamp_lo, clamp_hi, outliers.numpy(), counts)
    if feats.n_outliers:
        _outlier_bytes(payload, lay2, outliers)
    return payload, {"clamped": int(counts[0]), "nonfinite": int(counts[1])}


def unpack_dequant_sum_requant(payloads, tokens: int, hidden: int, quant: QuantSpec, outlier_idx, static_mins,
                               static_maxs, second: QuantSpec, second_min=None, second_max=None) -> torch.Tensor:
    """Two-shot leg 1 -> leg 2 in one pass; the bytes of ``reference.unpack_dequant_sum_requant_ref``."""
    return unpack_dequant_sum_requant_counts(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs,
                                             second, second_min, second_max)[0]
