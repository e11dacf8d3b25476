"""Communication schemes: what a row-parallel partial sum is turned into before it travels.

This module is the ONE owner of the scheme string grammar; everything else (job specs, pages,
the CLI, collectives) parses and prints schemes through it.

    python -m lowbit schemes        # prints GRAMMAR_HELP

Grammar::

    exact | bf16 | fp32                       exact all-reduce (exact == bf16 on the wire)
    <code>-<gran>[-<outliers>][-perm][-rot<R>][-sr][@<algo>]
      code:     int<B>[a] | nf<B>           int: uniform grid, B in 2,3,4,5,6,8, 'a' = asymmetric;
                                            nf: normal-quantile codebook, B in 3,4 (symmetric)
      gran:     static | token | group<G>
      outliers: top<K> | rand<K>[s<seed>]     K a fraction '1/64' or a decimal '0.05'
              | sp<n>                       n largest-|x| values per token as (uint16 index, BF16)
              | thr<T>c<K>                  per message, features with max|x| > T in BF16, at most
                                            K*H of them (index list in the message)
      perm:     calibrated channel grouping (group<G> only): features sorted by range
      rot<R>:   block Walsh-Hadamard rotation of size R (a power of two dividing hidden), dynamic
                scales only; outlier columns are taken out in the original space first
      sr:       stochastic rounding of the first leg (seeded per call), else round to nearest
      algo:     gather (default) | twoshot[+int<B>[a]-token|group<G>]   second leg, default int8-token
    scheme map: <scheme>[;L<a>[-<b>][.<module>]=<scheme>]...

==============================================  ===================================================
string                                          meaning
==============================================  ===================================================
``bf16`` (``exact``)                            exact all-reduce in BF16
``fp32``                                        exact all-reduce in FP32
``int4-static-top1/64``                         the paper: Int4 symmetric, static per-feature
                                                scales from calibration, top 1/64 features in BF16
``int4-static-rand1/64s7``                      baseline: same count of BF16 features, chosen at
                                                random with seed 7
``int8-token``                                  Int8, one dynamic scale per token (row)
``int4-group32``                                Int4, one dynamic scale per 32 features of a row
``int3a-group64-top1/64``                       Int3 asymmetric (scale and min) per group of 64
``int4-token@twoshot+int8-token``               two-shot reduce-scatter / all-gather; the reduced
                                                shard is requantized to Int8 per token
``int3-token-rot64``                            Int3 per token after a 64-wide block Hadamard
                                                rotation (inverted after the fp32 sum)
``int4-token-sr``                               Int4 per token, stochastic rounding
``nf4-static-top1/64``                          the paper with a 4-bit normal-quantile codebook
``nf3-group64``                                 3-bit codebook, one dynamic absmax per 64 features
``int4-static-sp3``                             the 3 largest-|x| values of each token travel as
                                                (uint16 index, BF16 value); 4 + 3*32/H bits
``int4-token-thr6c1/128``                       per message, features with max|x| > 6 go in BF16
                                                (at most H/128 of them; their index list is sent)
``int4-group64-perm``                           Int4 per group of 64 after a calibrated
                                                permutation that groups features of similar range
``int4-static-top1/64;L0-3=int8-token;``        per-site overrides: layers 0..3 use Int8 per
``L28.down_proj=bf16``                          token, layer 28's down_proj goes exact
==============================================  ===================================================

Neighbouring schemes (related work, compared with the paper in the README):

- ``nf<B>`` (non-uniform code, as NF4 in QLoRA): the code is an index into a fixed codebook of
  ``2**B`` values in [-1, 1] (``lowbit.codebook``: normal quantiles with an exact zero), scaled
  by the absmax of the feature (static) / token / group. "Static per layer/module" means the
  codebook is a constant: it never changes per message or per site; a different code at one
  site is a per-site override (``;L28.down_proj=nf3-token``). Symmetric only; rounds to the
  nearest entry; no stochastic rounding; never the two-shot second leg (that stays ``int``).
- ``sp<n>`` (dense-and-sparse, SqueezeLLM; spike reserving, FlashCommunication v2): per token the
  ``n`` values of largest magnitude are taken out, zeroed, the rest quantized; the pairs travel
  in the message (fixed count, fixed size). ``1 <= n <= H/2`` of the message's features.
- ``thr<T>c<K>`` (dynamic outliers, LLM.int8()): ``T`` an absolute threshold on |x| (a decimal
  such as ``6`` or ``0.5``), ``K`` the capacity as a fraction of the message's features (as
  ``top<K>``). Fixed-size message: C = floor(K * H) uint16 indices (unused: 0xFFFF) + C BF16
  columns + codes for all H features; more than C exceeding T: the C largest go, the rest are
  quantized normally and counted as ``thr_overflow``.
- ``perm`` (channel grouping): a static permutation derived from calibration on every rank, so
  it costs 0 bits per message (its H uint16 entries are ``static_bytes``).
- At most one of ``top``/``rand``, ``sp``, ``thr`` per scheme; ``sp``/``thr`` and ``perm`` do not
  combine with ``-rot<R>``. With ``@twoshot`` each first-leg chunk is one message (``sp``: n per
  token per chunk; ``thr``: C = floor(K * H/tp) per chunk); the second leg is a plain ``int``
  requantization.

Canonical strings (what ``str()`` prints, and what ``parse`` round-trips exactly): ``exact`` is
printed ``bf16``; ``@gather`` and a random seed of 0 are omitted; ``@twoshot`` always names its
second leg; outlier fractions print as ``n/d`` in lowest terms; thresholds print as the
shortest decimal (``thr6``, ``thr0.5``); suffixes print in the order outliers (top/rand/sp/thr),
``-perm``, ``-rot<R>``, ``-sr``. The scale dtype is not part of the string: strings always mean
BF16 scales (FP16 scales overflowed to inf on real data).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from fractions import Fraction

import torch

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
GRANULARITIES = ("static", "token", "group")
DYNAMIC_GRANULARITIES = ("token", "group")
SCALE_DTYPES = (torch.bfloat16, torch.float32)
OUTLIER_SELECTS = ("none", "topk", "random")
ALGOS = ("gather", "two_shot")
WIRE_DTYPES = ("bf16", "fp32")
MAX_K_FRAC = Fraction(1, 2)
ROUNDINGS = ("nearest", "stochastic")
MAX_ROTATION = 4096
CODES = ("int", "nf")  # uniform grid, or the normal-quantile codebook of lowbit.codebook
CODEBOOK_BITS = (3, 4)
MAX_SPARSE = 255  # values per token taken out by -sp<n> (also at most half the message's features)
MAX_INDEXED_HIDDEN = 65535  # sp/thr send uint16 column indices (0xFFFF is thr's unused-slot sentinel)
MAX_THRESHOLD = 1e9

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
  scheme map: <scheme>[;L<a>[-<b>][.<module>]=<scheme>]...

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
  int4-static-top1/64;L0-3=int8-token;L28.down_proj=bf16   per-layer / per-module overrides
"""


class SchemeError(ValueError):
    """A scheme that cannot be built; the message names the field and what is allowed."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fraction(value) -> Fraction:
    if isinstance(value, float):
        return Fraction(repr(value))  # 0.05 means 1/20, not the nearest binary fraction
    return Fraction(value)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, symmetry, and where scales come from.

    granularity: ``static`` one fp32 scale per feature from calibration (not sent);
    ``token`` one dynamic scale per row; ``group`` one per ``group_size`` contiguous features
    of a row. Dynamic scales travel in ``scale_dtype``.

    code: ``int`` a uniform grid of ``2**bits`` levels; ``nf`` an index into the fixed
    ``2**bits``-entry codebook of ``lowbit.codebook`` (symmetric, nearest entry, bits 3 or 4).
    """

    bits: int
    symmetric: bool = True
    granularity: str = "static"
    group_size: int | None = None
    scale_dtype: torch.dtype = torch.bfloat16
    # Stochastic rounding draws its uniforms from ``rounding_seed``; the communicator sets a
    # fresh seed per call (rank, site, call), so a run is reproducible. Neither field changes
    # the payload layout, and neither appears in ``str()`` (the scheme prints ``-sr``).
    rounding: str = "nearest"
    rounding_seed: int = 0
    code: str = "int"

    def __post_init__(self):
        if self.code not in CODES:
            raise SchemeError("code", f"{self.code!r} not allowed; allowed: {', '.join(CODES)}")
        if self.code == "nf":
            if self.bits not in CODEBOOK_BITS:
                raise SchemeError("bits", f"{self.bits!r} not allowed for the nf codebook; "
                                          f"allowed: {', '.join(map(str, CODEBOOK_BITS))}")
            if not self.symmetric:
                raise SchemeError("symmetric", "the nf codebook is symmetric around an exact zero; "
                                               "allowed: nf<B> without 'a'")
            if self.rounding != "nearest":
                raise SchemeError("rounding", "the nf codebook rounds to the nearest entry; allowed: 'nearest' "
                                              "(no -sr with nf<B>)")
        if self.rounding not in ROUNDINGS:
            raise SchemeError("rounding", f"{self.rounding!r} not allowed; allowed: {', '.join(ROUNDINGS)}")
        if not isinstance(self.rounding_seed, int) or self.rounding_seed < 0:
            raise SchemeError("rounding_seed", f"{self.rounding_seed!r} not allowed; allowed: an integer >= 0")
        if self.bits not in ALLOWED_BITS:
            raise SchemeError("bits", f"{self.bits!r} not allowed; allowed: {', '.join(map(str, ALLOWED_BITS))}")
        if self.granularity not in GRANULARITIES:
            raise SchemeError(
                "granularity", f"{self.granularity!r} not allowed; allowed: {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise SchemeError("group_size", f"{self.group_size!r} not allowed; allowed: a positive integer")
        elif self.group_size is not None:
            raise SchemeError(
                "group_size", f"{self.group_size!r} not allowed for granularity {self.granularity!r}; allowed: None"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(
                "scale_dtype",
                f"{_dtype_name(self.scale_dtype)} not allowed (fp16 scales overflow to inf); "
                f"allowed: {', '.join(_dtype_name(d) for d in SCALE_DTYPES)}",
            )

    @property
    def dynamic(self) -> bool:
        return self.granularity in DYNAMIC_GRANULARITIES

    def __str__(self) -> str:
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"{self.code}{self.bits}{'' if self.symmetric else 'a'}-{gran}"

    def validate_for(self, hidden: int) -> None:
        if self.granularity == "group" and hidden % self.group_size:
            divisors = [d for d in range(1, hidden + 1) if hidden % d == 0]
            raise SchemeError(
                "group_size",
                f"{self.group_size} does not divide hidden size {hidden}; "
                f"allowed group sizes: {', '.join(map(str, divisors))}",
            )


@dataclass(frozen=True)
class OutlierSpec:
    """Which features skip quantization and travel in BF16.

    ``topk``: the ``k_frac * hidden`` (floored) features with the largest calibrated range;
    ``random``: as many features drawn with ``seed`` (the paper's baseline). Both are fixed
    sets known to every rank, so their indices are never sent. ``none`` normalizes
    ``k_frac`` to 0.
    """

    select: str = "none"
    k_frac: Fraction = Fraction(1, 64)
    seed: int = 0

    def __post_init__(self):
        if self.select not in OUTLIER_SELECTS:
            raise SchemeError("select", f"{self.select!r} not allowed; allowed: {', '.join(OUTLIER_SELECTS)}")
        if self.select == "none":
            object.__setattr__(self, "k_frac", Fraction(0))
            object.__setattr__(self, "seed", 0)
            return
        k = _fraction(self.k_frac)
        object.__setattr__(self, "k_frac", k)
        if not (0 < k <= MAX_K_FRAC):
            raise SchemeError("k_frac", f"{k} not allowed; allowed: a fraction in (0, 1/2]")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SchemeError("seed", f"{self.seed!r} not allowed; allowed: an integer >= 0")
        if self.select == "topk" and self.seed != 0:
            raise SchemeError("seed", f"{self.seed} not allowed for select 'topk'; allowed: 0 (only 'random' uses it)")

    def count(self, hidden: int) -> int:
        """Number of BF16 features at this hidden size: floor(k_frac * hidden)."""
        return int(self.k_frac * hidden)

    def __str__(self) -> str:
        if self.select == "none":
            return ""
        k = f"{self.k_frac.numerator}/{self.k_frac.denominator}"
        if self.select == "topk":
            return f"top{k}"
        return f"rand{k}" + (f"s{self.seed}" if self.seed else "")


def decimal_text(value: float) -> str:
    """The shortest decimal text of a threshold (``6.0`` -> ``6``, ``0.5`` -> ``0.5``)."""
    text = format(value, ".10f").rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class ThresholdSpec:
    """Dynamic threshold outliers (``thr<T>c<K>``): per message, the features whose largest
    |x| over the message's tokens exceeds ``value`` travel in BF16, at most
    ``capacity(width) = floor(k_frac * width)`` of them (the largest first)."""

    value: float
    k_frac: Fraction = Fraction(1, 64)

    def __post_init__(self):
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_THRESHOLD:
            raise SchemeError("threshold", f"{v!r} not allowed; allowed: a number in [0, {MAX_THRESHOLD:g}]")
        v = float(v)
        if float(decimal_text(v)) != v:
            raise SchemeError("threshold", f"{v!r} not allowed; allowed: at most 10 decimal places")
        object.__setattr__(self, "value", v)
        k = _fraction(self.k_frac)
        object.__setattr__(self, "k_frac", k)
        if not (0 < k <= MAX_K_FRAC):
            raise SchemeError("k_frac", f"{k} not allowed for the threshold capacity; allowed: a fraction in (0, 1/2]")

    def capacity(self, width: int) -> int:
        """BF16 column slots in a message of ``width`` features: floor(k_frac * width)."""
        return int(self.k_frac * width)

    def __str__(self) -> str:
        return f"thr{decimal_text(self.value)}c{self.k_frac.numerator}/{self.k_frac.denominator}"


DEFAULT_SECOND = QuantSpec(8, True, "token")


@dataclass(frozen=True)
class Scheme:
    """One site's communication scheme (see the module docstring for the string form).

    ``second`` is the two-shot requantization leg (dynamic only); it defaults to int8-token
    when ``algo == "two_shot"`` and must be None otherwise. ``sparse`` (``-sp<n>``) values per
    token and ``threshold`` (``-thr<T>c<K>``) are per-message outliers, exclusive with each
    other and with ``outliers``; ``permute`` (``-perm``) is the calibrated channel grouping.
    """

    kind: str = "exact"
    wire_dtype: str | None = "bf16"
    quant: QuantSpec | None = None
    outliers: OutlierSpec = field(default_factory=OutlierSpec)
    algo: str = "gather"
    second: QuantSpec | None = None
    rotation: int | None = None  # block size of the Walsh-Hadamard rotation (lowbit.rotation)
    sparse: int = 0
    threshold: ThresholdSpec | None = None
    permute: bool = False

    def __post_init__(self):
        if self.kind not in ("exact", "quant"):
            raise SchemeError("kind", f"{self.kind!r} not allowed; allowed: exact, quant")
        if self.algo not in ALGOS:
            raise SchemeError("algo", f"{self.algo!r} not allowed; allowed: {', '.join(ALGOS)}")
        if self.kind == "exact":
            if self.wire_dtype not in WIRE_DTYPES:
                raise SchemeError("wire_dtype", f"{self.wire_dtype!r} not allowed; allowed: {', '.join(WIRE_DTYPES)}")
            if self.quant is not None or self.second is not None:
                raise SchemeError("quant", "an exact scheme takes no quantization; allowed: None")
            if self.outliers.select != "none":
                raise SchemeError("outliers", "an exact scheme keeps every feature; allowed: none")
            if self.algo != "gather":
                raise SchemeError("algo", f"{self.algo!r} not allowed for an exact scheme; allowed: gather")
            if self.rotation is not None:
                raise SchemeError("rotation", "an exact scheme is not rotated; allowed: None")
            if self.sparse or self.threshold is not None or self.permute:
                raise SchemeError("outliers", "an exact scheme sends every value; allowed: no sp, thr or perm")
            return
        object.__setattr__(self, "wire_dtype", None)
        if not isinstance(self.quant, QuantSpec):
            raise SchemeError("quant", f"{self.quant!r} not allowed for kind 'quant'; allowed: a QuantSpec")
        if self.algo == "gather" and self.second is not None:
            raise SchemeError("second", "only the two_shot algo has a second leg; allowed: None")
        if self.algo == "two_shot":
            if self.second is None:
                object.__setattr__(self, "second", DEFAULT_SECOND)
            if self.second.granularity not in DYNAMIC_GRANULARITIES:
                raise SchemeError(
                    "second",
                    f"granularity {self.second.granularity!r} not allowed for the requantization leg "
                    f"(no calibration exists for the reduced sum); allowed: {', '.join(DYNAMIC_GRANULARITIES)}",
                )
            if self.second.rounding != "nearest":
                raise SchemeError("second", "the requantization leg rounds to nearest; allowed: rounding 'nearest'")
            if self.second.code != "int":
                raise SchemeError("second", "the requantization leg is a plain uniform grid; "
                                            "allowed: int<B>[a]-token or int<B>[a]-group<G>")
        self._check_new_options()
        if self.rotation is not None:
            r = self.rotation
            if isinstance(r, bool) or not isinstance(r, int) or r < 2 or r > MAX_ROTATION or r & (r - 1):
                raise SchemeError("rotation", f"{r!r} not allowed; allowed: a power of two in 2..{MAX_ROTATION}")
            if self.quant.granularity not in DYNAMIC_GRANULARITIES:
                raise SchemeError(
                    "rotation",
                    "a rotated partial needs dynamic scales (calibrated ranges are of the unrotated "
                    f"features); allowed granularities: {', '.join(DYNAMIC_GRANULARITIES)}",
                )
            if self.algo == "two_shot" and self.outliers.select != "none":
                raise SchemeError("rotation", "rotation with BF16 outliers runs with the gather algo only; "
                                              "allowed: @gather, or no outliers")

    def _check_new_options(self) -> None:
        """The neighbouring-work options: their ranges and which combinations are refused."""
        n = self.sparse
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_SPARSE:
            raise SchemeError("sparse", f"{n!r} not allowed; allowed: an integer in 1..{MAX_SPARSE} (sp<n>)")
        if self.threshold is not None and not isinstance(self.threshold, ThresholdSpec):
            raise SchemeError("threshold", f"{self.threshold!r} is not a ThresholdSpec")
        if not isinstance(self.permute, bool):
            raise SchemeError("permute", f"{self.permute!r} not allowed; allowed: True, False")
        mechanisms = [name for name, on in (("top/rand", self.outliers.select != "none"), ("sp", n > 0),
                                            ("thr", self.threshold is not None)) if on]
        if len(mechanisms) > 1:
            raise SchemeError("outliers", f"{' and '.join(mechanisms)} together not allowed; allowed: one of "
                                          "top<K>, rand<K>[s<seed>], sp<n>, thr<T>c<K>")
        if self.permute and self.quant.granularity != "group":
            raise SchemeError("permute", f"-perm groups features for group-wise scales; granularity "
                                         f"{self.quant.granularity!r} not allowed; allowed: group<G>")
        if self.rotation is not None and (n or self.threshold is not None or self.permute):
            raise SchemeError("rotation", "-rot<R> does not combine with sp<n>, thr<T>c<K> or -perm; "
                                          "allowed: rotation with top<K>/rand<K> or no outliers")

    @property
    def is_exact(self) -> bool:
        return self.kind == "exact"

    @property
    def stochastic(self) -> bool:
        """True when the first leg uses stochastic rounding (``-sr``)."""
        return not self.is_exact and self.quant.rounding == "stochastic"

    @property
    def needs_calibration(self) -> bool:
        """True when static scales or a top-k outlier set must come from a calibration run."""
        if self.is_exact:
            return False
        return self.quant.granularity == "static" or self.outliers.select == "topk" or self.permute

    def __str__(self) -> str:
        if self.is_exact:
            return self.wire_dtype
        text = str(self.quant)
        if self.outliers.select != "none":
            text += f"-{self.outliers}"
        if self.sparse:
            text += f"-sp{self.sparse}"
        if self.threshold is not None:
            text += f"-{self.threshold}"
        if self.permute:
            text += "-perm"
        if self.rotation is not None:
            text += f"-rot{self.rotation}"
        if self.stochastic:
            text += "-sr"
        if self.algo == "two_shot":
            text += f"@twoshot+{self.second}"
        return text

    def validate_for(self, hidden: int, tp: int) -> None:
        """Check this scheme can run at this hidden size and TP size; raise SchemeError if not.

        Group sizes must divide ``hidden``. Two-shot's reduce-scatter splits the features into
        ``tp`` equal chunks (as ``lowbit.collectives`` does), so ``hidden`` must divide by
        ``tp`` and both legs' group sizes must divide the chunk ``hidden // tp``.
        """
        if not isinstance(tp, int) or tp < 1:
            raise SchemeError("tp", f"{tp!r} not allowed; allowed: an integer >= 1")
        if self.is_exact:
            return
        self.quant.validate_for(hidden)
        if self.rotation is not None and hidden % self.rotation:
            allowed = [2**i for i in range(1, 13) if hidden % 2**i == 0]
            raise SchemeError("rotation", f"block size {self.rotation} does not divide hidden size {hidden}; "
                                          f"allowed: {', '.join(map(str, allowed)) or 'none (hidden is odd)'}")
        if self.algo == "two_shot":
            if hidden % tp:
                raise SchemeError(
                    "algo", f"two_shot needs hidden size {hidden} divisible by TP size {tp}; allowed: gather"
                )
            width = hidden // tp
            for leg in (self.quant, self.second):
                if leg.granularity == "group" and width % leg.group_size:
                    allowed = [g for g in range(1, width + 1) if width % g == 0]
                    raise SchemeError(
                        "group_size",
                        f"{leg.group_size} does not divide the two-shot chunk of {width} features "
                        f"(hidden {hidden} / TP {tp}); allowed: {', '.join(map(str, allowed))}",
                    )
        if self.outliers.select != "none":
            n = self.outliers.count(hidden)
            if n < 1:
                raise SchemeError(
                    "k_frac",
                    f"{self.outliers.k_frac} of hidden size {hidden} keeps no feature; "
                    f"allowed: k_frac >= 1/{hidden}",
                )
        width = hidden // tp if self.algo == "two_shot" else hidden
        where = f"the two-shot chunk of {width} features" if self.algo == "two_shot" else f"hidden size {hidden}"
        if (self.sparse or self.threshold is not None) and width > MAX_INDEXED_HIDDEN:
            raise SchemeError("outliers", f"sp/thr send uint16 indices; {where} not allowed; "
                                          f"allowed: at most {MAX_INDEXED_HIDDEN} features per message")
        if self.sparse > width // 2:
            raise SchemeError("sparse", f"sp{self.sparse} takes more than half of {where}; "
                                        f"allowed: 1..{max(1, width // 2)}")
        if self.threshold is not None and self.threshold.capacity(width) < 1:
            raise SchemeError("k_frac", f"capacity {self.threshold.k_frac} of {where} holds no feature; "
                                        f"allowed: K >= 1/{width}")


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_K = r"(\d+/\d+|\d*\.\d+|\d+)"
_RE_QUANT = re.compile(r"(int|nf)(\d+)(a?)")
_RE_GRAN = re.compile(r"static|token|group(\d+)")
_RE_OUTLIERS = re.compile(r"top" + _K + r"|rand" + _K + r"(?:s(\d+))?")
_RE_ALGO = re.compile(r"gather|twoshot(?:\+(int\d+a?-(?:token|group\d+)))?")
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
    algo, second = "gather", None
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
    if pos != len(text):
        raise _expected("scheme", text, pos, "in this order '-sp<n>' or '-thr<T>c<K>', '-perm', '-rot<R>', '-sr', "
                                             "'-<outliers>', '@<algo>' or the end of the scheme")
    return Scheme("quant", quant=quant, outliers=outliers, algo=algo, second=second, rotation=rotation,
                  sparse=sparse, threshold=threshold, permute=permute)


def _row_parallel_modules() -> tuple[str, ...]:
    from lowbit.comm import ROW_PARALLEL_MODULES  # the TP layer owns module names

    return tuple(ROW_PARALLEL_MODULES)


@dataclass(frozen=True)
class SchemeMap:
    """A default scheme plus per-site overrides keyed by (layer, module or None for both).

    Lookup order: (layer, module), then (layer, None), then the default.
    """

    default: Scheme
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        modules = _row_parallel_modules()
        for (layer, module), scheme in self.overrides.items():
            if not isinstance(layer, int) or layer < 0:
                raise SchemeError("layer", f"{layer!r} not allowed; allowed: an integer >= 0")
            if module is not None and module not in modules:
                raise SchemeError("module", f"{module!r} not allowed; allowed: {', '.join(modules)}")
            if not isinstance(scheme, Scheme):
                raise SchemeError("overrides", f"{scheme!r} is not a Scheme")

    def for_site(self, layer: int, module: str | None = None) -> Scheme:
        for key in ((layer, module), (layer, None)):
            if key in self.overrides:
                return self.overrides[key]
        return self.default

    def schemes(self) -> list[Scheme]:
        """Every distinct scheme used, default first."""
        out = [self.default]
        for s in self.overrides.values():
            if s not in out:
                out.append(s)
        return out

    def validate_for(self, hidden: int, tp: int) -> None:
        for s in self.schemes():
            s.validate_for(hidden, tp)

    def __str__(self) -> str:
        runs: dict[tuple[str | None, str], list[int]] = {}
        for (layer, module), scheme in self.overrides.items():
            runs.setdefault((module, str(scheme)), []).append(layer)
        entries = []
        for (module, scheme), layers in runs.items():
            layers.sort()
            start = prev = layers[0]
            for layer in layers[1:] + [None]:
                if layer is not None and layer == prev + 1:
                    prev = layer
                    continue
                entries.append((start, prev, module, scheme))
                if layer is not None:
                    start = prev = layer
        entries.sort(key=lambda e: (e[0], e[2] is not None, e[2] or "", e[1]))
        parts = [str(self.default)]
        for start, end, module, scheme in entries:
            site = f"L{start}" + (f"-{end}" if end != start else "") + (f".{module}" if module else "")
            parts.append(f"{site}={scheme}")
        return ";".join(parts)


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
