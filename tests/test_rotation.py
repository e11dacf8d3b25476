"""Rotation (-rot<R>): exact fp32 round trip, the grammar, the communicator's math and bits,
and folding the forward rotation into the row-parallel weights."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.comm.collectives import QuantCommunicator
from lowbit.wire.accounting import scheme_bits_per_value
from lowbit.wire.payload import scheme_layout
from lowbit.site import Site
from lowbit.comm.dist import ThreadWorld
from lowbit.model.engine import build_tp_model
from lowbit.wire.payload import decode, encode
from lowbit.model.tp import fold_rotation
from lowbit.rotation import (fold_weight, hadamard_matrix, rotate, rotation_effect, rotation_matrix,
                             unrotate)
from lowbit.scheme import QuantSpec, Scheme, SchemeError, parse_scheme, parse_scheme_map
from tests.collective_cases import HIDDEN, TOKENS, fake_calibration, partials, reduce_on_threads
from tests.helpers import assert_close_verbose

SITE = Site(1, "down_proj")


@pytest.mark.parametrize("block", [1, 2, 8, 64])
def test_hadamard_matrix_is_symmetric_orthogonal(block):
    h = hadamard_matrix(block)
    # fp32 entries +-1/sqrt(R); H @ H sums R products: 1e-6 covers its rounding
    assert_close_verbose(h, h.T, msg="symmetric")
    assert_close_verbose(h @ h, torch.eye(block), atol=1e-6, msg="orthogonal")


@pytest.mark.parametrize("shape, block", [((5, 96), 32), ((2, 3, 576), 64), ((1, 8), 8), ((7, 64), 2)])
def test_rotation_round_trips_in_fp32(shape, block):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(block)) * 10
    x[..., 3] *= 1000  # a massive activation
    y = rotate(x, block)
    # Two fp32 matmuls of R terms each: the error is a few ulps of the block's magnitude.
    scale = x.abs().amax(-1, keepdim=True)
    assert_close_verbose(unrotate(y, block), x, atol=2e-6 * scale, msg="unrotate(rotate(x))")
    assert_close_verbose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, msg="norm kept")


def test_rotation_spreads_a_massive_feature_over_its_block():
    x = torch.zeros(1, 64)
    x[0, 5] = 1000.0
    y = rotate(x, 64)
    assert_close_verbose(y.abs(), torch.full((1, 64), 1000.0 / 8), rtol=1e-6)  # 1000 / sqrt(64)


def test_rotation_effect_shows_the_spike_spread_and_the_neighbours_saved():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 128, generator=gen)
    x[0, 7] = 40.0  # one large value in token 0
    eff = rotation_effect(x, 64, QuantSpec(4, True, "token"))
    assert eff["absmax"][0] == 40.0 and eff["absmax_rotated"][0] < 40.0 / 8 + 4  # ~ 40 / sqrt(64) + noise
    assert_close_verbose(eff["rms"], x.pow(2).mean(-1).sqrt())
    assert_close_verbose(eff["rotated"], rotate(x, 64))
    # unrotated, the spike's step (40 * 2/15 = 5.3) zeroes every other value of token 0 with
    # |x| < 2.67, 99 % of standard normal values: a relative error of ~1 (measured 1.0);
    # rotated, the largest value is 6.96 and the step 0.93: step/sqrt(12) = 0.27 of the rest's RMS
    # of ~1 (measured 0.28); 0.4 leaves 1.4x, still far from the unrotated 1.0
    assert eff["rest_error"][0] > 0.9
    assert eff["rest_error_rotated"][0] < 0.4
    # errors are relative L2 errors against the original token
    assert ((eff["error"] >= 0) & (eff["error"] < 1)).all() and ((eff["rest_error_rotated"] >= 0)).all()
    with pytest.raises(ValueError, match="dynamic granularity"):
        rotation_effect(x, 64, QuantSpec(4, True, "static"))


def test_rotation_is_the_dense_block_diagonal_matrix():
    m = rotation_matrix(96, 32)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(96))
    assert_close_verbose(rotate(x, 32), x @ m, atol=1e-5)
    assert torch.count_nonzero(m[:32, 32:]) == 0  # block diagonal: features never cross blocks
    assert_close_verbose(m @ m.T, torch.eye(96), atol=1e-6)


def test_bad_block_sizes_are_refused():
    with pytest.raises(ValueError, match="does not divide"):
        rotate(torch.zeros(2, 96), 64)
    with pytest.raises(ValueError, match="power of two"):
        rotate(torch.zeros(2, 96), 3)


# -- grammar --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["int3-token-rot64", "int4-group32-top1/64-rot64-sr", "int4-token-sr",
                                  "int4-token-rot64@twoshot+int8-token", "int2a-group16-rand1/32s3-rot16",
                                  "int4-token-sr@twoshot+int4-group8"])
def test_rotation_and_sr_strings_are_canonical(text):
    assert str(parse_scheme(text)) == text


rot_schemes = st.builds(
    lambda bits, sym, gran, outl, rot, sr, two: f"int{bits}{'' if sym else 'a'}-{gran}{outl}{rot}{sr}{two}",
    st.sampled_from([2, 3, 4, 8]), st.booleans(), st.sampled_from(["token", "group16", "group32"]),
    st.sampled_from(["", "-top1/32", "-rand1/16s5"]), st.sampled_from(["", "-rot2", "-rot32"]),
    st.sampled_from(["", "-sr"]), st.sampled_from(["", "@twoshot+int8-token"]),
).filter(lambda t: not ("@twoshot" in t and "-rot" in t and ("-top" in t or "-rand" in t)))


@settings(max_examples=100, deadline=None)
@given(rot_schemes)
def test_rotated_scheme_strings_round_trip(text):
    scheme = parse_scheme(text)
    assert str(scheme) == text and parse_scheme(str(scheme)) == scheme
    smap = parse_scheme_map(f"bf16;L2.o_proj={text}")
    assert parse_scheme_map(str(smap)) == smap


@pytest.mark.parametrize("text, field, words", [
    ("int4-static-rot64", "rotation", "dynamic scales"),
    ("int4-token-rot48", "rotation", "power of two"),
    ("int4-token-rot1", "rotation", "power of two"),
    ("int4-token-top1/64-rot64@twoshot", "rotation", "gather"),
    ("int4-token-sr-rot64", "outliers", "rot<R>, sr"),
])
def test_bad_rotation_schemes_name_the_field(text, field, words):
    with pytest.raises(SchemeError) as info:
        parse_scheme(text)
    assert info.value.field == field and words in str(info.value), str(info.value)


def test_rotation_block_must_divide_hidden():
    parse_scheme("int4-token-rot64").validate_for(576, 3)
    with pytest.raises(SchemeError, match="rotation: block size 128 does not divide hidden size 576; allowed: 2, 4, 8, 16, 32, 64"):
        parse_scheme("int4-token-rot128").validate_for(576, 3)
    with pytest.raises(SchemeError, match="rotation"):
        Scheme("exact", "bf16", rotation=64)


# -- communicator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int4-token-rot32", "int3a-group16-rot16", "int4-group16-top1/32-rot32"])
def test_rotated_gather_matches_single_process_math(scheme):
    tp, s = 3, parse_scheme(scheme)
    from lowbit.method.calibrate import select_outliers
    idx = select_outliers(fake_calibration(tp), SITE, s.outliers, HIDDEN)
    summed = torch.zeros(TOKENS, HIDDEN)
    outl = torch.zeros(TOKENS, idx.numel())
    for x in partials(tp):
        rest = x.clone()
        rest[:, idx] = 0
        r = rotate(rest, s.rotation)
        summed += decode(encode(r, s.quant)[0], TOKENS, HIDDEN, s.quant)
        outl += x[:, idx].to(torch.bfloat16).float()
    expected = unrotate(summed, s.rotation)
    expected[:, idx] = outl
    for rank, (out, _) in enumerate(reduce_on_threads(scheme, tp)):
        # same operations in the same order; 1e-5 allows another platform's matmul blocking
        assert_close_verbose(out, expected, atol=1e-5, msg=f"{scheme} rank {rank}")


def test_rotation_lowers_the_error_of_outlier_heavy_partials():
    tp = 3
    xs = partials(tp)
    exact = torch.stack(xs).sum(0)
    errors = {}
    for scheme in ("int4-token", "int4-token-rot32", "int3-token", "int3-token-rot32"):
        out = reduce_on_threads(scheme, tp, xs)[0][0]
        errors[scheme] = ((out - exact).norm() / exact.norm()).item()
    # Measured: 0.36x (int4) and 0.62x (int3) of the unrotated error on these seeded partials;
    # 0.75 leaves room for another platform's rounding and still fails if rotation does nothing.
    assert errors["int4-token-rot32"] < 0.75 * errors["int4-token"], errors
    assert errors["int3-token-rot32"] < 0.75 * errors["int3-token"], errors


def test_rotated_two_shot_matches_the_rotated_gather_up_to_the_second_leg():
    tp = 3
    exact = torch.stack(partials(tp)).sum(0)
    gather = reduce_on_threads("int8-token-rot32", tp)[0][0]
    two = reduce_on_threads("int8-token-rot32@twoshot+int8-token", tp)[0][0]
    # the second int8 leg adds at most ~1% of the sum's norm on these partials
    assert ((two - gather).norm() / exact.norm()).item() < 0.01


def test_rotated_bits_count_the_outlier_section():
    tp, hidden, tokens = 3, 576, 8
    x = [torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(r)) for r in range(tp)]
    cal = fake_calibration(tp, hidden=hidden)

    def body(group):
        comm = QuantCommunicator(group, "int3-token-top1/64-rot64", cal)
        comm.reduce(x[group.rank], SITE)
        return comm.calls[-1]
    call = ThreadWorld(tp).run(body)[0]
    expected = 3 + 16 / hidden + 9 * 16 / hidden  # all 576 rotated codes, a bf16 scale, 9 bf16 columns
    assert call.bytes_sent * 8 / (tokens * hidden) == pytest.approx(expected, abs=1e-12)
    assert call.extra["leg1_bits"] == pytest.approx(expected, abs=1e-12)
    assert call.extra["bits_breakdown"]["outliers"] == pytest.approx(9 * 16 / hidden)
    assert scheme_bits_per_value("int3-token-top1/64-rot64", hidden, tp) == pytest.approx(expected)
    assert scheme_bits_per_value("int3-token-rot64", hidden, tp) == pytest.approx(3 + 16 / hidden)
    assert scheme_bits_per_value("int4-static-top1/64", hidden, tp) == 4.1875
    assert scheme_layout(parse_scheme("int4-token-rot64"), tokens, hidden, 0).bits_per_value["outliers"] == 0


# -- folding --------------------------------------------------------------------------------------
def test_fold_weight_rotates_the_partial():
    gen = torch.Generator().manual_seed(40)
    w, a = torch.randn(96, 40, generator=gen), torch.randn(6, 40, generator=gen)
    # one extra fp32 matmul over 96 terms: 1e-4 absolute at |partial| ~ 10
    assert_close_verbose(a @ fold_weight(w, 32).T, rotate(a @ w.T, 32), atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8-token-rot32", "int4-group16-rot16;L0.o_proj=bf16"])
def test_folded_and_online_rotation_give_the_same_logits(tiny_models, scheme):
    model_name, tp = "tiny-llama", 2
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

    def body(group, fold):
        m = build_tp_model(model_name, group, loaded=tiny_models[model_name])
        if fold:
            sites = fold_rotation(m.model, scheme)
            assert len(sites) == (4 if "L0" not in scheme else 3)
        comm = QuantCommunicator(group, scheme, None, prerotated=fold)
        from lowbit.model.tp import set_communicator
        set_communicator(m.model, comm)
        with torch.no_grad():
            return m.model(ids, use_cache=False).logits
    online = ThreadWorld(tp).run(body, False)[0]
    folded = ThreadWorld(tp).run(body, True)[0]
    # Folding reorders fp32 sums (~1e-6 relative), which can move a value across a rounding
    # boundary: one quantization step of one feature. Logits of this tiny model are O(1) and
    # such a flip moves them by < 1e-2; a wrong rotation would move them by O(1).
    assert_close_verbose(folded, online, atol=2e-2, msg=scheme)


def test_folding_refuses_outlier_sites(tiny_models):
    def body(group):
        m = build_tp_model("tiny-llama", group, loaded=tiny_models["tiny-llama"])
        fold_rotation(m.model, "int4-token-rand1/16-rot16")
    with pytest.raises(ValueError, match="outlier"):
        ThreadWorld(1).run(body)
