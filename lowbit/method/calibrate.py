"""Calibration: per-feature statistics of the communicated partial sums, and outlier selection.

With the exact all-reduce, calibration text runs through the TP model. At every row-parallel
site (layer x {o_proj, down_proj}) each rank records, per batch, the min and max of every
feature of its *partial* sum, and keeps an exponential moving average
``ema = (1 - gamma) * ema + gamma * batch_value`` (initialised with the first batch; the paper
uses gamma = 0.01). The per-rank range is ``2 * max(|min|, |max|)``. The artifact also keeps
every batch's min/max so the app can show how consistent the outlier features are across
batches, ranks, layers and text sources, and a small ``sample``: the first ``SAMPLE_TOKENS``
tokens of the first batch's partial at every site and rank (fp32), so the app can show one
real partial's distribution before and after a rotation (``lowbit.rotation.rotation_effect``).

It also keeps the EMA of the per-batch min and max of every feature of the *reduced* sum
(``sum_min`` / ``sum_max`` [L, M, H], the same on every rank): the static scales of a two-shot
second leg that is requantized per feature (``@twoshot+int8-static``).

Outlier selection (same indices on every rank): ``topk`` scores each feature by its range summed
over ranks and keeps the k = floor(k_frac * hidden) largest; ``random`` draws k features with a
seed; ``none`` keeps none.

    python -m lowbit calibrate --model smollm2-135m --tp 3 --source wikipedia --chunks 16 --seq-len 256
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lowbit.artifacts import CALIBRATE_DEFAULTS, calibration_cache_dir
# the artifact and outlier selection live in lowbit.calibration (read by lowbit.comm without this procedure)
from lowbit.calibration import (ARTIFACT_META, SAMPLE_TOKENS, Calibration, CalibrationError,  # noqa: F401
                                select_outliers)
from lowbit.comm.communicator import Communicator, ExactCommunicator
from lowbit.comm.dist import Group
from lowbit.model.data import token_chunks
from lowbit.model.engine import build_tp_model, forward_partials
from lowbit.model.tp import row_parallel_sites, set_communicator
from lowbit.site import ROW_PARALLEL_MODULES, Site


class StatsCommunicator(Communicator):
    """Wraps a communicator and records per-batch min/max of this rank's partial per feature (and
    of the reduced sum)."""

    def __init__(self, inner: Communicator, layers: int, hidden: int):
        super().__init__(inner.group, record=False)
        self.inner = inner
        self.cur_min = torch.full((layers, len(ROW_PARALLEL_MODULES), hidden), math.inf)
        self.cur_max = torch.full((layers, len(ROW_PARALLEL_MODULES), hidden), -math.inf)
        self.sum_min = torch.full_like(self.cur_min, math.inf)
        self.sum_max = torch.full_like(self.cur_max, -math.inf)
        self.sample: torch.Tensor | None = None  # [L, M, S, H], filled by the first batch
        self.sampling = True

    def _reduce(self, partial, site):
        flat = partial.detach().reshape(-1, partial.shape[-1]).float().cpu()
        m = ROW_PARALLEL_MODULES.index(site.module)
        if self.sampling:
            if self.sample is None:
                rows = min(SAMPLE_TOKENS, flat.shape[0])
                self.sample = torch.zeros(self.cur_min.shape[0], len(ROW_PARALLEL_MODULES), rows, flat.shape[1])
            self.sample[site.layer, m] = flat[:self.sample.shape[2]]
        self.cur_min[site.layer, m] = torch.minimum(self.cur_min[site.layer, m], flat.amin(0))
        self.cur_max[site.layer, m] = torch.maximum(self.cur_max[site.layer, m], flat.amax(0))
        out = self.inner.reduce(partial, site)
        summed = out.detach().reshape(-1, out.shape[-1]).float().cpu()
        self.sum_min[site.layer, m] = torch.minimum(self.sum_min[site.layer, m], summed.amin(0))
        self.sum_max[site.layer, m] = torch.maximum(self.sum_max[site.layer, m], summed.amax(0))
        return out, 0, {}

    def take_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.cur_min.clone(), self.cur_max.clone()
        self.cur_min.fill_(math.inf)
        self.cur_max.fill_(-math.inf)
        return out

    def take_sum_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.sum_min.clone(), self.sum_max.clone()
        self.sum_min.fill_(math.inf)
        self.sum_max.fill_(-math.inf)
        return out


@torch.no_grad()
def run_calibration(model: torch.nn.Module, group: Group, token_batches: list[torch.Tensor], gamma: float = 0.01,
                    meta: dict | None = None, progress=None) -> Calibration:
    """Collective: run ``token_batches`` through the TP ``model`` with the exact all-reduce and
    return the statistics of every rank (gathered on every rank)."""
    if not 0 < gamma <= 1:
        raise CalibrationError(f"gamma: {gamma} not in (0, 1]")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    stats = StatsCommunicator(ExactCommunicator(group, record=False), layers, hidden)
    previous = next(m.communicator for m in model.modules() if hasattr(m, "communicator"))
    set_communicator(model, stats)
    device = next(model.parameters()).device
    mins, maxs, sum_mins, sum_maxs = [], [], [], []
    start = time.perf_counter()
    try:
        for step, ids in enumerate(token_batches):
            forward_partials(model, ids.to(device))
            bmin, bmax = stats.take_batch()
            smin, smax = stats.take_sum_batch()
            stats.sampling = False
            mins.append(bmin)
            maxs.append(bmax)
            sum_mins.append(smin)
            sum_maxs.append(smax)
            if progress:
                progress("calibrate", step + 1, len(token_batches), f"batch {step + 1}/{len(token_batches)}", {})
    finally:
        set_communicator(model, previous)
    # [batches, L, M, H] per rank -> gather -> [batches, L, M, tp, H]
    local = torch.stack([torch.stack(mins), torch.stack(maxs)])  # [2, B, L, M, H]
    gathered = group.all_gather(local.to(device)).cpu()  # [tp, 2, B, L, M, H]
    batch_min = gathered[:, 0].permute(1, 2, 3, 0, 4).contiguous()
    batch_max = gathered[:, 1].permute(1, 2, 3, 0, 4).contiguous()
    sample = None
    if stats.sample is not None:  # [L, M, S, H] per rank -> [L, M, tp, S, H]
        sample = group.all_gather(stats.sample.to(device)).cpu().permute(1, 2, 0, 3, 4).contiguous()
    ema_min, ema_max = batch_min[0].clone(), batch_max[0].clone()
    for b in range(1, batch_min.shape[0]):
        ema_min = (1 - gamma) * ema_min + gamma * batch_min[b]
        ema_max = (1 - gamma) * ema_max + gamma * batch_max[b]
    sum_min, sum_max = sum_mins[0].clone(), sum_maxs[0].clone()  # the same on every rank: no gather
    for b in range(1, len(sum_mins)):
        sum_min = (1 - gamma) * sum_min + gamma * sum_mins[b]
        sum_max = (1 - gamma) * sum_max + gamma * sum_maxs[b]
    tokens = sum(int(ids.numel()) for ids in token_batches)
    info = dict(meta or {}, tp=group.world_size, gamma=gamma, batches=len(token_batches), tokens=tokens,
                hidden=hidden, layers=layers, modules=list(ROW_PARALLEL_MODULES),
                seconds=round(time.perf_counter() - start, 3), sites=len(row_parallel_sites(model)))
    return Calibration(ema_min, ema_max, batch_min, batch_max, info, sample, sum_min, sum_max)


def ema_trace(calibration: Calibration, site: Site, feature: int, gamma: float | None = None) -> torch.Tensor:
    """EMA of one feature's range (summed over ranks) after each calibration batch: [batches]."""
    gamma = calibration.meta.get("gamma", 0.01) if gamma is None else gamma
    m = Calibration.module_index(site.module)
    bmin = calibration.batch_min[:, site.layer, m, :, feature]
    bmax = calibration.batch_max[:, site.layer, m, :, feature]
    ema_min, ema_max, out = bmin[0].clone(), bmax[0].clone(), []
    for b in range(bmin.shape[0]):
        if b:
            ema_min = (1 - gamma) * ema_min + gamma * bmin[b]
            ema_max = (1 - gamma) * ema_max + gamma * bmax[b]
        out.append((2 * torch.maximum(ema_min.abs(), ema_max.abs())).sum())
    return torch.stack(out)


def topk_sets(ranges: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k feature indices along the last dim of ``ranges`` [..., H] (sorted): [..., k]."""
    return ranges.topk(k, dim=-1).indices.sort(dim=-1).values


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(1, len(sa | sb))


# -- runners: a whole calibration on a group (what the calibrate job kind calls) -----------------
def with_calibration_defaults(params: dict) -> dict:
    """The calibration keys of ``params`` (those of ``CALIBRATE_DEFAULTS``), each its default where
    ``params`` leaves it unset; other keys are left out. (A job spec's calibration, with its text
    source and token count, is ``launch.layout.calibration_params``.)"""
    return {k: params.get(k, v) for k, v in CALIBRATE_DEFAULTS.items()}


def calibrate_into(tp_model, group: Group, params: dict, out: Path, progress=None) -> dict | None:
    """Collective: calibrate the loaded ``tp_model`` on ``params``' text and save the artifact
    to ``out`` (rank 0); rank 0 returns {artifact, reused, meta}."""
    p = with_calibration_defaults(params)
    chunks = token_chunks(tp_model.tokenizer, p["source"], "calib", p["chunks"], p["seq_len"])
    meta = dict(model=params["model"], source=p["source"], chunks=p["chunks"], seq_len=p["seq_len"],
                created=time.strftime("%Y-%m-%d %H:%M:%S"))
    cal = run_calibration(tp_model.model, group, list(chunks.split(p["batch_size"])), p["gamma"], meta, progress)
    if group.rank == 0:
        cal.save(out)
    group.barrier()
    return dict(artifact=str(out), reused=False, meta=cal.meta) if group.rank == 0 else None


def calibrate(group: Group, params: dict, progress=None) -> dict | None:
    """Collective: calibrate ``params["model"]`` and save the artifact to ``params["out"]`` (default:
    the shared cache folder, reused when present unless ``force``)."""
    p = with_calibration_defaults(params)
    out = Path(params.get("out") or calibration_cache_dir(params["model"], group.world_size, p["source"],
                                                          p["chunks"], p["seq_len"], p["gamma"]))
    if (out / ARTIFACT_META).exists() and not params.get("force"):
        cal = Calibration.load(out)
        cal.check_matches(params["model"], group.world_size)
        return dict(artifact=str(out), reused=True, meta=cal.meta) if group.rank == 0 else None
    return calibrate_into(build_tp_model(params["model"], group), group, params, out, progress)


def load_or_calibrate(tp_model, group: Group, params: dict, folder: Path, progress=None) -> Calibration:
    """The artifact in ``folder``, made first from ``params`` (on the loaded model) when missing;
    checked against the model and TP size."""
    if not (Path(folder) / ARTIFACT_META).exists():
        calibrate_into(tp_model, group, params, Path(folder), progress)
    cal = Calibration.load(folder)
    cal.check_matches(params["model"], group.world_size)
    return cal
