"""The executors without a cluster: the Slurm fields' checks in the spec, the cluster checks
against sinfo's partitions, Slurm's output parsed (the texts are what Debian's 22.05 printed on
the test cluster), the batch script, and a sweep cut into pieces and gathered back into the
answer of the whole sweep. The same code against a real Slurm: tests/test_slurm.py."""
from __future__ import annotations

import json
import shlex
import subprocess

import pytest

from launch.executors import executor_name
from launch.executors import slurm, slurm_cli
from launch.executors.slurm import batch_script, cluster_problems, sbatch_options
from launch.executors.slurm_cli import Partition
from launch.layout import RunPaths
from launch.spec import JobSpec, SpecError
from launch.torchrun import torchrun_args, worker_program
from lowbit.comm.dist import ThreadWorld
from lowbit.method.calibrate import run_calibration
from lowbit.method.sweep import gather_sweep, run_sweep, sweep_pieces
from lowbit.model.data import token_chunks
from lowbit.model.engine import build_tp_model

SELFTEST = dict(kind="selftest", model="none", tp=2)
DEBUG = Partition("debug", True, "up", 2, 0, 2, 0, 4, 0, None, "n[1-2]")
GPU = Partition("gpu", False, "up", 4, 1, 3, 0, 64, 8, 2 * 86400.0, "g[1-4]")


def problems(**fields) -> list[tuple[str, str]]:
    try:
        JobSpec(**dict(SELFTEST, **fields))
    except SpecError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize("fields, field, words", [
    (dict(executor="pbs"), "executor", ["unknown executor 'pbs'", "allowed: local, slurm"]),
    (dict(partition="gpu"), "partition", ["only for executor slurm", "leave it null"]),
    (dict(gpus_per_node=2), "gpus_per_node", ["only for executor slurm", "leave it 0"]),
    (dict(executor="slurm", partition="a b"), "partition", ["plain name", "no spaces or shell characters"]),
    (dict(executor="slurm", qos="$(id)"), "qos", ["plain name"]),
    (dict(executor="slurm", time_limit_s=90), "time_limit_s", ["whole minutes", "multiple of 60 s, got 90"]),
    (dict(executor="slurm", rdzv_endpoint="node0:29400"), "rdzv_endpoint", ["first node of the allocation"]),
    (dict(executor="slurm", link="100mbit"), "link", ["allowed with executor slurm: loopback"]),
    (dict(executor="slurm", gpus_per_node=-1), "gpus_per_node", ["between 0 and 64"]),
    (dict(executor="slurm", max_concurrent=0), "max_concurrent", ["between 1 and 10000"]),
    (dict(executor="slurm", backend="nccl", gpus_per_node=1), "gpus_per_node", ["2 ranks per node", ">= 2"]),
])
def test_slurm_fields_are_checked_in_the_spec_naming_the_field_and_the_allowed_values(fields, field, words):
    found = problems(**fields)
    assert field in [f for f, _ in found], found
    text = "; ".join(m for f, m in found if f == field)
    assert all(w in text for w in words), text


def test_a_multi_node_slurm_spec_needs_no_endpoint_and_a_local_one_does():
    assert problems(executor="slurm", nnodes=2, time_limit_s=600) == []
    assert [f for f, _ in problems(nnodes=2)] == ["rdzv_endpoint"]
    spec = JobSpec(**dict(SELFTEST, executor="slurm", nnodes=2, time_limit_s=600))
    assert executor_name(dict(spec_json=spec.to_json())) == "slurm"
    assert executor_name(dict(spec_json=json.dumps(SELFTEST))) == "local"  # rows from before the field


@pytest.mark.parametrize("fields, field, words", [
    (dict(partition="gpu-h100"), "partition", ["unknown partition 'gpu-h100'", "allowed: debug, gpu"]),
    (dict(nnodes=3, tp=3), "nnodes", ["3 nodes, but partition 'debug' has 2", "allowed: 1 to 2"]),
    (dict(tp=6), "tp", ["6 ranks per node", "nodes of 4", "tp <= 4"]),
    (dict(gpus_per_node=1), "gpus_per_node", ["partition 'debug' has nodes with 0 GPU(s)", "allowed: 0 to 0"]),
    (dict(partition="gpu", time_limit_s=3 * 86400), "time_limit_s", ["over partition 'gpu'", "up to 172800 s"]),
])
def test_cluster_checks_name_the_field_and_what_the_partition_allows(fields, field, words):
    spec = JobSpec(**dict(SELFTEST, executor="slurm", **dict(dict(time_limit_s=600), **fields)))
    found = cluster_problems(spec, [DEBUG, GPU])
    assert [f for f, _ in found] == [field], found
    assert all(w in found[0][1] for w in words), found
    assert cluster_problems(JobSpec(**dict(SELFTEST, executor="slurm", partition="gpu", gpus_per_node=8,
                                           nnodes=4, tp=8, time_limit_s=3600)), [DEBUG, GPU]) == []
    no_default = cluster_problems(JobSpec(**dict(SELFTEST, executor="slurm", time_limit_s=60)), [GPU])
    assert no_default == [("partition", "the cluster has no default partition; name one; allowed: gpu")]


def test_sbatch_refusals_are_filed_under_the_field_they_are_about():
    assert slurm._field_of("sbatch: error: invalid partition specified: nope") == "partition"
    assert slurm._field_of("sbatch: error: Invalid qos specification") == "qos"
    assert slurm._field_of("sbatch: error: Invalid account or account/partition combination specified") == "account"
    assert slurm._field_of("sbatch: error: Invalid generic resource (gres) specification") == "gpus_per_node"
    assert slurm._field_of("allocation failure: Requested node configuration is not available") == "nnodes"
    assert slurm._field_of("sbatch: error: Batch job submission failed: Access/permission denied") == "executor"


def test_slurm_time_limits_and_gres_parse():
    assert [slurm_cli.limit_seconds(t) for t in ("infinite", "UNLIMITED", "45", "30:00", "1:00:00", "2-00:00:00",
                                                 "1-12:30:00")] == [None, None, 2700, 1800, 3600, 172800, 131400]
    assert [slurm_cli._gpus(g) for g in ("(null)", "gpu:4", "gpu:a100:8(S:0-1)", "gpu:a100:2,gpu:v100:2")] == [0, 4, 8, 4]
    assert slurm_cli.minutes(3600) == "60"


def test_sinfo_and_squeue_answers_parse(monkeypatch):
    sinfo = "debug*|up|2|0/2/0/2|12|(null)|infinite|n[1-2]\nmain|up|1|1/0/0/1|12|(null)|infinite|n1\n" \
            "gpu|up|2|1/0/1/2|64|gpu:a100:8(S:0-1)|2-00:00:00|g[1-2]\ngpu|up|1|0/1/0/1|32|gpu:4|2-00:00:00|g3\n"
    squeue = "12|12|N/A|COMPLETED|None|n1|2026-12-03T06:17:42|2026-12-03T06:17:43\n" \
             "4_2|4|2|PENDING|JobArrayTaskLimit||N/A|N/A\n6|4|1|RUNNING|None|n2|2026-12-03T06:18:22|NONE\n" \
             "13|13|N/A|PENDING|ReqNodeNotAvail, UnavailableNodes:n2||N/A|N/A\n"
    monkeypatch.setattr(slurm_cli, "run", lambda args, timeout_s=0: sinfo if args[0] == "sinfo" else squeue)
    parts = {p.name: p for p in slurm_cli.partitions()}
    assert parts["debug"].default and not parts["gpu"].default
    assert (parts["gpu"].nodes, parts["gpu"].idle, parts["gpu"].allocated, parts["gpu"].other) == (3, 1, 1, 1)
    assert (parts["gpu"].gpus_per_node, parts["gpu"].cpus_per_node, parts["gpu"].max_time_s) == (8, 64, 172800)
    jobs = slurm_cli.job_states()
    assert sorted(jobs) == ["12", "13", "4"]
    assert [(j.job_id, j.task, j.state, j.reason) for j in jobs["4"]] == [
        ("4_2", 2, "PENDING", "JobArrayTaskLimit"), ("6", 1, "RUNNING", "None")]
    assert jobs["13"][0].reason == "ReqNodeNotAvail, UnavailableNodes:n2" and jobs["12"][0].start is not None


def test_the_batch_script_runs_one_torchrun_per_node_with_every_option_written_out(tmp_path):
    paths = RunPaths(tmp_path, "r1")
    one = JobSpec(**dict(SELFTEST, executor="slurm", partition="main", account="lab", qos="high", time_limit_s=600,
                         run_id="r1"))
    script = batch_script(one, paths)
    options = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert options[:len(sbatch_options(one))] == sbatch_options(one) == [
        "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=10", "--no-requeue", "--partition=main",
        "--account=lab", "--qos=high"]
    assert f"--output={paths.launcher_log}" in options and "--job-name=lowbit-r1" in options
    step = shlex.split(script.strip().splitlines()[-1])
    torchrun = step[step.index("--cpus-per-task=2") + 1:]
    assert torchrun == torchrun_args(worker_program(paths.spec), 2, 1, 0, ["--standalone"], paths.logs)
    assert f"test -r {paths.spec} ||" in script and f"exit {slurm.SHARED_CHECK_EXIT}" in script

    two = JobSpec(**dict(SELFTEST, executor="slurm", nnodes=2, gpus_per_node=1, time_limit_s=600, run_id="r1"))
    last = shlex.split(batch_script(two, paths).strip().splitlines()[-1])
    assert "--gpus-per-node=1" in last and "--node-rank" not in last
    assert last[last.index("--rdzv-endpoint") + 1] == "$addr:$port" and last[last.index("--nnodes") + 1] == "2"

    array = batch_script(one, paths, array="0-3%2")
    assert "#SBATCH --array=0-3%2" in array and f"#SBATCH --output={paths.logs}/task-%a.log" in array
    exports = "\n".join(line for line in array.splitlines() if line.startswith("export "))
    shown = subprocess.run(["bash", "-c", f"SLURM_ARRAY_TASK_ID=3\n{exports}\necho $TORCHELASTIC_ERROR_FILE $LOWBIT_TASK"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert shown == [str(paths.piece_error("task-3")), "3"]
    assert "export LOWBIT_TASK=prepare" in batch_script(one, paths, piece="prepare")


MODEL, TP = "tiny-llama", 2


def test_a_sweep_run_as_pieces_gathers_to_the_whole_sweeps_answer(tiny_models, tmp_path):
    tok = tiny_models[MODEL].tokenizer
    calib = list(token_chunks(tok, "wikipedia", "calib", 2, 32).split(2))
    held = token_chunks(tok, "wikipedia", "eval", 2, 32)
    params = dict(schemes=["int4-token", "int2-token"], allocate=[3.0, 2.5], allocate_candidates=["int2-token",
                  "int4-token"], batch_size=2, report_at=[4.2, 3.0])
    pieces = sweep_pieces(params, 64, TP)
    assert pieces == [dict(scheme="int4-static-top1/64"), dict(scheme="int4-token"), dict(scheme="int2-token"),
                      dict(allocate=3.0), dict(allocate=2.5)]

    def body(group):
        tp = build_tp_model(MODEL, group, loaded=tiny_models[MODEL])
        cal = run_calibration(tp.model, group, calib, meta=dict(model=MODEL))
        whole = run_sweep(tp, group, params, cal, held, None, tmp_path / "whole")
        for piece in [dict(prepare=True), *reversed(pieces)]:  # any order: each piece stands alone
            assert run_sweep(tp, group, params, cal, held, None, tmp_path / "pieces", piece=piece) is None
        return whole
    whole = ThreadWorld(TP).run(body)[0]
    gathered = gather_sweep(params, 64, TP, tmp_path / "pieces", reused=set())

    def drop_times(result):
        return dict(result, points=[{k: v for k, v in p.items() if k not in ("seconds", "comm_seconds")}
                                    for p in result["points"]])
    assert drop_times(gathered) == drop_times(whole)
    assert gathered["evaluated"] == len(whole["points"]) and gathered["reused"] == 0
