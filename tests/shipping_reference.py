# Size: ~450 lines: one short re-derivation per shipping system (six), sharing one rounding helper.
"""Independent numpy re-derivations of the quantized all-reduces that engines ship.

    .venv/bin/python -m pytest tests/test_shipping_reference.py -q

Pure numpy (no torch, no lowbit): the tests compare lowbit's emulations against these, so they
must not share code with them. Each function takes the per-rank partials (numpy arrays of
bf16 values held in float32/float64, all the same shape) and returns ``(outputs, wire)``:
``outputs[r]`` is what rank r ends up with (bf16 values as float64), ``wire`` the bytes each
rank sends, per leg (``wire["sent"][r]`` is the total). The sources, versions and every
assumption are in docs/shipping.md; the comments here only name the step.

Arithmetic of a narrow type is emulated as "exact result in float64, then one rounding"
(``round_to``): exact for every fp16 / fp8 / fp4 operation used here; fp32 steps use numpy
float32 arithmetic (IEEE, round to nearest even).
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
FORMATS = {  # name: (exponent bits, mantissa bits, largest finite value)
    "fp16": (5, 10, 65504.0),
    "bf16": (8, 7, float(np.ldexp(2.0 - 2.0 ** -7, 127))),
    "e4m3": (4, 3, 448.0),      # OCP float8_e4m3fn: no inf, the all-ones pattern is NaN
    "e5m2": (5, 2, 57344.0),
    "e2m1": (2, 1, 6.0),        # fp4: no inf, no NaN
}


def round_to(x, fmt: str, overflow: str = "inf") -> np.ndarray:
    """``x`` rounded to the nearest ``fmt`` value, ties to even, subnormals kept, as float64.

    overflow (a rounded magnitude above the largest finite value, or an infinite input):
    "inf" IEEE (finite overflow -> inf, inf stays); "nan" torch <= 2.11 float8_e4m3fn casts (-> NaN,
    inf too); "saturate" AMD MODE.FP16_OVFL (finite overflow -> +-max, a true inf stays inf);
    "satfinite" CUDA __NV_SATFINITE / cvt .satfinite and torchao's fp4 (-> +-max, inf too).
    """
    x = np.asarray(x, dtype=np.float64)
    ebits, mbits, fmax = FORMATS[fmt]
    emin = 2 - 2 ** (ebits - 1)                     # exponent of the smallest normal
    ax = np.abs(x)
    finite = np.isfinite(x)
    _, e2 = np.frexp(np.where(finite, ax, 1.0))     # ax = m * 2**e2, m in [0.5, 1)
    quantum = np.ldexp(1.0, np.maximum(e2 - 1, emin) - mbits)
    r = np.where(finite, np.copysign(np.rint(ax / quantum) * quantum, x), x)
    over = np.abs(r) > fmax                          # NaN compares False and stays NaN
    if overflow == "inf":
        r = np.where(over & finite, np.copysign(np.inf, x), r)
    elif overflow == "nan":
        r = np.where(over, np.nan, r)
    elif overflow == "saturate":
        r = np.where(over & finite, np.copysign(fmax, x), r)
    elif overflow == "satfinite":
        r = np.where(over, np.copysign(fmax, x), r)
    else:
        raise ValueError(f"overflow: {overflow!r}; allowed: inf, nan, saturate, satfinite")
    return r


def _bf16_out(v) -> np.ndarray:
    return round_to(v, "bf16", "inf")


def _stack(partials) -> tuple[np.ndarray, tuple]:
    shape = np.shape(partials[0])
    if any(np.shape(p) != shape for p in partials):
        raise ValueError("partials: every rank's partial must have the same shape")
    return np.stack([np.asarray(p, dtype=np.float64).ravel() for p in partials]), shape


def _split(outputs, shape):
    return [np.asarray(o, dtype=np.float64).reshape(shape) for o in outputs]


# --- QuickReduce (vLLM csrc/quickreduce, ROCm aiter csrc/include/quick_all_reduce.cuh) -----------

# code: (decoding-scale factor, lowest code, highest code, bytes per 2048-value atom tile)
QR_CODES = {
    "int3": (-0.25, -4, 3, 896),       # aiter only, TP 2 only
    "int4": (-0.125, -8, 7, 1152),
    "int6": (-1.0 / 32, -32, 31, 1664),
    "int8": (-1.0 / 128, -128, 127, 2176),
}
QR_TILE = 16384                         # values one workgroup handles: 256 threads x 8 atoms x 8
QR_ATOM_VALUES = 2048                   # values of one atom across the 256 threads
QR_EPS = {"fp16": 2.0 ** -24,           # 0x0001: the smallest fp16 subnormal
          "bf16": float(np.ldexp(1 + 87 / 128, -24))}   # bf16 0x33D7, about 1.0e-7
QR_WORLD_SIZES = (2, 4, 8)


def _qr_round(dtype: str, overflow: str):
    if dtype == "fp16":
        return lambda v: round_to(v, "fp16", overflow)
    # bf16 kernels compute in fp32 and round the result to bf16
    return lambda v: round_to(np.asarray(v, dtype=np.float64).astype(F32), "bf16")


def qr_groups(n: int) -> np.ndarray:
    """[n // 32, 32] positions sharing one scale: in every aligned block of 64 values, the 32
    even positions form one group and the 32 odd positions another (the two fp16 halves of
    the packed f16x2 words of 8 threads x 4 words)."""
    if n % 64:
        raise ValueError(f"n: {n} must be a multiple of 64 (pad to the 16384-value tile first)")
    return np.arange(n).reshape(-1, 32, 2).transpose(0, 2, 1).reshape(-1, 32)


def qr_encode(v: np.ndarray, code: str, dtype: str = "fp16", overflow: str = "inf"):
    """One codec send: groups [G, 32] of ``dtype`` values -> (codes [G, 32] in 0..2**b-1, scales [G])."""
    rnd = _qr_round(dtype, overflow)
    factor, qmin, qmax, _ = QR_CODES[code]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        wmax = np.fmax.reduce(v, axis=1)                      # max/min ignore NaN (IEEE maxNum)
        wmin = np.fmin.reduce(v, axis=1)
        extreme = np.where(np.abs(wmax) > np.abs(wmin), wmax, wmin)   # signed, ties -> the min
        decoding = rnd(extreme * factor)                      # the extreme maps to the lowest code
        encoding = rnd(1.0 / rnd(decoding + QR_EPS[dtype]))   # assumption: correctly rounded rcp
        w = rnd(v * encoding[:, None])
        w = np.fmin(np.fmax(w, qmin), qmax)                   # NaN -> qmin (maxNum)
    q = np.rint(w).astype(np.int64)                           # rintf: ties to even
    return q - qmin, decoding


def qr_decode(codes: np.ndarray, decoding: np.ndarray, code: str, dtype: str = "fp16",
              overflow: str = "inf") -> np.ndarray:
    _, qmin, _, _ = QR_CODES[code]
    with np.errstate(invalid="ignore", over="ignore"):
        return _qr_round(dtype, overflow)((codes + qmin) * decoding[:, None])


def qr_roundtrip(x, code: str = "int4", cast_bf16_to_fp16: bool = True, overflow: str = "inf") -> np.ndarray:
    """One rank's message through one codec send/receive (the values a peer decodes), as float64."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.ravel()
    n = flat.size
    padded = np.zeros(-(-n // QR_TILE) * QR_TILE)              # out-of-range buffer loads read 0
    dtype = "fp16" if cast_bf16_to_fp16 else "bf16"
    padded[:n] = round_to(flat, "fp16", overflow) if cast_bf16_to_fp16 else flat
    idx = qr_groups(padded.size)
    codes, scales = qr_encode(padded[idx], code, dtype, overflow)
    out = np.empty_like(padded)
    out[idx] = qr_decode(codes, scales, code, dtype, overflow)
    return out[:n].reshape(x.shape)


def quickreduce(partials, code: str = "int4", cast_bf16_to_fp16: bool = True, overflow: str = "inf"):
    """QuickReduce two-shot all-reduce. overflow: "inf" (gfx950, and any fp16 overflow outside
    gfx942) or "saturate" (gfx942, where the kernel sets MODE.FP16_OVFL)."""
    x, shape = _stack(partials)
    world, n = x.shape
    if world not in QR_WORLD_SIZES or (code == "int3" and world != 2):
        raise ValueError(f"world size: {world}; QuickReduce {code} runs at "
                         f"{'2' if code == 'int3' else ', '.join(map(str, QR_WORLD_SIZES))}")
    if n % 8:
        raise ValueError(f"n: {n} values; QuickReduce needs a multiple of 8 (16 bytes)")
    dtype = "fp16" if cast_bf16_to_fp16 else "bf16"
    rnd = _qr_round(dtype, overflow)
    tiles = -(-n // QR_TILE)
    padded = np.zeros((world, tiles * QR_TILE))
    padded[:, :n] = round_to(x, "fp16", overflow) if cast_bf16_to_fp16 else x
    idx = qr_groups(padded.shape[1])
    total = np.zeros(idx.shape)                               # leg 1: every rank's message decoded,
    for r in range(world):                                    # summed in rank order in the kernel dtype
        codes, scales = qr_encode(padded[r][idx], code, dtype, overflow)
        with np.errstate(invalid="ignore", over="ignore"):
            total = rnd(total + qr_decode(codes, scales, code, dtype, overflow))
    codes, scales = qr_encode(total, code, dtype, overflow)  # leg 2: the reduced values, same codec
    out = np.empty(padded.shape[1])
    out[idx] = qr_decode(codes, scales, code, dtype, overflow)
    out = _bf16_out(out[:n])                                   # fp16 -> fp32 -> bf16 (a no-op for bf16)
    leg = tiles * (world - 1) * (8 // world) * QR_CODES[code][3]   # this rank's atoms to each peer
    return _split([out] * world, shape), dict(leg1=[leg] * world, leg2=[leg] * world, sent=[2 * leg] * world)


# vLLM quick_all_reduce.py _QR_MIN_SIZE: bytes below which QuickReduce is not used, per
# (kernel dtype, world size), in the order [FP, INT8, INT6, INT4, INT3]
MB = 1 << 20
QR_MIN_SIZE = {
    ("fp16", 2): [1 * MB, 2 * MB, 2 * MB, 1 * MB, 1 * MB],
    ("fp16", 4): [1 * MB, 16 * MB, 4 * MB, 2 * MB, 2 * MB],
    ("fp16", 8): [16 * MB, 4 * MB, 4 * MB, 2 * MB, 2 * MB],
    ("bf16", 2): [2 * MB, 8 * MB, 8 * MB, 8 * MB, 8 * MB],
    ("bf16", 4): [8 * MB, 64 * MB, 64 * MB, 16 * MB, 16 * MB],
    ("bf16", 8): [16 * MB, 2048 * MB, 2048 * MB, 2048 * MB, 2048 * MB],
}
QR_LEVELS = ("fp", "int8", "int6", "int4", "int3")


def quickreduce_used(nbytes: int, world: int, code: str, cast_bf16_to_fp16: bool = True,
                     max_bytes: int = 2048 * MB) -> bool:
    """vLLM's gate (should_quick_allreduce) for a bf16 message of ``nbytes`` bytes."""
    dtype = "fp16" if cast_bf16_to_fp16 else "bf16"
    return nbytes % 16 == 0 and QR_MIN_SIZE[(dtype, world)][QR_LEVELS.index(code)] <= nbytes <= max_bytes


# --- FlashInfer quantized_all_reduce (flashinfer/comm/quantized_allreduce.py) -------------------

FP8_MAX = 448.0


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _fma32(a, b, c) -> np.ndarray:
    """fp32 a * b + c with one rounding (Triton contracts it to an FMA). a*b is exact in
    float64 here (a is an fp8 value); the float64 sum is then rounded to fp32."""
    with np.errstate(invalid="ignore", over="ignore"):
        return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(F32)


def _fi_quantize(v: np.ndarray, group: int):
    """fp32 values [n] -> (fp8 values as fp32 [n], dequantizing scale per group of ``group``)."""
    n = v.size
    ngroups = -(-n // group)
    padded = np.zeros(ngroups * group, dtype=F32)
    padded[:n] = v                                               # masked loads read 0.0
    g = padded.reshape(ngroups, group)
    amax = np.fmax(np.fmax.reduce(np.abs(g), axis=1), F32(1e-12))  # maxnum: NaN ignored
    inverse = amax / F32(FP8_MAX)
    quant = F32(FP8_MAX) / amax
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.clip(g * quant[:, None], -FP8_MAX, FP8_MAX)     # assumption: NaN stays NaN
    q = round_to(y, "e4m3", "satfinite").astype(F32)
    return q.ravel()[:n], inverse


def flashinfer_fp8(partials, scale_group: int = 256):
    """FlashInfer FP8 two-shot: fp8 e4m3 + an fp32 scale per ``scale_group`` values of the flat buffer."""
    x, shape = _stack(partials)
    world, n = x.shape
    if n % 8:
        raise ValueError(f"n: {n}; FlashInfer needs a multiple of 8 values")
    block = 4096 if n <= 33554432 else 16384
    group = min(scale_group, n)
    block = max(min(block, n), group)
    if block % group or block % world or not (_pow2(block) and _pow2(group) and _pow2(block // group)):
        raise ValueError(f"n: {n} at world size {world}: block {block} and group {group} must be powers of two, "
                         "the block a multiple of the group and of the world size")
    owner = (np.arange(n) // block) % world                     # stripes of ``block`` values, round robin
    gidx = np.arange(n) // group
    acc = np.zeros(n, dtype=F32)
    for r in range(world):                                      # leg 1 in rank order, fp32 FMA
        q, inverse = _fi_quantize(x[r].astype(F32), group)
        acc = _fma32(q, inverse[gidx], acc)
    q2, inverse2 = _fi_quantize(acc, group)                     # leg 2: the owner requantizes
    with np.errstate(invalid="ignore", over="ignore"):
        others = q2 * inverse2[gidx]
    outputs = [_bf16_out(np.where(owner == k, acc, others)) for k in range(world)]  # own stripe: no leg 2
    groups_of = np.bincount(owner[::group], minlength=world)   # a group never straddles two stripes
    values_of = np.bincount(owner, minlength=world)
    own = values_of + 4 * groups_of                             # fp8 bytes + fp32 scales of a stripe set
    leg1 = [int(own.sum() - own[r]) for r in range(world)]     # peers read the stripes they own
    leg2 = [int((world - 1) * own[r]) for r in range(world)]
    return _split(outputs, shape), dict(leg1=leg1, leg2=leg2, sent=[a + b for a, b in zip(leg1, leg2)])


# --- TensorRT-LLM low-precision all-reduce (customLowPrecisionAllReduceKernels.cu) --------------

TRT_GROUP = 496                          # 31 lanes x 16 fp8 values; lane 32 carries the scale
TRT_GROUP_BYTES = 512
TRT_BLOCK_GROUPS = 16                    # groups per 512-thread block (hierarchical TP 8 path)


def _trt_quantize(g: np.ndarray):
    """fp32 groups [G, 496] -> (fp8 values as fp32, encoding scale 448 / amax, or 0 for amax 0)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.fmax.reduce(np.abs(g), axis=1, initial=F32(0))   # fmaxf: NaN ignored
        scale = np.where(amax != 0, F32(FP8_MAX) / amax, F32(0)).astype(F32)
        y = np.where(scale[:, None] != 0, g * scale[:, None], g)
    return round_to(y, "e4m3", "satfinite").astype(F32), scale


def _trt_dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale[:, None] != 0, q / scale[:, None], q).astype(F32)


def _trt_groups(v: np.ndarray) -> np.ndarray:
    """[n] -> zero-padded groups [G, 496] from the start of ``v``."""
    ngroups = -(-v.shape[-1] // TRT_GROUP)
    out = np.zeros(ngroups * TRT_GROUP, dtype=F32)
    out[:v.shape[-1]] = v
    return out.reshape(ngroups, TRT_GROUP)


def trtllm_fp8(partials):
    """TensorRT-LLM LOWPRECISION: fp8 e4m3 + fp32 scale per 496 values. TP 2/4: two-shot over
    each rank's contiguous 1/TP shard (groups restart at every shard). TP 8: hierarchical over
    two NUMA halves of 4 ranks (three quantizations), groups of the flat buffer."""
    x, shape = _stack(partials)
    world, n = x.shape
    if world not in (2, 4, 8):
        raise ValueError(f"world size: {world}; TensorRT-LLM's low-precision all-reduce runs at 2, 4, 8")
    align = 16 * world if world <= 4 else 16
    if n % align or n > 64 * MB:
        raise ValueError(f"n: {n}; needs a multiple of {align} values and at most 64 Mi (larger ones are split)")

    def roundtrip(groups):
        return _trt_dequantize(*_trt_quantize(groups))

    if world <= 4:
        shard = n // world
        sent_groups = [[roundtrip(_trt_groups(x[r, j * shard:(j + 1) * shard].astype(F32))) for j in range(world)]
                       for r in range(world)]                      # [sender][shard]
        out = []
        for j in range(world):                                     # the owner of shard j sums from itself on
            acc = np.zeros_like(sent_groups[0][j])
            for ii in range(world):
                acc = (acc + sent_groups[(j + ii) % world][j]).astype(F32)
            out.append(roundtrip(acc).ravel()[:shard])             # leg 2: requantize, every rank decodes
        leg = [(world - 1) * sent_groups[0][0].shape[0] * TRT_GROUP_BYTES] * world
        return _split([_bf16_out(np.concatenate(out))] * world, shape), dict(leg1=leg, leg2=leg,
                                                                           sent=[2 * b for b in leg])
    decoded = np.stack([roundtrip(_trt_groups(x[r].astype(F32))) for r in range(world)])   # [8, G, 496]
    ngroups = decoded.shape[1]
    owner = (np.arange(ngroups) // TRT_BLOCK_GROUPS) % 4           # rank within its NUMA half
    halves = []
    for half in (0, 1):                                            # stage 1: reduce inside each half
        acc = np.zeros(decoded.shape[1:], dtype=F32)
        for ii in range(4):
            acc = (acc + decoded[half * 4 + (owner + ii) % 4, np.arange(ngroups)]).astype(F32)
        halves.append(roundtrip(acc))
    total = (halves[0] + halves[1]).astype(F32)                    # stage 2: across the halves
    out = _bf16_out(roundtrip(total).ravel()[:n])                  # stage 3: gather and dequantize
    mine = np.bincount(owner, minlength=4)
    sent = [int(TRT_GROUP_BYTES * (ngroups - mine[r % 4] + 4 * mine[r % 4])) for r in range(world)]
    return _split([out] * world, shape), dict(sent=sent)


# --- NCCL fp8 all-reduce (src/device/reduce_kernel.h, all_reduce.h; NCCL >= 2.24.3) ---------------

def nccl_fp8(partials, fmt: str = "e4m3", cast: str = "torch", accumulate: str = "ring"):
    """ncclAllReduce(ncclFloat8e4m3 / e5m2, ncclSum) of partials the caller cast to fp8 (no scale).
    cast: "torch" (tensor.to(float8) in torch >= 2.12, pinned here: e4m3fn saturates to +-448,
    inf too; e5m2 overflows to inf), "torch-2.11" (e4m3fn overflow -> NaN) or "satfinite".
    accumulate: "ring" (each hop: fp8 -> fp16, fp16 add, satfinite round to fp8) or "fp32"
    (the symmetric-memory kernels: fp32 sum in rank order, one satfinite rounding)."""
    x, shape = _stack(partials)
    world, n = x.shape
    over = {"torch": "satfinite" if fmt == "e4m3" else "inf", "torch-2.11": "nan" if fmt == "e4m3" else "inf",
            "satfinite": "satfinite"}[cast]
    q = round_to(x, fmt, over)
    per_rank = -(-n // world)
    chunk = -(-per_rank // 16) * 16                              # alignUp(divUp(n, world), 16 bytes / 1)
    pos_chunk = np.arange(n) // chunk
    if accumulate == "ring":
        acc = q[(pos_chunk + 1) % world, np.arange(n)]           # the reduction of chunk c starts at c + 1
        for k in range(2, world + 1):
            with np.errstate(invalid="ignore", over="ignore"):
                acc = round_to(round_to(acc + q[(pos_chunk + k) % world, np.arange(n)], "fp16"), fmt, "satfinite")
    elif accumulate == "fp32":
        acc = np.zeros(n, dtype=F32)
        for r in range(world):
            acc = (acc + q[r].astype(F32)).astype(F32)
        acc = round_to(acc, fmt, "satfinite")
    else:
        raise ValueError(f"accumulate: {accumulate!r}; allowed: ring, fp32")
    sizes = np.bincount(pos_chunk, minlength=world)[:world]
    sent = [int(2 * n - sizes[r] - sizes[(r + 1) % world]) for r in range(world)]  # ring: 2(W-1) chunks
    return _split([acc] * world, shape), dict(sent=sent)


# --- MXFP4 / NVFP4 as torchao 0.18 rounds them, in a two-shot all-reduce -----------------------

E8M0_BIAS = 127
F32_MIN_NORMAL = 2.0 ** -126


def mxfp4_roundtrip(v, block: int = 32) -> np.ndarray:
    """torchao to_mx(float4_e2m1fn_x2, FLOOR) then to_dtype(float32) on flat blocks of ``block``."""
    g = np.asarray(v, dtype=F32).reshape(-1, block)
    amax = np.max(np.abs(g), axis=1)                              # torch.amax: NaN propagates
    exponent = ((amax.view(np.int32) >> 23) & 0xFF).astype(np.int64) - E8M0_BIAS - 2  # floor(log2) - 2 (e2m1 max 6 = 1.5 * 2**2)
    biased = np.clip(exponent, -E8M0_BIAS, E8M0_BIAS + 1) + E8M0_BIAS
    biased = np.where(np.isnan(amax), 255, biased)
    scale = np.maximum((biased.astype(np.int32) << 23).view(F32), F32(F32_MIN_NORMAL))  # as torchao: 2**-127 -> 2**-126
    with np.errstate(invalid="ignore", over="ignore"):
        q = round_to(g / scale[:, None], "e2m1", "satfinite").astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        decode = np.where(biased == 255, np.nan, np.ldexp(F32(1), biased - E8M0_BIAS)).astype(F32)
        return (q * decode[:, None]).ravel()


def nvfp4_roundtrip(v, per_tensor: bool = True, block: int = 16) -> np.ndarray:
    """torchao nvfp4_quantize then NVFP4Tensor.dequantize(float32) on flat blocks of 16; with
    ``per_tensor`` the fp32 tensor scale is amax(v) / (448 * 6), as per_tensor_amax_to_scale."""
    v = np.asarray(v, dtype=F32)
    g = v.reshape(-1, block)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        block_scale = np.max(np.abs(g), axis=1) / F32(6.0)
        tiny = float(np.ldexp(1.0, -6))                             # torch.finfo(float8_e4m3fn).tiny
        if per_tensor:
            tensor_scale = F32(np.max(np.abs(v))) / F32(FP8_MAX * 6.0)
            e4m3 = round_to(np.clip(block_scale / tensor_scale, tiny, FP8_MAX), "e4m3", "satfinite").astype(F32)
            reciprocal = (F32(1.0) / tensor_scale) / e4m3
            decode = tensor_scale * e4m3
        else:
            e4m3 = round_to(np.clip(block_scale, tiny, FP8_MAX), "e4m3", "satfinite").astype(F32)
            reciprocal = F32(1.0) / e4m3
            decode = e4m3
        q = round_to(np.clip(g * reciprocal[:, None], -6.0, 6.0), "e2m1", "satfinite").astype(F32)
        return (q * decode[:, None].astype(F32)).ravel()


def _two_shot_fp32(partials, roundtrip, block: int, scale_bytes: float, message_bytes: int = 0):
    """lowbit's two-shot: contiguous 1/TP shards, fp32 sum in rank order, the owner re-encodes."""
    x, shape = _stack(partials)
    world, n = x.shape
    if n % (world * block):
        raise ValueError(f"n: {n}; needs a multiple of world size x {block}")
    total = np.zeros(n, dtype=F32)
    for r in range(world):
        with np.errstate(invalid="ignore", over="ignore"):
            total = (total + roundtrip(x[r].astype(F32))).astype(F32)
    shard = n // world
    out = np.concatenate([roundtrip(total[j * shard:(j + 1) * shard]) for j in range(world)])
    shard_bytes = int(shard / 2 + shard / block * scale_bytes) + message_bytes
    leg = [(world - 1) * shard_bytes] * world
    return _split([_bf16_out(out)] * world, shape), dict(leg1=leg, leg2=leg, sent=[2 * b for b in leg])


def mxfp4(partials):
    """MXFP4 (e2m1 + e8m0 per 32), torchao FLOOR rounding, two-shot with an fp32 sum. 4.25 bits."""
    return _two_shot_fp32(partials, mxfp4_roundtrip, 32, 1)


def nvfp4(partials, per_tensor: bool = True):
    """NVFP4 (e2m1 + e4m3 per 16 [+ one fp32 scale per message]), torchao rounding, two-shot. 4.5 bits."""
    return _two_shot_fp32(partials, lambda v: nvfp4_roundtrip(v, per_tensor), 16, 1, 4 if per_tensor else 0)
