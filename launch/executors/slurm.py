"""The Slurm executor: each run is a batch job (``sbatch``) whose step runs torchrun on the
allocation: ``srun`` starts one torchrun per node; with more than one node they meet at
torchrun's own c10d rendezvous on the first node. A sweep fans out as a job array, at most
``max_concurrent`` of its points at once (the array's ``%N``).

    spec = JobSpec(kind="evaluate", ..., executor="slurm", partition="gpu", gpus_per_node=4, time_limit_s=3600)
    run_id = JobQueue().submit(spec)   # checked against sinfo and `sbatch --test-only`: a bad field queues nothing

Besides a local run's files, a Slurm run's folder holds:

    slurm.sbatch           the batch script, every option in its #SBATCH lines (`sbatch slurm.sbatch` again)
    slurm-prepare.sbatch   a fanned-out sweep's first job (calibration, sensitivity table), when it needs one
    slurm.json             the job ids and the command line that submitted them, to paste into a shell
    logs/launcher.log      Slurm's output file (an array: logs/task-<i>.log; the prepare job: logs/prepare.log)

Plain sbatch / squeue / scontrol / scancel, not submitit: submitit pickles a Python function and
reads job states from ``sacct`` only, which needs Slurm's accounting database; a lowbit job is
already a command (torchrun), and ``squeue`` gives the pending reason and works on every cluster.

States: pending (Slurm's reason goes to events.jsonl), running, done, failed (Slurm's state,
exit code, nodes and their reasons, the failing rank's error), timeout (Slurm's TIMEOUT of
``--time``), cancelled (``scancel``). After a restart the queue re-attaches from ``slurm.json``
(or the job name ``lowbit-<run id>``) and Slurm's own state: nothing is submitted twice.
"""
# Size: ~450 lines: submit checks, the batch script, and the state machine of one run's jobs are one lifecycle.
from __future__ import annotations

import json
import os
import secrets
import shlex
import time
from pathlib import Path

from launch.events import EventLog
from launch.executors import PREPARE, TASK_ENV, Ended
from launch.executors.slurm_cli import (
    ENDED,
    WAITING,
    JobState,
    Partition,
    SlurmError,
    accounting,
    exit_codes,
    job_by_name,
    job_states,
    minutes,
    missing,
    node_reasons,
    partitions,
    run,
    sbatch,
    scancel,
)
from launch.failures import clip, failure_text
from launch.layout import RunPaths, read_json, write_atomic
from launch.registry import KINDS
from launch.spec import JobSpec
from launch.submit import REPO_ROOT, lowbit_env
from launch.torchrun import STANDALONE, c10d, torchrun_args, worker_program

SHARED_CHECK_EXIT = 96         # the batch script's exit code when a node cannot see the run folder
POLL_S = 1.0                   # squeue is asked at most this often, whatever the queue's poll
IMMEDIATE_S = 10               # the submit-time folder check waits this long for a free node, then skips
# A multi-node run's rendezvous port on its first node, from the job id (no two jobs of one node share it).
PORT_BASE, PORT_SPAN = 20000, 20000
_RDZV_ADDR, _RDZV_ID = "$addr:$port", "$SLURM_JOB_ID"   # left to the batch shell to expand
_SHARED_OK: set[tuple] = set()  # (runs root, cluster config, partition) whose folder a node has seen


def job_name(run_id: str) -> str:
    return f"lowbit-{run_id}"


# -- submit-time checks ----------------------------------------------------------------------
def sbatch_options(spec: JobSpec) -> list[str]:
    """The resource options of the spec's job: one torchrun per node, a CPU per rank."""
    opts = [f"--nodes={spec.nnodes}", "--ntasks-per-node=1", f"--cpus-per-task={spec.nproc_per_node}",
            f"--time={minutes(spec.time_limit_s)}", "--no-requeue"]
    opts += [f"--{name}={getattr(spec, name)}" for name in ("partition", "account", "qos") if getattr(spec, name)]
    if spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    return opts


def _partition(spec: JobSpec, parts: list[Partition]) -> Partition | None:
    """The partition the job goes to: the spec's, else the cluster's default."""
    return next((p for p in parts if (p.name == spec.partition if spec.partition else p.default)), None)


def cluster_problems(spec: JobSpec, parts: list[Partition]) -> list[tuple[str, str]]:
    """The spec's Slurm fields against the cluster's partitions (``sinfo``), each problem with
    the allowed values."""
    allowed = ", ".join(p.name for p in parts) or "(none)"
    part = _partition(spec, parts)
    if part is None and spec.partition is None:
        return [("partition", f"the cluster has no default partition; name one; allowed: {allowed}")]
    if part is None:
        return [("partition", f"unknown partition {spec.partition!r}; allowed: {allowed}")]
    problems = []
    if part.available != "up":
        up = ", ".join(p.name for p in parts if p.available == "up") or "(none)"
        problems.append(("partition", f"partition {part.name!r} is {part.available}; allowed (up): {up}"))
    if spec.nnodes > part.nodes:
        problems.append(("nnodes", f"{spec.nnodes} nodes, but partition {part.name!r} has {part.nodes}; "
                                   f"allowed: 1 to {part.nodes}"))
    if spec.nproc_per_node > part.cpus_per_node:
        problems.append(("tp", f"{spec.nproc_per_node} ranks per node need as many CPUs, but partition "
                               f"{part.name!r} has nodes of {part.cpus_per_node}; allowed: tp <= "
                               f"{part.cpus_per_node * spec.nnodes} at nnodes {spec.nnodes}, or more nodes"))
    if spec.gpus_per_node > part.gpus_per_node:
        problems.append(("gpus_per_node", f"{spec.gpus_per_node}, but partition {part.name!r} has nodes with "
                                          f"{part.gpus_per_node} GPU(s); allowed: 0 to {part.gpus_per_node}"))
    if part.max_time_s is not None and spec.time_limit_s > part.max_time_s:
        problems.append(("time_limit_s", f"{spec.time_limit_s:g} s is over partition {part.name!r}'s limit; "
                                         f"allowed: up to {part.max_time_s:g} s"))
    return problems


def _field_of(message: str) -> str:
    """The spec field an sbatch refusal is about (its own words), else ``executor``."""
    text = message.lower()
    for field, words in (("account", ("account", "association")), ("qos", ("qos",)), ("partition", ("partition",)),
                         ("gpus_per_node", ("gres", "gpu")), ("time_limit_s", ("time limit", "time_limit")),
                         ("nnodes", ("node",))):
        if any(w in text for w in words):
            return field
    return "executor"


def shared_folder_problem(root: Path, spec: JobSpec) -> str | None:
    """Can a node of the spec's partition read a token file written here into the runs root?
    A tiny ``srun`` that waits at most IMMEDIATE_S for a free node (a busy cluster skips it: every
    batch job checks again on its own allocation first). Remembered per process once seen."""
    key = (str(root), os.environ.get("SLURM_CONF"), spec.partition, spec.account, spec.qos)
    if key in _SHARED_OK:
        return None
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe = root / f".slurm-shared-check-{token}"
    probe.write_text(token + "\n")
    opts = [f"--{n}={getattr(spec, n)}" for n in ("partition", "account", "qos") if getattr(spec, n)]
    try:
        out = run(["srun", *opts, "--nodes=1", "--ntasks=1", "--time=1", f"--immediate={IMMEDIATE_S}", "--quiet",
                   "--job-name=lowbit-shared-check", "cat", str(probe)], timeout_s=IMMEDIATE_S + 30)
    except SlurmError as exc:
        if "Unable to allocate resources" in str(exc) or "immediate" in str(exc).lower():
            return None
        out = str(exc)
    finally:
        probe.unlink(missing_ok=True)
    if out.strip() == token:
        _SHARED_OK.add(key)
        return None
    return (f"the runs folder {root} is not visible on the cluster's nodes (a node read {probe.name}: "
            f"{out.strip()[:300]!r}); set LOWBIT_RUNS to a folder on a filesystem the nodes share")


# -- the batch script -------------------------------------------------------------------------
def _shell(args: list[str]) -> str:
    """An argument list as one shell line; only the rendezvous placeholders are expanded."""
    return " ".join(f'"{a}"' if a in (_RDZV_ADDR, _RDZV_ID) else shlex.quote(a) for a in args)


def batch_script(spec: JobSpec, paths: RunPaths, piece: str | None = None, array: str | None = None) -> str:
    """The batch script of the run (``piece``: the prepare job; ``array``: e.g. ``0-3%2``, one
    array task per piece). Every option is an #SBATCH line, every value of the run written out."""
    n, nproc, logs = spec.nnodes, spec.nproc_per_node, paths.logs
    if array:  # Slurm names the output file, the shell the error file, of each array task
        output = paths.piece_log("task-%a")
        before, after = str(paths.piece_error("task-@")).rsplit("@", 1)
        error_file = f'{shlex.quote(before)}"$SLURM_ARRAY_TASK_ID"{shlex.quote(after)}'
    elif piece:
        output, error_file = paths.piece_log(piece), shlex.quote(str(paths.piece_error(piece)))
    else:
        output, error_file = paths.launcher_log, shlex.quote(str(paths.error))
    options = sbatch_options(spec) + [f"--job-name={job_name(spec.run_id)}", f"--output={output}",
                                      "--open-mode=append", f"--chdir={REPO_ROOT}"] + ([f"--array={array}"] if array else [])
    env = {k: v for k, v in lowbit_env(paths, 1).items() if k != "TORCHELASTIC_ERROR_FILE"}
    step = ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if n > 1:
        rendezvous, node_rank = c10d(_RDZV_ADDR, _RDZV_ID), None
    else:
        rendezvous, node_rank = STANDALONE, 0
    torchrun = torchrun_args(worker_program(paths.spec), nproc, n, node_rank, rendezvous, logs)
    gpus = [f"--gpus-per-node={spec.gpus_per_node}"] if spec.gpus_per_node else []
    lines = ["#!/bin/bash",
             f"# lowbit run {spec.run_id}: {spec.kind} {spec.model} at TP {spec.tp} on {n} node(s), written by "
             "launch.executors.slurm; `sbatch` this file to run it again.",
             *(f"#SBATCH {o}" for o in options),
             "set -u",
             *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
             f"export TORCHELASTIC_ERROR_FILE={error_file}"]
    if array:
        lines.append(f'export {TASK_ENV}="$SLURM_ARRAY_TASK_ID"')
    elif piece:
        lines.append(f"export {TASK_ENV}={piece}")
    lines += ["# 1. every node of the allocation must see the run folder (a filesystem the nodes share)",
              f"{_shell(step + ['test', '-r', str(paths.spec)])} || {{ echo \"lowbit: {paths.spec} is not visible "
              f"on every node of $SLURM_JOB_NODELIST; LOWBIT_RUNS must be on a filesystem the nodes share\" >&2; "
              f"exit {SHARED_CHECK_EXIT}; }}"]
    if n > 1:
        lines += ["# torchrun's c10d rendezvous on the allocation's first node, a port from the job id",
                  'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  'addr=$(scontrol show node "$head" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)',
                  f"port=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))"]
    lines += ["# 2. one torchrun per node, its ranks on that node",
              _shell(step + [f"--cpus-per-task={nproc}", *gpus] + torchrun), ""]
    return "\n".join(lines)


# -- the executor -----------------------------------------------------------------------------
class SlurmExecutor:
    name = "slurm"
    uses_local_cpus = False   # Slurm schedules its jobs; the local queue's max_parallel does not apply
    claim_status = "pending"

    def __init__(self, root: Path, index, kill_grace_s: float = 5.0, parallel_jobs: int = 1):
        self.root, self.index = Path(root), index
        self._records: dict[str, dict] = {}     # run id -> its slurm.json
        self._jobs: dict[str, list[JobState]] = {}
        self._jobs_at = 0.0
        self._said: dict[str, str] = {}         # run id -> the last state line written to its events

    @staticmethod
    def submit_problems(spec: JobSpec, root: Path) -> list[tuple[str, str]]:
        absent = missing()
        if absent:
            return [("executor", f"slurm: {absent}; allowed here: local")]
        try:
            parts = partitions()
        except SlurmError as exc:
            return [("executor", f"slurm: cannot read the cluster's partitions: {exc}")]
        problems = cluster_problems(spec, parts)
        if problems:
            return problems
        try:
            run(["sbatch", "--test-only", *sbatch_options(spec), "--wrap", "true"])
        except SlurmError as exc:
            # Nodes out of service (down, drained) make --test-only say the configuration is not
            # available; sbatch itself queues the job until they return (the sinfo checks above
            # already hold the request to what the partition's nodes have).
            if not ("node configuration is not available" in str(exc) and _partition(spec, parts).other):
                return [(_field_of(str(exc)), f"Slurm refuses the job: {exc}")]
        problem = shared_folder_problem(root, spec)
        return [("executor", problem)] if problem else []

    def tracks(self, run_id: str) -> bool:
        return run_id in self._records

    def tracked(self) -> list[str]:
        return list(self._records)

    def start(self, spec: JobSpec, paths: RunPaths) -> None:
        fan_out = KINDS[spec.kind].hook("fan_out")
        plan = fan_out(spec, paths) if fan_out is not None else dict(pieces=None, prepare=False)
        record = dict(job=None, prepare=None, pieces=plan["pieces"], commands=[], submitted=time.time())
        self._records[spec.run_id] = record
        dependency = []
        if plan["prepare"]:
            script = self._write(paths.slurm_script(PREPARE), batch_script(spec, paths, piece=PREPARE))
            record["prepare"] = sbatch([str(script)])
            record["commands"].append(f"prep=$(sbatch --parsable {shlex.quote(str(script))})")
            dependency = [f"--dependency=afterok:{record['prepare']}"]
            self._save(paths, record)
        if plan["pieces"] != 0:
            array = None if plan["pieces"] is None else \
                f"0-{plan['pieces'] - 1}%{min(spec.max_concurrent, plan['pieces'])}"
            script = self._write(paths.slurm_script(), batch_script(spec, paths, array=array))
            try:
                record["job"] = sbatch(dependency + [str(script)])
            except SlurmError:
                if record["prepare"]:
                    scancel([record["prepare"]])
                raise
            record["commands"].append("sbatch " + ("--dependency=afterok:$prep " if dependency else "")
                                      + shlex.quote(str(script)))
        record["command"] = " && ".join(record["commands"])
        self._save(paths, record)
        self._jobs_at = 0.0  # the next poll asks squeue again: the new job is not in the last answer
        first = record["prepare"] or record["job"]
        if first:
            self._say(paths, "pending", f"submitted to Slurm as job {first}")

    def reattach(self, row: dict, paths: RunPaths) -> bool:
        record = read_json(paths.slurm_record)
        if not isinstance(record, dict):
            try:
                job_id = job_by_name(job_name(row["id"]))
            except SlurmError:
                job_id = None
            if job_id is None:
                return False
            record = dict(job=job_id, prepare=None, pieces=None)  # submitted, then the queue stopped at once
        self._records[row["id"]] = record
        return True

    def stop(self, row: dict | None, paths: RunPaths, grace_s: float) -> None:
        """scancel the run's jobs (Slurm signals their processes, then kills them after KillWait)."""
        record = self._records.get(paths.run_id) or read_json(paths.slurm_record)
        ids = [j for j in (record.get("prepare"), record.get("job")) if j] if isinstance(record, dict) else []
        if not ids:
            try:
                ids = [j for j in [job_by_name(job_name(paths.run_id))] if j]
            except SlurmError:
                ids = []
        try:
            scancel(ids)
        except SlurmError:
            pass  # already ended: nothing left to cancel

    def forget(self, run_id: str) -> None:
        self._records.pop(run_id, None)
        self._said.pop(run_id, None)

    def cleanup(self) -> None:
        """Nothing to clean on this machine: Slurm ends its own jobs' processes."""

    # -- watching --------------------------------------------------------------------------
    def poll(self, row: dict, paths: RunPaths) -> Ended | None:
        record = self._records[row["id"]]
        ids = [j for j in (record.get("prepare"), record.get("job")) if j]
        if not ids:
            return self._gather(row, paths, record)  # every point was there already (a resumed sweep)
        jobs = self._states(ids)
        if jobs is None:
            return None  # slurmctld did not answer: ask again on the next pass
        if any(j not in jobs for j in ids):
            return self._forgotten(row, paths, record, [j for j in ids if j not in jobs])
        states = [s for j in ids for s in sorted(jobs[j], key=lambda s: (s.task is not None, s.task or 0))]
        started = [s.start for s in states if s.state not in WAITING and s.start]
        if started and row["status"] == "pending":
            self.index.set_running(row["id"], min(started))
        active = [s for s in states if s.state not in ENDED]
        bad = next((s for s in states if s.state in ENDED and s.state != "COMPLETED"), None)
        if bad is not None:
            return self._ended_badly(bad, record, paths, stop=bool(active))
        if active:
            self._report(paths, record, states, started)
            return None
        if record.get("pieces") is not None:
            return self._gather(row, paths, record)
        return Ended("done", returncode=0)

    def _states(self, ids: list[str]) -> dict[str, list[JobState]] | None:
        """squeue's answer (at most every POLL_S; asked again when a job is missing from it)."""
        fresh = time.monotonic() - self._jobs_at < POLL_S
        if fresh and all(j in self._jobs for j in ids):
            return self._jobs
        try:
            self._jobs, self._jobs_at = job_states(), time.monotonic()
        except SlurmError:
            return None
        return self._jobs

    def _report(self, paths: RunPaths, record: dict, states: list[JobState], started: list[float]) -> None:
        """One events line per change: Slurm's pending reason, or how many pieces are done."""
        waiting = [s for s in states if s.state in WAITING]
        if not started and waiting:
            why = "not scheduled yet" if waiting[0].reason in ("None", "") else f"reason: {waiting[0].reason}"
            self._say(paths, "pending", f"waiting in Slurm's queue as job {waiting[0].job_id}, {why}")
        elif record.get("pieces"):
            tasks = [s for s in states if s.task is not None]
            done = sum(s.state == "COMPLETED" for s in tasks)
            running = sum(s.state not in WAITING and s.state not in ENDED for s in tasks)
            note = f", {len(waiting)} waiting ({waiting[0].reason})" if waiting else ""
            self._say(paths, "running", f"{done} of {record['pieces']} points done, {running} running{note}",
                      step=done, total=record["pieces"])

    def _say(self, paths: RunPaths, stage: str, message: str, **counts) -> None:
        if self._said.get(paths.run_id) != message:
            self._said[paths.run_id] = message
            EventLog(paths.events).emit(stage, message, **counts)

    def _ended_badly(self, job: JobState, record: dict, paths: RunPaths, stop: bool) -> Ended:
        """A job that ended other than COMPLETED: the run's status, Slurm's words, the cause."""
        rc, sig = exit_codes(job.base_id).get(job.job_id, (None, None))
        status = {"TIMEOUT": "timeout", "DEADLINE": "timeout", "CANCELLED": "cancelled"}.get(job.state, "failed")
        if job.base_id == record.get("prepare"):
            which, log, error_file = "the prepare job", paths.piece_log(PREPARE), paths.piece_error(PREPARE)
        elif job.task is not None:
            which = f"point {job.task} of {record.get('pieces')}"
            log, error_file = paths.piece_log(f"task-{job.task}"), paths.piece_error(f"task-{job.task}")
        else:
            which, log, error_file = "the job", paths.launcher_log, paths.error
        head = f"Slurm job {job.job_id} ({which}) ended {job.state}"
        head += "" if rc is None else f" with exit code {rc}" + (f", signal {sig}" if sig else "")
        head += f" on {job.nodes}" if job.nodes else ""
        lines = [head]
        lines += [f"node {node}: {state}, reason: {reason}" for node, state, reason in node_reasons(job.nodes)
                  if reason and reason != "none"]
        if status == "timeout":
            lines.append(f"over its time limit (--time={minutes(self._spec(paths).time_limit_s)} min); Slurm stopped it")
        elif status == "cancelled":
            lines.append("cancelled in Slurm, not from lowbit (scancel, or an administrator)")
        elif rc == SHARED_CHECK_EXIT:
            lines.append(f"a node cannot see the run folder {paths.dir}: LOWBIT_RUNS must be on a filesystem the "
                         "nodes share")
        elif not log.exists():
            lines.append(f"Slurm wrote no output file ({log}): the node could not write the run folder; "
                         "LOWBIT_RUNS must be on a filesystem the nodes share")
        elif job.state != "NODE_FAIL":
            lines.append(failure_text(paths, rc, log=log, error_file=error_file))
        return Ended(status, clip("\n".join(lines)), returncode=rc, stop=stop)

    def _forgotten(self, row: dict, paths: RunPaths, record: dict, ids: list[str]) -> Ended:
        """Jobs slurmctld no longer keeps (ended more than MinJobAge ago, e.g. while no queue
        watched): Slurm's accounting when it runs, else what the run folder shows."""
        for job_id in ids:
            for rec in accounting(job_id):
                if rec["state"] != "COMPLETED":
                    job = JobState(rec["job_id"], job_id, None, rec["state"], "", rec["nodes"], rec["start"], rec["end"])
                    return self._ended_badly(job, record, paths, stop=False)
        if record.get("pieces") is not None:
            return self._gather(row, paths, record)
        if isinstance(read_json(paths.result), dict):
            return Ended("done", "finished while no queue was watching (Slurm no longer lists the job)")
        return Ended("lost", f"Slurm no longer knows job(s) {', '.join(ids)} (ended more than MinJobAge ago, "
                             "no accounting) and the run wrote no result")

    def _gather(self, row: dict, paths: RunPaths, record: dict) -> Ended:
        """A fanned-out run's answer, from its pieces' files, as its result.json."""
        spec = self._spec(paths)
        try:
            result = KINDS[spec.kind].hook("gather")(spec, paths)
        except Exception as exc:  # noqa: BLE001 - a run whose pieces cannot be gathered fails, with why
            return Ended("failed", f"gathering the {record.get('pieces')} points failed: {type(exc).__name__}: {exc}")
        result.setdefault("run", dict(id=spec.run_id, kind=spec.kind, model=spec.model, tp=spec.tp, executor="slurm",
                                      jobs=[j for j in (record.get("prepare"), record.get("job")) if j]))
        write_atomic(paths.result, json.dumps(result, indent=2, default=str))
        EventLog(paths.events).done(f"{spec.kind}: {record.get('pieces')} points gathered")
        if row["status"] == "pending":
            self.index.set_running(row["id"])
        return Ended("done", returncode=0)

    # -- files ------------------------------------------------------------------------------
    @staticmethod
    def _spec(paths: RunPaths) -> JobSpec:
        return JobSpec.load_trusted(paths.spec)

    @staticmethod
    def _write(path: Path, text: str) -> Path:
        write_atomic(path, text)
        return path

    @staticmethod
    def _save(paths: RunPaths, record: dict) -> None:
        write_atomic(paths.slurm_record, json.dumps(record, indent=2))
