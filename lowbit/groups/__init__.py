"""Groupings (granularities): which values of a message share a scale (torchao's granularity objects).

==========  ==========  =============================================================================
token       module      one scale per
==========  ==========  =============================================================================
static      rows        feature, from calibration (fp32 per sender, held by every receiver, never sent)
token       rows        row (token) of the message
group<G>    rows        G contiguous features of a row (G divides the message's width)
flat<G>     flat        G consecutive values of the message's row-major buffer (any width; the last
                        group may be shorter, and its scale is sent and counted)
==========  ==========  =============================================================================

``lowbit.groups.base`` has the interface (and ``SizedGrouping`` for the ``<name><G>`` ones); every
module here is found by the registry, so a new grouping is one new module.

    PYTHONPATH=. python -c "from lowbit.groups import GROUPS; print([g.syntax for g in GROUPS.classes()])"
"""
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
