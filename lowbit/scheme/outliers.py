"""What travels in BF16 beside the codes: ``OutlierSpec`` (the static top-k / random features,
``top<K>`` / ``rand<K>[s<seed>]``) and ``ThresholdSpec`` (``thr<T>c<K>``: per message, features
over a threshold), with their canonical text (fractions in lowest terms, the shortest decimal).
``sp<n>`` is a count on the ``Scheme`` itself; the selection rules that apply them are
``lowbit.calibration.select_outliers`` and ``lowbit.outliers``.

    PYTHONPATH=. python -c "from lowbit.scheme.outliers import OutlierSpec; print(OutlierSpec('topk', 1/64))"
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from lowbit.plugins import SchemeError

OUTLIER_SELECTS = ("none", "topk", "random")
MAX_K_FRAC = Fraction(1, 2)
MAX_THRESHOLD = 1e9


def _fraction(value) -> Fraction:
    if isinstance(value, float):
        return Fraction(repr(value))  # 0.05 means 1/20, not the nearest binary fraction
    return Fraction(value)



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
