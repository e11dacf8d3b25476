"""Groupings (granularities): which values of a message share a scale. ``lowbit.groups.base`` has
the interface, ``lowbit.groups.rows`` static / token / group<G>; every other module here is one
more grouping, found by the registry."""
from lowbit.groups.base import GROUPS, Grouping  # noqa: F401 - the public names


def from_fields(granularity: str, group_size: int | None) -> Grouping:
    """The grouping the Python API's ``granularity=`` / ``group_size=`` fields describe."""
    return GROUPS.get(granularity).from_fields(group_size)


def parse(text: str, pos: int):
    """(grouping, end) of the granularity token at ``pos``, or None."""
    return GROUPS.parse(text, pos)


def syntax() -> str:
    """The granularity tokens as the grammar's messages list them: ``static, token, group<G>, ...``."""
    return ", ".join(cls.syntax for cls in GROUPS.classes())
