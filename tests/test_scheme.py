"""The scheme grammar: examples parse to the right fields, str() round-trips, bad input explains itself."""
from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.codes.int import ALLOWED_BITS
from lowbit.scheme import (
    GRAMMAR_HELP,
    OutlierSpec,
    QuantSpec,
    Scheme,
    SchemeError,
    SchemeMap,
    ThresholdSpec,
    parse_scheme,
    parse_scheme_map,
)

EXAMPLES = [
    "int4-static-top1/64",
    "int8-token",
    "int4-group32",
    "int3a-group64-top1/64",
    "int4-static-rand1/64s7",
    "int4-token@twoshot+int8-token",
    "bf16",
    "nf4-static-top1/64",
    "nf3-group64",
    "int4-static-sp3",
    "int4-token-thr6c1/128",
    "int4-group64-perm",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_are_canonical(text):
    assert str(parse_scheme(text)) == text


def test_paper_scheme_fields():
    s = parse_scheme("int4-static-top1/64")
    assert s.quant == QuantSpec(4, symmetric=True, granularity="static")
    assert s.outliers == OutlierSpec("topk", Fraction(1, 64))
    assert s.algo == "gather" and s.second is None
    assert s.needs_calibration
    assert s.outliers.count(576) == 9


def test_fields_of_the_other_examples():
    s = parse_scheme("int3a-group64-top1/64")
    assert (s.quant.bits, s.quant.symmetric, s.quant.granularity, s.quant.group_size) == (3, False, "group", 64)
    s = parse_scheme("int4-static-rand1/64s7")
    assert s.outliers == OutlierSpec("random", Fraction(1, 64), 7)
    s = parse_scheme("int4-token@twoshot+int8-token")
    assert s.algo == "two_shot" and s.second == QuantSpec(8, True, "token")
    assert parse_scheme("bf16") == Scheme("exact", "bf16")
    assert parse_scheme("fp32").wire_dtype == "fp32"


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("exact", "bf16"),
        (" int8-token ", "int8-token"),
        ("int4-token@gather", "int4-token"),
        ("int4-token@twoshot", "int4-token@twoshot+int8-token"),
        ("int4-static-top0.05", "int4-static-top1/20"),
        ("int4-static-top2/128", "int4-static-top1/64"),
        ("int4-static-rand1/64s0", "int4-static-rand1/64"),
    ],
)
def test_non_canonical_strings_normalize(text, canonical):
    assert str(parse_scheme(text)) == canonical


def test_needs_calibration():
    assert parse_scheme("int4-static").needs_calibration
    assert parse_scheme("int4-token-top1/64").needs_calibration
    assert not parse_scheme("int4-token-rand1/64").needs_calibration
    assert not parse_scheme("int8-token").needs_calibration
    assert not parse_scheme("bf16").needs_calibration


quant_specs = st.builds(
    QuantSpec,
    bits=st.sampled_from(ALLOWED_BITS),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["static", "token"]),
) | st.builds(
    lambda b, s, g: QuantSpec(b, s, "group", g),
    st.sampled_from(ALLOWED_BITS),
    st.booleans(),
    st.sampled_from([1, 8, 32, 64, 96]),
)
dynamic_specs = quant_specs.filter(lambda q: q.granularity != "static")
fractions_ = st.builds(Fraction, st.integers(1, 50), st.integers(2, 400)).filter(lambda f: 0 < f <= Fraction(1, 2))
outlier_specs = (
    st.just(OutlierSpec())
    | st.builds(OutlierSpec, st.just("topk"), fractions_)
    | st.builds(OutlierSpec, st.just("random"), fractions_, st.integers(0, 10**6))
)
quant_schemes = st.builds(
    lambda q, o, two, second: Scheme(
        "quant", quant=q, outliers=o, algo="two_shot" if two else "gather", second=second if two else None
    ),
    quant_specs,
    outlier_specs,
    st.booleans(),
    dynamic_specs,
)
schemes = quant_schemes | st.sampled_from([Scheme("exact", "bf16"), Scheme("exact", "fp32")])


@settings(max_examples=200, deadline=None)
@given(schemes)
def test_str_round_trips(scheme):
    text = str(scheme)
    parsed = parse_scheme(text)
    assert parsed == scheme, text
    assert str(parsed) == text


site_keys = st.tuples(st.integers(0, 40), st.sampled_from([None, "o_proj", "down_proj"]))


@settings(max_examples=100, deadline=None)
@given(schemes, st.dictionaries(site_keys, schemes, max_size=8))
def test_scheme_map_str_round_trips(default, overrides):
    smap = SchemeMap(default, overrides)
    text = str(smap)
    parsed = parse_scheme_map(text)
    assert parsed == smap, text
    assert str(parsed) == text


def test_scheme_map_example_and_lookup_order():
    text = "int4-static-top1/64;L0-3=int8-token;L28.down_proj=bf16"
    smap = parse_scheme_map(text)
    assert str(smap) == text
    assert len(smap.overrides) == 5  # L0..L3 (both modules) + L28.down_proj
    assert str(smap.for_site(2, "o_proj")) == "int8-token"
    assert str(smap.for_site(28, "down_proj")) == "bf16"
    assert str(smap.for_site(28, "o_proj")) == "int4-static-top1/64"
    assert str(smap.for_site(4, "down_proj")) == "int4-static-top1/64"
    # a (layer, module) override beats a whole-layer one
    smap = parse_scheme_map("bf16;L1=int8-token;L1.o_proj=int4-token")
    assert str(smap.for_site(1, "o_proj")) == "int4-token"
    assert str(smap.for_site(1, "down_proj")) == "int8-token"


def test_scheme_map_compresses_consecutive_layers():
    assert str(parse_scheme_map("bf16;L2=int8-token;L0-1=int8-token;L5=int8-token")) == "bf16;L0-2=int8-token;L5=int8-token"


# Bad input catalogue: (text, field named in the message, the allowed values it must list).
BAD_SCHEMES = [
    ("int4_token", "scheme", "'-' then a granularity: static, token, group<G>"),
    ("float8", "scheme", "exact, bf16, fp32, int<B>"),
    ("fp16", "scheme", "exact, bf16, fp32, int<B>"),
    ("int7-token", "bits", "2, 3, 4, 5, 6, 8"),
    ("int1-token", "bits", "2, 3, 4, 5, 6, 8"),
    ("int4", "scheme", "static, token, group<G>"),
    ("int4-channel", "granularity", "static, token, group<G>"),
    ("int4-group", "granularity", "static, token, group<G>"),
    ("int4-group0", "group_size", "a positive integer"),
    ("int4-static-top0.6", "k_frac", "(0, 1/2]"),
    ("int4-static-top0", "k_frac", "(0, 1/2]"),
    ("int4-static-top1/0", "k_frac", "(0, 1/2]"),
    ("int4-static-bottom1/64", "outliers", "top<K> or rand<K>[s<seed>]"),
    ("int4-static-top1/64s3", "scheme", "'-<outliers>', '@<algo>' or the end"),
    ("int4-token@ring", "algo", "gather, twoshot"),
    ("int4-token@twoshot+int4-bogus", "second", "int<B>[a]-token or int<B>[a]-group<G>"),
    ("int4-token@twoshot+int4-static-sfp16", "scale_format", "allowed: -s<fmt> with token or group<G>"),
    ("int4-token@twoshot+int9-token", "bits", "2, 3, 4, 5, 6, 8"),
    ("nf5-token", "bits", "allowed: 3, 4"),
    ("nf4a-token", "symmetric", "nf<B> without 'a'"),
    ("nf4-token-sr", "rounding", "'nearest'"),
    ("int4-token@twoshot+nf4-token", "second", "int<B>[a]-token or int<B>[a]-group<G>"),
    ("int4-token-sp0", "sparse", "1..255"),
    ("int4-token-sp300", "sparse", "1..255"),
    ("int4-token-thr6", "threshold", "thr<T>c<K>"),
    ("int4-token-thr6c0.7", "k_frac", "(0, 1/2]"),
    ("int4-token-thr6c1/0", "k_frac", "(0, 1/2]"),
    ("int4-token-thr0.00000000001c1/64", "threshold", "at most 10 decimal places"),
    ("int4-token-perm", "permute", "allowed: group<G>"),
    ("int4-static-top1/64-perm", "permute", "allowed: group<G>"),
    ("int4-static-top1/64-sp2", "outliers", "one of top<K>, rand<K>[s<seed>], sp<n>, thr<T>c<K>"),
    ("int4-token-sp2-thr6c1/64", "outliers", "one of top<K>"),
    ("int4-token-rand1/64-thr6c1/64", "outliers", "one of top<K>"),
    ("int4-token-sp2-rot64", "rotation", "rotation with top<K>/rand<K> or no outliers"),
    ("int4-group64-perm-rot64", "rotation", "rotation with top<K>/rand<K> or no outliers"),
    ("int4-group64-perm-sp2", "scheme", "in this order '-sp<n>' or '-thr<T>c<K>', '-perm'"),
]


@pytest.mark.parametrize("text, field, allowed", BAD_SCHEMES)
def test_bad_scheme_names_field_and_allowed_values(text, field, allowed):
    with pytest.raises(SchemeError) as info:
        parse_scheme(text)
    message = str(info.value)
    assert info.value.field == field, message
    assert message.startswith(f"{field}: "), message
    assert allowed in message, message


NEW_FIELDS = [
    ("nf4-static-top1/64", dict(code="nf", bits=4, sparse=0, threshold=None, permute=False)),
    ("int4-static-sp3", dict(code="int", bits=4, sparse=3, threshold=None, permute=False)),
    ("int4-token-thr6c1/128", dict(code="int", bits=4, sparse=0, threshold=ThresholdSpec(6.0, Fraction(1, 128)),
                                   permute=False)),
    ("int4-group64-perm", dict(code="int", bits=4, sparse=0, threshold=None, permute=True)),
    ("nf3-group32-thr0.25c1/32-perm@twoshot+int4-group32",
     dict(code="nf", bits=3, sparse=0, threshold=ThresholdSpec(0.25, Fraction(1, 32)), permute=True)),
]


@pytest.mark.parametrize("text, fields", NEW_FIELDS)
def test_neighbouring_scheme_fields(text, fields):
    s = parse_scheme(text)
    got = dict(code=s.quant.code.name, bits=s.quant.bits, sparse=s.sparse, threshold=s.threshold, permute=s.permute)
    assert got == fields
    assert str(s) == text
    assert s.outliers.select == ("topk" if "top" in text else "none")


def test_neighbouring_schemes_calibration_needs_and_capacity():
    assert parse_scheme("int4-group64-perm").needs_calibration, "the permutation comes from calibration"
    assert not parse_scheme("int4-token-sp2").needs_calibration
    assert not parse_scheme("nf4-token-thr6c1/64").needs_calibration
    assert parse_scheme("int4-token-thr6c1/64").threshold.capacity(576) == 9
    assert parse_scheme("int4-token-thr6c1/64").threshold.capacity(192) == 3  # a two-shot chunk at TP 3
    with pytest.raises(SchemeError, match="sparse: sp97 takes more than half of the two-shot chunk of 192"):
        parse_scheme("int4-token-sp97@twoshot").validate_for(576, 3)
    parse_scheme("int4-token-sp96@twoshot").validate_for(576, 3)
    with pytest.raises(SchemeError, match="k_frac: capacity 1/256 of the two-shot chunk of 192 features"):
        parse_scheme("int4-token-thr6c1/256@twoshot").validate_for(576, 3)
    with pytest.raises(SchemeError, match="at most 65535 features"):
        parse_scheme("int4-token-sp2").validate_for(2**17, 1)


@pytest.mark.parametrize("text, canonical", [
    ("int4-token-thr6.000c2/128", "int4-token-thr6c1/64"),
    ("int4-token-thr0.50c0.01", "int4-token-thr0.5c1/100"),
    ("nf4-group64-perm@gather", "nf4-group64-perm"),
])
def test_neighbouring_schemes_normalize(text, canonical):
    assert str(parse_scheme(text)) == canonical


new_quant = st.builds(lambda b, gran, g: QuantSpec(b, True, gran, g if gran == "group" else None, code="nf"),
                      st.sampled_from([3, 4]), st.sampled_from(["static", "token", "group"]),
                      st.sampled_from([8, 32, 64])) | quant_specs
thresholds = st.builds(ThresholdSpec, st.integers(0, 10**6).map(lambda v: v / 100), fractions_)


@st.composite
def neighbour_schemes(draw):
    quant = draw(new_quant)
    which = draw(st.sampled_from(["outliers", "sparse", "threshold", "none"]))
    kw = {}
    if which == "outliers":
        kw["outliers"] = draw(outlier_specs)
    elif which == "sparse":
        kw["sparse"] = draw(st.integers(1, 255))
    elif which == "threshold":
        kw["threshold"] = draw(thresholds)
    kw["permute"] = quant.granularity == "group" and draw(st.booleans())
    if draw(st.booleans()):
        kw.update(algo="two_shot", second=draw(dynamic_specs))
    return Scheme("quant", quant=quant, **kw)


@settings(max_examples=200, deadline=None)
@given(neighbour_schemes())
def test_neighbouring_schemes_round_trip(scheme):
    text = str(scheme)
    parsed = parse_scheme(text)
    assert parsed == scheme, text
    assert str(parsed) == text


def test_bad_scheme_reports_failing_position():
    with pytest.raises(SchemeError, match=r"at position 5 \('channel'\)"):
        parse_scheme("int4-channel")


BAD_MAPS = [
    ("bf16;X3=int8-token", "override", "L<a>[-<b>][.<module>]=<scheme>"),
    ("bf16;L3-1=int8-token", "override", "a <= b"),
    ("bf16;L3=int8-token;L2-4=bf16", "override", "each site at most once"),
    ("bf16;L3.mlp=int8-token", "module", "o_proj, down_proj"),
    ("bf16;L3=int9-token", "bits", "2, 3, 4, 5, 6, 8"),
]


@pytest.mark.parametrize("text, field, allowed", BAD_MAPS)
def test_bad_scheme_map_names_field_and_allowed_values(text, field, allowed):
    with pytest.raises(SchemeError) as info:
        parse_scheme_map(text)
    assert info.value.field == field and allowed in str(info.value), str(info.value)


def test_group_size_must_divide_hidden():
    parse_scheme("int4-group64").validate_for(576, 3)
    with pytest.raises(SchemeError) as info:
        parse_scheme("int4-group100").validate_for(576, 3)
    assert str(info.value).startswith("group_size: 100 does not divide hidden size 576; allowed group sizes: 1, 2, 3, 4, 6,")
    with pytest.raises(SchemeError, match="group_size: 100"):
        parse_scheme("int4-token@twoshot+int8-group100").validate_for(576, 3)


def test_two_shot_groups_must_fit_the_per_rank_feature_chunk():
    parse_scheme("int4-group64@twoshot+int8-group64").validate_for(576, 3)  # chunk of 192
    with pytest.raises(SchemeError, match="group_size: 64 does not divide the two-shot chunk of 144 .*allowed: 1, 2,"):
        parse_scheme("int4-token@twoshot+int8-group64").validate_for(576, 4)
    with pytest.raises(SchemeError, match="algo: two_shot needs hidden size 576 divisible by TP size 5; allowed: gather"):
        parse_scheme("int4-token@twoshot").validate_for(576, 5)
    parse_scheme("int4-group64").validate_for(576, 5)  # gather has no chunking
    with pytest.raises(SchemeError, match="group_size"):
        parse_scheme_map("bf16;L3=int4-group7").validate_for(576, 3)


def test_outlier_fraction_too_small_for_hidden():
    with pytest.raises(SchemeError, match="k_frac: 1/64 of hidden size 32 keeps no feature"):
        parse_scheme("int4-static-top1/64").validate_for(32, 2)


def test_constructor_validation_lists_allowed_values():
    with pytest.raises(SchemeError, match="scale_dtype: float64 not allowed; allowed: bf16, fp32, fp16, e8m0, e4m3"):
        QuantSpec(4, "token", scale_dtype=torch.float64)
    with pytest.raises(SchemeError, match="scale_dtype: e8m0 not allowed with granularity 'static'"):
        QuantSpec(4, granularity="static", scale_dtype=torch.float8_e8m0fnu)
    with pytest.raises(SchemeError, match="select: 'all' not allowed; allowed: none, topk, random"):
        OutlierSpec("all")
    assert Scheme("quant", quant=QuantSpec(4), algo="two_shot", second=QuantSpec(8)).needs_calibration  # static leg 2
    with pytest.raises(SchemeError, match="second: the requantization leg is a uniform grid or a minifloat"):
        Scheme("quant", quant=QuantSpec(4), algo="two_shot", second=QuantSpec(4, True, "token", code="nf"))
    with pytest.raises(SchemeError, match="wire_dtype: 'fp16' not allowed; allowed: bf16, fp32"):
        Scheme("exact", "fp16")
    with pytest.raises(SchemeError, match="tp: 0 not allowed"):
        parse_scheme("int8-token").validate_for(576, 0)


def test_grammar_help_examples_all_parse():
    lines = GRAMMAR_HELP.split("Examples:")[1].strip().splitlines()
    texts = [line.split()[0] for line in lines]
    assert set(EXAMPLES) <= set(texts)
    for text in texts:
        if ";" in text:
            assert str(parse_scheme_map(text)) == text
        else:
            assert str(parse_scheme(text)) == text


def test_package_docstring_is_the_one_help_text_and_documents_every_example():
    import lowbit.scheme

    doc = lowbit.scheme.__doc__
    assert GRAMMAR_HELP in doc  # one text: the package docstring carries GRAMMAR_HELP, no second copy
    for text in EXAMPLES:
        assert re.search(r"(^|\s)" + re.escape(text) + r"(\s|$)", doc, re.M), text


@pytest.mark.parametrize("text,nbytes", [("int4-static-top1/64@min64k", 65536), ("int8-token@min2M", 2 << 20),
                                         ("int4-token@twoshot+int4-token@min1000", 1000),
                                         ("int4-static-top1/64@twoshot+int8-token@minauto", -1)])
def test_size_gate_parses_prints_and_round_trips(text, nbytes):
    s = parse_scheme(text)
    assert s.min_message == nbytes and str(s) == text and parse_scheme(str(s)) == s
    assert str(parse_scheme_map(text + ";L0=int8-token@min4k")) == text + ";L0=int8-token@min4k"


@pytest.mark.parametrize("text,match", [
    ("int4-static@min-5", "min_message: '-5' is not a size; allowed: @min<bytes>"),
    ("int4-static@min64kb", "min_message: '64kb' is not a size"),
    ("int4-static@minfoo", "min_message: 'foo' is not a size"),
    ("int4-static@min64k@twoshot", "min_message: '64k@twoshot' is not a size"),
])
def test_a_bad_size_gate_names_the_field(text, match):
    with pytest.raises(SchemeError, match=re.escape(match)):
        parse_scheme(text)
    with pytest.raises(SchemeError, match="min_message: an exact scheme has no size gate"):
        Scheme("exact", min_message=1024)
    with pytest.raises(SchemeError, match="min_message: -7 is not a size"):
        Scheme("quant", quant=QuantSpec(4, True, "token"), min_message=-7)
