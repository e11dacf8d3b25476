"""bench.classroom_load's figures when the server falls behind: a client that timed out counts as
slower than every finished one (never dropped, never given a made-up time), and docs/classroom.md's
cells say "> the timeout" with how many were late.

    .venv/bin/python -m pytest tests/test_bench_classroom.py -q
"""
from __future__ import annotations

from bench.blocks.classroom import _cpu, _timing
from bench.classroom_load import cpu_of, summary


def test_a_timed_out_client_ranks_after_every_finished_one():
    s = summary([0.5, None, 0.25, 1.0], timeout_s=120.0)
    assert s["all_s"] == [0.25, 0.5, 1.0, None]
    assert s["median_s"] == 0.75  # the middle two of four: (0.5 + 1.0) / 2
    assert s["worst_s"] is None and s["timed_out"] == 1 and s["n"] == 4 and s["timeout_s"] == 120.0


def test_a_median_that_falls_on_a_timed_out_client_is_unknown_not_a_number():
    assert summary([None, 0.5, None], timeout_s=60.0)["median_s"] is None  # odd count: the middle one timed out
    assert summary([None, 0.5], timeout_s=60.0)["median_s"] is None  # even count: one of the middle two did
    finished = summary([0.3, 0.1, 0.2], timeout_s=60.0)
    assert (finished["median_s"], finished["worst_s"], finished["timed_out"]) == (0.2, 0.3, 0)


def test_the_docs_cell_says_how_many_clients_were_late():
    late = summary([None] * 24 + [0.5] * 6, timeout_s=120.0)
    assert _timing(late, 1.0, 2.0) == "> 120 s / > 120 s (missed, 24 of 30 not done within 120 s)"
    assert _timing(summary([0.09, 0.37], timeout_s=120.0), 1.0, 2.0) == "0.23 s / 0.37 s"
    assert _timing(summary([0.9, 2.5], timeout_s=120.0), 1.0, 2.0) == "1.70 s / 2.50 s (missed)"


def test_a_phase_with_no_script_run_renders_a_dash_not_a_crash():
    assert cpu_of([]) == dict(runs=0, median_s=None, total_s=0)  # every tab timed out before its change
    assert _cpu(cpu_of([])) == "-"
    assert _cpu(cpu_of([dict(thread_cpu_s=0.04), dict(thread_cpu_s=0.02), dict(thread_cpu_s=0.03)])) == "0.030 s"
