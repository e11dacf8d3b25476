"""Megatron-style tensor parallelism for Llama-family decoders, driven by the model's TP plan.

Shape of the transform (read ``config.base_model_tp_plan``; Llama's plan is the fallback):
1. Column-parallel (``colwise``) linears keep a contiguous slice of their *output* rows: q/k/v
   by whole heads, gate/up by an equal slice of the intermediate size.
2. When the TP size exceeds the KV heads, k/v are *replicated*: rank r keeps KV head
   ``r // (tp // n_kv)`` so its query heads still find their group (as vLLM does).
3. Row-parallel (``rowwise``) linears keep the matching slice of their *input* columns and are
   replaced by ``RowParallelLinear``, which hands its partial sum to a ``Communicator`` - the
   only place where ranks talk, and the place low-bit communication plugs in.
4. Embeddings, norms and lm_head stay replicated.

    python -m lowbit tp-check --model smollm2-135m --tp 3   # sharded vs unsharded logits
"""
from __future__ import annotations

import re

import torch
from torch import nn

from lowbit.comm.communicator import Communicator
from lowbit.rotation import fold_weight
from lowbit.scheme import parse_scheme_map
from lowbit.site import Site

LLAMA_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3")


class TPSizeError(ValueError):
    """A TP size that cannot shard this model; the message lists the sizes that can."""


def text_config(config):
    """The decoder's config (multimodal configs such as Gemma 3 nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def tp_plan(config) -> dict[str, str]:
    """The model's TP plan as {module pattern: 'colwise' | 'rowwise'}; other styles are dropped."""
    plan = getattr(text_config(config), "base_model_tp_plan", None) or LLAMA_TP_PLAN
    out = {}
    for pattern, style in plan.items():
        if style.startswith("colwise"):
            out[pattern] = "colwise"
        elif style.startswith("rowwise"):
            out[pattern] = "rowwise"
    return out


def _heads(config) -> tuple[int, int]:
    cfg = text_config(config)
    n_heads = cfg.num_attention_heads
    return n_heads, getattr(cfg, "num_key_value_heads", None) or n_heads


def tp_size_problem(config, tp: int) -> str | None:
    """Why ``tp`` cannot shard this config, or None when it can."""
    cfg = text_config(config)
    n_heads, n_kv = _heads(cfg)
    if tp < 1:
        return "must be >= 1"
    if n_heads % tp:
        return f"{n_heads} attention heads are not divisible by {tp}"
    if n_kv % tp and tp % n_kv:
        return f"{n_kv} KV heads neither divide by {tp} nor divide {tp} (no whole-head split or replication)"
    if cfg.intermediate_size % tp:
        return f"intermediate size {cfg.intermediate_size} is not divisible by {tp}"
    return None


def valid_tp_sizes(config, limit: int = 64) -> list[int]:
    return [n for n in range(1, limit + 1) if tp_size_problem(config, n) is None]


def check_tp_size(config, tp: int, model_name: str = "model") -> None:
    problem = tp_size_problem(config, tp)
    if problem:
        raise TPSizeError(f"tp: {tp} cannot shard {model_name} ({problem}); valid TP sizes: "
                          f"{', '.join(map(str, valid_tp_sizes(config)))}")


def input_columns(in_features: int, rank: int, tp: int) -> slice:
    """The input columns a row-parallel linear keeps on ``rank``: a contiguous 1/tp slice."""
    per = in_features // tp
    return slice(rank * per, (rank + 1) * per)


class RowParallelLinear(nn.Module):
    """A row-parallel linear: local matmul on this rank's input slice, then the communicator
    reduces the partial sums of all ranks. A bias is added once, after the reduction."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, communicator: Communicator, site: Site):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.communicator = communicator
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = nn.functional.linear(x, self.weight)
        out = self.communicator.reduce(partial, self.site)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, site={self.site}"


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def _slice_rows(linear: nn.Linear, rows: slice) -> None:
    linear.weight = nn.Parameter(linear.weight.data[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone(), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def shard_model(model: nn.Module, rank: int, tp: int, communicator: Communicator) -> nn.Module:
    """Shard ``model`` in place for ``rank`` of ``tp`` ranks; returns it. See the module doc."""
    config = text_config(model.config)
    check_tp_size(config, tp)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise TPSizeError(f"model: type {config.model_type!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    n_heads, n_kv = _heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    plan = [(_pattern_regex(p), style) for p, style in tp_plan(config).items()]

    def kv_rows() -> slice:
        if n_kv % tp == 0:
            per = n_kv // tp * head_dim
            return slice(rank * per, (rank + 1) * per)
        kv_head = rank // (tp // n_kv)
        return slice(kv_head * head_dim, (kv_head + 1) * head_dim)

    for name, module in list(base.named_modules()):
        for regex, style in plan:
            match = regex.match(name)
            if not match or not isinstance(module, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if style == "colwise":
                if leaf in ("k_proj", "v_proj"):
                    _slice_rows(module, kv_rows())
                else:
                    per = module.out_features // tp
                    _slice_rows(module, slice(rank * per, (rank + 1) * per))
            else:
                weight = module.weight.data[:, input_columns(module.in_features, rank, tp)].clone()
                bias = None if module.bias is None else module.bias.data.clone()
                site = Site(layer=int(match.group(1)), module=leaf)
                parent = base.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, leaf, RowParallelLinear(weight, bias, communicator, site))
    for layer in base.layers:
        attn = layer.self_attn
        attn.num_key_value_groups = (n_heads // tp) // max(n_kv // tp, 1)
    model.lowbit_tp = (rank, tp)
    return model


def row_parallel_sites(model: nn.Module) -> list[Site]:
    return [m.site for m in model.modules() if isinstance(m, RowParallelLinear)]


def set_communicator(model: nn.Module, communicator: Communicator) -> None:
    """Swap the communicator of every row-parallel linear (e.g. exact -> quantized)."""
    for m in model.modules():
        if isinstance(m, RowParallelLinear):
            m.communicator = communicator


def fold_rotation(model: torch.nn.Module, schemes) -> list:
    """Fold the forward rotation into every row-parallel weight whose site's scheme rotates.

    ``schemes`` is a SchemeMap or string. Returns the folded sites. Use the folded model with
    ``QuantCommunicator(..., prerotated=True)``, which then skips the sender's rotation. Sites
    with BF16 outliers cannot be folded (their outlier columns are needed unrotated).
    """
    smap = parse_scheme_map(schemes) if isinstance(schemes, str) else schemes
    folded = []
    for module in model.modules():
        if not isinstance(module, RowParallelLinear):
            continue
        scheme = smap.for_site(module.site.layer, module.site.module)
        if scheme.is_exact or scheme.rotation is None:
            continue
        if scheme.outliers.select != "none":
            raise ValueError(f"fold: {module.site} uses {scheme} with BF16 outliers; its outlier columns must "
                             "travel unrotated, so rotate online (prerotated=False) instead")
        with torch.no_grad():
            module.weight.copy_(fold_weight(module.weight.data, scheme.rotation))
        folded.append(module.site)
    model.lowbit_folded_rotation = str(smap)
    return folded
