"""Codes: one module per code (``int``, ``nf``, ``fp``, ``lm``), each a ``lowbit.codes.base.Code``
registered in ``CODES``; ``lowbit.codes.base`` says what a code answers and how to add one."""
from lowbit.codes.base import CODES, Code, from_fields  # noqa: F401 - the public names


def parse(text: str, pos: int):
    """(code, end) of the code token at ``pos``, or None."""
    return CODES.parse(text, pos)
