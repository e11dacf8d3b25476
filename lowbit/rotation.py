"""Block Walsh-Hadamard rotation of the communicated partial sums (scheme suffix ``-rot<R>``).

Why it helps: a partial sum with a few huge features (the massive activations of SmolLM2) forces
a per-token or per-group scale so large that every other feature of that token rounds to zero.
An orthogonal rotation ``y = x M`` spreads each huge feature evenly over the ``R`` features of its
block, so the block's absmax shrinks towards its RMS and the quantization step with it. The
transform is linear, so the ranks may rotate their partials, quantize, send, dequantize and sum
in the rotated space, and undo it once on the fp32 sum: ``sum_r(x_r) = (sum_r x_r M) M^T``.

``M`` is block diagonal over the hidden features: each block of ``R`` contiguous features is
multiplied by fixed random signs ``s`` (one per feature, the same on every rank and run) and
then by the normalized Sylvester-Hadamard matrix ``H_R / sqrt(R)`` (symmetric, orthogonal).
So ``M = diag(s) Hn`` per block and ``M^{-1} = M^T = Hn diag(s)``. Nothing travels for it: every
rank builds the same ``M``, so a rotated scheme costs exactly the bits of its payload.

With BF16 outliers (``top<K>``/``rand<K>``) the outlier columns are taken out in the original
space first (sent in BF16 and zeroed), the rest is rotated and all ``H`` rotated features are
quantized; the receiver overwrites the outlier columns of the inverse-rotated sum with the
exact BF16 sum. Folding (``lowbit.model.tp.fold_rotation``): ``x M = (a W^T) M = a (M^T W)^T``, so the forward
rotation can be multiplied into each rank's row-parallel weight slice offline and the sender
pays nothing at run time.

    PYTHONPATH=. python -c "import torch; from lowbit.rotation import rotate, unrotate; \\
        x = torch.randn(4, 576); print((unrotate(rotate(x, 64), 64) - x).abs().max())"
"""
from __future__ import annotations

import functools
import math

import torch

from lowbit.quant import dequantize, quantize

_FP32 = torch.float32
_SIGN_SEED = 0x5EED


def check_block(hidden: int, block: int) -> None:
    if block < 1 or block & (block - 1):
        raise ValueError(f"rotation block: {block} not allowed; allowed: a power of two")
    if hidden % block:
        raise ValueError(f"rotation block: {block} does not divide hidden size {hidden}")


@functools.lru_cache(maxsize=32)
def hadamard_matrix(block: int) -> torch.Tensor:
    """Normalized Sylvester-Hadamard matrix ``H_R / sqrt(R)`` [R, R] in fp32: H[i, j] =
    (-1)^popcount(i & j) / sqrt(R). Symmetric and orthogonal, so it is its own inverse."""
    check_block(block, block)
    idx = torch.arange(block)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    for shift in range(max(1, block.bit_length())):
        parity ^= (bits >> shift) & 1
    return (1.0 - 2.0 * parity.to(_FP32)) / math.sqrt(block)


@functools.lru_cache(maxsize=32)
def rotation_signs(hidden: int) -> torch.Tensor:
    """Fixed random +-1 per feature [H] (the same on every rank, every run)."""
    gen = torch.Generator().manual_seed(_SIGN_SEED + hidden)
    return (torch.randint(0, 2, (hidden,), generator=gen) * 2 - 1).to(_FP32)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x M`` over the last dim in fp32 (see the module docstring): [..., H] -> [..., H]."""
    hidden = x.shape[-1]
    check_block(hidden, block)
    x = x.to(_FP32) * rotation_signs(hidden).to(x.device)
    blocks = x.reshape(*x.shape[:-1], hidden // block, block)
    return (blocks @ hadamard_matrix(block).to(x.device)).reshape(x.shape)


def unrotate(y: torch.Tensor, block: int) -> torch.Tensor:
    """``y M^T``, the inverse of ``rotate`` (fp32): [..., H] -> [..., H]."""
    hidden = y.shape[-1]
    check_block(hidden, block)
    y = y.to(_FP32)
    blocks = y.reshape(*y.shape[:-1], hidden // block, block)
    x = (blocks @ hadamard_matrix(block).to(y.device)).reshape(y.shape)
    return x * rotation_signs(hidden).to(y.device)


def rotation_matrix(hidden: int, block: int) -> torch.Tensor:
    """The dense [H, H] ``M`` (for folding and tests; the communicator never builds it)."""
    return rotate(torch.eye(hidden), block)


def fold_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Row-parallel weight slice [H, in/tp] with the forward rotation folded in: ``M^T W``,
    so that ``a @ fold_weight(W).T == rotate(a @ W.T)``."""
    m = rotation_matrix(weight.shape[0], block).to(weight.device)
    return (m.T @ weight.to(_FP32)).to(weight.dtype)


def rotation_effect(x: torch.Tensor, block: int, spec) -> dict:
    """What rotating one partial ``x`` [T, H] does to its quantization (the app's "why it works"
    panel). ``spec`` is a dynamic ``QuantSpec`` (per token or per group). Returns the rotated
    values ``rotated`` [T, H] and per token [T]: ``absmax`` / ``absmax_rotated`` (the scale is
    proportional to it), ``rms`` (rotation keeps it), and the relative L2 error of quantizing with
    ``spec`` without / with the rotation (the rotated one measured after rotating back):
    ``error`` / ``error_rotated`` over the whole token, ``rest_error`` / ``rest_error_rotated``
    over every feature except the token's largest |x| (what a spike does to its neighbours).
    """
    if not spec.dynamic:
        raise ValueError(f"spec: {spec} not allowed; allowed: a dynamic granularity (token, group)")
    x = x.to(_FP32)
    rest = torch.ones_like(x, dtype=torch.bool)
    rest.scatter_(-1, x.abs().argmax(-1, keepdim=True), False)

    def relative(err: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        norm = ref.norm(dim=-1)
        return err.norm(dim=-1) / torch.where(norm > 0, norm, torch.ones_like(norm))

    def errors(values: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        res = quantize(values, spec)
        back = dequantize(res.codes, spec, res.scales, res.mins)
        if inverse:
            back = unrotate(back, block)
        err = back - x
        return relative(err, x), relative(err * rest, x * rest)

    rotated = rotate(x, block)
    error, rest_error = errors(x, False)
    error_rotated, rest_error_rotated = errors(rotated, True)
    return dict(rotated=rotated, absmax=x.abs().amax(-1), absmax_rotated=rotated.abs().amax(-1),
                rms=x.pow(2).mean(-1).sqrt(), error=error, error_rotated=error_rotated, rest_error=rest_error,
                rest_error_rotated=rest_error_rotated)
