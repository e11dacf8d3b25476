"""The grouping interface: which values of one message share a scale (torchao's "granularity").

A grouping is a small frozen dataclass (torchao's ``PerAxis`` / ``PerGroup`` / ``PerToken`` are the
model) asked, never named, by the quantizer, the payload layout and the scheme grammar:

==========================  ==========================================================================
asked                       what it answers
==========================  ==========================================================================
``parse`` / ``str()``       its token of the scheme string (``static``, ``token``, ``group32``, ...)
``validate(spec)``          its own parameters and what it refuses with the spec's code / scale format
``check_width(width)``      whether a message ``width`` features wide can be cut into its groups
``n_scales`` / shape        how many dynamic scales one message of tokens x width values carries
``group`` / ``ungroup``     the message as [..., n_groups, group] (ranges are taken over the last
                            axis) and back
``expand``                  the scales broadcast to every value (dequantize, the playground's steps)
``static_bytes``            per-feature scales held by every receiver (static only), never sent
``padding``                 values beyond the message whose codes travel too (a last group padded to
                            G and sent whole: TensorRT-LLM's 496-value warps, ``lowbit.groups.pad``)
==========================  ==========================================================================

A new grouping is one class in one new module of this package, registered with
``@GROUPS.register``; the grammar, the quantizer, the layout and the accounting pick it up.

    PYTHONPATH=. python -c "from lowbit.groups import GROUPS; print(GROUPS.names())"
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.plugins import Registry, SchemeError

GROUPS = Registry("granularity", "lowbit.groups")


@dataclass(frozen=True)
class Grouping:
    """One granularity. ``dynamic`` ones compute their scales from the message and send them."""

    name: ClassVar[str]
    order: ClassVar[int] = 100
    syntax: ClassVar[str]  # how the grammar's help writes the token, e.g. ``group<G>``
    help: ClassVar[str]  # one line for the grammar's help
    dynamic: ClassVar[bool] = True
    sized: ClassVar[bool] = False  # its token carries a group size (``group<G>``)
    groups_features: ClassVar[bool] = False  # groups are runs of a row's features: -perm can regroup them

    @classmethod
    def parse(cls, text: str, pos: int):
        """(grouping, end) when ``text`` holds this grouping's token at ``pos``, else None."""
        raise NotImplementedError

    @classmethod
    def from_fields(cls, group_size: int | None) -> "Grouping":
        """This grouping from the Python API's ``granularity=`` / ``group_size=`` fields."""
        if group_size is not None:
            raise SchemeError("group_size", f"{group_size!r} not allowed for granularity {cls.name!r}; allowed: None")
        return cls()

    @property
    def size(self) -> int | None:
        """Values per group for the sized groupings, else None (the API's ``group_size``)."""
        return None

    def validate(self, spec) -> None:
        """Refuse what this grouping cannot do with ``spec``'s code (a group must start on a byte
        boundary of the code's packing)."""
        multiple = spec.code.group_multiple
        if self.size is not None and multiple > 1 and self.size % multiple:
            raise SchemeError("group_size", f"{self.size} not allowed for {spec.code} (its codes pack {multiple} to "
                                            f"a byte boundary, so a group must start on one); allowed: a multiple "
                                            f"of {multiple}")

    def scale_refusal(self, spelled: str) -> str | None:
        """Why a scale format cannot be given with this grouping (``spelled`` as the caller wrote
        it), or None."""
        return None

    def check_width(self, width: int, where: str | None = None) -> None:
        """SchemeError unless a message of ``width`` features splits into this grouping's groups
        (``where`` names the message, e.g. a two-shot chunk; default: the hidden size)."""

    def n_scales(self, tokens: int, width: int) -> int:
        return 0

    def scale_shape(self, tokens: int, width: int) -> tuple[int, ...]:
        """The shape of one message's scales as ``quantize`` returns them."""
        return ()

    def group(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, valid) as [..., n_groups, group]; padding (if any) is not valid."""
        raise NotImplementedError

    def ungroup(self, grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of ``group`` for a per-value tensor: back to ``shape``."""
        return grouped.reshape(shape)

    def squeeze(self, scales: torch.Tensor) -> torch.Tensor:
        """Per-group values [..., n_groups] (from ``group``) as ``quantize`` returns them."""
        return scales

    def expand(self, scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Scales (as ``quantize`` returns them) broadcast to every value of ``shape``."""
        raise NotImplementedError

    def static_bytes(self, width: int, symmetric: bool) -> int:
        """Bytes every receiver holds per sender and never receives (static scales and mins)."""
        return 0

    def padding(self, tokens: int, width: int) -> int:
        """Zero values after the message's own whose codes are sent with it (0: none)."""
        return 0


@dataclass(frozen=True)
class SizedGrouping(Grouping):
    """A grouping whose token is a prefix and a group size (``group32``, ``flat256``): the parsing,
    printing and size check they share. Subclasses set ``prefix`` (and ``name``, ``syntax``...)."""

    prefix: ClassVar[str]
    sized = True
    group_size: int = 32

    @classmethod
    def parse(cls, text: str, pos: int):
        m = re.compile(re.escape(cls.prefix) + r"(\d+)").match(text, pos)
        return (cls(int(m.group(1))), m.end()) if m else None

    @classmethod
    def from_fields(cls, group_size: int | None) -> "SizedGrouping":
        return cls(group_size)

    def __post_init__(self):
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise SchemeError("group_size", f"{g!r} not allowed; allowed: a positive integer")

    def __str__(self) -> str:
        return f"{self.prefix}{self.group_size}"

    @property
    def size(self) -> int:
        return self.group_size
