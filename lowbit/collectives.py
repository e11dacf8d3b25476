"""Quantized communicators for the row-parallel partial sums.

``QuantCommunicator`` applies a ``SchemeMap`` (one scheme per site, with per-layer overrides):

- exact (``bf16`` / ``fp32``): all_reduce in the wire dtype.
- ``gather`` (the paper's math): each rank encodes its partial into one payload
  (``lowbit.payload``), all-gathers the payloads, dequantizes every rank's payload with that
  rank's static scales and sums in fp32 in rank order. Every rank computes the same sum.
- ``two_shot``: the hidden features are cut into ``tp`` contiguous chunks; rank j owns chunk j.
  Leg 1: all-to-all of the quantized chunks; the owner dequantizes them and sums in fp32.
  Leg 2: the owner requantizes its reduced chunk with the scheme's dynamic ``second`` spec and
  all-gathers it (padded to the largest chunk payload; the padding is counted as sent).
  Each rank sends ~1 + 1/tp partials' worth instead of the all-gather's tp - 1 received, so
  it moves fewer bytes when tp >= 3. Per-token scales become per (token, chunk).

Outlier features (top-k by calibrated range, or random) travel in BF16 at fixed indices known
to every rank. Each call records bytes handed to collectives, bits per value of each leg, and
how many values were clamped or non-finite.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.calibrate import Calibration, CalibrationError, select_outliers
from lowbit.comm import Communicator, Site
from lowbit.dist import Group
from lowbit.payload import decode, encode, layout
from lowbit.scheme import Scheme, SchemeMap, parse_scheme_map

_WIRE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class SitePlan:
    """Everything fixed per site: the scheme, outlier indices, static ranges of every rank."""

    scheme: Scheme
    outlier_idx: torch.Tensor  # [k] sorted feature indices
    static_min: torch.Tensor | None  # [tp, H] or None for dynamic granularities
    static_max: torch.Tensor | None


class QuantCommunicator(Communicator):
    """Communicator driven by a SchemeMap; see the module docstring."""

    def __init__(self, group: Group, schemes: SchemeMap | str, calibration: Calibration | None = None,
                 record: bool = True, keep_first_leg: bool = False):
        super().__init__(group, record)
        self.schemes = parse_scheme_map(schemes) if isinstance(schemes, str) else schemes
        self.calibration = calibration
        self.keep_first_leg = keep_first_leg  # error probes: also gather two-shot's leg-1 sums
        self.last_first_leg: torch.Tensor | None = None
        self._plans: dict[Site, SitePlan] = {}
        if calibration is not None and calibration.tp != group.world_size:
            raise CalibrationError(f"calibration: artifact is for TP size {calibration.tp}, "
                                   f"group has {group.world_size} ranks")

    @property
    def name(self) -> str:  # type: ignore[override]
        return str(self.schemes)

    def scheme_name(self, site: Site) -> str:
        return str(self.schemes.for_site(site.layer, site.module))

    def plan(self, site: Site, hidden: int) -> SitePlan:
        if site not in self._plans:
            scheme = self.schemes.for_site(site.layer, site.module)
            scheme.validate_for(hidden, self.group.world_size)
            if scheme.is_exact:
                self._plans[site] = SitePlan(scheme, torch.empty(0, dtype=torch.long), None, None)
                return self._plans[site]
            if scheme.needs_calibration and self.calibration is None:
                raise CalibrationError(f"calibration: scheme {scheme} at {site} needs a calibration artifact "
                                       "(static scales or top-k outliers); run `python -m lowbit calibrate`")
            idx = select_outliers(self.calibration, site, scheme.outliers, hidden)
            smin = smax = None
            if scheme.quant.granularity == "static":
                m = Calibration.module_index(site.module)
                smin = self.calibration.ema_min[site.layer, m].float()
                smax = self.calibration.ema_max[site.layer, m].float()
            self._plans[site] = SitePlan(scheme, idx, smin, smax)
        return self._plans[site]

    def _reduce(self, partial: torch.Tensor, site: Site):
        hidden = partial.shape[-1]
        plan = self.plan(site, hidden)
        if plan.scheme.is_exact:
            wire = partial.to(_WIRE_DTYPES[plan.scheme.wire_dtype])
            out = self.group.all_reduce(wire).to(partial.dtype)
            nbytes = wire.numel() * wire.element_size()
            # a ring all-reduce receives 2 (tp - 1) / tp of the tensor per rank
            received = 2 * (self.group.world_size - 1) * nbytes // self.group.world_size
            return out, nbytes, {"leg1_bits": 8.0 * wire.element_size(), "bytes_received": received}
        x = partial.reshape(-1, hidden).float()
        if plan.scheme.algo == "gather":
            out, nbytes, extra = self._gather(x, plan)
        else:
            out, nbytes, extra = self._two_shot(x, plan)
        return out.to(partial.dtype).reshape(partial.shape), nbytes, extra

    def _static(self, plan: SitePlan, rank: int, cols: slice = slice(None)):
        if plan.static_min is None:
            return None, None
        return plan.static_min[rank, cols], plan.static_max[rank, cols]

    def _gather(self, x: torch.Tensor, plan: SitePlan):
        tokens, hidden = x.shape
        rank, tp = self.group.rank, self.group.world_size
        quant, idx = plan.scheme.quant, plan.outlier_idx
        payload, stats = encode(x, quant, idx, *self._static(plan, rank))
        gathered = self.group.all_gather(payload)
        out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
        for r in range(tp):
            out += decode(gathered[r], tokens, hidden, quant, idx, *self._static(plan, r))
        bits = layout(tokens, hidden, quant, idx.numel()).bits_per_value
        return out, payload.numel(), dict(stats, leg1_bits=bits["total"], bits_breakdown=bits,
                                          bytes_received=(tp - 1) * payload.numel())

    def _chunks(self, hidden: int, idx: torch.Tensor):
        tp = self.group.world_size
        width = hidden // tp
        cols = [slice(j * width, (j + 1) * width) for j in range(tp)]
        local_idx = [idx[(idx >= c.start) & (idx < c.stop)] - c.start for c in cols]
        return cols, local_idx, width

    def _two_shot(self, x: torch.Tensor, plan: SitePlan):
        tokens, hidden = x.shape
        rank, tp = self.group.rank, self.group.world_size
        quant, second = plan.scheme.quant, plan.scheme.second
        cols, local_idx, width = self._chunks(hidden, plan.outlier_idx)
        parts, clamped, nonfinite = [], 0, 0
        for j in range(tp):
            p, st = encode(x[:, cols[j]].contiguous(), quant, local_idx[j], *self._static(plan, rank, cols[j]))
            parts.append(p)
            clamped += st["clamped"]
            nonfinite += st["nonfinite"]
        send_splits = [p.numel() for p in parts]
        own_bytes = send_splits[rank]
        received = self.group.all_to_all(torch.cat(parts), send_splits, [own_bytes] * tp)
        reduced = torch.zeros(tokens, width, dtype=torch.float32, device=x.device)
        for r in range(tp):
            reduced += decode(received[r * own_bytes:(r + 1) * own_bytes], tokens, width, quant,
                              local_idx[rank], *self._static(plan, r, cols[rank]))
        if self.keep_first_leg:
            self.last_first_leg = self.group.all_gather(reduced).permute(1, 0, 2).reshape(tokens, hidden)
        # Leg 2: requantize the reduced chunk (dynamic scales), all-gather padded payloads.
        p2, st2 = encode(reduced, second, local_idx[rank])
        sizes2 = [layout(tokens, width, second, local_idx[j].numel()).total_bytes for j in range(tp)]
        padded = torch.zeros(max(sizes2), dtype=torch.uint8, device=x.device)
        padded[:p2.numel()] = p2
        gathered = self.group.all_gather(padded)
        out = torch.empty(tokens, hidden, dtype=torch.float32, device=x.device)
        for j in range(tp):
            out[:, cols[j]] = decode(gathered[j, :sizes2[j]], tokens, width, second, local_idx[j])
        values = tokens * hidden
        extra = dict(clamped=clamped, nonfinite=nonfinite, leg2_clamped=st2["clamped"],
                     leg1_bits=8.0 * sum(send_splits) / values if values else 0.0,
                     leg2_bits=8.0 * max(sizes2) * tp / values if values else 0.0,
                     leg1_bytes=sum(send_splits), leg2_bytes=max(sizes2),
                     bytes_received=(tp - 1) * own_bytes + (tp - 1) * max(sizes2))
        return out, sum(send_splits) + max(sizes2), extra
