"""Communication schemes: what a row-parallel partial sum is turned into before it travels.

``spec`` holds the dataclasses, ``grammar`` the one parser and help text (``GRAMMAR_HELP``,
printed by ``python -m lowbit schemes`` and appended below), ``plan`` the parse-once-per-job
``SchemePlan``. Import the public names from here.
"""
from lowbit.scheme.grammar import GRAMMAR_HELP, PRESETS, parse_scheme, parse_scheme_map  # noqa: F401 - the public names
from lowbit.scheme.spec import (  # noqa: F401 - the public names
                                ALGOS, ALLOWED_BITS, BLOCK_SCALE_DTYPES, CODEBOOK_BITS, CODES, FITTED_BITS, FP_FORMATS,
                                KERNEL_SCALE_DTYPES, SCALE_FORMATS, DEFAULT_SECOND, DYNAMIC_GRANULARITIES,
                                GRANULARITIES, MAX_INDEXED_HIDDEN, MAX_K_FRAC, MAX_ROTATION, MAX_SPARSE,
                                MAX_MIN_MESSAGE, MAX_THRESHOLD, MIN_MESSAGE_AUTO, OUTLIER_SELECTS, ROUNDINGS, SCALE_DTYPES,
                                TABLE_SCOPES, WIRE_DTYPES,
                                OutlierSpec, QuantSpec, Scheme, SchemeError, SchemeMap, ThresholdSpec,
                                decimal_text, fp_code_text, scale_format_name, size_text)

__doc__ += "\n" + GRAMMAR_HELP
