"""The Code protocol: what one code (int, nf, fp, lm, ...) answers, so nothing outside this package
ever branches on a code's name.

A code turns the ratio ``v = x / scale`` of every quantized value into an 8-bit-or-less code and
back. It is a small frozen dataclass (its parameters: ``bits``, ``symmetric`` and its own, such as
fp's exponent bits), registered in ``CODES`` and asked by everyone else:

=========================  =================================================================
asked                      what it answers
=========================  =================================================================
``parse`` / ``str()``      its token of the scheme string (``int3a``, ``nf4``, ``fp8e4m3``, ``lm3s``)
``validate(spec)``         its parameters, and the rounding / asymmetry it refuses, with the
                           message naming the field and the allowed values
``qrange``                 (qmin, qmax) of the signed code; the stored code is q - qmin
``scale_constant``         c in ``scale = absmax * c`` (the grid's 2 / (2**b - 1); 1 for codebooks)
``needed_scale`` /         the smallest scale that fits a dynamic / static absmax into the code
``static_scale``
``encode`` / ``decode``    ratio -> signed code q (nearest, or stochastic with a seed), code ->
                           value in units of the scale; ``levels`` is a fitted table (per call)
``beyond``                 which ratios fell outside what the code holds (counted as clamped)
``grid``                   its values and the range the scale was built for (the playground)
``code_bytes`` /           bytes of ``n`` packed codes in a payload; bytes of the table every
``table_bytes``            receiver builds once (lm: 2**B fp32), never sent per message
``group_multiple``         codes per byte boundary (fp4: 2, fp6: 4): a group must start on one
``requantizes``            may it be the two-shot second leg
``needs_calibration``      does a scheme with it need a calibration artifact (lm: its tables)
``site_levels``            per-sender tables fitted on a calibration (lm), or None
``kernel_key``             the family of kernels that can run it (``kernels.registry`` registers
                           implementations under it); None: ``lowbit.quant``'s torch path only
``takes_nan``              its ``encode`` maps NaN ratios itself (a shipping code: QuickReduce sends
                           NaN to its lowest code, fp8 keeps it); the shipping scale formats that
                           pass NaN through (``ScaleFormat.takes_nan``) need such a code
``max_ratio``              the largest |value| it holds in units of the scale (int4: 7.5, e4m3: 448):
                           with the scale format's largest scale, the format's range (``lowbit.counters``)
``zero_code``              the stored code of the value 0 (what padding sends)
=========================  =================================================================

How to add a part (each is ONE new module; nothing else changes):

- **A code** (e.g. QuickReduce's own INT rule): ``lowbit/codes/<name>.py`` with a frozen dataclass
  subclassing ``Code``, decorated ``@CODES.register``; set ``name``, ``order``, ``syntax`` and
  ``help`` (the grammar's help lists it), write ``parse`` (a regex at ``pos``), ``__str__``,
  ``choices`` (what the pages' pickers offer), ``validate`` and the numeric methods above. Give it
  a ``kernel_key`` only if an existing kernel computes exactly its bytes (``kernels.registry``
  lists what each kernel implements). Its own test file holds its error bound and its NaN/Inf
  policy (hypothesis), and its bits from bytes.
- **A grouping** (e.g. ``flat<G>``, ``lowbit/groups/flat.py``): ``lowbit/groups/<name>.py``, a
  ``lowbit.groups.base.Grouping`` (or ``SizedGrouping`` for a ``<prefix><G>`` token) registered
  with ``@GROUPS.register``: ``n_scales``, ``scale_shape``, ``group`` / ``ungroup``, ``expand`` and,
  when it cannot cut every width, ``check_width``.
- **A scale format** (e.g. MX's floor rounding): ``lowbit/scales/<name>.py``, a
  ``lowbit.scales.base.ScaleFormat`` registered with ``@SCALES.register``: ``name``, ``dtype``,
  ``help`` and ``_round`` (a small float's ulp-step rounding is the default); ``scales`` /
  ``write`` / ``read`` when it has a per-message header (``header``, as e4m3).
- **An input cast** (e.g. vLLM's bf16 -> fp16 that overflows to inf): ``lowbit/casts/<name>.py``,
  a ``lowbit.casts.base.Cast`` registered with ``@CASTS.register``: ``parse`` reads its ``-<token>``
  after the scale format, ``token`` prints it, ``apply`` maps the fp32 partial.
- **A preset** naming a shipping system: one line in ``lowbit.scheme.grammar.PRESETS``, with its
  sources and assumptions in the comment above it.

``tests/test_plugins.py`` does each of the first four in a test (a ternary code, e5m2 scales, the
fp16 cast) and ``tests/test_flat_groups.py`` tests the real ``flat<G>``.

Each registry imports every module of its package on first use (``lowbit.plugins.Registry``),
so the grammar, the quantizer, the payload layout and the accounting see the new part at once.

    PYTHONPATH=. python -c "from lowbit.codes import CODES; print([str(c(4)) for c in CODES.classes()][:2])"
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.plugins import Registry, SchemeError

CODES = Registry("code", "lowbit.codes")


@dataclass(frozen=True)
class Code:
    """One code; see the module docstring for what each member means."""

    name: ClassVar[str]
    order: ClassVar[int] = 100
    syntax: ClassVar[str]  # the token as the grammar's help writes it, e.g. ``int<B>[a]``
    help: ClassVar[str]  # one line (or a few, joined by newlines) for the grammar's help
    guide: ClassVar[str] = ""  # a paragraph for the help's "neighbouring schemes" section
    options: ClassVar[tuple[str, ...]] = ()  # the Python API's fields it takes besides bits / symmetric
    roundings: ClassVar[tuple[str, ...]] = ("nearest",)
    requantizes: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    kernel_key: ClassVar[str | None] = None
    asymmetric: ClassVar[bool] = False  # it has an asymmetric variant (scale + min)
    takes_nan: ClassVar[bool] = False  # encode maps NaN ratios itself

    bits: int
    symmetric: bool = True

    # -- the scheme string -------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, pos: int):
        """(code, end) when ``text`` holds this code's token at ``pos``, else None."""
        raise NotImplementedError

    @classmethod
    def choices(cls) -> list["Code"]:
        """The symmetric variants a picker offers (one per width, or per format)."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """The code as messages name it: the family of a grid or codebook (``nf``), the format of
        a minifloat (``fp8e4m3``)."""
        return self.name

    @property
    def family(self) -> str:
        """The code without its variant suffixes, as result tables group it (``int4``, ``fp8e4m3``)."""
        return f"{self.name}{self.bits}"

    # -- checks ------------------------------------------------------------------------------------
    def validate(self, spec) -> None:
        """Refuse what this code cannot be in ``spec`` (its rounding, its parameters)."""
        if spec.rounding not in self.roundings:
            raise SchemeError("rounding", self.rounding_refusal())

    def rounding_refusal(self) -> str:
        return f"{self.name} codes round to nearest; allowed: 'nearest' (no -sr with {self.syntax})"

    # -- numbers -----------------------------------------------------------------------------------
    @property
    def qrange(self) -> tuple[int, int]:
        """Smallest and largest signed code q (the stored code is q - qmin)."""
        return 0, 2**self.bits - 1

    @property
    def group_multiple(self) -> int:
        return 1

    @property
    def max_ratio(self) -> float:
        """The largest |x / scale| the code holds without clamping (a codebook's: 1)."""
        return 1.0

    @property
    def zero_code(self) -> int:
        """The stored (uint8) code of the value 0."""
        return -self.qrange[0]

    @property
    def scale_constant(self) -> float:
        return 1.0

    def needed_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """The smallest dynamic scale that fits ``absmax`` (fp32, or float64 to be rounded by the
        scale format)."""
        return absmax * self.scale_constant

    def static_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """The fp32 static scale per feature from the calibrated absmax."""
        return absmax * self.scale_constant

    def encode(self, ratio: torch.Tensor, *, seed: int | None = None, levels=None) -> torch.Tensor:
        """Signed codes q (fp32) of fp32 ratios (no NaN; +-Inf allowed); ``seed`` set: stochastic."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, *, levels=None) -> torch.Tensor:
        """fp32 values in units of the scale of stored (uint8) codes."""
        raise NotImplementedError

    def beyond(self, ratio: torch.Tensor, saturating_scale: bool) -> torch.Tensor | None:
        """Ratios the code could not hold (counted as clamped), or None when none can be: with a
        scale format that saturates, those past the end codes by more than half a step."""
        if not saturating_scale:
            return None
        qmin, qmax = self.qrange
        return (ratio < qmin - 0.5) | (ratio > qmax + 0.5)

    def grid(self, levels=None) -> dict:
        """``levels``: the values codes decode to, in units of the scale; ``edges``: the range
        the scale was built for (beyond it values clamp to the end codes)."""
        raise NotImplementedError

    # -- bytes -------------------------------------------------------------------------------------
    def code_bytes(self, count: int) -> int:
        """Bytes of ``count`` packed codes (``lowbit.quant.pack_bits``: padded in the last byte only)."""
        return (count * self.bits + 7) // 8

    @property
    def table_bytes(self) -> int:
        """Bytes of the table every receiver builds once per sender (0: no table)."""
        return 0

    def tables_per_site(self, tp: int) -> int:
        """How many distinct tables one site's receivers build (one per sender unless shared)."""
        return tp

    # -- per-site tables ---------------------------------------------------------------------------
    def site_levels(self, calibration, site, scheme, outlier_idx, perm):
        """One table per sender fitted on ``calibration`` at ``site``, or None (no table)."""
        return None

    def check_levels(self, levels) -> None:
        """Refuse a per-call table this code cannot take."""
        if levels is not None:
            raise SchemeError("levels", f"a fitted table not allowed for code {self}; allowed: None")


def check_codebook(code: Code, spec, label: str, allowed_bits: tuple[int, ...], symmetric_error: str) -> None:
    """What the codebook codes (nf, lm) need: a width they have, symmetric codes (an absmax scale),
    nearest-entry rounding; ``label`` as the messages call the codebook."""
    if code.bits not in allowed_bits:
        raise SchemeError("bits", f"{code.bits!r} not allowed for the {label} codebook; "
                                  f"allowed: {', '.join(map(str, allowed_bits))}")
    if not code.symmetric:
        raise SchemeError("symmetric", symmetric_error)
    if spec.rounding != "nearest":
        raise SchemeError("rounding", f"the {code.name} codebook rounds to the nearest entry; allowed: 'nearest' "
                                      f"(no -sr with {code.name}<B>)")


def option_defaults() -> dict:
    """{option: default} of every registered code's own options (fp's ``exp_bits``, ...)."""
    out = {}
    for cls in CODES.classes():
        for f in dataclasses.fields(cls):
            if f.name in cls.options:
                out.setdefault(f.name, f.default)
    return out


def from_fields(name: str, bits: int, symmetric: bool, **options) -> Code:
    """The code the Python API's fields describe (``code="fp", bits=8, exp_bits=4``); an option
    this code does not take is refused unless it has its default value."""
    cls = CODES.get(name, "code")
    defaults = option_defaults()
    for key, value in options.items():
        if key in cls.options:
            continue
        if key not in defaults:
            raise SchemeError(key, f"not a field of a quantizer (per-call values, the stochastic rounding seed and "
                                   f"a fitted table, are arguments of quantize / encode); allowed: bits, symmetric, "
                                   f"granularity, group_size, scale_dtype, rounding, code, {', '.join(defaults)}")
        if value != defaults[key]:
            raise SchemeError(key, f"{value!r} not allowed for code {name!r}; allowed: {defaults[key]!r}")
    return cls(bits, bool(symmetric), **{k: v for k, v in options.items() if k in cls.options})
