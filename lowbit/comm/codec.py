"""What a quantized communicator runs its messages through, and the record of which path each took.

A ``Codec`` (``kernels.dispatch.Codec`` implements it; lowbit never imports the kernels: the job
layer injects one) is asked, per message, which implementation would run it (``path``), then
runs it and says which one did (``encode`` / ``decode_sum``): the two differ only when a kernel
failed and the codec fell back. ``REFERENCE`` is lowbit's own torch path (``lowbit.wire.payload``,
the definition every kernel is held byte-equal to); the communicator runs it itself for every
message no kernel implements, and when no codec is given.

``PathLog`` keeps, per site and leg, the paths that ran (in first-use order) and turns every
change of path into an event: a call whose path differs from the one the codec announced (a
fallback), or from the site's previous call. Events go to the listener the job layer gives (it
writes them to the run's events.jsonl; the Runs page shows them) and into the run's result, so
nothing switches silently.

    PYTHONPATH=. python -c "from lowbit.comm.codec import PathLog; log = PathLog(); \\
        log.note('L0.o_proj', 'leg1', 'native', 'reference', 'RuntimeError: no CPU'); print(log.events)"
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

REFERENCE = "reference"


@runtime_checkable
class Codec(Protocol):
    """The kernels' side of a communicator (see the module docstring)."""

    def path(self, quant, device) -> str:
        """The implementation a message quantized with ``quant`` on ``device`` would take."""

    def encode(self, x: torch.Tensor, quant, outlier_idx, static_min, static_max) -> tuple[torch.Tensor, dict, str]:
        """(payload, {"clamped", "nonfinite"}, the path that ran) of one message."""

    def decode_sum(self, payloads: torch.Tensor, tokens: int, width: int, quant, outlier_idx, static_mins,
                   static_maxs, out: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """(the fp32 rank-order sum of the payloads, written to ``out`` when given (a column slice of
        the whole output: no assembly afterwards), the path that ran)."""

    def owner_step(self, payloads: torch.Tensor, tokens: int, width: int, quant, outlier_idx, static_mins,
                   static_maxs, second, second_min, second_max) -> tuple[torch.Tensor, dict, str]:
        """The two-shot owner step: (the leg-2 payload of the owner's chunk, {"clamped", "nonfinite"}
        of its fp32 sum, the path that ran): ``decode_sum`` then ``encode`` with ``second``, the
        bytes of those two, in one call (the kernels' fused pass)."""

    def rotate(self, x: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
        """The block Walsh-Hadamard rotation (``lowbit.rotation``'s, on the codec's device kernel)."""

    def failure(self) -> str | None:
        """Why a kernel stopped running in this process (the reason a fallback event carries)."""


def check_codec(codec) -> None:
    if codec is not None and not isinstance(codec, Codec):
        raise TypeError(f"codec: {type(codec).__name__} not allowed; allowed: None (lowbit's torch path) or a "
                        "Codec (kernels.dispatch.Codec())")


class PathLog:
    """Per (site, leg): the codec paths that ran, in first-use order; every change is an event
    (``events``, and ``listener(event)`` when given). Each change is reported once."""

    def __init__(self, listener: Callable[[dict], None] | None = None):
        self.listener = listener
        self.paths: dict[tuple[str, str], list[str]] = {}
        self.events: list[dict] = []
        self._last: dict[tuple[str, str], str] = {}
        self._reported: set = set()

    def note(self, site: str, leg: str, expected: str, ran: str, reason: str | None = None) -> None:
        """One message of ``site``'s ``leg`` was announced as ``expected`` and ran as ``ran``."""
        key = (site, leg)
        changes = []
        if ran != expected:
            changes.append(("fallback", expected))
        previous = self._last.get(key)
        if previous is not None and previous != ran:
            changes.append(("change", previous))
        self._last[key] = ran
        seen = self.paths.setdefault(key, [])
        if ran not in seen:
            seen.append(ran)
        for kind, before in changes:
            if (key, before, ran) in self._reported:
                continue
            self._reported.add((key, before, ran))
            event = dict(kind=kind, site=site, leg=leg, before=before, path=ran, reason=reason)
            self.events.append(event)
            if self.listener is not None:
                self.listener(event)

    def by_site(self) -> dict[str, str]:
        """{site: its paths} as a result names them: ``native``; ``native, reference`` after a
        change; two-shot legs as ``leg1 native; leg2 reference`` when they differ."""
        out: dict[str, dict[str, str]] = {}
        for (site, leg), paths in self.paths.items():
            out.setdefault(site, {})[leg] = ", ".join(paths)
        return {site: next(iter(legs.values())) if len(set(legs.values())) == 1
                else "; ".join(f"{leg} {p}" for leg, p in legs.items()) for site, legs in out.items()}


def event_text(scheme: str, event: dict) -> str:
    """One line for the run's events: what changed path where, and why."""
    why = f" ({event['reason']})" if event.get("reason") else ""
    what = "fell back" if event["kind"] == "fallback" else "changed path"
    return (f"codec {what} at {event['site']} {event['leg']} of {scheme}: {event['before']} -> {event['path']}"
            f"{why}")
