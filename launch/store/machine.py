"""The machine and the models, for the sidebar and the pickers: cores, GPUs, backend; the Slurm
cluster this machine submits to, when there is one; a model's shape and the TP sizes it can run at
(configs only, no weights)."""
from __future__ import annotations

import os
import time

import pandas as pd
import torch

from launch.executors.slurm_cli import SlurmError, missing, partitions
from launch.spec import available_gpus
from lowbit.comm.placement import describe_auto
from lowbit.model.models import load_config
from lowbit.model.tp import TPSizeError, check_tp_size, text_config


def model_shape(name: str) -> dict:
    """hidden size, layers, heads, KV heads and vocabulary of a model, from its config only."""
    cfg = text_config(load_config(name))
    return dict(model=name, hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
                heads=int(cfg.num_attention_heads),
                kv_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
                intermediate=int(getattr(cfg, "intermediate_size", 0) or 0), vocab=int(cfg.vocab_size))


def valid_tp_sizes(name: str, largest: int = 8) -> list[int]:
    """TP sizes from 1 to ``largest`` that can shard ``name`` (``lowbit.model.tp.check_tp_size``)."""
    cfg = load_config(name)
    sizes = []
    for tp in range(1, largest + 1):
        try:
            check_tp_size(cfg, tp, name)
            sizes.append(tp)
        except TPSizeError:
            pass
    return sizes


def machine_info() -> dict:
    """CPU cores, GPUs and the backend ``auto`` picks here (by TP size: ``lowbit.comm.placement``)."""
    gpus = available_gpus()
    names = []
    if gpus:
        try:
            names = [torch.cuda.get_device_name(i) for i in range(gpus)]
        except Exception:  # noqa: BLE001 - names are decoration
            names = []
    return dict(cpu_cores=os.cpu_count() or 1, gpus=gpus, gpu_names=names, backend=describe_auto(gpus))


CLUSTER_COLUMNS = ["partition", "default", "state", "nodes", "idle", "allocated", "other", "cpus_per_node",
                   "gpus_per_node", "time_limit_h"]
CLUSTER_TTL_S = 30.0        # sinfo is asked at most this often by the sidebar's reruns
SINFO_TIMEOUT_S = 3.0       # a controller that does not answer leaves the panel out, not the page hanging
_cluster_cache: list = [0.0, None]


def cluster_frame(max_age_s: float = CLUSTER_TTL_S) -> pd.DataFrame:
    """The Slurm cluster ``executor: slurm`` submits to, one row per partition (``sinfo``): its
    nodes idle / allocated / other, CPUs and GPUs per node, time limit in hours. Empty where
    Slurm's commands are not installed or no controller answers (the Slurm executor's submit says
    why)."""
    now = time.monotonic()
    if _cluster_cache[1] is not None and now - _cluster_cache[0] < max_age_s:
        return _cluster_cache[1]
    rows = []
    if not missing():
        try:
            rows = [dict(partition=p.name, default=p.default, state=p.available, nodes=p.nodes, idle=p.idle,
                         allocated=p.allocated, other=p.other, cpus_per_node=p.cpus_per_node,
                         gpus_per_node=p.gpus_per_node,
                         time_limit_h=None if p.max_time_s is None else p.max_time_s / 3600)
                    for p in partitions(timeout_s=SINFO_TIMEOUT_S)]
        except SlurmError:
            rows = []
    frame = pd.DataFrame(rows, columns=CLUSTER_COLUMNS)
    _cluster_cache[:] = [now, frame]
    return frame
