"""The one scheme-string grammar: parse, print (``str()`` of the dataclasses) and help text.

    python -m lowbit schemes        # prints GRAMMAR_HELP, the one description of the grammar

Everything else (job specs, pages, the CLI, collectives) parses schemes through
``parse_scheme`` / ``parse_scheme_map``; a job parses its scheme strings once
(``lowbit.scheme.plan``) and hands the plan on. A quantizer's parts parse their own tokens: the
grammar asks the code registry (``lowbit.codes``), then the groupings (``lowbit.groups``), the
scale formats (``lowbit.scales``) and the input casts (``lowbit.casts``), and builds the
``QuantSpec`` whose one ``validate()`` checks them; the help text lists what they registered.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import replace
from fractions import Fraction

from lowbit import codes, groups, scales
from lowbit.casts import CASTS
from lowbit.scheme.outliers import OutlierSpec, ThresholdSpec
from lowbit.scheme.spec import MIN_MESSAGE_AUTO, QuantSpec, Scheme, SchemeError, SchemeMap, sparse_refusal
from lowbit.wire.recipes import RECIPE_ALGOS

# Named presets: the formats shipping systems send, as aliases of ordinary scheme strings (the
# parser expands them; str() of the result prints the expansion). Each line: name -> expansion,
# then where it comes from and what could be checked about it. Bits per value are measured from
# the payload bytes in tests/test_formats.py (hidden 576).
PRESETS = {
    # OCP Microscaling (MX) v1.0 MXFP4 as torchao 0.18 rounds it by default (to_mx, FLOOR: the shared
    # exponent 2**(floor(log2 amax) - 2), lowbit.scales.mxfloor), in a two-shot on the flat buffer's
    # shards with an fp32 sum (lowbit.comm.recipes). 4.25 bits per leg. lowbit's round-up rule stays
    # available as fp4e2m1-group32-se8m0.
    "mxfp4": "fp4e2m1-group32-se8m0fl@flat2shot",
    # OCP MX v1.0 MXFP8: FP8 E4M3 elements, E8M0 scale per 32 (same rounding note). 8.25 bits.
    "mxfp8": "fp8e4m3-group32-se8m0",
    # NVIDIA NVFP4 as torchao 0.18 quantizes it (nvfp4_quantize: an fp32 tensor scale amax / (448 x 6)
    # per message, an e4m3 per 16, lowbit.scales.nv), two-shot on the flat buffer's shards, fp32 sum.
    # 4.5 bits + 32 per message. lowbit's power-of-two message scale: fp4e2m1-group16-se4m3.
    "nvfp4": "fp4e2m1-group16-snv@flat2shot",
    # vLLM QuickReduce (QuickAllReduce; csrc/quickreduce at 0bf6342e, ROCm aiter at e4048607): two-shot
    # over 16384-value tiles, QuickReduce's interleaved groups of 32 and scale rule, the default
    # bf16 -> fp16 cast (gfx950's IEEE overflow; -f16sat: gfx942, -bf16: the native path), an fp16
    # sum; docs/shipping.md. 4.5 / 6.5 / 8.5 / 3.5 bits per leg. TP 2, 4, 8 (INT3: aiter, TP 2).
    "quickreduce-int3": "qint3-ilv32-sqr-f16@quickreduce",
    "quickreduce-int4": "qint4-ilv32-sqr-f16@quickreduce",
    "quickreduce-int6": "qint6-ilv32-sqr-f16@quickreduce",
    "quickreduce-int8": "qint8-ilv32-sqr-f16@quickreduce",
    # FlashInfer quantized_all_reduce (flashinfer/comm/quantized_allreduce.py, b190523e .. fb28d724): FP8
    # e4m3 with an fp32 scale per 256 values of the flat buffer (max(amax, 1e-12) / 448), stripes of
    # 4096 round robin, a fused fp32 FMA sum; the owner keeps its own stripe. 8.125 bits per leg.
    "flashinfer-fp8": "f8e4m3-flat256-sfi@flashinfer",
    # TensorRT-LLM AllReduceStrategy.LOWPRECISION (customLowPrecisionAllReduceKernels.cu, 1a43c7d6): FP8
    # e4m3 per warp of 496 values (31 lanes x 16) + the fp32 scale 448 / amax in lane 32 (512 bytes),
    # groups restart at each rank's 1/TP shard, fp32 sum from the owner on. TP 2 / 4 (TP 8 not emulated).
    "trtllm-fp8": "f8e4m3-pad496-strt@trtllm",
    # NCCL >= 2.24.3 ncclAllReduce on ncclFloat8e4m3 / e5m2: the caller's torch cast to fp8, no scale,
    # the ring's fp16 add and satfinite fp8 rounding per hop (src/device/reduce_kernel.h). 8 bits.
    "nccl-fp8e4m3": "f8e4m3-tensor-snone@ncclring",
    "nccl-fp8e5m2": "f8e5m2-tensor-snone@ncclring",
}

_HELP_COLUMN = 44  # where the description column starts
_HELP_WIDTH = 108


def _rows(label: str, items: list[tuple[str, str]]) -> list[str]:
    """Help lines: ``label`` then one ``| syntax   description`` row per item, wrapped."""
    lines = []
    for i, (syntax, text) in enumerate(items):
        lead = f"    {label + ':':<10}" if i == 0 else "            | "
        wrapped = textwrap.wrap(text, _HELP_WIDTH - _HELP_COLUMN) or [""]
        lines.append(f"{lead}{syntax:<{_HELP_COLUMN - len(lead)}}{wrapped[0]}".rstrip())
        lines += [" " * _HELP_COLUMN + more for more in wrapped[1:]]
    return lines


def _grammar_help() -> str:
    """GRAMMAR_HELP, with the codes, groupings, scale formats and casts their registries hold."""
    scale_text = "dynamic scales' format: " + " | ".join(f"{c.name} {c.help}".strip() for c in scales.SCALES.classes())
    casts = [(c.syntax, c.help) for c in CASTS.classes() if c.syntax]
    guides = [c.guide for c in codes.CODES.classes() if c.guide]
    lines = [
        "Scheme strings (lowbit.scheme is the one parser):",
        "",
        "  exact | bf16 | fp32                       exact all-reduce (exact == bf16 on the wire)",
        "  <code>-<gran>[-s<fmt>]" + ("[-<cast>]" if casts else "") + "[-<outliers>][-perm][-rot<R>][-sr][@<algo>]"
        "   or a <preset>",
        *_rows("code", [(c.syntax, c.help) for c in codes.CODES.classes()]),
        *_rows("gran", [(g.syntax, g.help) for g in groups.GROUPS.classes()]),
        *_rows("scale", [("-s<fmt>", scale_text)]),
        *(_rows("cast", casts) if casts else []),
        _FIXED_ROWS.rstrip("\n"),
        "",
        "Neighbouring schemes (related work, compared with the paper in docs/results.md):",
        "",
        *(textwrap.indent(g, "  ").replace("  ", "- ", 1) for g in guides),
        _NEIGHBOURS.rstrip("\n"),
        textwrap.indent(scales.base.GUIDE, "  ").replace("  ", "- ", 1),
        "",
        _CANONICAL_AND_EXAMPLES.rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"


_FIXED_ROWS = """\
    outliers: top<K> | rand<K>[s<seed>]     K = fraction of features kept in BF16, in (0, 1/2]
            | sp<n>                         per token, the n largest |x| as (uint16 index, BF16 value)
            | thr<T>c<K>                    per message, features with max|x| > T in BF16, at most K*H
                                            (fixed capacity; index list sent; overflow counted)
    perm:     channel grouping for group<G>: calibrated permutation, features of similar range share a group
    rot<R>:   block Walsh-Hadamard of size R before quantizing (dynamic scales only)
    sr:       stochastic rounding (unbiased; seeded per call) instead of round to nearest
    algo:     gather (default) | twoshot[+<code>-<gran>[-s<fmt>]]   second leg (a code that requantizes:
                                            int or fp), default int8-token; static = per-feature scales of
                                            the reduced sum from calibration
            | quickreduce | flashinfer | trtllm | ncclring | flat2shot
                                            a shipping all-reduce as it computes (lowbit.comm.recipes,
                                            docs/shipping.md): its owners, sum order and arithmetic
    min:      @min<n>[k|M] | @minauto       size gate: a message under n bytes (its BF16 size) goes as the
                                            exact BF16 all-reduce; auto = the crossover the collective bench
                                            measured for the job's link and TP size (counted as sent)
  preset:   mxfp4 | mxfp8 | nvfp4 | quickreduce-int3 | quickreduce-int4 | quickreduce-int6
            | quickreduce-int8 | flashinfer-fp8 | trtllm-fp8 | nccl-fp8e4m3 | nccl-fp8e5m2
                                            an alias of its expansion (python -m lowbit schemes lists
                                            them); takes no options
  scheme map: <scheme>[;L<a>[-<b>][.<module>]=<scheme>]...
"""

_NEIGHBOURS = """\
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
  token per chunk; thr: C = floor(K * H/tp) per chunk); the second leg is a plain int or fp
  requantization.
"""

_CANONICAL_AND_EXAMPLES = """\
Canonical strings (what str() prints, and what parse round-trips exactly): exact is
printed bf16; @gather and a random seed of 0 are omitted; @twoshot always names its
second leg; outlier fractions print as n/d in lowest terms; thresholds print as the
shortest decimal (thr6, thr0.5); suffixes print in the order -s<fmt>, outliers (top/rand/sp/thr),
-perm, -rot<R>, -sr. A scale format of bf16 (the default) is not printed; a preset prints as
its expansion.

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
  lm4-token-rot64                   4-bit Lloyd-Max codebook fitted per site and rank, after rotation
  lm3s-group64-rot64                3-bit fitted codebook, one table per site shared by its ranks
  lm3p-token-rot64                  3-bit fitted codebook with its ends kept at -1 and +1
  int4-static-sp3                   3 largest-|x| values per token as (index, BF16) pairs
  int4-token-thr6c1/128             features with max|x| > 6 in this message in BF16, at most H/128
  int4-group64-perm                 Int4 per 64 features after the calibrated range-sorting permutation
  int4-static-top1/64@min64k        the paper's scheme, but messages under 64 KiB go as exact BF16
  int4-static-top1/64@twoshot+int4-token@minauto   two-shot, gated at the measured crossover
  fp8e4m3-token                     FP8 E4M3 per token (bf16 scale)
  fp4e2m1-group32-se8m0             MXFP4 (what the mxfp4 preset expands to)
  fp8e5m2-group64-sfp32             FP8 E5M2 per 64 features, fp32 scales
  int4-group32-sfp16                Int4 per 32 features, fp16 scales (saturating)
  fp4e2m1-group16-se4m3@twoshot+fp4e2m1-group16-se4m3   NVFP4 on both two-shot legs
  int4-static-top1/64@twoshot+int8-static   two-shot; the reduced sum requantized with calibrated scales
  int4-static-top1/64;L0-3=int8-token;L28.down_proj=bf16   per-layer / per-module overrides
"""

GRAMMAR_HELP = _grammar_help()


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_K = r"(\d+/\d+|\d*\.\d+|\d+)"
_RE_OUTLIERS = re.compile(r"top" + _K + r"|rand" + _K + r"(?:s(\d+))?")
_RE_ALGO = re.compile(r"gather|twoshot|" + "|".join(RECIPE_ALGOS))
_RE_GATE = re.compile(r"@min(?:(\d+)([kM]?)|(auto))(?=$)")
_GATE_UNITS = {"": 1, "k": 1024, "M": 1 << 20}
_RE_ROT = re.compile(r"-rot(\d+)")
_RE_SPARSE = re.compile(r"-sp(\d+)")
_RE_THR = re.compile(r"-thr(\d+(?:\.\d+)?)c" + _K)
_RE_PERM = re.compile(r"-perm(?=[-@]|$)")
_RE_SUFFIX = re.compile(r"-rot\d|-sr(?:@|$)|-sp\d|-thr\d|-perm(?:[-@]|$)")
_EXACT = {"exact": "bf16", "bf16": "bf16", "fp32": "fp32"}


class _Unparsed(SchemeError):
    """Text that does not follow the grammar (a part refusing its values is a plain SchemeError)."""


def _expected(field_name: str, text: str, pos: int, what: str) -> _Unparsed:
    rest = text[pos:] or "<end>"
    return _Unparsed(field_name, f"cannot parse {text!r} at position {pos} ({rest!r}); expected {what}")


def _second_leg_text() -> str:
    legs = [c.syntax for c in codes.CODES.classes() if c.requantizes]
    others = f" (or {', '.join(f'{s}-<gran>' for s in legs[1:])})" if legs[1:] else ""
    return f"a second leg: {legs[0]}-token or {legs[0]}-group<G>{others}, then optionally -s<fmt>"


def _parse_quant_spec(text: str, pos: int, field_name: str) -> tuple[QuantSpec | None, int]:
    """``<code>-<gran>[-s<fmt>][-<cast>]`` at ``pos``: each part read by its own registry."""
    found = codes.parse(text, pos)
    if found is None:
        return None, pos
    code, pos = found
    if not text.startswith("-", pos):
        raise _expected(field_name, text, pos, f"'-' then a granularity: {groups.syntax()}")
    found = groups.parse(text, pos + 1)
    if found is None:
        raise _expected("granularity", text, pos + 1, f"a granularity: {groups.syntax()}")
    grouping, pos = found
    scale = cast = None
    found = scales.parse(text, pos)
    if found is not None:
        scale, end = found
        refusal = grouping.scale_refusal(text[pos:end])  # a token str() could not print again
        if refusal:
            raise SchemeError("scale_format", refusal)
        pos = end
    found = CASTS.parse(text, pos)
    if found is not None:
        cast, pos = found
    return QuantSpec(code=code, grouping=grouping, scale=scale, cast=cast), pos


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
    if text in PRESETS:
        return parse_scheme(PRESETS[text])
    for name in sorted(PRESETS, key=len, reverse=True):
        if text.startswith(name) and text[len(name):len(name) + 1] in ("-", "@", "+", ".", "_"):
            raise SchemeError("preset", f"{name!r} takes no options (got {text!r}); allowed: {name} alone, "
                                        f"or write its expansion {PRESETS[name]} and change that")
    quant, pos = _parse_quant_spec(text, 0, "scheme")
    if quant is None:
        forms = ", ".join(f"{c.syntax}-<gran>[...]" for c in codes.CODES.classes())
        raise _expected("scheme", text, 0, f"one of: exact, bf16, fp32, {forms}, or a preset: " + ", ".join(PRESETS))
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
        if sparse < 1:  # -sp0 means nothing (0 is "no sp" in the dataclass)
            raise sparse_refusal(sparse)
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
            raise _expected("algo", text, pos + 1, "an algo: gather, twoshot, twoshot+<second leg> ("
                                                   + _second_leg_text() + ")")
        pos = a.end()
        if a.group(0) in RECIPE_ALGOS:
            algo = a.group(0)
        if a.group(0) == "twoshot":
            algo = "two_shot"
            if text.startswith("+", pos):
                second, pos = _parse_second(text, pos + 1)
        if text.startswith("@min", pos):
            min_message, pos = _parse_gate(text, pos)
    if pos != len(text):
        raise _expected("scheme", text, pos, "in this order '-sp<n>' or '-thr<T>c<K>', '-perm', '-rot<R>', '-sr', "
                                             "'-<outliers>', '@<algo>' or the end of the scheme; "
                                             "a size gate '@min<size>' comes last")
    return Scheme("quant", quant=quant, outliers=outliers, algo=algo, second=second, rotation=rotation,
                  sparse=sparse, threshold=threshold, permute=permute, min_message=min_message)


def _parse_second(text: str, pos: int) -> tuple[QuantSpec, int]:
    """The two-shot second leg at ``pos`` (after ``@twoshot+``); it ends the scheme or its gate."""
    try:
        second, end = _parse_quant_spec(text, pos, "second")
    except _Unparsed:
        second, end = None, pos
    if second is None or not (end == len(text) or text.startswith("@min", end)):
        raise _expected("second", text, pos if second is None else end, _second_leg_text())
    return second, end


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

