"""What each format does at each site (layer, module): the per-site half of the pre-flight audit.

    PYTHONPATH=. python -c "from lowbit.method.audit_sites import COUNTERS; print(COUNTERS)"

``SiteProbe`` is a communicator that, at every row-parallel site, takes the exact fp32 sum of the
ranks' partials, runs every audited format's communicator on the SAME partials, compares, and
forwards the exact sum. So every site of every format sees exact inputs (what ``ErrorProbe`` calls
the *local* mode): a site is flagged for what it does itself, never for what an earlier site
broke, and one forward of the model serves every format (only the codecs run once per format).

Per site and format it counts (``COUNTERS``; a two-shot scheme's second leg has the same counters
prefixed ``leg2_``, ``LEG2``):

====================  =========================================================================
``nonfinite_out``     non-finite values of the site's reduced output where the exact sum is
                      finite (second leg: non-finite final outputs where the first leg's sum
                      was finite). Counted by the audit on the output, whatever the codec says.
``beyond_range_in``   finite inputs the format cannot hold (``lowbit.counters``' definition: made
                      non-finite by its input cast, e.g. fp16's 65504, or beyond ``range_limit``).
                      Second leg: of the first leg's sums.
``clamped``           values the quantizer clamped (``lowbit.quant``; static scales: beyond the
                      calibrated range)
``attenuated_groups`` groups whose decoded values keep less than half of their input's L2 norm
``underflowed_groups`` groups with a nonzero input whose every nonzero input decodes to 0
``groups``            groups sent (the denominator of the two above; static scales: a feature's
                      column, ``lowbit.groups``)
====================  =========================================================================

The message counters are ``lowbit.counters.message_counters``, whoever computes them: the codec
reports them per call, and where it does not the audit calls the same function.

Where a count comes from: the codec's per-message ``stats`` (the communicator's per-call extras)
when it reports that name (``source`` "codec"); else the audit computes it from the messages the
communicator builds (``QuantCommunicator.first_leg`` / ``decode_message``: the same plan, tables and
codec) and the first leg's sums (``source`` "audit"); where neither can (a rotated or permuted
second leg is not compared in its quantizer's space) the count is None and the report says "not
reported by this codec", never 0. Message counts are summed over ranks (each rank counts the
messages it sends); output counts are one rank's (every rank holds the same output). The SQNR of the
sum is 10 log10(sum exact^2 / sum (out - exact)^2) over the positions where both are finite; None
when the output equals the exact sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.calibration import Calibration
from lowbit.comm.collectives import QuantCommunicator
from lowbit.comm.communicator import Communicator, ExactCommunicator
from lowbit.comm.dist import Group
from lowbit.counters import message_counters
from lowbit.scheme import WIRE_DTYPES, QuantSpec, SchemeMap
from lowbit.site import ROW_PARALLEL_MODULES, Site

COUNTERS = ("nonfinite_out", "beyond_range_in", "clamped", "attenuated_groups", "underflowed_groups", "groups")
LEG2 = "leg2_"
ALL_COUNTERS = COUNTERS + tuple(LEG2 + c for c in COUNTERS)
OUTPUT_COUNTERS = ("nonfinite_out", LEG2 + "nonfinite_out")  # counted on the output, one rank's view
GROUP_COUNTERS = ("attenuated_groups", "underflowed_groups", "groups")
NOT_REPORTED = "not reported by this codec"


def _counted(values: torch.Tensor, decoded: torch.Tensor, quant: QuantSpec, valid: torch.Tensor) -> dict:
    """``lowbit.counters.message_counters`` of one message over its ``valid`` values only: an invalid
    value (a BF16 outlier column, which travels exactly) is made non-finite, which the counters
    leave out of both the range count and the groups."""
    return message_counters(torch.where(valid, values.float(), float("nan")), decoded, quant)


@dataclass
class SiteTally:
    """One site's counts under one format on this rank, and where each came from."""

    counts: dict = field(default_factory=lambda: {c: 0 for c in ALL_COUNTERS})
    sources: dict = field(default_factory=dict)  # counter -> "codec" | "audit" | "exact"; absent: not reported
    err2: float = 0.0
    ref2: float = 0.0
    calls: int = 0

    def add(self, counter: str, value: int | None, source: str) -> None:
        if value is None:
            return
        self.counts[counter] += int(value)
        self.sources.setdefault(counter, source)


class SiteProbe(Communicator):
    """Local mode over several formats at once: see the module docstring. ``formats`` maps a name
    to its parsed ``SchemeMap``; ``tallies[(name, site)]`` are this rank's counts."""

    def __init__(self, group: Group, formats: dict[str, SchemeMap], calibration: Calibration | None = None,
                 codec=None):
        super().__init__(group, record=False)
        self.exact = ExactCommunicator(group, torch.float32, record=False)
        self.comms = {name: QuantCommunicator(group, smap, calibration, record=False, keep_first_leg=True,
                                              codec=codec) for name, smap in formats.items()}
        self.tallies: dict[tuple[str, Site], SiteTally] = {}

    def _reduce(self, partial: torch.Tensor, site: Site):
        exact = self.exact.reduce(partial, site)
        for name, comm in self.comms.items():
            tally = self.tallies.setdefault((name, site), SiteTally())
            out, _, extra = comm.reduce_with_stats(partial, site)
            self._tally(tally, comm, site, partial, exact, out, extra)
        return exact, 0, {}

    # -- one call of one format ------------------------------------------------------------------
    def _tally(self, tally: SiteTally, comm: QuantCommunicator, site: Site, partial: torch.Tensor,
               exact: torch.Tensor, out: torch.Tensor, extra: dict) -> None:
        hidden = partial.shape[-1]
        x, out, exact = partial.reshape(-1, hidden), out.reshape(-1, hidden).float(), exact.reshape(-1, hidden).float()
        tally.calls += 1
        both = torch.isfinite(out) & torch.isfinite(exact)
        tally.err2 += float(((out - exact)[both].double() ** 2).sum())
        tally.ref2 += float((exact[both].double() ** 2).sum())
        tally.add("nonfinite_out", int((~torch.isfinite(out) & torch.isfinite(exact)).sum()), "audit")
        scheme = comm.schemes.for_site(site.layer, site.module)
        if scheme.is_exact or extra.get("gated"):  # the exact all-reduce in its wire dtype: nothing grouped
            wire = WIRE_DTYPES[scheme.wire_dtype or "bf16"]
            tally.add("beyond_range_in", int((torch.isfinite(x) & ~torch.isfinite(x.to(wire))).sum()), "exact")
            for counter in ("clamped", *GROUP_COUNTERS):
                tally.add(counter, 0, "exact")
            return
        for counter in COUNTERS[1:]:
            if counter in extra:
                tally.add(counter, extra[counter], "codec")
        missing = [c for c in COUNTERS[1:] if c not in extra]
        if missing:
            self._first_leg_counts(tally, comm, site, x, missing)
        if scheme.algo == "two_shot":
            first = comm.last_first_leg
            comm.last_first_leg = None
            if first is not None:
                first = first.reshape(-1, hidden).float()
                tally.add(LEG2 + "nonfinite_out", int((~torch.isfinite(out) & torch.isfinite(first)).sum()), "audit")
            for counter in COUNTERS[1:]:
                if LEG2 + counter in extra:
                    tally.add(LEG2 + counter, extra[LEG2 + counter], "codec")
            missing2 = [c for c in COUNTERS[1:] if LEG2 + c not in extra]
            if missing2 and first is not None and scheme.rotation is None and not scheme.permute:
                self._second_leg_counts(tally, comm, site, first, out, missing2)

    def _first_leg_counts(self, tally: SiteTally, comm: QuantCommunicator, site: Site, x: torch.Tensor,
                          missing: list[str]) -> None:
        """The counts the codec did not report, from this rank's first-leg messages re-encoded as
        the communicator encodes them and decoded alone."""
        scheme = comm.schemes.for_site(site.layer, site.module)
        quant = scheme.quant
        for message in comm.first_leg(x, site):
            values = message.values.float()
            valid = torch.isfinite(values)
            if message.outlier_idx.numel():
                valid[:, message.outlier_idx] = False  # the BF16 columns travel exactly
            if "clamped" in missing:
                tally.add("clamped", message.stats.get("clamped"), "codec")
            if any(c != "clamped" for c in missing):
                counts = _counted(values, comm.decode_message(message, site), quant, valid)
                for counter in missing:
                    if counter != "clamped":
                        tally.add(counter, counts[counter], "audit")

    def _second_leg_counts(self, tally: SiteTally, comm: QuantCommunicator, site: Site, first: torch.Tensor,
                           out: torch.Tensor, missing: list[str]) -> None:
        """The second leg of this rank's own chunk: its input is the first leg's sum there, its
        decoded values the final output there (BF16 outlier columns excluded)."""
        hidden, rank, tp = first.shape[-1], self.group.rank, self.group.world_size
        width = hidden // tp
        cols = slice(rank * width, (rank + 1) * width)
        plan = comm.plan(site, hidden)
        second = plan.scheme.second
        inputs, decoded = first[:, cols], out[:, cols]
        valid = torch.isfinite(inputs)
        idx = plan.outlier_idx
        local = idx[(idx >= cols.start) & (idx < cols.stop)] - cols.start
        if local.numel():
            valid[:, local] = False
        counts = _counted(inputs, decoded, second, valid)
        for counter in missing:
            if counter in counts:  # clamped is the codec's (the leg-2 quantizer's), never recounted here
                tally.add(LEG2 + counter, counts[counter], "audit")

    # -- the rows --------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """Collective: one row per (format, site), counts summed over ranks (output counts and the
        SQNR sums: this rank's, the same on every rank). Every rank returns the rows."""
        keys = sorted(self.tallies, key=lambda k: (k[0], k[1].layer, ROW_PARALLEL_MODULES.index(k[1].module)))
        if not keys:
            return []
        message = [c for c in ALL_COUNTERS if c not in OUTPUT_COUNTERS]
        local = torch.tensor([[float(self.tallies[k].counts[c]) for c in message] for k in keys], dtype=torch.float64)
        summed = self.group.all_reduce(local)
        rows = []
        for i, key in enumerate(keys):
            name, site = key
            t = self.tallies[key]
            counts = dict(t.counts, **{c: int(summed[i, j].item()) for j, c in enumerate(message)})
            two_shot = self.comms[name].schemes.for_site(site.layer, site.module).algo == "two_shot"
            row = dict(format=name, layer=site.layer, module=site.module, calls=t.calls, two_shot=two_shot,
                       sqnr_db=10 * math.log10(t.ref2 / t.err2) if t.err2 > 0 and t.ref2 > 0 else None,
                       sources={c: t.sources.get(c) for c in ALL_COUNTERS})
            for counter in ALL_COUNTERS:
                reported = counter in t.sources and (two_shot or not counter.startswith(LEG2))
                row[counter] = counts[counter] if reported else None
            rows.append(row)
        return rows
