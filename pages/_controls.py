"""Controls -> one scheme string: the one builder the Layer error, Playground and Trade-offs pages use.

The choices come from the registries (``lowbit.codes``, ``lowbit.groups``, ``lowbit.scales``), so
a new code, grouping or scale format appears in every picker without a page edit; the string is
built from ``lowbit.scheme``'s dataclasses, which check it (a ``SchemeError`` names the field).
``scheme_text`` is plain Python (tests call it); ``pick_code`` draws the code pickers both the
Layer error and the Playground page show. Not a page itself (app.py lists the pages).

    PYTHONPATH=. python -c "from pages._controls import scheme_text; print(scheme_text('nf4', granularity='group', group=64))"
"""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import streamlit as st

from lowbit import codes, groups
from lowbit.codes import CODES, Code
from lowbit.groups import GROUPS
from lowbit.scales import SCALES
from lowbit.scheme import OutlierSpec, QuantSpec, Scheme, SchemeError, ThresholdSpec, parse_scheme

OUTLIER_CHOICES = {
    "topk": "top-k features (the paper)", "random": "random features (baseline)", "none": "none",
    "sparse": "largest values per token (sparse pairs)", "threshold": "features over a threshold (per message)",
}
STATIC_SETS = ("topk", "random", "none")  # the outlier choices a whole-partial view offers (no per-message ones)
K_CHOICES = ["1/128", "1/64", "1/32", "1/16"]


def code_names() -> list[str]:
    """Every registered code family, in the registry's order: ``int``, ``nf``, ``fp``, ``lm``, ..."""
    return CODES.names()


def code_choices(name: str) -> dict[int | str, Code]:
    """The variants a picker offers for the family ``name``, by label: the width for a family whose
    token is the family and a width (``int4`` -> 4), else the token (``fp8e4m3``)."""
    variants = CODES.get(name).choices()
    by_width = all(str(v) == f"{name}{v.bits}" for v in variants)
    return {(v.bits if by_width else str(v)): v for v in variants}


def default_index(choices: dict) -> int:
    """Index of a picker's first choice among ``code_choices``: the first 4-bit variant (int4, nf4,
    fp4e2m1), else the first one."""
    return next((i for i, code in enumerate(choices.values()) if code.bits == 4), 0)


def width_families() -> list[str]:
    """Families whose token is the family and a width (``int4``, ``nf3``): what a sweep grid's
    ``bits`` axis combines with (the others, such as ``fp8e4m3``, are whole codes)."""
    return [c.name for c in CODES.classes() if all(isinstance(label, int) for label in code_choices(c.name))]


def pick_code(prefix: str, help: str) -> Code:
    """The code pickers of a page (Streamlit): a radio of the families (key ``<prefix>_code``) and a
    selectbox of the family's widths or formats (key ``<prefix>_bits_<family>``); the chosen Code."""
    family = st.radio("Code", code_names(), horizontal=True, key=f"{prefix}_code", help=help)
    choices = code_choices(family)
    labels = list(choices)
    label = st.selectbox("Bits" if isinstance(labels[0], int) else "Format", labels, index=default_index(choices),
                         key=f"{prefix}_bits_{family}")
    return choices[label]


def allows_asymmetric(code: Code) -> bool:
    return type(code).asymmetric


def allows_stochastic(code: Code) -> bool:
    return "stochastic" in type(code).roundings


def granularity_names() -> list[str]:
    return GROUPS.names()


def is_sized(granularity: str) -> bool:
    """Does the granularity take a group size (``group<G>``)?"""
    return GROUPS.get(granularity).sized


def is_dynamic(granularity: str) -> bool:
    return GROUPS.get(granularity).dynamic


def scale_names() -> list[str]:
    return SCALES.names()


def scheme_text(code: str | Code = "int4", *, symmetric: bool = True, granularity: str = "static",
                group: int | None = 32, scale: str = "bf16", outliers: str = "topk", k: str | Fraction = "1/64",
                per_token: int = 3, threshold: float = 6.0, rotation: int | str | None = None,
                stochastic: bool = False, permute: bool = False, algo: str = "gather",
                second: QuantSpec | str | None = None) -> str:
    """The canonical scheme string of a page's controls; raises SchemeError naming the field.

    ``code``: a Code or its token (``int4``, ``fp4e2m1``); ``symmetric=False`` its asymmetric
    variant. ``group`` counts only for a sized granularity, ``scale`` only for a dynamic one,
    ``rotation`` (None, "none" or a block size) only with dynamic scales, ``permute`` only where
    groups are runs of features (a page disables those controls; their values then do not count).
    ``outliers``: one of ``OUTLIER_CHOICES`` (``sparse``: ``per_token`` values per token;
    ``threshold``: features over ``threshold``, at most ``k`` of them). ``second``: the two-shot
    leg (a QuantSpec, its string, ``"same"`` for the first leg's format, None for the default).
    """
    if isinstance(code, str):
        found = codes.parse(code, 0)
        if found is None or found[1] != len(code):
            raise SchemeError("code", f"{code!r} not allowed; allowed: a code such as "
                                      + ", ".join(str(c.choices()[0]) for c in CODES.classes()))
        code = found[0]
    if not symmetric:
        code = replace(code, symmetric=False)
    if outliers not in OUTLIER_CHOICES:
        raise SchemeError("outliers", f"{outliers!r} not allowed; allowed: {', '.join(OUTLIER_CHOICES)}")
    try:
        k_frac = Fraction(k)
    except (ValueError, ZeroDivisionError) as exc:
        raise SchemeError("k", f"{k!r} is not a fraction such as 1/64") from exc
    grouping = groups.from_fields(granularity, int(group) if is_sized(granularity) else None)
    quant = QuantSpec(code=code, grouping=grouping, scale=SCALES.get(scale)() if grouping.dynamic else None,
                      rounding="stochastic" if stochastic else "nearest")
    if isinstance(second, str):
        second = quant if second == "same" else parse_scheme(second).quant
    extra = {}
    if outliers == "sparse":
        extra["sparse"] = int(per_token)
    elif outliers == "threshold":
        extra["threshold"] = ThresholdSpec(float(threshold), k_frac)
    select = outliers if outliers in ("topk", "random") else "none"
    rot = None if rotation in (None, 0, "none") or not grouping.dynamic else int(rotation)
    scheme = Scheme("quant", quant=quant, outliers=OutlierSpec(select, k_frac), algo=algo,
                    second=second if algo == "two_shot" else None, rotation=rot,
                    permute=bool(permute and grouping.groups_features), **extra)
    return str(scheme)

