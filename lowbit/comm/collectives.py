# Size: ~465 lines: the communicators share one plan, encode and decode path across gather, two-shot and the shipping recipes.
"""Quantized communicators for the row-parallel partial sums.

``QuantCommunicator`` applies a ``SchemeMap`` (one scheme per site, with per-layer overrides):

- exact (``bf16`` / ``fp32``): all_reduce in the wire dtype.
- ``gather`` (the paper's math): each rank encodes its partial into one payload
  (``lowbit.wire.payload``), all-gathers the payloads, dequantizes every rank's payload with that
  rank's static scales and sums in fp32 in rank order. Every rank computes the same sum.
- ``two_shot``: the hidden features are cut into ``tp`` contiguous chunks; rank j owns chunk j.
  Leg 1: all-to-all of the quantized chunks; the owner dequantizes them and sums in fp32.
  Leg 2: the owner requantizes its reduced chunk with the scheme's ``second`` spec (dynamic, or
  static: per-feature scales from the calibrated ranges of the reduced sum) and all-gathers it (padded to the largest chunk payload; the padding is counted as sent).
  Each rank sends ~1 + 1/tp partials' worth instead of the all-gather's tp - 1 received, so
  it moves fewer bytes when tp >= 3. Per-token scales become per (token, chunk).

Outlier features (top-k by calibrated range, or random) travel in BF16 at fixed indices known
to every rank. Each call records bytes handed to collectives, bits per value of each leg, and
how many values were clamped or non-finite.

Rotation (``-rot<R>``, ``lowbit.rotation``): each rank rotates its partial before quantizing
(or its weights already did: ``prerotated=True`` after ``lowbit.rotation.fold_rotation``), the
sum is taken in the rotated space in fp32 and rotated back once. With BF16 outliers the
outlier columns are cut out in the original space first; the message is then the payload of
all ``H`` rotated features (``lowbit.wire.payload``, no outlier section) followed by the BF16
outlier columns [T, k] - one more section, counted in the bits like everything else.
Neighbouring-work schemes (``lowbit.scheme``): ``nf<B>`` and the fp codes ``fp<B>e<E>m<M>``
(also on the two-shot second leg) only change the quantizer; ``-s<fmt>`` only the scales section. ``sp<n>``
and ``thr<T>c<K>`` are per-message outliers inside the payload (``lowbit.wire.payload``): with gather
each rank picks its own set and every receiver decodes each rank's set from that rank's
message; with two-shot every first-leg chunk is a message with its own picks (thr capacity
floor(K * H/tp) per chunk), and the second leg is the plain ``second`` requantization. The
message size is fixed either way (thr: fixed capacity; more candidates than slots are summed
into the call's ``thr_overflow``), so the all-gather / all-to-all sizes never vary. ``-perm``:
every rank permutes its partial's features with the same calibrated order
(``channel_permutation``) before anything else and the sum is permuted back once; BF16 outlier
indices are moved into the permuted order. Nothing per message is sent for it.
Fitted codebooks (``lm<B>[s]``, ``lowbit.codes.lm``): the site's plan asks the code for every
sender's table, fitted from the artifact once (``SitePlan.levels``); each rank encodes with its own
and decodes every sender's payload with that sender's (a per-call argument, never a spec field),
so nothing about the table travels.
Stochastic rounding (``-sr``): the first leg's quantizer draws its uniforms from a seed made of
(communicator seed, site, rank, call number at that site: ``rounding_seed``), so reruns are
bit-identical while ranks and calls get independent noise; the two-shot second leg rounds to nearest.

Codec (``lowbit.comm.codec``): with one injected (``kernels.dispatch.Codec``), every message the
registered kernels implement goes through them (the same bytes and sums as lowbit's own path);
the rest, and every message without a codec, take lowbit's path (``REFERENCE``). Each call
records the path each leg took (``codec_path``, ``codec_path2``), ``paths`` keeps them per site,
and a change of path is an event (``on_path_change``): nothing switches silently.

``first_leg`` is one rank's first-leg messages as the communicator builds them (what the
playground shows of a rank); ``decode_message`` decodes one of them alone.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.calibration import Calibration, CalibrationError, select_outliers
from lowbit.comm.codec import REFERENCE, Codec, PathLog, check_codec
from lowbit.comm.communicator import Communicator
from lowbit.comm.dist import Group
from lowbit.comm.recipes import run_recipe
from lowbit.counters import add_counters, message_counters
from lowbit.rotation import rotate, unrotate
from lowbit.scheme import MIN_MESSAGE_AUTO, WIRE_DTYPES, QuantSpec, Scheme, SchemeError, SchemeMap, parse_scheme_map
from lowbit.site import ROW_PARALLEL_MODULES, Site
from lowbit.wire.accounting import leg2_chunk_bytes, wire_bytes
from lowbit.wire.recipes import RECIPE_ALGOS
from lowbit.wire.payload import append_outlier_columns, decode, encode, layout, outlier_tail_sum, scheme_layout


def rounding_seed(base: int, site: Site, rank: int, call: int) -> int:
    """The stochastic rounding seed of ``rank``'s first-leg message in its ``call``-th call at
    ``site`` under the communicator seed ``base`` (the one derivation: the playground's view of a
    rank uses it too)."""
    module = ROW_PARALLEL_MODULES.index(site.module)
    return ((((base * 1_009 + site.layer) * 2 + module) * 4_099 + rank) * 1_000_003 + call) % 2**62


def channel_permutation(calibration: Calibration, site: Site) -> torch.Tensor:
    """The ``-perm`` order of a site: features sorted by calibrated range summed over ranks,
    ascending (equal ranges keep index order), so each group of G neighbours in the permuted
    order holds features of similar range. ``perm[p]`` is the original feature at position p;
    identical on every rank (it depends on the artifact only)."""
    score = calibration.ranges()[site.layer, Calibration.module_index(site.module)].sum(0)
    return torch.sort(score, stable=True).indices


def _add_message_stats(total: dict, stats: dict) -> None:
    for key in ("thr_selected", "thr_overflow", "sparse"):
        if key in stats:
            total[key] = total.get(key, 0) + stats[key]


@dataclass
class SitePlan:
    """Everything fixed per site: the scheme, outlier indices, static ranges of every rank,
    and the -perm channel order (outlier indices are then positions in the permuted order)."""

    scheme: Scheme
    outlier_idx: torch.Tensor  # [k] sorted feature indices (original, unrotated space)
    static_min: torch.Tensor | None  # [tp, H] or None for dynamic granularities
    static_max: torch.Tensor | None
    perm: torch.Tensor | None = None  # [H] original feature at each permuted position
    inverse: torch.Tensor | None = None  # [H] permuted position of each original feature
    sum_min: torch.Tensor | None = None  # [H] the reduced sum's calibrated range (a static second leg)
    sum_max: torch.Tensor | None = None
    levels: list | None = None  # a code with per-site tables (lm): each sender's fitted table

    def sender_levels(self, rank: int):
        """The table sender ``rank`` encodes its first leg with (None: the code has none)."""
        return None if self.levels is None else self.levels[rank]


@dataclass
class Message:
    """One first-leg message of this rank: the features it carries (``cols``), the values its
    quantizer saw (``values`` [T, W]: permuted, rotated), the BF16 features inside it
    (``outlier_idx``, local; empty when rotated: the columns then follow as a tail), this rank's
    static range over ``cols``, and what encoding gave: the payload, its stats and the codec path."""

    cols: slice
    values: torch.Tensor
    outlier_idx: torch.Tensor
    static: tuple
    payload: torch.Tensor
    stats: dict
    path: str
    seed: int = 0
    levels: tuple | None = None


class QuantCommunicator(Communicator):
    """Communicator driven by a SchemeMap; see the module docstring."""

    def __init__(self, group: Group, schemes: SchemeMap | str, calibration: Calibration | None = None,
                 record: bool = True, keep_first_leg: bool = False, prerotated: bool = False, seed: int = 0,
                 codec: Codec | None = None, on_path_change: Callable[[dict], None] | None = None,
                 counters: bool = True):
        super().__init__(group, record)
        # lowbit.counters per call (a torch decode of this rank's own messages and a pass over the
        # values: several times the kernels' own cost at 8192 x 576). Only when the call's stats are
        # kept (``stats_kept``); ``counters=False`` for timings, which measure the all-reduce alone.
        self.counters = counters
        check_codec(codec)
        self.codec = codec  # None: lowbit.wire.payload's encode/decode (the reference) for every message
        self.paths = PathLog(on_path_change)  # the codec path of each site and leg, and every change of it
        self.prerotated = prerotated  # rotated sites' partials arrive rotated (folded weights)
        self.seed = seed  # stochastic rounding: base of the per-call seeds
        self._site_calls: dict[Site, int] = {}
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
            smin = smax = perm = inverse = None
            if not scheme.quant.dynamic:
                m = Calibration.module_index(site.module)
                smin = self.calibration.ema_min[site.layer, m].float()
                smax = self.calibration.ema_max[site.layer, m].float()
            if scheme.permute:
                perm = channel_permutation(self.calibration, site)
                inverse = torch.argsort(perm)
                idx = inverse[idx].sort().values  # permute is group-only: no static ranges to move
            sum_min = sum_max = None
            if scheme.algo == "two_shot" and not scheme.second.dynamic:
                sum_min, sum_max = (t.float() for t in self.calibration.sum_range(site))
                if perm is not None:
                    raise CalibrationError(f"{site}: -perm with a static second leg is not implemented; "
                                           "allowed: a dynamic second leg with -perm")
            levels = scheme.quant.code.site_levels(self.calibration, site, scheme, idx, perm)
            self._plans[site] = SitePlan(scheme, idx, smin, smax, perm, inverse, sum_min, sum_max, levels)
        return self._plans[site]

    def _reduce(self, partial: torch.Tensor, site: Site):
        hidden = partial.shape[-1]
        plan = self.plan(site, hidden)
        if plan.scheme.min_message == MIN_MESSAGE_AUTO:
            raise SchemeError("min_message", f"{plan.scheme} at {site}: @minauto is resolved by the job from the "
                                             "collective-bench records before any message; allowed: @min<size>")
        gated = plan.scheme.gated(partial.numel() // max(hidden, 1), hidden)
        if plan.scheme.is_exact or gated:  # a gated message goes as the exact BF16 all-reduce
            wire = partial.to(WIRE_DTYPES[plan.scheme.wire_dtype or "bf16"])
            out = self.group.all_reduce(wire).to(partial.dtype)
            nbytes = wire.numel() * wire.element_size()
            received = int(wire_bytes("exact", self.group.world_size, nbytes))
            extra = {"leg1_bits": 8.0 * wire.element_size(), "bytes_received": received}
            return out, nbytes, dict(extra, gated=1) if gated else extra
        if plan.scheme.algo in RECIPE_ALGOS:  # a shipping all-reduce as it computes (lowbit.comm.recipes)
            out, nbytes, extra = run_recipe(self.group, partial, plan.scheme, self.counters and self.stats_kept)
            return out.to(partial.dtype), nbytes, extra
        x, messages, expected = self._first_leg(partial.reshape(-1, hidden), site, plan)
        if plan.scheme.algo == "gather":
            out, nbytes, extra = self._gather(x, plan, messages[0])
        else:
            out, nbytes, extra, expected2 = self._two_shot(x, plan, messages)
            self.paths.note(str(site), "leg2", expected2, extra["codec_path2"], self._failure())
        self.paths.note(str(site), "leg1", expected, extra["codec_path"], self._failure())
        rot = plan.scheme.rotation
        if rot is not None and plan.scheme.algo == "two_shot":  # the sum is rotated back once (gather: inside)
            out = self._rotate(out, rot, inverse=True)
            if self.last_first_leg is not None:
                self.last_first_leg = self._rotate(self.last_first_leg, rot, inverse=True)
        if plan.perm is not None:
            inverse = plan.inverse.to(out.device)
            out = out[:, inverse]
            if plan.scheme.algo == "two_shot" and self.last_first_leg is not None:
                self.last_first_leg = self.last_first_leg[:, inverse]
        return out.to(partial.dtype).reshape(partial.shape), nbytes, extra

    def call_seed(self, site: Site, scheme: Scheme) -> int:
        """This call's stochastic rounding seed (0 when the first leg rounds to nearest): made of the
        communicator's seed, the site, this rank and the call number at that site, so reruns are
        bit-identical while ranks and calls draw independent noise."""
        if not scheme.stochastic:
            return 0
        n = self._site_calls.get(site, 0)
        self._site_calls[site] = n + 1
        return rounding_seed(self.seed, site, self.group.rank, n)

    # -- one rank's first leg ----------------------------------------------------------------------
    def first_leg(self, partial: torch.Tensor, site: Site) -> list[Message]:
        """This rank's first-leg messages of ``partial`` [T, H] at ``site``, encoded as ``reduce``
        would encode them (same plan, seed, tables and codec), without sending anything."""
        plan = self.plan(site, partial.shape[-1])
        if plan.scheme.is_exact:
            raise ValueError(f"{site}: {plan.scheme} is exact; it has no first-leg messages")
        return self._first_leg(partial.reshape(-1, partial.shape[-1]), site, plan)[1]

    def decode_message(self, message: Message, site: Site) -> torch.Tensor:
        """fp32 [T, W] of one of this rank's first-leg messages, decoded alone (the BF16 tail of a
        rotated message is not part of it)."""
        plan = self._plans[site]
        _, dec_kw = plan.scheme.message_kwargs(message.values.shape[1])
        return decode(message.payload[:self._codes_bytes(plan, message)], message.values.shape[0],
                      message.values.shape[1], plan.scheme.quant, message.outlier_idx, *message.static, **dec_kw,
                      levels=message.levels)

    def _first_leg(self, x: torch.Tensor, site: Site, plan: SitePlan) -> tuple[torch.Tensor, list[Message], str]:
        """(the partial as the messages were cut from it: permuted, fp32 unless a kernel reads it as
        it is; this rank's first-leg messages; the path the codec announced for them)."""
        tokens, hidden = x.shape
        rank, tp, scheme = self.group.rank, self.group.world_size, plan.scheme
        quant, seed, levels = scheme.quant, self.call_seed(site, scheme), plan.sender_levels(rank)
        rot, idx = scheme.rotation, plan.outlier_idx
        expected = self._path(quant, x.device, scheme.per_message_outliers)
        if rot is not None and self.prerotated and idx.numel():
            raise ValueError(f"{site}: prerotated partials cannot give unrotated BF16 outlier columns")
        # a kernel quantizes and counts BF16/FP16 partials as they are (converting in its loop); the
        # torch path, a permutation and a rotation work on fp32
        if expected == REFERENCE or plan.perm is not None or rot is not None:
            x = x.float()
        if plan.perm is not None:
            x = x[:, plan.perm.to(x.device)]
        width = hidden // tp if scheme.algo == "two_shot" else hidden
        seen, local = x, [idx[(idx >= j) & (idx < j + width)] - j for j in range(0, hidden, width)]
        if rot is not None:  # BF16 columns cut out in the original space, then every feature rotated and coded
            if idx.numel():
                seen = x.clone()
                seen[:, idx] = 0.0
            if not self.prerotated:
                seen = self._rotate(seen, rot)
            local = [torch.empty(0, dtype=torch.long)] * len(local)
        enc_kw, _ = scheme.message_kwargs(width)
        messages = []
        for j, start in enumerate(range(0, hidden, width)):
            cols = slice(start, start + width)
            static = self._static(plan, rank, cols)
            values = seen if scheme.algo != "two_shot" else (  # a kernel reads a column slice in place
                seen[:, cols].contiguous() if expected == REFERENCE else seen[:, cols])
            payload, stats, path = self._encode(values, quant, local[j], static, enc_kw, expected, seed, levels)
            if rot is not None:
                payload = append_outlier_columns(payload, x, idx)
                stats["nonfinite"] = int((~torch.isfinite(x)).sum())  # of the partial as produced
            messages.append(Message(cols, values, local[j], static, payload, stats, path, seed, levels))
        return x, messages, expected

    def _codes_bytes(self, plan: SitePlan, message: Message) -> int:
        """Bytes of a message before its rotated BF16 tail (all of it when there is none)."""
        if plan.scheme.rotation is None:
            return message.payload.numel()
        tokens, width = message.values.shape
        return scheme_layout(plan.scheme, tokens, width, plan.outlier_idx.numel()).codes.end

    def _counters(self, plan: SitePlan, messages: list[Message], out: torch.Tensor) -> dict:
        """``lowbit.counters`` of this call's first-leg messages, and ``nonfinite_out`` of the reduced
        ``out``; {} unless asked for (``counters``) and the call's stats are kept (``stats_kept``)."""
        if not (self.counters and self.stats_kept):
            return {}
        start = time.perf_counter()
        counts: dict = {}
        for m in messages:
            add_counters(counts, self._message_counters(plan, m))
        return dict(counts, nonfinite_out=int((~torch.isfinite(out)).sum()),
                    counters_seconds=time.perf_counter() - start)

    def _message_counters(self, plan: SitePlan, message: Message) -> dict:
        """``lowbit.counters`` of one first-leg message: its values against its own payload decoded alone."""
        tokens, width = message.values.shape
        _, dec_kw = plan.scheme.message_kwargs(width)
        decoded = decode(message.payload[:self._codes_bytes(plan, message)], tokens, width, plan.scheme.quant,
                         message.outlier_idx, *message.static, **dec_kw, levels=message.levels)
        return message_counters(message.values, decoded, plan.scheme.quant)

    def _static(self, plan: SitePlan, rank: int, cols: slice = slice(None)):
        if plan.static_min is None:
            return None, None
        return plan.static_min[rank, cols], plan.static_max[rank, cols]

    # -- the codec -------------------------------------------------------------------------------
    def _path(self, quant: QuantSpec, device, per_message: bool = False) -> str:
        """The path a message quantized with ``quant`` takes: the codec's, unless there is no codec
        or the message picks its own outliers (sp/thr: the kernels' API has no such sections)."""
        if self.codec is None or per_message:
            return REFERENCE
        return self.codec.path(quant, device)

    def _failure(self) -> str | None:
        return None if self.codec is None else self.codec.failure()

    def _rotate(self, x: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
        """The block rotation: the codec's (its kernel where it has one), else lowbit's torch reference."""
        if self.codec is not None:
            return self.codec.rotate(x, block, inverse)
        return unrotate(x, block) if inverse else rotate(x, block)

    def _encode(self, x: torch.Tensor, quant: QuantSpec, idx, static: tuple, enc_kw: dict, path: str,
                seed: int = 0, levels=None) -> tuple[torch.Tensor, dict, str]:
        """One message's payload, its {clamped, nonfinite, ...} stats (``lowbit.wire.payload.encode``'s)
        and the path that ran."""
        if path == REFERENCE:
            return (*encode(x, quant, idx, *static, **enc_kw, seed=seed, levels=levels), REFERENCE)
        return self.codec.encode(x, quant, idx, *static)

    def _decode_sum(self, payloads: torch.Tensor, tokens: int, width: int, quant: QuantSpec, idx,
                    smins, smaxs, dec_kw: dict, path: str, levels: list | None = None,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """(fp32 zeros + the dequantized payloads [n, nbytes] in row (rank) order, the path that
        ran); ``smins``/``smaxs`` [n, width] are the senders' static ranges (None for dynamic
        scales); ``levels`` one fitted table per row (each sender's own) or None; ``out``: the fp32
        [tokens, width] tensor (a view is fine) the sum is written to."""
        if path != REFERENCE:  # the kernels' codes (uniform grid, nearest) decode the same for every sender
            return self.codec.decode_sum(payloads, tokens, width, quant, idx, smins, smaxs, out)
        if out is None:
            out = torch.zeros(tokens, width, dtype=torch.float32, device=payloads.device)
        else:
            out.zero_()
        for r in range(payloads.shape[0]):
            out += decode(payloads[r], tokens, width, quant, idx, None if smins is None else smins[r],
                          None if smaxs is None else smaxs[r], **dec_kw, levels=None if levels is None else levels[r])
        return out, REFERENCE

    # -- the collectives -------------------------------------------------------------------------
    def _gather(self, x: torch.Tensor, plan: SitePlan, message: Message):
        tokens, hidden = x.shape
        tp, idx, rot = self.group.world_size, plan.outlier_idx, plan.scheme.rotation
        _, dec_kw = plan.scheme.message_kwargs(hidden)
        payload = message.payload
        gathered = self.group.all_gather(payload)
        if rot is None:
            out, ran = self._decode_sum(gathered, tokens, hidden, plan.scheme.quant, idx, plan.static_min,
                                        plan.static_max, dec_kw, message.path, plan.levels)
        else:
            n_codes = self._codes_bytes(plan, message)
            summed, ran = self._decode_sum(gathered[:, :n_codes], tokens, hidden, plan.scheme.quant, None, None,
                                           None, {}, message.path, plan.levels)
            out = self._rotate(summed, rot, inverse=True)
            if idx.numel():  # the BF16 columns, summed in the original space
                out[:, idx] = outlier_tail_sum(gathered, n_codes, tokens, idx.numel())
        bits = scheme_layout(plan.scheme, tokens, hidden, idx.numel()).bits_per_value
        counts = self._counters(plan, [message], out)
        return out, payload.numel(), dict(message.stats, **counts,
                                          leg1_bits=bits["total"], bits_breakdown=bits,
                                          bytes_received=int(wire_bytes("gather", tp, payload.numel())),
                                          codec_path=_same(message.path, ran))

    def _two_shot(self, x: torch.Tensor, plan: SitePlan, messages: list[Message]):
        tokens, hidden = x.shape
        rank, tp = self.group.rank, self.group.world_size
        second, width = plan.scheme.second, hidden // tp
        _, dec_kw = plan.scheme.message_kwargs(width)
        local_idx = [m.outlier_idx for m in messages]
        clamped = sum(m.stats["clamped"] for m in messages)
        nonfinite = sum(m.stats["nonfinite"] for m in messages)
        message_stats = {}
        for m in messages:
            _add_message_stats(message_stats, m.stats)
        send_splits = [m.payload.numel() for m in messages]
        own_bytes = send_splits[rank]
        received = self.group.all_to_all(torch.cat([m.payload for m in messages]), send_splits, [own_bytes] * tp)
        cols = messages[rank].cols
        smins = None if plan.static_min is None else plan.static_min[:, cols]
        smaxs = None if plan.static_max is None else plan.static_max[:, cols]
        payloads1 = received.reshape(tp, own_bytes)
        static2 = plan.sum_min is not None  # leg 2: dynamic, or static with the reduced sum's calibrated ranges

        def sum_range(j: int, batch: bool = False):
            if not static2:
                return None, None
            lo, hi = plan.sum_min[messages[j].cols], plan.sum_max[messages[j].cols]
            return (lo.unsqueeze(0), hi.unsqueeze(0)) if batch else (lo, hi)
        expected2 = self._path(second, x.device)
        if REFERENCE not in (messages[rank].path, expected2) and not self.keep_first_leg:
            # the kernels' owner step: unpack, fp32 sum, requantize and pack the chunk in one pass
            p2, st2, ran1 = self.codec.owner_step(payloads1, tokens, width, plan.scheme.quant, local_idx[rank],
                                                  smins, smaxs, second, *sum_range(rank))
            enc2, reduced = ran1, None  # the fused step never materializes the sum: no leg-2 counters
        else:
            reduced, ran1 = self._decode_sum(payloads1, tokens, width, plan.scheme.quant, local_idx[rank], smins,
                                             smaxs, dec_kw, messages[rank].path, plan.levels)
            if self.keep_first_leg:
                self.last_first_leg = self.group.all_gather(reduced).permute(1, 0, 2).reshape(tokens, hidden)
            p2, st2, enc2 = self._encode(reduced, second, local_idx[rank], sum_range(rank), {}, expected2)
        # all-gather the leg-2 payloads padded to the largest; each decoded into its columns of out
        sizes2 = [layout(tokens, width, second, local_idx[j].numel()).total_bytes for j in range(tp)]
        leg2_bytes = leg2_chunk_bytes(tokens, width, second, [local_idx[j].numel() for j in range(tp)])
        padded = torch.zeros(leg2_bytes, dtype=torch.uint8, device=x.device)
        padded[:p2.numel()] = p2
        gathered = self.group.all_gather(padded)
        out = torch.empty(tokens, hidden, dtype=torch.float32, device=x.device)
        ran2 = set()
        for j in range(tp):
            _, ran = self._decode_sum(gathered[j:j + 1, :sizes2[j]], tokens, width, second, local_idx[j],
                                      *sum_range(j, batch=True), {}, enc2, out=out[:, messages[j].cols])
            ran2.add(ran)
        values = tokens * hidden
        counts = self._counters(plan, messages, out)
        if reduced is not None and counts:
            start = time.perf_counter()
            add_counters(counts, message_counters(reduced, out[:, messages[rank].cols], second), "leg2_")
            counts["counters_seconds"] += time.perf_counter() - start
        extra = dict(clamped=clamped, nonfinite=nonfinite, leg2_clamped=st2["clamped"], **counts,
                     leg1_bits=8.0 * sum(send_splits) / values if values else 0.0,
                     leg2_bits=8.0 * leg2_bytes * tp / values if values else 0.0,
                     leg1_bytes=sum(send_splits), leg2_bytes=leg2_bytes,
                     # every peer sends this rank its chunk (own_bytes each) in leg 1
                     bytes_received=int(wire_bytes("two_shot", tp, tp * own_bytes, leg2_bytes)),
                     codec_path=_same(*{m.path for m in messages}, ran1), codec_path2=_same(enc2, *ran2),
                     **message_stats)
        return out, sum(send_splits) + leg2_bytes, extra, expected2


def _same(*paths: str) -> str:
    """The path of a leg from the paths its steps took: one name, or them all joined with '+'
    (a kernel failed between two steps of the same leg)."""
    return "+".join(dict.fromkeys(paths))
