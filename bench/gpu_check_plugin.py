"""pytest plugin of ``bench.gpu_check``'s ``kernels_equal`` step: run the kernel tests' own cases
on CUDA, and write the outcome of every test to ``$LOWBIT_GPU_CHECK_PYTEST_JSON``.

    LOWBIT_GPU_CHECK_DEVICE=cuda python3 -m pytest tests/test_kernels.py -p bench.gpu_check_plugin

tests/test_kernels.py builds its inputs on the CPU and takes the Triton kernels from
``kernels.dispatch.import_interpreted()`` at import. With ``LOWBIT_GPU_CHECK_DEVICE=cuda`` this
plugin (loaded before the test modules are collected) makes that call return the *compiled*
kernels wrapped so every tensor argument moves to the GPU and every result comes back, and
wraps the ``kernels.reference`` entry points the same way: each test then compares the CUDA
kernels with the reference computed on the same GPU, byte for byte, on the tests' unchanged
cases (odd shapes, outliers, NaN / Inf / near-fp32-max, zero rows, strided input, bad input).
tests/test_rotation_kernel.py needs nothing: it runs on CUDA by itself when a GPU is there.
On the CPU the plugin only records the outcomes (the tests run the interpreter as usual).
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch

DEVICE = os.environ.get("LOWBIT_GPU_CHECK_DEVICE", "cpu")
_REFERENCE_ENTRY_POINTS = ("quantize_pack_ref", "unpack_dequant_sum_ref", "unpack_dequant_sum_requant_ref")
_outcomes: list[dict] = []
_start = time.perf_counter()


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(v.to(device) for v in value)
    return value


def on_device(fn, device: str = "cuda"):
    """``fn`` with its tensor arguments on ``device`` and its tensor result back on the CPU."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*[_to(a, device) for a in args], **{k: _to(v, device) for k, v in kwargs.items()})
        return out.cpu() if isinstance(out, torch.Tensor) else out
    wrapped.on_device = device
    return wrapped


class CudaKernels:
    """``kernels.triton_quant``'s API, compiled, on CUDA copies of the arguments."""

    def __init__(self, module):
        self.module = module
        self.quantize_pack = on_device(module.quantize_pack)
        self.unpack_dequant_sum = on_device(module.unpack_dequant_sum)
        self.unpack_dequant_sum_requant = on_device(module.unpack_dequant_sum_requant)

    def __getattr__(self, name):
        return getattr(self.module, name)


def install_cuda_kernels() -> None:
    from kernels import dispatch
    from kernels import reference as ref
    compiled = CudaKernels(dispatch.triton_module(interpret=False))
    dispatch.import_interpreted = lambda: compiled
    for name in _REFERENCE_ENTRY_POINTS:
        setattr(ref, name, on_device(getattr(ref, name)))


def pytest_configure(config):
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("LOWBIT_GPU_CHECK_DEVICE=cuda but torch sees no CUDA device")
        install_cuda_kernels()


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        entry = dict(nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                     seconds=round(report.duration, 4))
        if report.outcome == "failed":
            entry["message"] = str(report.longrepr)[-1500:]
        _outcomes.append(entry)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LOWBIT_GPU_CHECK_PYTEST_JSON")
    if not path or hasattr(session.config, "workerinput"):
        return
    calls = [o for o in _outcomes if o["when"] == "call"]
    counts = {k: sum(1 for o in calls if o["outcome"] == k) for k in ("passed", "failed", "skipped")}
    errors = [o for o in _outcomes if o["when"] != "call" and o["outcome"] == "failed"]
    skipped_setup = sum(1 for o in _outcomes if o["when"] != "call" and o["outcome"] == "skipped")
    Path(path).write_text(json.dumps(dict(
        device=DEVICE, exitstatus=int(exitstatus), collected=session.testscollected, **counts,
        skipped_at_setup=skipped_setup, errors=len(errors), seconds=round(time.perf_counter() - _start, 3),
        failures=[o for o in _outcomes if o["outcome"] == "failed"][:30]), indent=1))
