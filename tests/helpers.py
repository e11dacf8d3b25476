"""Test helpers shared by the test files: comparisons that say *where* they failed."""
from __future__ import annotations

import torch

from lowbit.quant import dequantize, quantize

FP32_EPS = 2.0**-23


def assert_close_verbose(actual, expected, atol=0.0, rtol=0.0, msg: str = "", max_print: int = 5) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise (NaN == NaN).

    ``atol`` may be a tensor broadcastable to the shapes (e.g. a per-row bound). On failure the
    message lists the first ``max_print`` mismatching indices with both values and the bound.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.double()
    e = expected.double()
    bound = torch.as_tensor(atol, dtype=torch.float64) + rtol * e.abs()
    bound = torch.broadcast_to(bound, a.shape)
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(a) & (a == e)
    ok = both_nan | same_inf | ((a - e).abs() <= bound)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    lines = [f"{msg} {len(bad)} of {a.numel()} elements differ; first {min(max_print, len(bad))}:"]
    for idx in bad[:max_print].tolist():
        i = tuple(idx)
        lines.append(
            f"  at {i}: actual={a[i].item()!r} expected={e[i].item()!r} "
            f"diff={(a[i] - e[i]).abs().item():.3g} bound={bound[i].item():.3g}"
        )
    raise AssertionError("\n".join(lines))


def scale_per_element(res, spec, shape):
    """A quantizer result's scales broadcast to every element (static / token / group granularity)."""
    if spec.granularity == "static":
        return res.scales.expand(shape)
    if spec.granularity == "token":
        return res.scales.unsqueeze(-1).expand(shape)
    return res.scales.repeat_interleave(spec.group_size, -1)


def assert_codebook_error_bound(x, spec, lo, hi, max_gap: float, levels=None):
    """Quantize and dequantize ``x`` with a codebook spec (nf, lm; ``levels`` an lm code's fitted
    table): every value lies within half the table's largest gap (``max_gap``, in units of the
    scale) times its scale, plus fp32 rounding of x / scale and of entry * scale (4 ulp of each).
    Returns the quantizer's result."""
    res = quantize(x, spec, lo, hi, levels=levels)
    y = dequantize(res.codes, spec, res.scales, levels=levels)
    scale = scale_per_element(res, spec, x.shape)
    assert_close_verbose(y, x, atol=scale * max_gap / 2 + 4 * FP32_EPS * (x.abs() + scale), msg=str(spec))
    return res


def assert_page_clean(at, errors=(), warnings=()) -> None:
    """A page run (streamlit AppTest) raised nothing, and every error or warning element it shows
    is one the test expects (``errors`` / ``warnings``: substrings of the element's text). A
    store that turned a bug into a message, or a page that swallowed one, fails here."""
    assert not at.exception, [e.value for e in at.exception]
    for kind, shown, expected in (("error", at.error, errors), ("warning", at.warning, warnings)):
        unexpected = [str(e.value) for e in shown if not any(text in str(e.value) for text in expected)]
        assert not unexpected, f"unexpected {kind} element(s): {unexpected}"


def json_shape(value, path: str = "") -> set[tuple[str, str]]:
    """The keys and value types of a JSON document as a set of (path, type name) pairs, list
    items merged under ``[]`` (``{"records": [{"tp": 2}]}`` -> {("", "dict"), ("records", "list"),
    ("records[]", "dict"), ("records[].tp", "int")}): two documents written by the same code for
    the same inputs have the same shape, whatever the numbers."""
    shape = {(path, type(value).__name__)}
    if isinstance(value, dict):
        for key, item in value.items():
            shape |= json_shape(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for item in value:
            shape |= json_shape(item, f"{path}[]")
    return shape
