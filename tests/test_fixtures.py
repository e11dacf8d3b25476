"""The checked-in fixtures (tests/fixtures/jobs, made by tests/scripts/make_fixtures.py from real
runs of every job kind) still have the shape real runs have today: one is made afresh through the
launcher (torchrun ranks, gloo) and must have the same keys and value types.

    .venv/bin/python -m pytest tests/test_fixtures.py -q
"""
from __future__ import annotations

import json

import pytest

from tests.helpers import json_shape
from tests.scripts.make_fixtures import fixture_result, fixture_spec, make


@pytest.mark.slow
def test_a_fresh_collective_bench_run_has_the_keys_and_types_of_the_checked_in_fixture(tmp_path):
    """The collective bench's records are what the app tests read as measured (their timings need
    real processes); a change to the bench's output fails here until the fixtures are made again
    (``python tests/scripts/make_fixtures.py``)."""
    name = "collective-bench-tp2"
    folder = make([name], tmp_path)[name]
    fresh_result = json.loads((folder / "result.json").read_text())
    fresh_spec = json.loads((folder / "spec.json").read_text())
    for fresh, kept in ((fresh_result, fixture_result(name)), (fresh_spec, fixture_spec(name))):
        drift = sorted(json_shape(fresh) ^ json_shape(kept))
        assert not drift, f"{name} drifted from tests/fixtures/jobs/{name} (path, type): {drift}"
    assert fresh_spec == fixture_spec(name)  # the same spec, every field
    assert [(r["tokens"], r["scheme"]) for r in fresh_result["records"]] == \
        [(r["tokens"], r["scheme"]) for r in fixture_result(name)["records"]]
