# Size: ~620 lines: each dataclass carries its own checks against a hidden size and TP size (int, nf, fp, fitted lm codes, scale formats, the gate), which is most of the file.
"""The scheme dataclasses: what one site's partial sum becomes before it travels.

``Scheme`` (one site), ``SchemeMap`` (a default plus per-site overrides), ``QuantSpec`` (code,
bits, granularity), ``OutlierSpec`` / ``ThresholdSpec`` (what goes in BF16), their canonical
strings (``str()``) and their checks against a hidden size and TP size. The string grammar that
builds them is ``lowbit.scheme.grammar``; ``python -m lowbit schemes`` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

from lowbit.site import ROW_PARALLEL_MODULES

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
GRANULARITIES = ("static", "token", "group")
DYNAMIC_GRANULARITIES = ("token", "group")
# The scale formats (scheme suffix ``-s<fmt>``); bf16 is the default and is never printed.
# fp16 saturates at 65504 (never inf); e8m0 is a power of two (OCP MX's shared exponent byte);
# e4m3 is a float8_e4m3fn multiple of one power-of-two fp32 scale per message (NVFP4's two levels).
SCALE_FORMATS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16,
                 "e8m0": torch.float8_e8m0fnu, "e4m3": torch.float8_e4m3fn}
SCALE_DTYPES = tuple(SCALE_FORMATS.values())
BLOCK_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float8_e4m3fn)  # symmetric codes only
KERNEL_SCALE_DTYPES = (torch.bfloat16, torch.float32)  # what kernels/ implements; the rest stay on the torch path
OUTLIER_SELECTS = ("none", "topk", "random")
ALGOS = ("gather", "two_shot")
WIRE_DTYPES = ("bf16", "fp32")
MAX_K_FRAC = Fraction(1, 2)
ROUNDINGS = ("nearest", "stochastic")
MAX_ROTATION = 4096
# uniform grid, the normal-quantile codebook of lowbit.codebook, a minifloat, a Lloyd-Max codebook fitted
# per site on calibration (lowbit.method.fitted_codebook)
CODES = ("int", "nf", "fp", "lm")
# The floating-point codes (scheme code fp<B>e<E>m<M>): (bits, exponent bits) -> largest finite value.
# Saturating: no inf; e4m3 is float8_e4m3fn (no inf, its one NaN pattern never produced), e5m2 is
# float8_e5m2 without its inf/NaN patterns, the 6- and 4-bit ones are OCP MX's FP6/FP4 (no inf/NaN).
FP_FORMATS = {(8, 4): 448.0, (8, 5): 57344.0, (6, 2): 7.5, (6, 3): 28.0, (4, 2): 6.0}
# codes per byte boundary: a group of fp4 / fp6 codes starts on a whole byte (2 per byte, 4 per 3 bytes)
FP_GROUP_MULTIPLE = {4: 2, 6: 4, 8: 1}
CODEBOOK_BITS = (3, 4)
FITTED_BITS = (2, 3, 4)  # lm<B>: 2**B levels fitted per site (and rank) on the calibration's sample
TABLE_SCOPES = ("rank", "site")  # lm<B>: one table per (site, rank); lm<B>s: one per site, shared by the ranks
MAX_SPARSE = 255  # values per token taken out by -sp<n> (also at most half the message's features)
MAX_INDEXED_HIDDEN = 65535  # sp/thr send uint16 column indices (0xFFFF is thr's unused-slot sentinel)
MAX_THRESHOLD = 1e9
MIN_MESSAGE_AUTO = -1  # ``@minauto``: the job sets the threshold from the collective-bench records
MAX_MIN_MESSAGE = 1 << 40

class SchemeError(ValueError):
    """A scheme that cannot be built; the message names the field and what is allowed."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def scale_format_name(dtype: torch.dtype) -> str:
    """The grammar's name of a scale dtype: ``fp32``, ``bf16``, ``fp16``, ``e8m0``, ``e4m3``."""
    for name, d in SCALE_FORMATS.items():
        if d == dtype:
            return name
    return _dtype_name(dtype)


def fp_code_text(bits: int, exp_bits: int) -> str:
    return f"fp{bits}e{exp_bits}m{bits - 1 - exp_bits}"


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
    ``2**bits``-entry codebook of ``lowbit.codebook`` (symmetric, nearest entry, bits 3 or 4);
    ``fp`` a saturating minifloat of ``bits`` bits with ``exp_bits`` exponent bits (``FP_FORMATS``:
    fp8e4m3, fp8e5m2, fp6e2m3, fp6e3m2, fp4e2m1), scale = absmax / the format's largest value;
    ``lm`` an index into a table of ``2**bits`` levels in [-1, 1] fitted by Lloyd-Max on the
    calibration's sample at each site (scale = absmax, as ``nf``; bits 2, 3 or 4). ``table_scope``
    ``rank`` fits one table per (site, rank), ``site`` one per site shared by its ranks.
    ``pin_ends`` (``lm<B>p``) keeps the table's ends at -1 and +1 (the absmax decodes exactly).
    ``levels`` is the fitted table itself: set by the communicator per site and sender
    (``lowbit.method.fitted_codebook``), never part of ``str()``; a parsed ``lm`` spec has None.

    scale_dtype: one of ``SCALE_FORMATS`` (see there); fp16/e8m0/e4m3 for dynamic scales only.
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
    exp_bits: int = 0  # fp codes only: exponent bits (mantissa = bits - 1 - exp_bits)
    table_scope: str = "rank"  # lm codes only: whose sample a table is fitted on (TABLE_SCOPES)
    pin_ends: bool = False  # lm codes only (lm<B>p): the end levels stay at -1 and +1, the absmax decodes exactly
    levels: tuple[float, ...] | None = None  # lm codes only: the fitted fp32 table, sorted, in [-1, 1]

    def __post_init__(self):
        if self.code not in CODES:
            raise SchemeError("code", f"{self.code!r} not allowed; allowed: {', '.join(CODES)}")
        if self.code == "fp":
            self._check_fp()
        elif self.exp_bits:
            raise SchemeError("exp_bits", f"{self.exp_bits!r} not allowed for code {self.code!r}; allowed: 0")
        self._check_fitted()
        if self.code == "nf":
            self._check_codebook("nf", CODEBOOK_BITS, "the nf codebook is symmetric around an exact zero; "
                                                      "allowed: nf<B> without 'a'")
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
                f"{_dtype_name(self.scale_dtype)} not allowed; allowed: {', '.join(SCALE_FORMATS)}",
            )
        fmt = scale_format_name(self.scale_dtype)
        if self.granularity == "static" and self.scale_dtype not in KERNEL_SCALE_DTYPES:
            raise SchemeError("scale_dtype", f"{fmt} not allowed with granularity 'static' (per-feature static "
                                             "scales are fp32 from calibration and never travel); allowed: "
                                             "-s<fmt> with token or group<G>")
        if self.scale_dtype in BLOCK_SCALE_DTYPES and not self.symmetric:
            raise SchemeError("scale_dtype", f"{fmt} not allowed with an asymmetric code (its mins need a sign "
                                             "and a zero); allowed: fp32, bf16, fp16")
        if self.code == "fp" and self.granularity == "group":
            multiple = FP_GROUP_MULTIPLE[self.bits]
            if self.group_size % multiple:
                raise SchemeError("group_size", f"{self.group_size} not allowed for {self.code_text} (its codes pack "
                                                f"{multiple} to a byte boundary, so a group must start on one); "
                                                f"allowed: a multiple of {multiple}")

    def _check_codebook(self, name: str, allowed_bits: tuple[int, ...], symmetric_error: str) -> None:
        """What the nf and lm codebooks both need: a width they have, symmetric codes (an absmax
        scale), nearest-entry rounding; ``name`` as the messages call the codebook."""
        if self.bits not in allowed_bits:
            raise SchemeError("bits", f"{self.bits!r} not allowed for the {name} codebook; "
                                      f"allowed: {', '.join(map(str, allowed_bits))}")
        if not self.symmetric:
            raise SchemeError("symmetric", symmetric_error)
        if self.rounding != "nearest":
            code = self.code
            raise SchemeError("rounding", f"the {code} codebook rounds to the nearest entry; allowed: 'nearest' "
                                          f"(no -sr with {code}<B>)")

    def _check_fitted(self) -> None:
        if self.code != "lm":
            if self.levels is not None or self.table_scope != "rank" or self.pin_ends:
                raise SchemeError("levels", f"a fitted table not allowed for code {self.code!r}; allowed: "
                                            "levels=None, table_scope='rank', pin_ends=False (lm<B> only)")
            return
        self._check_codebook("fitted lm", FITTED_BITS, "the lm codebook is scaled by the absmax like nf; allowed: "
                                                       "lm<B>[s] without 'a' (its fitted levels need not be symmetric)")
        if self.table_scope not in TABLE_SCOPES:
            raise SchemeError("table_scope", f"{self.table_scope!r} not allowed; allowed: {', '.join(TABLE_SCOPES)}")
        if self.levels is not None:
            lv = self.levels
            ok = (isinstance(lv, tuple) and len(lv) == 2**self.bits
                  and all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in lv)
                  and all(a <= b for a, b in zip(lv, lv[1:])))
            if ok and self.pin_ends:
                ok = lv[0] == -1.0 and lv[-1] == 1.0
            if not ok:
                raise SchemeError("levels", f"{lv!r} not allowed; allowed: a sorted tuple of {2**self.bits} "
                                            "floats in [-1, 1] (the fitted table) or None")

    def _check_fp(self) -> None:
        if (self.bits, self.exp_bits) not in FP_FORMATS:
            allowed = ", ".join(fp_code_text(b, e) for b, e in FP_FORMATS)
            raise SchemeError("code", f"{fp_code_text(self.bits, self.exp_bits)!r} not allowed; allowed: {allowed}")
        if not self.symmetric:
            raise SchemeError("symmetric", "fp codes are sign-magnitude around an exact zero; allowed: "
                                           "fp<B>e<E>m<M> without 'a'")
        if self.rounding != "nearest":
            raise SchemeError("rounding", "fp codes round to nearest, ties to even; allowed: 'nearest' "
                                          "(no -sr with fp<B>e<E>m<M>)")

    @property
    def fp_max(self) -> float:
        """The fp code's largest finite value (its saturation point)."""
        return FP_FORMATS[(self.bits, self.exp_bits)]

    @property
    def scale_format(self) -> str:
        """The scale format as the grammar writes it (``-s<fmt>``): fp32, bf16, fp16, e8m0, e4m3."""
        return scale_format_name(self.scale_dtype)

    @property
    def message_scale(self) -> bool:
        """True when one fp32 second-level scale per message travels before the scales (e4m3)."""
        return self.dynamic and self.scale_dtype == torch.float8_e4m3fn

    @property
    def dynamic(self) -> bool:
        return self.granularity in DYNAMIC_GRANULARITIES

    @property
    def granularity_text(self) -> str:
        """The granularity as the grammar writes it: ``static``, ``token`` or ``group<G>``."""
        return f"group{self.group_size}" if self.granularity == "group" else self.granularity

    @property
    def code_text(self) -> str:
        """The code as the grammar writes it, e.g. ``int4``, ``int3a``, ``nf4``, ``fp4e2m1``, ``lm4``, ``lm4s``."""
        if self.code == "fp":
            return fp_code_text(self.bits, self.exp_bits)
        if self.code == "lm":
            return f"lm{self.bits}" + ("s" if self.table_scope == "site" else "") + ("p" if self.pin_ends else "")
        return f"{self.code}{self.bits}{'' if self.symmetric else 'a'}"

    def __str__(self) -> str:
        text = f"{self.code_text}-{self.granularity_text}"
        if self.scale_dtype != torch.bfloat16 and self.dynamic:
            text += f"-s{self.scale_format}"
        return text

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


def size_text(nbytes: int) -> str:
    """A gate size as the grammar writes it: ``auto``, ``<n>M``, ``<n>k`` (1024 bytes) or bytes."""
    if nbytes == MIN_MESSAGE_AUTO:
        return "auto"
    if nbytes and nbytes % (1 << 20) == 0:
        return f"{nbytes >> 20}M"
    if nbytes and nbytes % 1024 == 0:
        return f"{nbytes >> 10}k"
    return str(nbytes)


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

    ``second`` is the two-shot requantization leg: dynamic, or ``static`` with per-feature scales of
    the reduced sum from calibration (``Calibration.sum_range``); it defaults to int8-token
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
    # ``@min<size>``: a message whose BF16 size is under this many bytes goes as the exact BF16
    # all-reduce (the codec's fixed cost loses there); MIN_MESSAGE_AUTO until the job resolves it
    min_message: int | None = None

    def __post_init__(self):
        self._check_gate()
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
            if self.second.rounding != "nearest":
                raise SchemeError("second", "the requantization leg rounds to nearest; allowed: rounding 'nearest'")
            if self.second.code in ("nf", "lm"):
                raise SchemeError("second", "the requantization leg is a uniform grid or a minifloat; "
                                            "allowed: int<B>[a]-token|group<G> or fp<B>e<E>m<M>-token|group<G>")
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

    def _check_gate(self) -> None:
        m = self.min_message
        if m is None:
            return
        if self.kind == "exact":
            raise SchemeError("min_message", "an exact scheme has no size gate; allowed: none")
        if isinstance(m, bool) or not isinstance(m, int) or not (m == MIN_MESSAGE_AUTO or 0 <= m <= MAX_MIN_MESSAGE):
            raise SchemeError("min_message", f"{m!r} is not a size; allowed: @min<bytes>[k|M] (e.g. @min64k) "
                                             f"or @minauto")

    def gated(self, tokens: int, hidden: int) -> bool:
        """Does a message of ``tokens`` x ``hidden`` values go as the exact BF16 all-reduce
        (``@min<size>``: its BF16 bytes are under the threshold)? An unresolved ``@minauto`` gates
        nothing here; the communicator refuses to run it."""
        m = self.min_message
        return m is not None and m > 0 and tokens * hidden * 2 < m

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
        """True when static scales, a top-k outlier set or a fitted codebook (lm) must come from a
        calibration run."""
        if self.is_exact:
            return False
        second_static = self.algo == "two_shot" and self.second.granularity == "static"
        return (self.quant.granularity == "static" or self.outliers.select == "topk" or self.permute or second_static
                or self.quant.code == "lm")

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
        if self.min_message is not None:
            text += f"@min{size_text(self.min_message)}"
        return text

    def validate_for(self, hidden: int, tp: int) -> None:
        """Check this scheme can run at this hidden size and TP size; raise SchemeError if not.

        Group sizes must divide ``hidden``. Two-shot's reduce-scatter splits the features into
        ``tp`` equal chunks (as ``lowbit.comm.collectives`` does), so ``hidden`` must divide by
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



@dataclass(frozen=True)
class SchemeMap:
    """A default scheme plus per-site overrides keyed by (layer, module or None for both).

    Lookup order: (layer, module), then (layer, None), then the default.
    """

    default: Scheme
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        modules = ROW_PARALLEL_MODULES
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


