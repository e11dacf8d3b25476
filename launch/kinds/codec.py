"""The codec a job runs its communicators with: one parameter, ``params.codec``, in every kind that
has communicators (evaluate, sweep, throughput, collective-bench).

==============  ====================================================================================
``kernels``     ``kernels.dispatch.Codec()``: the registered kernels where they implement a message
                (``LOWBIT_KERNELS`` picks the backend, ``auto`` by default), lowbit's torch path
                elsewhere; every call records the path it took
``reference``   lowbit's own torch path (``lowbit.wire.payload``) for every message
==============  ====================================================================================

Runs stored before the parameter had one name carry ``params.fused_kernels`` (evaluate: a bool)
or the values ``lowbit`` / ``auto`` (throughput, collective-bench); ``codec_name`` reads them as
what they meant. New specs are checked against ``CODECS`` only.

    PYTHONPATH=. python -c "from launch.kinds.codec import codec_name; print(codec_name({'fused_kernels': True}, 'reference'))"
"""
from __future__ import annotations

CODECS = ("kernels", "reference")
_STORED_VALUES = {"lowbit": "reference", "auto": "kernels"}  # the values older runs stored


def check(params: dict) -> list[tuple[str, str]]:
    """Problems of ``params.codec`` (and the old name) in a new spec."""
    problems = []
    if "fused_kernels" in params:
        problems.append(("params.fused_kernels", "renamed; allowed: params.codec = " + " or ".join(CODECS)))
    value = params.get("codec")
    if value is not None and value not in CODECS:
        problems.append(("params.codec", f"{value!r} not allowed; allowed: {', '.join(CODECS)}"))
    return problems


def codec_name(params: dict, default: str) -> str:
    """The codec a (possibly stored) spec's params ask for: ``kernels`` or ``reference``."""
    if "codec" in params:
        return _STORED_VALUES.get(params["codec"], params["codec"])
    if "fused_kernels" in params:
        return "kernels" if params["fused_kernels"] else "reference"
    return default


def make(name: str):
    """(label for results, codec for the communicators) of a codec name."""
    if name == "reference":
        return "lowbit.wire.payload", None
    if name != "kernels":
        raise ValueError(f"codec: {name!r} not allowed; allowed: {', '.join(CODECS)}")
    from kernels import dispatch  # the kernel stack (numba, Triton) loads only when a job asks for it
    codec = dispatch.Codec()
    return codec.__name__, codec
