"""Which kernel implements which (code, grouping) on which backend: the one table ``kernels.dispatch`` asks.

    PYTHONPATH=. python -c "from kernels import registry; from lowbit.scheme import parse_scheme as p; \\
        print(registry.implementation(p('int4-token').quant, 'native'), registry.refusal(p('nf4-token').quant, 'native'))"

An implementation is registered per (code key, grouping, backend): the code key is the code's
``kernel_key`` (``lowbit.codes.base``: the family of kernels that computes exactly its bytes; int
today), the grouping its name, the backend one of ``BACKENDS``. Each entry says what else it
needs: the code widths it packs, the scale formats it writes, the rounding rule, the device.
A spec no entry implements runs on lowbit's torch reference (``lowbit.wire.payload``: the
definition every kernel is held byte-equal to), and the kernels' own entry points refuse it with
the reason (``refusal``). Adding a kernel is one ``register`` call here and its module.

Every registered module implements ``KernelBackend``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch

BACKENDS = ("reference", "native", "triton", "interpret")
GRID_BITS = (2, 3, 4, 5, 6, 8)
WHOLE_BYTE_BITS = (2, 4, 8)  # widths whose codes never straddle a byte (what the Triton kernels pack)


class KernelBackend(Protocol):
    """What every registered implementation module offers (same arguments, bytes and errors as
    ``kernels.reference``)."""

    def quantize_pack(self, x: torch.Tensor, quant, outlier_idx=None, static_min=None,
                      static_max=None) -> torch.Tensor: ...

    def unpack_dequant_sum(self, payloads: torch.Tensor, tokens: int, hidden: int, quant, outlier_idx=None,
                           static_mins=None, static_maxs=None, out_dtype: torch.dtype = torch.float32
                           ) -> torch.Tensor: ...

    def unpack_dequant_sum_requant(self, payloads: torch.Tensor, tokens: int, hidden: int, quant, outlier_idx,
                                   static_mins, static_maxs, second) -> torch.Tensor: ...

    # and, where ``Implementation.owner_step`` says so: ``unpack_dequant_sum_requant_counts`` (the
    # two-shot owner step in one pass, a static second leg too) and ``unpack_dequant_sum(..., out=)``


@dataclass(frozen=True)
class Implementation:
    """One registered kernel: its backend, module (imported on first use), device and what it packs."""

    backend: str
    module: str
    device: str  # "cpu", "cuda" or "any"
    bits: tuple[int, ...] = GRID_BITS
    scale_formats: tuple[str, ...] = ("bf16", "fp32")
    roundings: tuple[str, ...] = ("nearest",)
    counts: bool = False  # it counts clamped / non-finite values in its own pass (``quantize_pack_counts``)
    # it runs the two-shot owner step (unpack, fp32 sum, requantize, pack; dynamic or static second
    # leg) as one call (``unpack_dequant_sum_requant_counts``) and writes a sum into a given ``out``
    owner_step: bool = False

    def refusal(self, quant) -> str | None:
        """Why this implementation cannot run ``quant`` (beyond its code and grouping), or None."""
        if quant.rounding not in self.roundings:
            return (f"rounding {quant.rounding!r}: the kernels round to nearest (half to even); stochastic "
                    "rounding stays on lowbit.quant's torch path")
        if quant.scale.name not in self.scale_formats:
            return (f"scale format {quant.scale_format!r}: the kernels write {' or '.join(self.scale_formats)} "
                    f"scales only; allowed: {', '.join(self.scale_formats)} (the other scale formats stay on "
                    "lowbit.quant's torch path)")
        if quant.bits not in self.bits:
            return (f"bits: the {self.backend} kernels pack {', '.join(map(str, self.bits))}-bit codes; "
                    f"{quant.bits}-bit codes straddle bytes and stay on the torch path (kernels.dispatch routes "
                    "them there)")
        return None

    def load(self) -> KernelBackend:
        return importlib.import_module(self.module)


_TABLE: dict[tuple[str, str, str], Implementation] = {}


def register(code_key: str, groupings: tuple[str, ...], impl: Implementation) -> None:
    for grouping in groupings:
        _TABLE[(code_key, grouping, impl.backend)] = impl


ROW_GROUPINGS = ("static", "token", "group")
register("int", ROW_GROUPINGS, Implementation("reference", "kernels.reference", "any", counts=True,
                                                          owner_step=True))
register("int", ROW_GROUPINGS, Implementation("native", "kernels.native_cpu", "cpu", counts=True,
                                                          owner_step=True))
register("int", ROW_GROUPINGS, Implementation("triton", "kernels.triton_quant", "cuda", WHOLE_BYTE_BITS))
register("int", ROW_GROUPINGS, Implementation("interpret", "kernels.triton_quant", "cpu", WHOLE_BYTE_BITS))
# The block Hadamard rotation has one kernel (Triton); elsewhere lowbit.rotation's torch matmul runs.
ROTATIONS = {"triton": "kernels.hadamard", "interpret": "kernels.hadamard"}


def module(backend: str) -> str:
    """The module that implements ``backend`` (one per backend; the Triton ones are imported by
    ``kernels.dispatch``, which decides compiled or interpreted)."""
    return next(impl.module for (_, _, b), impl in _TABLE.items() if b == backend)


def _entry(quant, backend: str) -> Implementation | None:
    return _TABLE.get((quant.code.kernel_key, quant.grouping.name, backend))


def implementation(quant, backend: str) -> Implementation | None:
    """The registered implementation of ``backend`` that runs ``quant`` exactly, or None."""
    impl = _entry(quant, backend)
    return impl if impl is not None and impl.refusal(quant) is None else None


def refusal(quant, backend: str) -> str | None:
    """Why ``backend`` has no implementation of ``quant`` (the message the kernels raise), or None."""
    keys = sorted({code for code, _, b in _TABLE if b == backend})
    if quant.code.kernel_key not in keys:
        return (f"code {quant.code.kind!r}: the kernels implement the {' and '.join(keys)} codes only; allowed: "
                f"{', '.join(keys)} (the nf and fitted lm codebooks, the fp codes and every other code stay on "
                "lowbit.quant's torch path)")
    impl = _entry(quant, backend)
    if impl is None:
        groupings = sorted({g for code, g, b in _TABLE if b == backend and code == quant.code.kernel_key})
        return (f"granularity {quant.granularity!r}: the kernels implement {', '.join(groupings)} only (the "
                "others stay on lowbit.quant's torch path)")
    return impl.refusal(quant)
