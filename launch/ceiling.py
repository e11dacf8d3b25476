"""The class ceiling: the most one job may ask of the machine when a class shares it.

    from launch.ceiling import ceiling_problems, class_spec
    spec = class_spec(spec_dict)     # a spec that names no time limit gets the class's (the demo's)
    ceiling_problems(spec)           # [(field, message)] for every field over the ceiling; [] if it fits

Why a ceiling and not a fair queue: the queue runs one job at a time (a CPU job already uses
every core), and a fair order of the waiting jobs cannot shorten the one that is running. A spec
may ask for 10,000,000 tokens and a 3600 s limit, so one user's job can hold the machine for an
hour whatever the order. The ceiling bounds every job a class viewer starts to the classroom
demo's own budget (``launch.presets.demo_spec``: its time limit, its token counts, a few task
items), so a wait is at most the jobs ahead times that budget; the app adds one active job per
viewer (pages/_access.py) so nobody fills the queue. A value over the ceiling is refused with its
field named, never lowered.
"""
from __future__ import annotations

from launch.presets import demo_spec
from launch.spec import JobSpec

_DEMO = demo_spec()
# field -> the largest value a viewer's job may ask for
CEILING = {
    "time_limit_s": float(_DEMO["time_limit_s"]),   # the demo's own limit
    "calib_tokens": 4096,                            # 2x the demo's calibration
    "eval_tokens": 4096,                             # 4x the demo's evaluation text
    "items_per_task": 50,                            # the spec's default item count
    "max_new_tokens": 256,
    "tp": 4,                                         # the embedded models' largest demo-sized TP
}


def class_spec(spec: dict) -> dict:
    """``spec`` with the class's time limit when it names none: JobSpec's default (3600 s) is
    meant for one user's laptop. A time limit the spec does name is kept (and checked)."""
    return spec if "time_limit_s" in spec else dict(spec, time_limit_s=CEILING["time_limit_s"])


def ceiling_problems(spec: dict) -> list[tuple[str, str]]:
    """(field, message) for every field of ``spec`` above ``CEILING``; fields the spec leaves out
    count at ``JobSpec``'s defaults."""
    problems = []
    for name, most in CEILING.items():
        value = spec.get(name, getattr(JobSpec, name))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > most:
            problems.append((name, f"at most {_number(most)} for a job started by a class viewer (the class "
                                   f"ceiling), got {_number(value)}; the teacher's browser can start larger ones"))
    return problems


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"
