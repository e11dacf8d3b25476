"""One entry point per kernel; picks the implementation for the device and bit width.

    PYTHONPATH=. python -c "import torch; from kernels import dispatch; from lowbit.scheme import QuantSpec; \\
        print(dispatch.backend(torch.device('cpu'), 4), dispatch.quantize_pack(torch.randn(3, 64), QuantSpec(4, True, 'token')).shape)"

``LOWBIT_KERNELS`` (environment, read on every call):

=============  ====================================================================================
``auto``       default. CUDA: Triton kernels (``kernels.triton_quant``) for 2/4/8-bit codes, the
               eager torch reference for 3/5/6-bit codes. CPU: the numba kernels
               (``kernels.native_cpu``) for every size and width: they take less CPU time than
               both torch paths at every size measured (docs/kernels.md, "kernels-native-summary",
               with the one small op where the reference is ahead: host-side checks dominate
               both, not worth a size rule). Where numba does not import (one warning), the
               previous rule: the compiled torch path (``kernels.fused_cpu``) for messages of at
               least ``FUSED_MIN_VALUES`` values, the eager reference below that (a compiled call
               costs more fixed overhead than the eager ops save on small messages:
               docs/history.md, "kernels-cpu"), and the eager reference for good where
               torch.compile cannot run (one warning).
``triton``     Triton kernels; an error off CUDA. 3/5/6 bits still go to the torch path.
``interpret``  Triton kernels under the Triton interpreter on CPU tensors (tests). Sets
               ``TRITON_INTERPRET=1`` for the rest of the process (``import_interpreted``);
               an error if they were already imported compiled in this process.
``compiled``   ``kernels.fused_cpu`` (any device torch.compile supports).
``native``     ``kernels.native_cpu`` (numba, CPU tensors, every width); an error off CPU.
``reference``  ``kernels.reference``, eager torch.
=============  ====================================================================================

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
from lowbit.rotation import rotate, unrotate
from lowbit.scheme import QuantSpec

BACKENDS = ("auto", "triton", "interpret", "compiled", "reference", "native")
FUSED_MIN_VALUES = 1 << 16  # tokens x hidden; see the table above
ENV = "LOWBIT_KERNELS"
_compile_broken: str | None = None  # why torch.compile failed here, once it has
# A Codec's backend while one of its calls runs in this thread (else LOWBIT_KERNELS). Per thread:
# the threaded test ranks call one Codec at the same time.
_forced = threading.local()
_native_broken: str | None = None  # why kernels.native_cpu (numba) did not import here, once it has


def mode() -> str:
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r} not allowed; allowed: {', '.join(BACKENDS)}")
    return value


def backend(device: torch.device | str, bits: int, values: int | None = None) -> str:
    """The implementation that runs for a message of ``values`` (tokens x hidden; None: a large
    one) on ``device`` with ``bits``-bit codes: ``triton``, ``interpret``, ``compiled``,
    ``native`` or ``reference``."""
    device = torch.device(device)
    chosen = mode()
    triton_bits = bits in ref.WHOLE_BYTE_BITS
    if chosen == "auto":
        if device.type == "cuda":
            return "triton" if triton_bits else "reference"
        if native_available():
            return "native"
        small = values is not None and values < FUSED_MIN_VALUES
        return "reference" if _compile_broken or small else "compiled"
    if chosen == "triton":
        if device.type != "cuda":
            raise ValueError(f"{ENV}=triton needs CUDA tensors, got {device.type}; use interpret on CPU")
        return "triton" if triton_bits else "reference"
    if chosen == "interpret":
        if device.type != "cpu":
            raise ValueError(f"{ENV}=interpret runs the Triton interpreter on CPU tensors, got {device.type}")
        return "interpret" if triton_bits else "reference"
    if chosen == "native" and device.type != "cpu":
        raise ValueError(f"{ENV}=native runs on CPU tensors, got {device.type}")
    return chosen


def native_available() -> bool:
    """Does ``kernels.native_cpu`` import (numba installed)? Tried once; a failure warns once and
    ``auto`` keeps the torch paths from then on."""
    global _native_broken
    if _native_broken is not None:
        return False
    try:
        importlib.import_module("kernels.native_cpu")
        return True
    except ImportError as exc:
        _native_broken = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"kernels: the numba CPU kernels do not import here ({_native_broken[:300]}); "
                      "using the torch paths (pip install numba)", RuntimeWarning, stacklevel=3)
        return False


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


def _module(device, bits: int, values: int | None):
    which = backend(device, bits, values)
    if which in ("triton", "interpret"):
        return which, triton_module(which == "interpret")
    if which == "compiled":
        from kernels import fused_cpu
        return which, fused_cpu
    if which == "native":
        return which, importlib.import_module("kernels.native_cpu")
    return which, None


def _native_failed(exc: Exception) -> None:
    """A native kernel failed on good input (numba cannot compile for this CPU, a broken install):
    ``auto`` takes the torch rule from now on, with one warning."""
    global _native_broken
    _native_broken = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"kernels: the numba CPU kernels failed here ({_native_broken[:300]}); "
                  "using the torch paths from now on", RuntimeWarning, stacklevel=4)


def _run(name: str, device, bits: int, values: int, args, kwargs):
    global _compile_broken
    which, module = _module(device, bits, values)
    if module is None:
        return getattr(ref, f"{name}_ref")(*args, **kwargs)
    if which == "native" and mode() == "auto":
        try:
            return getattr(module, name)(*args, **kwargs)
        except (TypeError, ValueError):
            raise  # bad input: the reference's errors, raised before any kernel runs
        except Exception as exc:
            _native_failed(exc)
            return _run(name, device, bits, values, args, kwargs)
    if which != "compiled" or mode() == "compiled":
        return getattr(module, name)(*args, **kwargs)
    try:
        return getattr(module, name)(*args, **kwargs)
    except (TypeError, ValueError):
        raise  # bad input: the same errors as the reference, raised before compiling
    except Exception as exc:  # no C++ compiler, an inductor bug: keep running, eagerly
        _compile_broken = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"kernels: torch.compile failed here ({_compile_broken[:300]}); "
                      "using the eager torch reference from now on", RuntimeWarning, stacklevel=3)
        return getattr(ref, f"{name}_ref")(*args, **kwargs)


def quantize_pack(x: torch.Tensor, quant: QuantSpec, outlier_idx=None, static_min=None,
                  static_max=None) -> torch.Tensor:
    """One rank's payload (uint8, ``lowbit.wire.payload`` layout) of its partial sum x [T, H].

    ``outlier_idx``: features sent in BF16 (same on every rank); ``static_min``/``static_max``
    [H]: this rank's calibrated range (static granularity only)."""
    ref.check_input(x, quant)
    return _run("quantize_pack", x.device, quant.bits, x.numel(), (x, quant, outlier_idx, static_min, static_max), {})


def quantize_pack_counts(x: torch.Tensor, quant: QuantSpec, outlier_idx=None, static_min=None, static_max=None):
    """(payload, {"clamped", "nonfinite"}): ``quantize_pack`` plus the counts a communicator records
    (``lowbit.quant.input_counts``' clamped, excluding the outlier features; nonfinite over all of
    x). The native kernels count in their own pass over x; the torch paths count with lowbit."""
    ref.check_input(x, quant)
    if backend(x.device, quant.bits, x.numel()) == "native":
        try:
            return importlib.import_module("kernels.native_cpu").quantize_pack_counts(x, quant, outlier_idx,
                                                                                     static_min, static_max)
        except (TypeError, ValueError):
            raise
        except Exception as exc:
            if mode() != "auto":
                raise
            _native_failed(exc)
    from lowbit.quant import input_counts
    payload = quantize_pack(x, quant, outlier_idx, static_min, static_max)
    idx = None if outlier_idx is None else torch.as_tensor(outlier_idx).reshape(-1).to(x.device)
    counts = input_counts(x, quant, static_min, static_max, idx)
    return payload, {"clamped": counts["clamped"], "nonfinite": int((~torch.isfinite(x)).sum())}


def unpack_dequant_sum(payloads: torch.Tensor, tokens: int, hidden: int, quant: QuantSpec, outlier_idx=None,
                       static_mins=None, static_maxs=None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sum [T, H] (``out_dtype``) of every rank's dequantized payload, in fp32 and rank order.

    ``payloads`` [tp, nbytes] uint8 (the all-gather result); ``static_mins``/``maxs`` [tp, H]:
    each sender's calibrated range (static granularity only)."""
    _check_payloads(payloads)
    bits = quant.bits if isinstance(quant, QuantSpec) else 8
    return _run("unpack_dequant_sum", payloads.device, bits, _values(tokens, hidden),
                (payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs), {"out_dtype": out_dtype})


def unpack_dequant_sum_requant(payloads: torch.Tensor, tokens: int, hidden: int, quant: QuantSpec, outlier_idx,
                               static_mins, static_maxs, second: QuantSpec) -> torch.Tensor:
    """Two-shot: sum the leg-1 payloads of this rank's chunk [T, H], requantize the fp32 sum with
    the dynamic ``second`` spec and the same outlier features; returns the leg-2 payload."""
    _check_payloads(payloads)
    ref.check_second(second)
    whole = isinstance(quant, QuantSpec) and {quant.bits, second.bits} <= set(ref.WHOLE_BYTE_BITS)
    bits = quant.bits if whole else 3  # either leg straddles bytes: the torch path for both
    return _run("unpack_dequant_sum_requant", payloads.device, bits, _values(tokens, hidden),
                (payloads, tokens, hidden, quant, outlier_idx, static_mins, static_maxs, second), {})


def _values(tokens, hidden) -> int | None:
    return tokens * hidden if isinstance(tokens, int) and isinstance(hidden, int) else None


def _check_payloads(payloads) -> None:
    if not isinstance(payloads, torch.Tensor) or payloads.dtype != torch.uint8 or payloads.dim() != 2:
        got = f"{payloads.dtype} {tuple(payloads.shape)}" if isinstance(payloads, torch.Tensor) else type(payloads).__name__
        raise TypeError(f"payloads must be a uint8 tensor [tp, nbytes] (one payload per rank), got {got}")


def block_hadamard(x: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
    """The block Walsh-Hadamard rotation, chosen like the codes: the Triton kernel
    (``kernels.hadamard``) on CUDA or under ``interpret``, lowbit's torch reference elsewhere (the
    compiled CPU path has no rotation of its own). Communicators given this module as their codec
    rotate through it."""
    if backend(x.device, 8) in ("triton", "interpret"):
        module = import_interpreted("kernels.hadamard") if mode() == "interpret" else \
            importlib.import_module("kernels.hadamard")
        return module.block_hadamard(x, block, inverse)
    return unrotate(x, block) if inverse else rotate(x, block)


def compile_works() -> bool:
    """Can the compiled CPU path run here (``kernels.fused_cpu`` imports and torch.compile has
    not failed in this process)?"""
    if _compile_broken is not None:
        return False
    try:
        from kernels import fused_cpu  # noqa: F401 - torch.compile machinery: imported only when asked
    except ImportError:
        return False
    return True


class Codec:
    """This dispatcher with one backend forced, as a codec object for ``QuantCommunicator`` (the
    benchmarks compare backends in one process): ``Codec("reference").quantize_pack(...)``."""

    def __init__(self, backend_name: str):
        if backend_name not in BACKENDS:
            raise ValueError(f"codec: {backend_name!r} not allowed; allowed: {', '.join(BACKENDS)}")
        self.name = backend_name
        self.__name__ = f"kernels.dispatch[{backend_name}]"

    def _forced(self, fn, *args, **kwargs):
        previous = getattr(_forced, "name", None)
        _forced.name = self.name
        try:
            return fn(*args, **kwargs)
        finally:
            _forced.name = previous

    def quantize_pack(self, *args, **kwargs):
        return self._forced(quantize_pack, *args, **kwargs)

    def quantize_pack_counts(self, *args, **kwargs):
        return self._forced(quantize_pack_counts, *args, **kwargs)

    def unpack_dequant_sum(self, *args, **kwargs):
        return self._forced(unpack_dequant_sum, *args, **kwargs)

    def unpack_dequant_sum_requant(self, *args, **kwargs):
        return self._forced(unpack_dequant_sum_requant, *args, **kwargs)

    def block_hadamard(self, *args, **kwargs):
        return self._forced(block_hadamard, *args, **kwargs)
