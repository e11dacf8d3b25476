"""Communication schemes: what a row-parallel partial sum is turned into before it travels.

``spec`` holds the dataclasses (``outliers`` what travels in BF16), ``grammar`` the one parser and help text (``GRAMMAR_HELP``,
printed by ``python -m lowbit schemes`` and appended below), ``plan`` the parse-once-per-job
``SchemePlan``. A quantizer's parts (codes, groupings, scale formats, casts) are the plug-ins of
``lowbit.codes``, ``lowbit.groups``, ``lowbit.scales`` and ``lowbit.casts``. Import the public
names from here.
"""
from lowbit.scheme.grammar import GRAMMAR_HELP, PRESETS, parse_scheme, parse_scheme_map  # noqa: F401 - the public names
from lowbit.scheme.outliers import (MAX_K_FRAC, MAX_THRESHOLD, OUTLIER_SELECTS, OutlierSpec,  # noqa: F401
                                    ThresholdSpec, decimal_text)
from lowbit.scheme.spec import (  # noqa: F401 - the public names
                                ALGOS, DEFAULT_SECOND, MAX_INDEXED_HIDDEN, MAX_MIN_MESSAGE, MAX_ROTATION, MAX_SPARSE,
                                MIN_MESSAGE_AUTO, ROUNDINGS, WIRE_DTYPES, QuantSpec, Scheme, SchemeError, SchemeMap,
                                size_text)

__doc__ += "\n" + GRAMMAR_HELP
