"""The Triton block-Hadamard kernel equals its torch reference (run by the Triton interpreter
on CPU; on a GPU machine the same tests run the compiled kernel on CUDA tensors)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kernels import dispatch
from tests.helpers import assert_close_verbose

if importlib.util.find_spec("triton") is None:  # not importorskip: triton must first load under the interpreter
    pytest.skip("triton is not installed", allow_module_level=True)
# CPU: the kernel under the Triton interpreter (reloaded if an earlier test imported it compiled)
hadamard = (__import__("kernels.hadamard", fromlist=["_"]) if torch.cuda.is_available()
            else dispatch.import_interpreted("kernels.hadamard", reload=True))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(hadamard.triton is None, reason="triton is not installed")


def test_the_kernel_runs_here():
    assert hadamard.triton_available(DEVICE)


# (rows, hidden, block, rows per program, dtype): rows that do not fill the last tile, several
# blocks per row, blocks from 2 (broadcast-sum path) to 64 (tl.dot path), one-row programs.
# The interpreter runs every program in Python, so shapes stay small and bf16 input is checked
# on two of them.
CASES = [(1, 16, 16, 16, torch.float32), (7, 96, 32, 16, torch.float32), (5, 24, 8, 4, torch.float32),
         (3, 16, 2, 2, torch.float32), (33, 576, 64, 16, torch.float32), (5, 128, 64, 1, torch.float32),
         (2, 8, 8, 32, torch.float32), (7, 96, 32, 16, torch.bfloat16), (5, 24, 8, 4, torch.bfloat16)]


@pytest.mark.parametrize("rows, hidden, block, per_program, dtype", CASES)
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_matches_reference(rows, hidden, block, per_program, dtype, inverse):
    x = (torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows * hidden + block)) * 5).to(dtype)
    x = x.to(DEVICE)
    got = hadamard.block_hadamard(x, block, inverse, rows_per_program=per_program)
    want = hadamard.block_hadamard_ref(x, block, inverse)
    assert got.dtype == torch.float32 and got.shape == x.shape
    # Both sum R fp32 products, in a different order: a few ulps of the row's magnitude
    # (IEEE fp32 dot, no TF32).
    bound = 4e-7 * block ** 0.5 * x.float().abs().amax(-1, keepdim=True)
    assert_close_verbose(got.cpu(), want.cpu(), atol=bound.cpu(), msg=f"{rows}x{hidden} R={block} inv={inverse}")


def test_kernel_round_trips_and_keeps_leading_dims():
    x = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(192)).to(DEVICE)
    y = hadamard.block_hadamard(x, 64)
    assert y.shape == x.shape
    back = hadamard.block_hadamard(y, 64, inverse=True)
    assert_close_verbose(back.cpu(), x.cpu(), atol=1e-5)  # two fp32 passes of 64-term sums


def test_bad_arguments():
    with pytest.raises(ValueError, match="does not divide"):
        hadamard.block_hadamard(torch.zeros(2, 96), 64)
    with pytest.raises(ValueError, match="power of two"):
        hadamard.block_hadamard(torch.zeros(2, 96), 32, rows_per_program=3)
    assert hadamard.block_hadamard(torch.zeros(0, 64), 64).shape == (0, 64)
