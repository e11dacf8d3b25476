"""The machine and the models, for the sidebar and the pickers: cores, GPUs, backend; a model's shape
and the TP sizes it can run at (configs only, no weights)."""
from __future__ import annotations

import os

import torch

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
