"""The CPU production path (kernels.fused_cpu, torch.compile graphs) bit-identical to the eager
reference, at several token counts from one compiled graph, and on degenerate input.

    .venv/bin/python -m pytest tests/test_kernels_compiled.py -q

Marked slow: every new (spec, hidden, outliers) compiles three graphs, a few seconds each on two
cores (the inductor cache makes later runs faster).
"""
from __future__ import annotations

import pytest
import torch

from kernels import dispatch, fused_cpu
from kernels import reference as ref
from lowbit.wire.payload import layout
from lowbit.scheme import QuantSpec

from tests.helpers import assert_close_verbose
from tests.test_kernels import OUTLIERS, H, assert_same_bytes, partial, spec_id, static_args

pytestmark = pytest.mark.slow

PAPER = QuantSpec(4, True, "static")
CASES = [  # (spec, outliers, input dtype)
    (PAPER, OUTLIERS, torch.float32),
    (QuantSpec(4, False, "group", 40), OUTLIERS, torch.bfloat16),
    (QuantSpec(8, True, "token", scale_dtype=torch.float32), None, torch.float32),
    (QuantSpec(3, True, "token"), OUTLIERS, torch.float32),  # straddling codes: eager bit packer
]


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def rank_payloads(spec, outliers, tokens, dtype, tp=3, seed=30):
    xs = [partial(seed + r, tokens, H, dtype) for r in range(tp)]
    ranges = [static_args(spec, x) for x in xs]
    return xs, ranges


@pytest.mark.parametrize("spec,outliers,dtype", CASES, ids=[spec_id(c[0]) for c in CASES])
def test_compiled_path_is_bit_identical_to_the_eager_reference_at_any_token_count(spec, outliers, dtype):
    n_out = 0 if outliers is None else outliers.numel()
    graphs_after_first = None
    for tokens in (7, 12, 33):  # 7 compiles (tokens dynamic); 12 and 33 reuse its graphs
        xs, ranges = rank_payloads(spec, outliers, tokens, dtype)
        payloads = []
        for x, (lo, hi) in zip(xs, ranges):
            got = fused_cpu.quantize_pack(x, spec, outliers, lo, hi)
            assert_same_bytes(got, ref.quantize_pack_ref(x, spec, outliers, lo, hi), layout(tokens, H, spec, n_out),
                              f"tokens={tokens}")
            payloads.append(got)
        payloads = torch.stack(payloads)
        static = ((torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges]))
                  if spec.granularity == "static" else (None, None))
        for out_dtype in (torch.float32, torch.bfloat16):
            got = fused_cpu.unpack_dequant_sum(payloads, tokens, H, spec, outliers, *static, out_dtype=out_dtype)
            want = ref.unpack_dequant_sum_ref(payloads, tokens, H, spec, outliers, *static, out_dtype=out_dtype)
            # same fp32 ops in the same order; inductor keeps IEEE division and adds no FMA
            assert_close_verbose(got.float(), want.float(), atol=0.0, msg=f"tokens={tokens} {out_dtype}")
        if graphs_after_first is None:
            graphs_after_first = compiled_graphs()
    assert compiled_graphs() == graphs_after_first, "a new token count recompiled a graph"


def test_compiled_path_handles_one_token_the_decode_step():
    xs, ranges = rank_payloads(PAPER, OUTLIERS, 1, torch.float32)
    payloads = torch.stack([fused_cpu.quantize_pack(x, PAPER, OUTLIERS, lo, hi) for x, (lo, hi) in zip(xs, ranges)])
    want = torch.stack([ref.quantize_pack_ref(x, PAPER, OUTLIERS, lo, hi) for x, (lo, hi) in zip(xs, ranges)])
    assert_same_bytes(payloads.reshape(-1), want.reshape(-1))
    mins, maxs = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
    assert_close_verbose(fused_cpu.unpack_dequant_sum(payloads, 1, H, PAPER, OUTLIERS, mins, maxs),
                         ref.unpack_dequant_sum_ref(payloads, 1, H, PAPER, OUTLIERS, mins, maxs), atol=0.0)


def test_compiled_two_shot_requant_bytes_equal_reference():
    # one rank's chunk of a 600-feature partial at TP 3; the first leg reuses CASES' graphs
    first, second, tokens, width = PAPER, QuantSpec(8, True, "token"), 5, H
    local = OUTLIERS
    xs = [partial(40 + r, tokens, width) for r in range(3)]
    ranges = [static_args(first, x) for x in xs]
    payloads = torch.stack([ref.quantize_pack_ref(x, first, local, lo, hi) for x, (lo, hi) in zip(xs, ranges)])
    mins, maxs = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
    got = fused_cpu.unpack_dequant_sum_requant(payloads, tokens, width, first, local, mins, maxs, second)
    want = ref.unpack_dequant_sum_requant_ref(payloads, tokens, width, first, local, mins, maxs, second)
    assert_same_bytes(got, want, layout(tokens, width, second, 3))


@pytest.mark.parametrize("spec", [PAPER, QuantSpec(4, False, "group", 40)], ids=spec_id)
def test_compiled_path_on_degenerate_input(spec):
    lo_hi = (-torch.ones(H), torch.ones(H)) if spec.granularity == "static" else (None, None)
    dtype = torch.float32 if spec.granularity == "static" else torch.bfloat16  # reuse CASES' graphs
    empty = fused_cpu.quantize_pack(torch.zeros(0, H, dtype=dtype), spec, OUTLIERS, *lo_hi)
    assert empty.shape == (0,)
    static = tuple(t.unsqueeze(0) for t in lo_hi) if lo_hi[0] is not None else (None, None)
    assert fused_cpu.unpack_dequant_sum(empty.unsqueeze(0), 0, H, spec, OUTLIERS, *static).shape == (0, H)

    x = partial(50, 9, H)
    x[2] = 0.0  # all-zero row: scale 0
    x[0, 7], x[1, 8], x[2, 9] = float("nan"), float("inf"), -float("inf")
    x[3, OUTLIERS[0]] = float("nan")
    lo, hi = static_args(spec, torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0))
    x = x.to(dtype).t().contiguous().t()  # non-contiguous (column-major)
    got = fused_cpu.quantize_pack(x, spec, OUTLIERS, lo, hi)
    assert_same_bytes(got, ref.quantize_pack_ref(x, spec, OUTLIERS, lo, hi), layout(9, H, spec, 3))
    static = (lo.unsqueeze(0), hi.unsqueeze(0)) if lo is not None else (None, None)
    out = fused_cpu.unpack_dequant_sum(got.unsqueeze(0), 9, H, spec, OUTLIERS, *static)
    assert_close_verbose(out, ref.unpack_dequant_sum_ref(got.unsqueeze(0), 9, H, spec, OUTLIERS, *static), atol=0.0)
    if spec.symmetric:
        assert torch.equal(out[2, :7], torch.zeros(7))
    with pytest.raises(TypeError, match="dtype"):
        fused_cpu.quantize_pack(x.double(), spec, OUTLIERS, lo, hi)


def test_dispatch_auto_on_cpu_runs_the_compiled_path_without_numba(monkeypatch):
    """Where the numba kernels cannot load, auto keeps the compiled path for large CPU messages."""
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "_compile_broken", None)
    monkeypatch.setattr(dispatch, "native_available", lambda: False)
    x = partial(60, tokens=400)  # 80k values: above FUSED_MIN_VALUES
    assert dispatch.backend("cpu", 4, x.numel()) == "compiled"
    lo, hi = static_args(PAPER, x)
    calls = []
    original = fused_cpu.quantize_pack
    monkeypatch.setattr(fused_cpu, "quantize_pack", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert_same_bytes(dispatch.quantize_pack(x, PAPER, OUTLIERS, lo, hi), ref.quantize_pack_ref(x, PAPER, OUTLIERS, lo, hi))
    assert calls == [1]
