"""Block Walsh-Hadamard rotation as a Triton kernel, and the torch reference it must match.

    TRITON_INTERPRET=1 PYTHONPATH=. python -c "import torch; from kernels.hadamard import \\
        block_hadamard, block_hadamard_ref; x = torch.randn(7, 96); \\
        print((block_hadamard(x, 32) - block_hadamard_ref(x, 32)).abs().max())"

What it computes (``lowbit.rotation`` owns the definition): for every row and every block of
``R`` contiguous features, forward ``y = (x * s) @ Hn`` and inverse ``x = (y @ Hn) * s``, with
``s`` the fixed +-1 feature signs and ``Hn = H_R / sqrt(R)`` the normalized Sylvester-Hadamard
matrix, ``H[i, j] = (-1)^popcount(i & j)``.

The reference (``block_hadamard_ref``) is ``lowbit.rotation.rotate`` / ``unrotate``: it reads x
once, writes a signed copy, then a batched [rows, H/R, R] x [R, R] matmul (two passes over
T x H fp32 plus the R x R matrix). The kernel does one read and one write: each program loads a
[ROWS, R] tile, applies the signs in registers, builds ``Hn`` from the index bits (no matrix in
memory) and multiplies. ``R >= 16`` uses ``tl.dot`` in IEEE fp32; smaller blocks a broadcast
multiply-and-sum. Without CUDA and without ``TRITON_INTERPRET=1`` the wrapper falls back to the
reference, so the library runs everywhere.
"""
from __future__ import annotations

import math

import torch

from lowbit.rotation import check_block, rotate, rotation_signs, unrotate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is in requirements.txt; the reference still works
    triton = None

_FP32 = torch.float32


def block_hadamard_ref(x: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
    """Torch reference: ``lowbit.rotation.rotate`` (or ``unrotate``) in fp32."""
    return unrotate(x, block) if inverse else rotate(x, block)


if triton is not None:
    @triton.jit
    def _block_hadamard_kernel(x_ptr, out_ptr, signs_ptr, rows, stride_x, stride_out, scale,
                               BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROWS: tl.constexpr,
                               INVERSE: tl.constexpr, USE_DOT: tl.constexpr):
        pid_rows = tl.program_id(0)
        pid_block = tl.program_id(1)
        r = pid_rows * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK)
        cols = pid_block * BLOCK + c
        row_ok = r[:, None] < rows
        x = tl.load(x_ptr + r[:, None] * stride_x + cols[None, :], mask=row_ok, other=0.0).to(tl.float32)
        s = tl.load(signs_ptr + cols)
        if not INVERSE:
            x = x * s[None, :]
        both = c[:, None] & c[None, :]
        parity = both & 0
        for k in tl.static_range(LOG2_BLOCK):
            parity = parity ^ ((both >> k) & 1)
        h = (1.0 - 2.0 * parity.to(tl.float32)) * scale
        if USE_DOT:
            y = tl.dot(x, h, input_precision="ieee")
        else:
            y = tl.sum(x[:, :, None] * h[None, :, :], axis=1)
        if INVERSE:
            y = y * s[None, :]
        tl.store(out_ptr + r[:, None] * stride_out + cols[None, :], y, mask=row_ok)


def triton_available(device: torch.device) -> bool:
    """True when the kernel can run for tensors on ``device``: a GPU, or CPU tensors when the
    kernel was decorated under the interpreter (``kernels.dispatch.import_interpreted``)."""
    if triton is None:
        return False
    if type(_block_hadamard_kernel).__name__ == "InterpretedFunction":
        return device.type == "cpu"
    return device.type == "cuda"


def block_hadamard(x: torch.Tensor, block: int, inverse: bool = False, rows_per_program: int = 16) -> torch.Tensor:
    """Forward (or inverse) block rotation of x [..., H] -> fp32 [..., H] with the Triton kernel;
    the reference where Triton cannot run (see the module docstring)."""
    hidden = x.shape[-1]
    check_block(hidden, block)
    if not triton_available(x.device) or x.numel() == 0:
        return block_hadamard_ref(x, block, inverse)
    if rows_per_program < 1 or rows_per_program & (rows_per_program - 1):
        raise ValueError(f"rows_per_program: {rows_per_program} not allowed; allowed: a power of two")
    flat = x.reshape(-1, hidden).to(_FP32).contiguous()
    out = torch.empty_like(flat)
    signs = rotation_signs(hidden).to(x.device)
    rows = flat.shape[0]
    use_dot = block >= 16 and rows_per_program >= 16
    grid = (triton.cdiv(rows, rows_per_program), hidden // block)
    _block_hadamard_kernel[grid](flat, out, signs, rows, flat.stride(0), out.stride(0), 1.0 / math.sqrt(block),
                                 BLOCK=block, LOG2_BLOCK=max(1, block.bit_length() - 1), ROWS=rows_per_program,
                                 INVERSE=inverse, USE_DOT=use_dot)
    return out.reshape(x.shape)
