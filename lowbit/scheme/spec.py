# Size: ~450 lines: Scheme, SchemeMap and QuantSpec share one validation; splitting them would split validate_for.
"""The scheme dataclasses: what one site's partial sum becomes before it travels.

``Scheme`` (one site), ``SchemeMap`` (a default plus per-site overrides), ``QuantSpec`` (one leg's
quantizer: a code, a grouping, a scale format, a rounding rule, an input cast), ``OutlierSpec`` /
``ThresholdSpec`` (what goes in BF16), their canonical strings (``str()``) and their checks
against a hidden size and TP size. The parts of a ``QuantSpec`` are plug-ins (``lowbit.codes``,
``lowbit.groups``, ``lowbit.scales``, ``lowbit.casts``): each checks itself, ``QuantSpec.validate``
asks each in turn, and nothing here branches on which one it is. The string grammar that builds
them is ``lowbit.scheme.grammar``; ``python -m lowbit schemes`` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit import codes, groups, scales
from lowbit.casts import Cast, NoCast
from lowbit.codes import Code
from lowbit.groups import Grouping
from lowbit.plugins import SchemeError
from lowbit.scales import ScaleFormat
from lowbit.scheme.outliers import OutlierSpec, ThresholdSpec  # noqa: F401 - the scheme's parts
from lowbit.site import ROW_PARALLEL_MODULES
from lowbit.wire.recipes import RECIPE_ALGOS, check_recipe, check_recipe_tp

ALGOS = ("gather", "two_shot", *RECIPE_ALGOS)  # the recipes: shipping all-reduces (lowbit.comm.recipes)
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # an exact scheme's wire dtype, by name
ROUNDINGS = ("nearest", "stochastic")
MAX_ROTATION = 4096
MAX_SPARSE = 255  # values per token taken out by -sp<n> (also at most half the message's features)
MAX_INDEXED_HIDDEN = 65535  # sp/thr send uint16 column indices (0xFFFF is thr's unused-slot sentinel)
MIN_MESSAGE_AUTO = -1  # ``@minauto``: the job sets the threshold from the collective-bench records
MAX_MIN_MESSAGE = 1 << 40


def size_text(nbytes: int) -> str:
    """A gate size as the grammar writes it: ``auto``, ``<n>M``, ``<n>k`` (1024 bytes) or bytes."""
    if nbytes == MIN_MESSAGE_AUTO:
        return "auto"
    if nbytes and nbytes % (1 << 20) == 0:
        return f"{nbytes >> 20}M"
    if nbytes and nbytes % 1024 == 0:
        return f"{nbytes >> 10}k"
    return str(nbytes)


def sparse_refusal(n) -> SchemeError:
    """The one message for a bad ``sp<n>`` count (the grammar's ``-sp0`` and the dataclass's range)."""
    return SchemeError("sparse", f"{n!r} not allowed; allowed: an integer in 1..{MAX_SPARSE} (sp<n>)")


@dataclass(frozen=True, init=False)
class QuantSpec:
    """How one tensor is quantized: ``code`` (``lowbit.codes``: int, nf, fp, lm), ``grouping``
    (``lowbit.groups``: which values share a scale: static per feature from calibration, per
    token, per group of G features), ``scale`` (``lowbit.scales``: what a dynamic scale travels as),
    ``rounding`` (nearest, or stochastic for codes that allow it) and ``cast`` (``lowbit.casts``:
    what the sender does to its partial first; none by default).

    Build it from its parts (``QuantSpec(code=IntCode(4), grouping=PerToken())``, as the grammar
    does) or from the Python API's fields (``QuantSpec(4, True, "group", 32, code="nf")``;
    ``scale_dtype=``, and a code's own options such as ``exp_bits=``). Per-call values (the
    stochastic rounding seed, an lm code's fitted table) are arguments of ``lowbit.quant.quantize``
    and ``lowbit.wire.payload.encode``, never fields: a spec is fixed per site.
    """

    code: Code
    grouping: Grouping
    scale: ScaleFormat
    rounding: str
    cast: Cast

    def __init__(self, bits: int | None = None, symmetric: bool = True, granularity: str = "static",
                 group_size: int | None = None, scale_dtype: torch.dtype | None = None, rounding: str = "nearest",
                 code: str | Code = "int", *, grouping: Grouping | None = None, scale: ScaleFormat | None = None,
                 cast: Cast | None = None, **code_options):
        if isinstance(code, Code):
            if bits is not None or code_options:
                raise TypeError("QuantSpec: give a Code as code= or its fields (bits, symmetric, ...), not both")
        else:
            if bits is None:
                raise TypeError("QuantSpec: bits (or a Code as code=) is required")
            code = codes.from_fields(code, bits, symmetric, **code_options)
        if grouping is None:
            grouping = groups.from_fields(granularity, group_size)
        elif granularity != "static" or group_size is not None:
            raise TypeError("QuantSpec: give a Grouping as grouping= or granularity / group_size, not both")
        if scale is None:
            scale = scales.default_scale() if scale_dtype is None else scales.by_dtype(scale_dtype)
        elif scale_dtype is not None:
            raise TypeError("QuantSpec: give a ScaleFormat as scale= or scale_dtype, not both")
        for name, value in (("code", code), ("grouping", grouping), ("scale", scale), ("rounding", rounding),
                            ("cast", cast if cast is not None else NoCast())):
            object.__setattr__(self, name, value)
        self.validate()

    def validate(self) -> None:
        """The one check of a quantizer: the rounding rule, then each part asked in turn (its own
        parameters, and what it refuses together with the others)."""
        if self.rounding not in ROUNDINGS:
            raise SchemeError("rounding", f"{self.rounding!r} not allowed; allowed: {', '.join(ROUNDINGS)}")
        for part, kind in ((self.code, Code), (self.grouping, Grouping), (self.scale, ScaleFormat),
                           (self.cast, Cast)):
            if not isinstance(part, kind):
                raise SchemeError(kind.__name__.lower(), f"{part!r} is not a {kind.__name__}")
        self.code.validate(self)
        self.grouping.validate(self)
        self.scale.validate(self)
        self.cast.validate(self)

    # the Python API's field names, read from the parts
    @property
    def bits(self) -> int:
        return self.code.bits

    @property
    def symmetric(self) -> bool:
        return self.code.symmetric

    @property
    def granularity(self) -> str:
        return self.grouping.name

    @property
    def group_size(self) -> int | None:
        return self.grouping.size

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def scale_format(self) -> str:
        """The scale format as the grammar writes it (``-s<fmt>``): fp32, bf16, fp16, e8m0, e4m3."""
        return self.scale.name

    @property
    def message_scale(self) -> bool:
        """True when a per-message header (e4m3's fp32 second-level scale) travels before the scales."""
        return self.dynamic and self.scale.header is not None

    @property
    def dynamic(self) -> bool:
        return self.grouping.dynamic

    @property
    def granularity_text(self) -> str:
        """The granularity as the grammar writes it: ``static``, ``token``, ``group<G>``, ..."""
        return str(self.grouping)

    @property
    def code_text(self) -> str:
        """The code as the grammar writes it, e.g. ``int4``, ``int3a``, ``nf4``, ``fp4e2m1``, ``lm4s``."""
        return str(self.code)

    def __str__(self) -> str:
        return f"{self.code}-{self.grouping}" + (self.scale.token if self.dynamic else "") + self.cast.token

    def validate_for(self, hidden: int) -> None:
        """SchemeError unless a message of ``hidden`` features splits into this spec's groups."""
        self.grouping.check_width(hidden)


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
        if self.algo != "two_shot" and self.second is not None:
            raise SchemeError("second", "only the two_shot algo has a second leg; allowed: None")
        if self.algo in RECIPE_ALGOS:
            check_recipe(self)
        if self.algo == "two_shot":
            if self.second is None:
                object.__setattr__(self, "second", DEFAULT_SECOND)
            if self.second.rounding != "nearest":
                raise SchemeError("second", "the requantization leg rounds to nearest; allowed: rounding 'nearest'")
            if not self.second.code.requantizes:
                leg = [c.syntax for c in codes.CODES.classes() if c.requantizes]
                raise SchemeError("second", f"the requantization leg is a uniform grid or a minifloat; allowed: a code "
                                            f"of {', '.join(leg)} with any granularity (e.g. {leg[0]}-token or "
                                            f"{leg[0]}-group<G>)")
        self._check_sparse_threshold_perm()
        if self.rotation is not None:
            r = self.rotation
            if isinstance(r, bool) or not isinstance(r, int) or r < 2 or r > MAX_ROTATION or r & (r - 1):
                raise SchemeError("rotation", f"{r!r} not allowed; allowed: a power of two in 2..{MAX_ROTATION}")
            if not self.quant.dynamic:
                dynamic = [g.name for g in groups.GROUPS.classes() if g.dynamic]
                raise SchemeError(
                    "rotation",
                    "a rotated partial needs dynamic scales (calibrated ranges are of the unrotated "
                    f"features); allowed granularities: {', '.join(dynamic)}",
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

    def _check_sparse_threshold_perm(self) -> None:
        """``sp<n>``, ``thr<T>c<K>`` and ``-perm``: their ranges, at most one outlier mechanism, and
        what they refuse to combine with (perm: groups of features; rotation: none of the three)."""
        n = self.sparse
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_SPARSE:
            raise sparse_refusal(n)
        if self.threshold is not None and not isinstance(self.threshold, ThresholdSpec):
            raise SchemeError("threshold", f"{self.threshold!r} is not a ThresholdSpec")
        if not isinstance(self.permute, bool):
            raise SchemeError("permute", f"{self.permute!r} not allowed; allowed: True, False")
        mechanisms = [name for name, on in (("top/rand", self.outliers.select != "none"), ("sp", n > 0),
                                            ("thr", self.threshold is not None)) if on]
        if len(mechanisms) > 1:
            raise SchemeError("outliers", f"{' and '.join(mechanisms)} together not allowed; allowed: one of "
                                          "top<K>, rand<K>[s<seed>], sp<n>, thr<T>c<K>")
        if self.permute and not self.quant.grouping.groups_features:
            allowed = [g.syntax for g in groups.GROUPS.classes() if g.groups_features]
            raise SchemeError("permute", f"-perm groups features for group-wise scales; granularity "
                                         f"{self.quant.granularity!r} not allowed; allowed: {', '.join(allowed)}")
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
        second_static = self.algo == "two_shot" and not self.second.dynamic
        return (not self.quant.dynamic or self.outliers.select == "topk" or self.permute or second_static
                or self.quant.code.needs_calibration)

    @property
    def per_message_outliers(self) -> bool:
        """True when each message picks its own BF16 values (``sp<n>`` or ``thr<T>c<K>``)."""
        return not self.is_exact and (self.sparse > 0 or self.threshold is not None)

    def message_kwargs(self, width: int) -> tuple[dict, dict]:
        """(encode kwargs, decode kwargs) of one first-leg message of ``width`` features
        (``lowbit.wire.payload.encode`` / ``decode``): the sp count or the thr value and capacity."""
        if self.threshold is not None:
            cap = self.threshold.capacity(width)
            return dict(threshold=self.threshold.value, capacity=cap), dict(capacity=cap)
        if self.sparse:
            return dict(sparse=self.sparse), dict(sparse=self.sparse)
        return {}, {}

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
        elif self.algo in RECIPE_ALGOS:
            text += f"@{self.algo}"
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
        if self.algo in RECIPE_ALGOS:
            check_recipe_tp(self, tp)
        if self.algo == "two_shot":
            if hidden % tp:
                raise SchemeError(
                    "algo", f"two_shot needs hidden size {hidden} divisible by TP size {tp}; allowed: gather"
                )
            width = hidden // tp
            for leg in (self.quant, self.second):
                leg.grouping.check_width(width, f"the two-shot chunk of {width} features (hidden {hidden} / TP {tp})")
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


