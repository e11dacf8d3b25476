"""The Communicator interface: what a row-parallel linear does with its partial sum.

In Megatron-style TP each rank's o_proj / down_proj produces a *partial* of the full hidden
vector; a communicator turns the partials of all ranks into the reduced output. Every call is
recorded (layer, module, shape, bytes handed to the collective) so pages can plot traffic.
The exact all-reduce lives here; the quantized ones are in ``lowbit.comm.collectives``.
"""
from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass, field

import torch

from lowbit.comm.dist import Group
from lowbit.site import Site

@dataclass
class CallRecord:
    """One communicator call as seen by this rank."""

    layer: int
    module: str
    tokens: int
    hidden: int
    dtype: str
    bytes_sent: int  # bytes this rank handed to collectives in this call
    # wall time of the whole reduce (quantize + collective + dequantize), less the time its
    # ``lowbit.counters`` diagnostics took (``extra["counters_seconds"]``): they are not communication
    seconds: float
    scheme: str = "exact"
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Communicator(abc.ABC):
    """Base class: reduce one rank's partial sum over the group and record the call.

    Subclasses implement ``_reduce(partial, site) -> (reduced, bytes_sent, extra)``.
    ``record=False`` turns the per-call log off (e.g. for long generation runs).
    ``stats_kept`` is True while a call's extra stats will be kept (recorded, or returned by
    ``reduce_with_stats``): a subclass skips diagnostics nobody reads when it is False.
    """

    name = "base"

    def __init__(self, group: Group, record: bool = True):
        self.group = group
        self.record = record
        self.calls: list[CallRecord] = []
        self.stats_kept = record

    def reduce(self, partial: torch.Tensor, site: Site) -> torch.Tensor:
        start = time.perf_counter()
        self.stats_kept = self.record
        reduced, nbytes, extra = self._reduce(partial, site)
        if self.record:
            hidden = partial.shape[-1]
            self.calls.append(
                CallRecord(
                    layer=site.layer,
                    module=site.module,
                    tokens=partial.numel() // max(hidden, 1),
                    hidden=hidden,
                    dtype=str(partial.dtype).removeprefix("torch."),
                    bytes_sent=int(nbytes),
                    seconds=time.perf_counter() - start - extra.get("counters_seconds", 0.0),
                    scheme=self.scheme_name(site),
                    extra=extra,
                )
            )
        return reduced

    def reduce_with_stats(self, partial: torch.Tensor, site: Site) -> tuple[torch.Tensor, int, dict]:
        """(reduced, bytes handed to collectives, the call's extra stats), without recording the
        call: what a benchmark times."""
        self.stats_kept = True
        return self._reduce(partial, site)

    def scheme_name(self, site: Site) -> str:
        return self.name

    @abc.abstractmethod
    def _reduce(self, partial: torch.Tensor, site: Site) -> tuple[torch.Tensor, int, dict]:
        """Return (reduced tensor, bytes this rank sent, extra stats for the record)."""

    def reset(self) -> None:
        self.calls.clear()


class ExactCommunicator(Communicator):
    """All-reduce of the partials in ``wire_dtype`` (bf16 as deployed, or fp32 for checks).

    With ``wire_dtype=None`` the partial's own dtype travels.
    """

    def __init__(self, group: Group, wire_dtype: torch.dtype | None = None, record: bool = True):
        super().__init__(group, record)
        self.wire_dtype = wire_dtype

    @property
    def name(self) -> str:  # type: ignore[override]
        return "exact" if self.wire_dtype is None else f"exact-{str(self.wire_dtype).removeprefix('torch.')}"

    def _reduce(self, partial: torch.Tensor, site: Site) -> tuple[torch.Tensor, int, dict]:
        wire = partial if self.wire_dtype is None else partial.to(self.wire_dtype)
        reduced = self.group.all_reduce(wire).to(partial.dtype)
        return reduced, wire.numel() * wire.element_size(), {}
