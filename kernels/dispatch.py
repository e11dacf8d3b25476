"""One entry point per kernel, and the codec a communicator runs: the registry picks the implementation.

    PYTHONPATH=. python -c "import torch; from kernels import dispatch; from lowbit.scheme import QuantSpec; \\
        q = QuantSpec(4, True, 'token'); print(dispatch.backend('cpu', q), dispatch.quantize_pack(torch.randn(3, 64), q).shape)"

``LOWBIT_KERNELS`` (environment, read on every call) names the backend wanted; the registry
(``kernels.registry``) says whether it implements the message's spec (code, grouping, widths,
scale format, rounding), and where it does not, lowbit's torch reference runs (the definition):

=============  ====================================================================================
``auto``       default. CUDA: the Triton kernels (``kernels.triton_quant``). CPU: the numba kernels
               (``kernels.native_cpu``) at every size: they take less CPU time than both torch
               paths (the reference and the torch.compile path, since removed) at every size
               measured (docs/kernels.md, "kernels-native-summary").
``triton``     Triton kernels; an error off CUDA.
``interpret``  Triton kernels under the Triton interpreter on CPU tensors (tests). Sets
               ``TRITON_INTERPRET=1`` for the rest of the process (``import_interpreted``);
               an error if they were already imported compiled in this process.
``native``     ``kernels.native_cpu`` (numba, CPU tensors); an error off CPU.
``reference``  ``kernels.reference``: lowbit's own torch path behind the kernels' checks.
=============  ====================================================================================

Nothing switches silently. In ``auto`` a native kernel that fails on good input (numba missing,
or unable to compile for this CPU) is an error when ``LOWBIT_KERNELS_STRICT`` is set (the test
suite sets it: ``tests/conftest.py``); otherwise the call runs the reference, the process keeps
the reference from then on, a warning says why, and a ``Codec`` reports the path each call took,
so a communicator records it per site and emits an event when a site's path changes
(``lowbit.comm.collectives``; the job layer writes it to the run's events, the Runs page shows it).

Every path returns the same bytes (payloads) and values (sums) as the reference, raises the
same TypeError / ValueError for bad input (checked before any kernel runs), and returns an
empty payload / a [0, H] sum for zero tokens.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings

import torch

from kernels import reference as ref
from kernels import registry
from lowbit.quant import input_counts
from lowbit.rotation import rotate, unrotate
from lowbit.scheme import QuantSpec

BACKENDS = ("auto", "triton", "interpret", "native", "reference")
ENV = "LOWBIT_KERNELS"
STRICT_ENV = "LOWBIT_KERNELS_STRICT"  # set: a native kernel's failure in auto mode raises instead of falling back
REFERENCE = "reference"
# A Codec's backend while one of its calls runs in this thread (else LOWBIT_KERNELS). Per thread:
# the threaded test ranks call one Codec at the same time.
_forced = threading.local()
_native_broken: str | None = None  # why kernels.native_cpu failed in this process, once it has


class KernelFailure(RuntimeError):
    """A native kernel failed on good input while ``LOWBIT_KERNELS_STRICT`` forbids falling back."""


def mode() -> str:
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r} not allowed; allowed: {', '.join(BACKENDS)}")
    return value


def strict() -> bool:
    """Must a native kernel's failure in ``auto`` mode raise (``LOWBIT_KERNELS_STRICT``)?"""
    return os.environ.get(STRICT_ENV, "").strip() not in ("", "0")


def wanted(device: torch.device | str) -> str:
    """The backend the mode asks for on ``device`` (before asking whether it implements a spec)."""
    device = torch.device(device)
    chosen = mode()
    if chosen == "auto":
        if device.type == "cuda":
            return "triton"
        return "native" if native_available() else REFERENCE
    if chosen == "triton" and device.type != "cuda":
        raise ValueError(f"{ENV}=triton needs CUDA tensors, got {device.type}; use interpret on CPU")
    if chosen == "interpret" and device.type != "cpu":
        raise ValueError(f"{ENV}=interpret runs the Triton interpreter on CPU tensors, got {device.type}")
    if chosen == "native" and device.type != "cpu":
        raise ValueError(f"{ENV}=native runs on CPU tensors, got {device.type}")
    return chosen


def backend(device: torch.device | str, quant: QuantSpec, *more: QuantSpec) -> str:
    """The implementation that runs ``quant`` (and every spec of ``more``, e.g. a two-shot second
    leg) on ``device``: the wanted backend when the registry says it implements them all, else the
    reference."""
    which = wanted(device)
    if all(registry.implementation(q, which) is not None for q in (quant, *more)):
        return which
    return REFERENCE


def native_available() -> bool:
    """Does ``kernels.native_cpu`` import (numba installed)? Tried once; a failure is a
    ``KernelFailure`` under ``LOWBIT_KERNELS_STRICT``, else one warning and the reference from then on."""
    if _native_broken is not None:
        return False
    try:
        importlib.import_module("kernels.native_cpu")
        return True
    except ImportError as exc:
        _native_failed(exc, "do not import")
        return False


def native_failure() -> str | None:
    """Why the native kernels stopped running in this process (None: they did not)."""
    return _native_broken


def _native_failed(exc: Exception, what: str = "failed") -> None:
    global _native_broken
    reason = f"{type(exc).__name__}: {exc}"
    if strict():
        raise KernelFailure(f"kernels: the numba CPU kernels {what} here ({reason[:300]}); {STRICT_ENV} is set, "
                            "so auto does not fall back to the reference") from exc
    _native_broken = reason
    warnings.warn(f"kernels: the numba CPU kernels {what} here ({reason[:300]}); auto runs the torch reference "
                  "from now on (each call reports the path it took)", RuntimeWarning, stacklevel=4)


def triton_module(interpret: bool):
    """The Triton kernel module, interpreted (``import_interpreted``) or compiled for the GPU; the
    compiled one refuses a module this process already imported interpreted (Triton reads
    ``TRITON_INTERPRET`` at import). The GPU checks (bench.gpu_check_*) take the compiled one."""
    if interpret:
        return import_interpreted()
    module = importlib.import_module(_TRITON_MODULE)
    if _is_interpreted(module):
        raise RuntimeError(f"{_TRITON_MODULE} was imported with TRITON_INTERPRET=1 in this process (Triton reads "
                           f"it at import); start a new process without it for {ENV}=triton")
    return module


_TRITON_MODULE = "kernels.triton_quant"


def _is_interpreted(module) -> bool:
    """Were the module's Triton kernels decorated under the interpreter?"""
    kinds = {type(v).__name__ for v in vars(module).values()}
    return "InterpretedFunction" in kinds and "JITFunction" not in kinds


def import_interpreted(name: str = _TRITON_MODULE, reload: bool = False):
    """The Triton kernel module ``name`` (``kernels.triton_quant``, ``kernels.hadamard``) with its
    kernels interpreted: the one place that sets ``TRITON_INTERPRET``. Triton reads it when a
    kernel is decorated and again while it runs (its lazily imported helpers assert it), so it
    stays set: from here on this process runs Triton kernels in the interpreter. A module
    already imported compiled is an error, or with ``reload`` imported again (tests only: old
    references keep the old kernels)."""
    module = sys.modules.get(name)
    if module is not None and _is_interpreted(module):
        return module
    if module is not None and not reload:
        raise RuntimeError(f"{name} was already imported compiled in this process (Triton reads "
                           f"TRITON_INTERPRET at import); run {ENV}=interpret in a new process")
    os.environ["TRITON_INTERPRET"] = "1"
    return importlib.reload(module) if module is not None else importlib.import_module(name)


def _module(which: str):
    if which in ("triton", "interpret"):
        return triton_module(which == "interpret")
    return importlib.import_module(registry.module(which))


def _run(name: str, which: str, args, kwargs):
    """(result, the backend that ran): ``name`` of ``which``; a native failure in ``auto`` falls
    back to the reference (or raises under ``LOWBIT_KERNELS_STRICT``)."""
    module = _module(which)
    if which != "native" or mode() != "auto":
        return getattr(module, name)(*args, **kwargs), which
    try:
        return getattr(module, name)(*args, **kwargs), which
    except (TypeError, ValueError):
        raise  # bad input: the reference's errors, raised before any kernel runs
    except Exception as exc:  # noqa: BLE001 - numba cannot compile for this CPU, a broken install: recorded
        _native_failed(exc)
        return getattr(ref, name)(*args, **kwargs), REFERENCE


def _quantize_pack(x, quant, outlier_idx=None, static_min=None, static_max=None):
    ref.check_input(x, quant)
    return _run("quantize_pack", backend(x.device, quant), (x, quant, outlier_idx, static_min, static_max), {})


def quantize_pack(x: torch.Tensor, quant: QuantSpec, outlier_idx=None, static_min=None,
                  static_max=None) -> torch.Tensor:
    """One rank's payload (uint8, ``lowbit.wire.payload`` layout) of its partial sum x [T, H].

    ``outlier_idx``: features sent in BF16 (same on every rank); ``static_min``/``static_max``
    [H]: this rank's calibrated range (static granularity only)."""
    return _quantize_pack(x, quant, outlier_idx, static_min, static_max)[0]


def _quantize_pack_counts(x, quant, outlier_idx=None, static_min=None, static_max=None):
    ref.check_input(x, quant)
    which = backend(x.device, quant)
    args = (x, quant, outlier_idx, static_min, static_max)
    if registry.implementation(quant, which).counts:  # it counts in its own pass over x
        (payload, counts), ran = _run("quantize_pack_counts", which, args, {})
        return payload, counts, ran
    payload, ran = _run("quantize_pack", which, args, {})
    idx = None if outlier_idx is None else torch.as_tensor(outlier_idx).reshape(-1).to(x.device)
    counts = input_counts(x, quant, static_min, static_max, idx)
    return payload, {"clamped": counts["clamped"], "nonfinite": int((~torch.isfinite(x)).sum())}, ran


def quantize_pack_counts(x: torch.Tensor, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None):
    """(payload, {"clamped", "nonfinite"}): ``quantize_pack`` plus the counts a communicator records
    (``lowbit.quant.input_counts``' clamped, excluding the outlier features; nonfinite over all of
    x). The native kernels count in their own pass over x; the other paths count with lowbit."""
    payload, counts, _ = _quantize_pack_counts(x, quant, outlier_idx, static_min, static_max)
    return payload, counts


def _unpack_dequant_sum(payloads, tokens, hidden, quant, outlier_idx=None, static_mins=None, static_maxs=None,
                        out_dtype=torch.float32, out=None):
    _check_payloads(payloads)
    _check_spec(quant)
    ref.check_out(out, tokens, hidden, out_dtype, payloads.device)
    which = backend(payloads.device, quant)
    args = (payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs)
    if out is not None and _has_owner_step(quant, which):  # it writes into ``out`` itself
        return _run("unpack_dequant_sum", which, args, {"out_dtype": out_dtype, "out": out})
    result, ran = _run("unpack_dequant_sum", which, args, {"out_dtype": out_dtype})
    return (result if out is None else out.copy_(result)), ran


def unpack_dequant_sum(payloads: torch.Tensor, tokens: int, hidden: int, quant: QuantSpec, outlier_idx=None,
                       static_mins=None, static_maxs=None, out_dtype: torch.dtype = torch.float32,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """The sum [T, H] (``out_dtype``) of every rank's dequantized payload, in fp32 and rank order.

    ``payloads`` [tp, nbytes] uint8 (the all-gather result); ``static_mins``/``maxs`` [tp, H]:
    each sender's calibrated range (static granularity only); ``out``: a [T, H] ``out_dtype``
    tensor to write the sum to (a column slice of a wider output is fine), returned."""
    return _unpack_dequant_sum(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs, out_dtype,
                               out)[0]


def _has_owner_step(quant, which: str) -> bool:
    impl = registry.implementation(quant, which)  # None: a code no kernel has (the reference's check refuses it)
    return impl is not None and impl.owner_step


def _owner_step(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs, second, second_min=None,
                second_max=None):
    """((leg-2 payload, its {"clamped", "nonfinite"}), the backend that ran): one backend runs both
    legs (one that implements both specs, else the reference); in one pass where the registry says
    it has the fused owner step, else its sum and then its requantization."""
    _check_payloads(payloads)
    _check_spec(quant)
    ref.check_second(second, second_min, second_max)
    which = backend(payloads.device, quant, second)
    args = (payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs, second, second_min, second_max)
    if _has_owner_step(quant, which):
        return _run("unpack_dequant_sum_requant_counts", which, args, {})
    reduced, ran = _run("unpack_dequant_sum", which, args[:7], {})
    payload, counts, ran2 = _quantize_pack_counts(reduced, second, outlier_idx, second_min, second_max)
    return (payload, counts), ran if ran == ran2 else f"{ran}+{ran2}"


def unpack_dequant_sum_requant_counts(payloads: torch.Tensor, tokens: int, hidden: int, quant: QuantSpec,
                                      outlier_idx, static_mins, static_maxs, second: QuantSpec, second_min=None,
                                      second_max=None):
    """The two-shot owner step: sum the leg-1 payloads of this rank's chunk [T, H] in fp32, requantize
    the sum with ``second`` (dynamic, or static with the reduced sum's calibrated range
    ``second_min`` / ``second_max`` [H]) and the same outlier features. Returns (the leg-2 payload,
    {"clamped", "nonfinite"} of the sum, as ``quantize_pack_counts`` counts them)."""
    return _owner_step(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs, second, second_min,
                       second_max)[0]


def unpack_dequant_sum_requant(payloads: torch.Tensor, tokens: int, hidden: int, quant: QuantSpec, outlier_idx,
                               static_mins, static_maxs, second: QuantSpec, second_min=None,
                               second_max=None) -> torch.Tensor:
    """``unpack_dequant_sum_requant_counts``' leg-2 payload."""
    return unpack_dequant_sum_requant_counts(payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs,
                                             second, second_min, second_max)[0]


def _check_spec(quant) -> None:
    if not isinstance(quant, QuantSpec):
        raise TypeError(f"quant must be a QuantSpec, got {type(quant).__name__}")


def _check_payloads(payloads) -> None:
    if not isinstance(payloads, torch.Tensor) or payloads.dtype != torch.uint8 or payloads.dim() != 2:
        got = f"{payloads.dtype} {tuple(payloads.shape)}" if isinstance(payloads, torch.Tensor) else type(payloads).__name__
        raise TypeError(f"payloads must be a uint8 tensor [tp, nbytes] (one payload per rank), got {got}")


def block_hadamard(x: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
    """The block Walsh-Hadamard rotation: the Triton kernel (``kernels.hadamard``) where the wanted
    backend has one (``registry.ROTATIONS``: CUDA, or ``interpret``), lowbit's torch reference
    elsewhere. Communicators given a ``Codec`` rotate through it."""
    which = wanted(x.device)
    if which in registry.ROTATIONS:
        name = registry.ROTATIONS[which]
        module = import_interpreted(name) if which == "interpret" else importlib.import_module(name)
        return module.block_hadamard(x, block, inverse)
    return unrotate(x, block) if inverse else rotate(x, block)


class Codec:
    """The kernels as a communicator's codec (``lowbit.comm.collectives.Codec``): ``path`` says which
    implementation a message would take, ``encode`` / ``decode_sum`` run it and say which one did.

    ``Codec()`` follows ``LOWBIT_KERNELS``; ``Codec("reference")`` etc. force one backend (the
    benchmarks compare backends in one process) and also offer the module's entry points under
    that backend (``Codec("native").quantize_pack(...)``)."""

    def __init__(self, backend_name: str | None = None):
        if backend_name is not None and backend_name not in BACKENDS:
            raise ValueError(f"codec: {backend_name!r} not allowed; allowed: {', '.join(BACKENDS)}")
        self.name = backend_name
        self.__name__ = "kernels.dispatch" if backend_name is None else f"kernels.dispatch[{backend_name}]"

    def _forced(self, fn, *args, **kwargs):
        if self.name is None:
            return fn(*args, **kwargs)
        previous = getattr(_forced, "name", None)
        _forced.name = self.name
        try:
            return fn(*args, **kwargs)
        finally:
            _forced.name = previous

    # -- the communicator's protocol -------------------------------------------------------------
    def path(self, quant: QuantSpec, device) -> str:
        """The implementation a message quantized with ``quant`` would take (``reference``: none
        of the kernels implements it; the communicator then runs lowbit's own path)."""
        return self._forced(backend, device, quant)

    def encode(self, x, quant, outlier_idx, static_min, static_max):
        """(payload, {"clamped", "nonfinite"}, the backend that ran)."""
        return self._forced(_quantize_pack_counts, x, quant, outlier_idx, static_min, static_max)

    def decode_sum(self, payloads, tokens, width, quant, outlier_idx, static_mins, static_maxs, out=None):
        """(the fp32 rank-order sum, written to ``out`` when given, the backend that ran)."""
        return self._forced(_unpack_dequant_sum, payloads, tokens, width, quant, outlier_idx, static_mins,
                            static_maxs, torch.float32, out)

    def owner_step(self, payloads, tokens, width, quant, outlier_idx, static_mins, static_maxs, second, second_min,
                   second_max):
        """(leg-2 payload, its {"clamped", "nonfinite"}, the backend that ran): the two-shot owner step."""
        (payload, counts), ran = self._forced(_owner_step, payloads, tokens, width, quant, outlier_idx, static_mins,
                                              static_maxs, second, second_min, second_max)
        return payload, counts, ran

    def rotate(self, x: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
        return self._forced(block_hadamard, x, block, inverse)

    def failure(self) -> str | None:
        """Why the native kernels stopped running in this process (None: they did not)."""
        return native_failure()

    # -- the entry points under this codec's backend (benchmarks) --------------------------------
    def quantize_pack(self, *args, **kwargs):
        return self._forced(quantize_pack, *args, **kwargs)

    def quantize_pack_counts(self, *args, **kwargs):
        return self._forced(quantize_pack_counts, *args, **kwargs)

    def unpack_dequant_sum(self, *args, **kwargs):
        return self._forced(unpack_dequant_sum, *args, **kwargs)

    def unpack_dequant_sum_requant(self, *args, **kwargs):
        return self._forced(unpack_dequant_sum_requant, *args, **kwargs)

    def unpack_dequant_sum_requant_counts(self, *args, **kwargs):
        return self._forced(unpack_dequant_sum_requant_counts, *args, **kwargs)

    def block_hadamard(self, *args, **kwargs):
        return self._forced(block_hadamard, *args, **kwargs)
