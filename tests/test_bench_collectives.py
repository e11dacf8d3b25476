"""bench.collectives on threaded fake groups: the records, their byte and bit accounting, the
fused-path plumbing against lowbit's communicator, and the collective-bench spec checks."""
from __future__ import annotations

import pytest
import torch

from bench.collectives import (DEFAULT_SCHEMES, bench_on_group, check_params, codec_module, data_calibration,
                               format_table, timed_communicator, outlier_features, synthetic_partial)
from launch.spec import JobSpec, SpecError
from lowbit.site import Site
from lowbit.comm.dist import ThreadWorld
from tests.helpers import assert_close_verbose

# lowbit's torch path: no torch.compile in fast tests (the fused path is compared separately)
FAST = dict(repeats=2, min_repeats=1, warmup=1, budget_s=0.5, codec="reference")


def _run(tp, **params):
    return ThreadWorld(tp).run(lambda g: bench_on_group(g, dict(FAST, **params)))


def test_one_record_per_size_and_scheme_with_the_fields_the_readme_reads():
    schemes = ["bf16", "int4-static-top1/64", "int4-static-top1/64@twoshot+int4-token"]
    per_rank = _run(3, tokens=[1, 16], hidden=[576], schemes=schemes)
    records = per_rank[0]
    assert [(r["tokens"], r["scheme"]) for r in records] == [(t, s) for t in (1, 16) for s in schemes]
    for r in records:
        for key in ("tp", "tokens", "hidden", "method", "scheme", "link", "median_ms", "speedup_vs_bf16",
                    "bytes_per_rank", "bits_per_value"):
            assert r[key] is not None, (key, r)
        assert r["median_ms"] > 0 and r["repeats"] >= 1
    assert {r["method"] for r in records} == {"exact", "gather", "two_shot"}
    assert all(r["speedup_vs_bf16"] == 1.0 for r in records if r["scheme"] == "bf16")
    # every rank reports the same timings (the slowest rank of each repeat)
    assert [r["median_ms"] for r in per_rank[1]] == [r["median_ms"] for r in records]
    assert "int4-static-top1/64" in format_table(records)


def test_paper_scheme_is_4_1875_bits_and_bytes_follow_each_algorithm():
    tokens, hidden, tp = 16, 576, 3
    records = {r["scheme"]: r for r in _run(tp, tokens=[tokens], hidden=[hidden],
                                            schemes=["bf16", "int4-static-top1/64", "int8-static@twoshot+int8-token"])[0]}
    bf16_bytes = tokens * hidden * 2
    assert records["bf16"]["bytes_per_rank"] == 2 * (tp - 1) * bf16_bytes // tp  # ring all-reduce
    assert records["bf16"]["bits_per_value"] == 16.0
    paper = records["int4-static-top1/64"]
    assert paper["bits_per_value"] == 4.1875  # 63/64 * 4 + 1/64 * 16, exact in binary
    assert paper["bytes_per_rank"] == (tp - 1) * tokens * hidden * 4.1875 / 8  # gather: tp - 1 payloads
    two = records["int8-static@twoshot+int8-token"]
    # leg 1: tp - 1 int8 chunks of hidden/tp; leg 2: tp - 1 int8 chunks + one bf16 scale per token
    chunk = tokens * hidden // tp
    assert two["bytes_per_rank"] == (tp - 1) * chunk + (tp - 1) * (chunk + 2 * tokens)
    assert two["leg2_bits_per_value"] == pytest.approx(8 + 16 * tp / hidden)


def test_quantized_paths_compute_the_sum():
    records = _run(2, tokens=[16], hidden=[64], schemes=DEFAULT_SCHEMES)[0]
    errors = {r["scheme"]: r["rel_error"] for r in records}
    # Measured on these seeded 16 x 64 partials at TP 2 (in brackets); each bound is about 2-4x it.
    # bf16 rounding of the inputs and the sum: 2**-8 relative per value at most (0.0026); 8e-3 = 2 x 2**-8
    assert errors["bf16"] < 8e-3
    # int8 with exact static ranges: step = range/255, RMS error step/sqrt(12) per value (0.0055);
    # the two-shot rounds twice, the second time per token (0.013)
    assert errors["int8-static"] < 0.02 and errors["int8-static@twoshot+int8-token"] < 0.03
    # int4 keeps the big features in bf16; the rest has step 2*absmax/15 (0.025, per-feature static
    # ranges are tight). 0.15 is the uniform error step/sqrt(12) of a +-4 RMS range: 8/15/sqrt(12) = 0.154
    assert errors["int4-static-top1/64"] < 0.15
    # int2 only has to be a sum, not a good one: 4 levels (0.40); a lost signal reads >= 1
    assert errors["int2-static"] < 1.0


def test_two_shot_that_cannot_split_the_features_is_a_skipped_record():
    records = _run(3, tokens=[4], hidden=[64], schemes=["bf16", "int8-static@twoshot+int8-token"])[0]
    skipped = records[1]
    assert skipped["median_ms"] is None and "divisible" in skipped["skipped"], skipped
    assert "skipped" in format_table(records)


@pytest.mark.parametrize("scheme", ["bf16", "int8-static", "int8-static@twoshot+int8-token"])
def test_no_wire_group_reduces_tp_copies_of_the_own_partial(scheme):
    """compute_ms runs the reduce on NoWireGroup: same shapes, no traffic, so the 'sum' over tp
    ranks is tp x this rank's own data (up to int8 steps)."""
    from bench.collectives import NoWireGroup
    tp, partial = 3, synthetic_partial(8, 96, 1, 0, torch.float32)
    group = NoWireGroup(1, tp)
    # every rank calibrated on this partial: the copies decode with the scales they were encoded with
    calib = ThreadWorld(tp).run(lambda g: data_calibration(g, partial))[1]
    out = timed_communicator(group, scheme, calib, None).reduce(partial, Site(0, "down_proj"))
    expected, scale = tp * partial, partial.abs().amax(0)
    if "twoshot" in scheme:  # every leg hands back this rank's own feature chunk (rank 1: columns 32..63)
        expected, scale = expected[:, 32:64].repeat(1, tp), scale[32:64].repeat(tp)
    # int8 static: step = 2 absmax / 255 per feature and copy (half a step of error each; a whole
    # step here for margin); two-shot's per-token int8 leg adds a step of 2 rowmax / 255
    bound = tp * (2 * scale) / 255 + 1e-6
    if "twoshot" in scheme:
        bound = bound + 2 * expected.abs().amax(1, keepdim=True) / 255
    assert_close_verbose(out, expected, atol=bound, msg=scheme)


def test_compute_ms_is_reported_and_can_be_skipped():
    with_compute = _run(2, tokens=[4], hidden=[64], schemes=["int8-static"], compute_repeats=1)[0]
    assert all(r["compute_ms"] > 0 for r in with_compute)
    without = _run(2, tokens=[4], hidden=[64], schemes=["int8-static"], compute_repeats=0)[0]
    assert all(r["compute_ms"] is None for r in without)


def test_bf16_baseline_is_always_measured():
    records = _run(2, tokens=[4], hidden=[64], schemes=["int8-static"])[0]
    assert [r["scheme"] for r in records] == ["bf16", "int8-static"]


@pytest.mark.parametrize("scheme", ["int4-static-top1/64", "int2-static", "int4-token-top1/64",
                                    "int4-static-top1/64@twoshot+int4-token", "int8-static@twoshot+int8-token",
                                    "int3a-group16-top1/64@twoshot+int8-token"])
def test_fused_path_equals_lowbit_communicator(scheme):
    """The kernels codec (``params.codec = kernels``: here the native kernels) returns the very values
    of lowbit.comm.collectives.QuantCommunicator: same bytes on the wire, same fp32 sums."""
    label, reference = codec_module("kernels")
    assert label == "kernels.dispatch"
    tokens, hidden, tp = 5, 96, 3

    def body(group):
        partial = synthetic_partial(tokens, hidden, group.rank, 3, torch.bfloat16)
        calib = data_calibration(group, partial)
        site = Site(0, "down_proj")
        plain = timed_communicator(group, scheme, calib, None)._reduce(partial, site)
        fused = timed_communicator(group, scheme, calib, reference)._reduce(partial, site)
        return plain, fused

    for rank, ((out_a, bytes_a, extra_a), (out_b, bytes_b, extra_b)) in enumerate(ThreadWorld(tp).run(body)):
        assert_close_verbose(out_b, out_a, msg=f"rank {rank} {scheme}")  # bit-equal: same math, same order
        assert bytes_a == bytes_b and extra_a["bytes_received"] == extra_b["bytes_received"]


def test_calibration_from_the_data_selects_the_synthetic_outliers():
    hidden = 128
    partials = ThreadWorld(2).run(lambda g: data_calibration(g, synthetic_partial(64, hidden, g.rank, 0,
                                                                                  torch.float32)))
    from lowbit.method.calibrate import select_outliers
    from lowbit.scheme import parse_scheme
    idx = select_outliers(partials[0], Site(0, "down_proj"), parse_scheme("int4-static-top1/64").outliers, hidden)
    assert idx.tolist() == outlier_features(hidden, 0).tolist()


def test_codec_names_the_path_and_refuses_the_removed_compiled_one():
    """One spelling (launch.kinds.codec): kernels or reference; the values older runs stored read as
    what they meant, and the torch.compile path that no longer exists is refused by name."""
    assert codec_module("reference") == ("lowbit.wire.payload", None)
    assert codec_module("lowbit") == ("lowbit.wire.payload", None)  # a stored run's old spelling
    assert codec_module("auto")[0] == "kernels.dispatch"
    with pytest.raises(ValueError, match="codec"):
        codec_module("fused")


@pytest.mark.parametrize("params, field", [
    (dict(tokens=[0]), "params.tokens"),
    (dict(tokens=[]), "params.tokens"),
    (dict(hidden="576"), "params.hidden"),
    (dict(schemes=["int9-static"]), "params.schemes[0]"),
    (dict(schemes=[]), "params.schemes"),
    (dict(repeats=0), "params.repeats"),
    (dict(warmup=True), "params.warmup"),
    (dict(budget_s=0), "params.budget_s"),
    (dict(budget_s="20"), "params.budget_s"),
    (dict(codec="cuda"), "params.codec"),
    (dict(dtype="fp8"), "params.dtype"),
    (dict(tokenz=[1]), "params.tokenz"),
])
def test_bad_params_are_refused_by_field(params, field):
    assert field in [f for f, _ in check_params(params)]
    with pytest.raises(SpecError) as err:
        JobSpec(kind="collective-bench", model="none", tp=2, params=params)
    assert field in err.value.fields()


def test_default_params_and_loopback_spec_are_valid():
    assert check_params({}) == []
    spec = JobSpec(kind="collective-bench", model="none", tp=4, params=dict(tokens=[1, 8192], hidden=[576, 5120]))
    assert spec.link == "loopback"


def test_emulated_link_without_namespace_rights_is_refused_on_field_link(monkeypatch, capsys):
    from bench import collectives
    from launch import cluster
    monkeypatch.setattr(cluster, "_effective_caps", lambda: 0)
    assert collectives.main(["--tp", "3", "--link", "100mbit"]) == 2
    err = capsys.readouterr().err
    assert "link:" in err and "loopback" in err and "CAP_NET_ADMIN" in err, err


def test_markdown_table_has_one_column_per_link(tmp_path, capsys):
    import json

    from bench.collectives import main
    records = _run(2, tokens=[4], hidden=[64], schemes=["int8-static"])[0]
    both = records + [dict(r, link="100mbit") for r in records]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(dict(meta={}, records=both)))
    assert main(["--markdown", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "loopback: ms" in lines[0] and "100mbit: ms" in lines[0]
    assert len(lines) == 2 + 2 and "`int8-static`" in lines[3]
