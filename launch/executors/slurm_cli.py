"""Slurm's own commands, parsed: ``sinfo`` (partitions and nodes), ``squeue`` (live job states
and pending reasons), ``scontrol`` (exit codes), ``sacct`` (jobs slurmctld no longer keeps in
memory, where accounting runs), ``sbatch``, ``scancel`` and ``srun``. Each call is an argument list
with a time-out; which cluster is asked comes from the environment (``$SLURM_CONF``), as for any
Slurm command.

    partitions()                 # [Partition(name="debug", default=True, nodes=2, idle=2, gpus_per_node=0, ...)]
    job_states()                 # {"12": [JobState(job_id="12_0", state="RUNNING", ...), ...]} (this user's jobs)
    exit_codes("12")             # {"12_0": (0, 0), "12_1": (3, 0)}  (exit code, signal)
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass

COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
COMMAND_TIMEOUT_S = 30.0
# Slurm job states: still waiting, started (possibly finishing), and ended.
WAITING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
ENDED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"})
_SQUEUE_FORMAT = "%i|%F|%K|%T|%r|%N|%S|%e"


class SlurmError(RuntimeError):
    """A Slurm command that failed; the message is its own error text."""


def missing() -> str | None:
    """Which Slurm client commands are not on PATH here (None: all are)."""
    absent = [c for c in COMMANDS if shutil.which(c) is None]
    return f"Slurm's commands are not installed here (missing: {', '.join(absent)})" if absent else None


def run(args: list[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """stdout of a Slurm command; SlurmError with its stderr when it fails or hangs."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]}: not installed") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]}: no answer within {timeout_s:g} s (is slurmctld running?)") from None
    if done.returncode != 0:
        text = " ".join((done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").split("\n"))
        raise SlurmError(f"{args[0]}: {text}")
    return done.stdout


# -- time -------------------------------------------------------------------------------------
def limit_seconds(text: str) -> float | None:
    """A Slurm time limit ("infinite", "30:00", "1:00:00", "2-00:00:00", "45") in seconds (None: none)."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "NONE", "", "N/A"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if len(parts) == 1:
        seconds = parts[0] * 60.0  # a bare number is minutes
    else:
        seconds = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    return seconds + (int(days) * 86400 if days else 0)


def minutes(seconds: float) -> str:
    """``--time`` in whole minutes (the spec refuses limits that are not)."""
    return str(int(seconds // 60))


def _timestamp(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None  # N/A, Unknown, NONE


# -- partitions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    available: str          # up, down, drain, inactive
    nodes: int
    allocated: int
    idle: int
    other: int              # down, drained, ... nodes
    cpus_per_node: int      # the largest node's
    gpus_per_node: int      # the largest node's
    max_time_s: float | None
    node_list: str


def _gpus(gres: str) -> int:
    """GPUs in a node's gres text, e.g. ``gpu:4``, ``gpu:a100:8(S:0-1)``, ``(null)``."""
    return sum(int(n) for n in re.findall(r"gpu(?::[A-Za-z0-9_.-]+)?:(\d+)", gres))


def partitions(timeout_s: float = COMMAND_TIMEOUT_S) -> list[Partition]:
    """Every partition (``sinfo``), one entry each (node groups of a partition summed)."""
    out: dict[str, dict] = {}
    for line in run(["sinfo", "-h", "-o", "%P|%a|%D|%F|%c|%G|%l|%N"], timeout_s).splitlines():
        fields = line.split("|")
        if len(fields) != 8:
            continue
        name, avail, count, fourway, cpus, gres, limit, nodes = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        a, i, o, _ = (int(x) for x in fourway.split("/"))
        p = out.setdefault(name, dict(name=name, default=default, available=avail, nodes=0, allocated=0, idle=0,
                                      other=0, cpus_per_node=0, gpus_per_node=0,
                                      max_time_s=limit_seconds(limit), node_list=[]))
        p["nodes"] += int(count)
        p["allocated"] += a
        p["idle"] += i
        p["other"] += o
        p["cpus_per_node"] = max(p["cpus_per_node"], int(cpus.rstrip("+")))
        p["gpus_per_node"] = max(p["gpus_per_node"], _gpus(gres))
        p["node_list"].append(nodes)
    return [Partition(**dict(p, node_list=",".join(p["node_list"]))) for p in out.values()]


def node_reasons(node_list: str) -> list[tuple[str, str, str]]:
    """(node, state, reason) of each node of ``node_list`` (e.g. ``n[1-2]``), from ``sinfo -N``."""
    if not node_list:
        return []
    try:
        text = run(["sinfo", "-h", "-N", "-n", node_list, "-o", "%N|%T|%E"])
    except SlurmError:
        return []
    rows = [tuple(line.split("|", 2)) for line in text.splitlines() if line.count("|") >= 2]
    return list(dict.fromkeys(rows))


# -- jobs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobState:
    job_id: str             # "12", or "12_3" for task 3 of array job 12
    base_id: str            # the job id sbatch printed (the array's for a task)
    task: int | None
    state: str              # Slurm's state name, e.g. PENDING, RUNNING, NODE_FAIL
    reason: str             # why it is pending (or how it ended), "None" otherwise
    nodes: str
    start: float | None
    end: float | None


def job_states(timeout_s: float = COMMAND_TIMEOUT_S) -> dict[str, list[JobState]]:
    """This user's jobs slurmctld still knows (active, and ended ones for MinJobAge), grouped by
    the id sbatch printed; every array task on its own."""
    text = run(["squeue", "--me", "--states=all", "--array", "-h", "-o", _SQUEUE_FORMAT], timeout_s)
    out: dict[str, list[JobState]] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) != 8:
            continue
        job_id, base, task, state, reason, nodes, start, end = fields
        base = base if base not in ("", "N/A", "0") else job_id
        out.setdefault(base, []).append(JobState(job_id, base, int(task) if task.isdigit() else None, state,
                                                 reason, nodes, _timestamp(start), _timestamp(end)))
    return out


def _fields(line: str, keys: tuple[str, ...]) -> dict[str, str]:
    return dict(re.findall(rf"(?:^|\s)({'|'.join(keys)})=(\S*)", line))


def exit_codes(base_id: str) -> dict[str, tuple[int, int]]:
    """(exit code, signal) of each job under ``base_id`` that has ended (``scontrol show job``;
    then ``sacct`` for jobs slurmctld has forgotten); {} when neither knows it."""
    codes: dict[str, tuple[int, int]] = {}
    try:
        for line in run(["scontrol", "show", "job", "-o", base_id]).splitlines():
            f = _fields(line, ("JobId", "ArrayJobId", "ArrayTaskId", "ExitCode"))
            if "ExitCode" in f and ":" in f["ExitCode"]:
                name = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if f.get("ArrayTaskId", "").isdigit() else f["JobId"]
                rc, sig = f["ExitCode"].split(":")
                codes[name] = (int(rc), int(sig))
    except SlurmError:
        pass
    if codes:
        return codes
    for row in accounting(base_id):
        codes[row["job_id"]] = row["exit"]
    return codes


def accounting(base_id: str) -> list[dict]:
    """``sacct``'s records of ``base_id`` (job_id, state, exit, nodes); [] where accounting is off."""
    try:
        text = run(["sacct", "-n", "-P", "-X", "-j", base_id, "-o", "JobID,State,ExitCode,NodeList,Start,End"])
    except SlurmError:
        return []
    rows = []
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) != 6 or ":" not in fields[2]:
            continue
        rc, sig = fields[2].split(":")
        rows.append(dict(job_id=fields[0], state=fields[1].split(" ")[0], exit=(int(rc), int(sig)), nodes=fields[3],
                         start=_timestamp(fields[4]), end=_timestamp(fields[5])))
    return rows


def job_by_name(name: str) -> str | None:
    """The id of this user's job named ``name`` that slurmctld still knows (the newest), or None."""
    text = run(["squeue", "--me", "--states=all", "-h", "--name", name, "-o", "%F"])
    ids = sorted({line.strip() for line in text.splitlines() if line.strip().isdigit()}, key=int)
    return ids[-1] if ids else None


def sbatch(args: list[str]) -> str:
    """Submit; returns the job id (``--parsable`` prints ``id`` or ``id;cluster``)."""
    out = run(["sbatch", "--parsable", *args]).strip()
    job_id = out.split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch: unexpected answer {out!r}")
    return job_id


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        run(["scancel", *job_ids])
