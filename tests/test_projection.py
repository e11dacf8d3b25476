"""The alpha-beta projection: formulas, fitting, and the check against measured records."""
from __future__ import annotations

import pytest

from lowbit.wire.accounting import wire_bytes

from lowbit.method.projection import (INTERCONNECTS, SHAPES, Gpu, allreduce_s, check_against, crossover_tokens,
                               fit_alpha_beta, gather_s, project, table)


def test_ring_formulas():
    alpha, beta = 1e-5, 1e9
    # N=2: one step each way; each rank sends half the message twice
    assert allreduce_s(2, 1e6, alpha, beta) == pytest.approx(2 * alpha + 1e6 / beta)
    assert allreduce_s(4, 1e6, alpha, beta) == pytest.approx(6 * alpha + 1.5e6 / beta)
    assert gather_s(4, 2.5e5, alpha, beta) == pytest.approx(3 * alpha + 7.5e5 / beta)


def test_fit_recovers_alpha_and_beta():
    a, b = fit_alpha_beta([(x, 3e-4 + x / 2e8) for x in (1e3, 1e5, 1e6, 1e7)])
    assert a == pytest.approx(3e-4, rel=1e-6) and 1 / b == pytest.approx(2e8, rel=1e-6)
    with pytest.raises(ValueError, match="two sizes"):
        fit_alpha_beta([(1.0, 1.0)])


def test_check_reports_zero_error_on_model_generated_records():
    alpha, beta, n = 2e-4, 1.25e7, 3
    recs = []
    for tokens in (16, 256, 2048, 8192):
        m = tokens * 576 * 2
        recs.append(dict(link="100mbit", tp=n, method="exact", tokens=tokens, hidden=576, bytes_per_rank=m,
                         median_ms=1e3 * allreduce_s(n, m, alpha, beta)))
        p = tokens * 576 * 4.25 / 8
        # shaped like the collective bench's records: bytes_per_rank is what one rank sends, (N-1) payloads
        recs.append(dict(link="100mbit", tp=n, method="gather", scheme="int4-token", tokens=tokens, hidden=576,
                         bytes_per_rank=wire_bytes("gather", n, p), median_ms=1e3 * gather_s(n, p, alpha, beta)))
    rows = check_against(recs)
    assert len(rows) == len(recs)
    assert max(abs(r["rel_error"]) for r in rows) < 1e-6
    assert rows[0]["alpha_us"] == pytest.approx(200, rel=1e-4) and rows[0]["beta_gbps"] == pytest.approx(0.0125)


def test_projection_is_consistent():
    shape, pcie = SHAPES["llama2-13b"], INTERCONNECTS["pcie4"]
    r = project(shape, pcie, 8, 8192, 4.1875)
    assert r["comm_speedup"] > 1 and 1 < r["e2e_speedup"] < r["comm_speedup"]
    # a faster link makes quantization matter less
    assert project(shape, INTERCONNECTS["nvlink4"], 8, 8192, 4.1875)["e2e_speedup"] < r["e2e_speedup"]
    # a free, infinitely fast codec is bounded by the byte ratio plus latency terms
    fast = Gpu(hbm_gbps=1e9, launch_us=0.0)
    assert project(shape, pcie, 8, 8192, 4.1875, fast)["comm_speedup"] < 16 / 4.1875 + 1e-9
    assert crossover_tokens(shape, INTERCONNECTS["nvlink4"], 8, 4.1875) > 1
    assert "A model, not a measurement" in table()
