"""The row groupings: scales per feature (static), per token, or per G contiguous features of a row.

==========  =============================================  =====================================
token       one scale per                                  scales of a [T, H] message
==========  =============================================  =====================================
static      feature, from calibration (this rank's min /    [H] fp32, never sent (held by every
            max tensors [H]); the paper's scheme            receiver: ``static_bytes``)
token       row (token), from the row                       [T], in the scale format
group<G>    G contiguous features of a row; G divides H     [T, H // G], in the scale format
==========  =============================================  =====================================

    PYTHONPATH=. python -c "from lowbit.groups.rows import PerGroup; print(PerGroup(32), PerGroup(32).n_scales(8, 576))"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.groups.base import GROUPS, Grouping, SizedGrouping
from lowbit.plugins import SchemeError

STATIC_SCALE_FORMATS = ("bf16", "fp32")  # static scales are fp32 from calibration; bf16 is the default that prints nothing


@GROUPS.register
@dataclass(frozen=True)
class Static(Grouping):
    name = "static"
    order = 0
    syntax = "static"
    help = "per-feature scales from calibration (fp32, never sent)"
    dynamic = False

    @classmethod
    def parse(cls, text: str, pos: int):
        return (cls(), pos + 6) if text.startswith("static", pos) else None

    def __str__(self) -> str:
        return "static"

    def scale_refusal(self, spelled: str) -> str | None:
        return (f"{spelled} not allowed with granularity 'static' (per-feature static scales are fp32 from "
                "calibration and never travel); allowed: -s<fmt> with token or group<G>")

    def validate(self, spec) -> None:
        super().validate(spec)
        if spec.scale.name not in STATIC_SCALE_FORMATS:
            raise SchemeError("scale_dtype", self.scale_refusal(spec.scale.name))

    def expand(self, scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return scales.expand(shape)  # [H] broadcasts over rows

    def group(self, x: torch.Tensor, valid: torch.Tensor):
        # the values sharing one static scale: a feature's column ([H, T]; the audit's groups)
        return x.reshape(-1, x.shape[-1]).transpose(0, 1), valid.reshape(-1, x.shape[-1]).transpose(0, 1)

    def ungroup(self, grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return grouped.transpose(0, 1).reshape(shape)

    def static_bytes(self, width: int, symmetric: bool) -> int:
        return width * 4 * (1 if symmetric else 2)  # fp32 scales (+ mins) per sender


@GROUPS.register
@dataclass(frozen=True)
class PerToken(Grouping):
    name = "token"
    order = 1
    syntax = "token"
    help = "one dynamic scale per token"

    @classmethod
    def parse(cls, text: str, pos: int):
        return (cls(), pos + 5) if text.startswith("token", pos) else None

    def __str__(self) -> str:
        return "token"

    def n_scales(self, tokens: int, width: int) -> int:
        return tokens

    def scale_shape(self, tokens: int, width: int) -> tuple[int, ...]:
        return (tokens,)

    def group(self, x: torch.Tensor, valid: torch.Tensor):
        return x.unsqueeze(-2), valid.unsqueeze(-2)

    def squeeze(self, scales: torch.Tensor) -> torch.Tensor:
        return scales.squeeze(-1)

    def expand(self, scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return scales.unsqueeze(-1).expand(shape)


@GROUPS.register
@dataclass(frozen=True)
class PerGroup(SizedGrouping):
    name = "group"
    prefix = "group"
    order = 2
    syntax = "group<G>"
    help = "one dynamic scale per G contiguous features of a token; G divides the message's width"
    groups_features = True

    def check_width(self, width: int, where: str | None = None) -> None:
        if width % self.group_size:
            divisors = ", ".join(str(d) for d in range(1, width + 1) if width % d == 0)
            if where is None:
                raise SchemeError("group_size", f"{self.group_size} does not divide hidden size {width}; "
                                                f"allowed group sizes: {divisors}")
            raise SchemeError("group_size", f"{self.group_size} does not divide {where}; allowed: {divisors}")

    def n_scales(self, tokens: int, width: int) -> int:
        return tokens * (width // self.group_size)

    def scale_shape(self, tokens: int, width: int) -> tuple[int, ...]:
        return (tokens, width // self.group_size)

    def group(self, x: torch.Tensor, valid: torch.Tensor):
        width = x.shape[-1]
        self.check_width(width)
        shape = (*x.shape[:-1], width // self.group_size, self.group_size)
        return x.reshape(shape), valid.reshape(shape)

    def expand(self, scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return scales.repeat_interleave(self.group_size, -1).reshape(shape)
