"""The one scheme-string grammar: parse, print (``str()`` of the dataclasses) and help text.

    python -m lowbit schemes        # prints GRAMMAR_HELP, the one description of the grammar

Everything else (job specs, pages, the CLI, collectives) parses schemes through
``parse_scheme`` / ``parse_scheme_map``; a job parses its scheme strings once
(``lowbit.scheme.plan``) and hands the plan on.
"""
from __future__ import annotations

import re
from fractions import Fraction

from dataclasses import replace

from lowbit.scheme.spec import (ALLOWED_BITS, MAX_SPARSE, MIN_MESSAGE_AUTO, OutlierSpec, QuantSpec, Scheme, SchemeError, SchemeMap,
                                ThresholdSpec)

GRAMMAR_HELP = """\
Scheme strings (lowbit.scheme is the one parser):

  exact | bf16 | fp32                       exact all-reduce (exact == bf16 on the wire)
  <code>-<gran>[-<outliers>][-perm][-rot<R>][-sr][@<algo>]
    code:     int<B>[a]                     uniform grid, B in 2,3,4,5,6,8; 'a' = asymmetric (scale + min)
            | nf<B>                         normal-quantile codebook (NF-style), B in 3,4; symmetric
    gran:     static | token | group<G>     static = per-feature scales from calibration
    outliers: top<K> | rand<K>[s<seed>]     K = fraction of features kept in BF16, in (0, 1/2]
            | sp<n>                         per token, the n largest |x| as (uint16 index, BF16 value)
            | thr<T>c<K>                    per message, features with max|x| > T in BF16, at most K*H
                                            (fixed capacity; index list sent; overflow counted)
    perm:     channel grouping for group<G>: calibrated permutation, features of similar range share a group
    rot<R>:   block Walsh-Hadamard of size R before quantizing (dynamic scales only)
    sr:       stochastic rounding (unbiased; seeded per call) instead of round to nearest
    algo:     gather (default) | twoshot[+int<B>[a]-token|group<G>]   second leg, default int8-token
    min:      @min<n>[k|M] | @minauto       size gate: a message under n bytes (its BF16 size) goes as the
                                            exact BF16 all-reduce; auto = the crossover the collective bench
                                            measured for the job's link and TP size (counted as sent)
  scheme map: <scheme>[;L<a>[-<b>][.<module>]=<scheme>]...

Neighbouring schemes (related work, compared with the paper in the README):

- nf<B> (non-uniform code, as NF4 in QLoRA): the code is an index into a fixed codebook of
  2**B values in [-1, 1] (lowbit.codebook: normal quantiles with an exact zero), scaled
  by the absmax of the feature (static) / token / group. "Static per layer/module" means the
  codebook is a constant: it never changes per message or per site; a different code at one
  site is a per-site override (;L28.down_proj=nf3-token). Symmetric only; rounds to the
  nearest entry; no stochastic rounding; never the two-shot second leg (that stays int).
- sp<n> (dense-and-sparse, SqueezeLLM; spike reserving, FlashCommunication v2): per token the
  n values of largest magnitude are taken out, zeroed, the rest quantized; the pairs travel
  in the message (fixed count, fixed size). 1 <= n <= H/2 of the message's features.
- thr<T>c<K> (dynamic outliers, LLM.int8()): T an absolute threshold on |x| (a decimal
  such as 6 or 0.5), K the capacity as a fraction of the message's features (as
  top<K>). Fixed-size message: C = floor(K * H) uint16 indices (unused: 0xFFFF) + C BF16
  columns + codes for all H features; more than C exceeding T: the C largest go, the rest are
  quantized normally and counted as thr_overflow.
- perm (channel grouping): a static permutation derived from calibration on every rank, so
  it costs 0 bits per message (its H uint16 entries are static_bytes).
- At most one of top/rand, sp, thr per scheme; sp/thr and perm do not
  combine with -rot<R>. With @twoshot each first-leg chunk is one message (sp: n per
  token per chunk; thr: C = floor(K * H/tp) per chunk); the second leg is a plain int
  requantization.

Canonical strings (what str() prints, and what parse round-trips exactly): exact is
printed bf16; @gather and a random seed of 0 are omitted; @twoshot always names its
second leg; outlier fractions print as n/d in lowest terms; thresholds print as the
shortest decimal (thr6, thr0.5); suffixes print in the order outliers (top/rand/sp/thr),
-perm, -rot<R>, -sr. The scale dtype is not part of the string: strings always mean
BF16 scales (FP16 scales overflowed to inf on real data).

Examples:
  bf16                              exact BF16 all-reduce (the baseline)
  int4-static-top1/64               the paper: Int4 static per-feature, top 1/64 features in BF16
  int4-static-rand1/64s7            same, but 1/64 random features (seed 7) in BF16
  int8-token                        Int8, one dynamic scale per token
  int4-group32                      Int4, one dynamic scale per 32 features
  int3a-group64-top1/64             Int3 asymmetric per group of 64, top 1/64 in BF16
  int4-token@twoshot+int8-token     two-shot; reduced shard requantized to Int8 per token
  int3-token-rot64                  Int3 per token after a 64-wide block Hadamard rotation
  int4-token-sr                     Int4 per token with stochastic rounding
  nf4-static-top1/64                the paper's scheme with the 4-bit normal-quantile codebook
  nf3-group64                       3-bit codebook, one dynamic absmax per 64 features
  int4-static-sp3                   3 largest-|x| values per token as (index, BF16) pairs
  int4-token-thr6c1/128             features with max|x| > 6 in this message in BF16, at most H/128
  int4-group64-perm                 Int4 per 64 features after the calibrated range-sorting permutation
  int4-static-top1/64@min64k        the paper's scheme, but messages under 64 KiB go as exact BF16
  int4-static-top1/64@twoshot+int4-token@minauto   two-shot, gated at the measured crossover
  int4-static-top1/64;L0-3=int8-token;L28.down_proj=bf16   per-layer / per-module overrides
"""


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_K = r"(\d+/\d+|\d*\.\d+|\d+)"
_RE_QUANT = re.compile(r"(int|nf)(\d+)(a?)")
_RE_GRAN = re.compile(r"static|token|group(\d+)")
_RE_OUTLIERS = re.compile(r"top" + _K + r"|rand" + _K + r"(?:s(\d+))?")
_RE_ALGO = re.compile(r"gather|twoshot(?:\+(int\d+a?-(?:token|group\d+)))?")
_RE_GATE = re.compile(r"@min(?:(\d+)([kM]?)|(auto))(?=$)")
_GATE_UNITS = {"": 1, "k": 1024, "M": 1 << 20}
_RE_ROT = re.compile(r"-rot(\d+)")
_RE_SPARSE = re.compile(r"-sp(\d+)")
_RE_THR = re.compile(r"-thr(\d+(?:\.\d+)?)c" + _K)
_RE_PERM = re.compile(r"-perm(?=[-@]|$)")
_RE_SUFFIX = re.compile(r"-rot\d|-sr(?:@|$)|-sp\d|-thr\d|-perm(?:[-@]|$)")
_EXACT = {"exact": "bf16", "bf16": "bf16", "fp32": "fp32"}


def _expected(field_name: str, text: str, pos: int, what: str) -> SchemeError:
    rest = text[pos:] or "<end>"
    return SchemeError(field_name, f"cannot parse {text!r} at position {pos} ({rest!r}); expected {what}")


def _parse_quant_spec(text: str, pos: int, field_name: str) -> tuple[QuantSpec, int]:
    m = _RE_QUANT.match(text, pos)
    if not m:
        return None, pos
    code, bits, asym = m.group(1), int(m.group(2)), bool(m.group(3))
    if code == "int" and bits not in ALLOWED_BITS:
        raise SchemeError("bits", f"{bits} not allowed; allowed: {', '.join(map(str, ALLOWED_BITS))}")
    if code == "nf" and field_name == "second":
        raise SchemeError("second", "the requantization leg is a plain uniform grid; "
                                    "allowed: int<B>[a]-token or int<B>[a]-group<G>")
    pos = m.end()
    if not text.startswith("-", pos):
        raise _expected(field_name, text, pos, "'-' then a granularity: static, token, group<G>")
    g = _RE_GRAN.match(text, pos + 1)
    if not g:
        raise _expected("granularity", text, pos + 1, "a granularity: static, token, group<G>")
    gran = "group" if g.group(1) is not None else g.group(0)
    group_size = int(g.group(1)) if g.group(1) is not None else None
    return QuantSpec(bits, symmetric=not asym, granularity=gran, group_size=group_size, code=code), g.end()


def _parse_k(text: str) -> Fraction:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise SchemeError("k_frac", f"{text!r} not allowed; allowed: a fraction in (0, 1/2] such as 1/64 or 0.05")


def parse_scheme(text: str) -> Scheme:
    """Parse one scheme string (see the module docstring); raise SchemeError on bad input."""
    if not isinstance(text, str):
        raise SchemeError("scheme", f"{text!r} is not a string")
    text = text.strip()
    if text in _EXACT:
        return Scheme("exact", wire_dtype=_EXACT[text])
    quant, pos = _parse_quant_spec(text, 0, "scheme")
    if quant is None:
        raise _expected("scheme", text, 0, "one of: exact, bf16, fp32, int<B>[a]-<gran>[-<outliers>][@<algo>], "
                                           "nf<B>-<gran>[...]")
    outliers = OutlierSpec()
    if text.startswith("-", pos) and not _RE_SUFFIX.match(text, pos):
        o = _RE_OUTLIERS.match(text, pos + 1)
        if not o:
            raise _expected("outliers", text, pos + 1,
                            "outliers: top<K> or rand<K>[s<seed>] (or sp<n>, thr<T>c<K>, perm, rot<R>, sr)")
        if o.group(1) is not None:
            outliers = OutlierSpec("topk", _parse_k(o.group(1)))
        else:
            outliers = OutlierSpec("random", _parse_k(o.group(2)), int(o.group(3) or 0))
        pos = o.end()
    sparse, threshold, permute = 0, None, False
    m = _RE_SPARSE.match(text, pos)
    if m:
        sparse = int(m.group(1))
        if sparse < 1:
            raise SchemeError("sparse", f"{sparse} not allowed; allowed: an integer in 1..{MAX_SPARSE} (sp<n>)")
        pos = m.end()
    m = _RE_THR.match(text, pos)
    if m:
        try:
            threshold = ThresholdSpec(float(m.group(1)), _parse_k(m.group(2)))
        except ZeroDivisionError:
            raise SchemeError("k_frac", f"{m.group(2)!r} not allowed; allowed: a fraction in (0, 1/2]")
        pos = m.end()
    elif text.startswith("-thr", pos):
        raise _expected("threshold", text, pos + 1, "thr<T>c<K>: T a decimal such as 6 or 0.5, K a fraction "
                                                    "such as 1/64")
    m = _RE_PERM.match(text, pos)
    if m:
        permute = True
        pos = m.end()
    rotation = None
    m = _RE_ROT.match(text, pos)
    if m:
        rotation = int(m.group(1))
        pos = m.end()
    if text.startswith("-sr", pos) and (pos + 3 == len(text) or text[pos + 3] == "@"):
        quant = replace(quant, rounding="stochastic")
        pos += 3
    algo, second, min_message = "gather", None, None
    if text.startswith("@min", pos):
        min_message, pos = _parse_gate(text, pos)
    if text.startswith("@", pos):
        a = _RE_ALGO.match(text, pos + 1)
        if not a:
            raise _expected(
                "algo", text, pos + 1, "an algo: gather, twoshot, twoshot+int<B>[a]-token, twoshot+int<B>[a]-group<G>"
            )
        if a.group(0) == "twoshot" and text.startswith("+", a.end()):
            raise _expected("second", text, a.end() + 1, "a second leg: int<B>[a]-token or int<B>[a]-group<G>")
        if a.group(0) != "gather":
            algo = "two_shot"
            if a.group(1):
                second, _ = _parse_quant_spec(a.group(1), 0, "second")
        pos = a.end()
        if text.startswith("@min", pos):
            min_message, pos = _parse_gate(text, pos)
    if pos != len(text):
        raise _expected("scheme", text, pos, "in this order '-sp<n>' or '-thr<T>c<K>', '-perm', '-rot<R>', '-sr', "
                                             "'-<outliers>', '@<algo>' or the end of the scheme; "
                                             "a size gate '@min<size>' comes last")
    return Scheme("quant", quant=quant, outliers=outliers, algo=algo, second=second, rotation=rotation,
                  sparse=sparse, threshold=threshold, permute=permute, min_message=min_message)


def _parse_gate(text: str, pos: int) -> tuple[int, int]:
    """``@min<n>[k|M]`` or ``@minauto`` at ``pos`` (the end of the scheme): (bytes, end)."""
    g = _RE_GATE.match(text, pos)
    if not g:
        raise SchemeError("min_message", f"{text[pos + 4:]!r} is not a size; allowed: @min<bytes>[k|M] at the end "
                                         f"of the scheme (e.g. @min64k, @min2M) or @minauto")
    if g.group(3):
        return MIN_MESSAGE_AUTO, g.end()
    return int(g.group(1)) * _GATE_UNITS[g.group(2)], g.end()


_RE_OVERRIDE = re.compile(r"L(\d+)(?:-(\d+))?(?:\.([A-Za-z_]\w*))?=(.*)")


def parse_scheme_map(text: str) -> SchemeMap:
    """Parse ``<scheme>[;L<a>[-<b>][.<module>]=<scheme>]...``; raise SchemeError on bad input."""
    if not isinstance(text, str):
        raise SchemeError("scheme map", f"{text!r} is not a string")
    parts = [p.strip() for p in text.strip().split(";")]
    default = parse_scheme(parts[0])
    overrides: dict[tuple[int, str | None], Scheme] = {}
    for part in parts[1:]:
        m = _RE_OVERRIDE.fullmatch(part)
        if not m:
            raise SchemeError(
                "override", f"cannot parse {part!r}; expected L<a>[-<b>][.<module>]=<scheme>, e.g. L0-3=int8-token"
            )
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise SchemeError("override", f"layer range L{first}-{last} is empty; allowed: L<a>-<b> with a <= b")
        scheme = parse_scheme(m.group(4))
        for layer in range(first, last + 1):
            key = (layer, m.group(3))
            if key in overrides:
                where = f"L{layer}" + (f".{key[1]}" if key[1] else "")
                raise SchemeError("override", f"{where} is given twice; allowed: each site at most once")
            overrides[key] = scheme
    return SchemeMap(default, overrides)

