"""bench/gpu_check.py (the GPU machine's one command) in its CPU-safe mode, and the backend /
device choice for ranks that share a GPU (lowbit.comm.placement), with the device count mocked.

    .venv/bin/python -m pytest tests/test_gpu_check.py -q

The end-to-end run (every step, tiny shapes, ranks under torchrun on the CPU) is marked slow:
about two minutes on the 2-core machine, most of it starting torch in each rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from lowbit.comm import dist as lowbit_dist
from lowbit.comm import placement
from lowbit.comm.placement import Placement, choose_placement

REPO = gpu_check.REPO


# -- backend and device for shared-GPU ranks ------------------------------------------------------
@pytest.mark.parametrize("backend,rank,world,gpus,want", [
    ("auto", 0, 2, 0, ("gloo", "cpu", 0)),
    ("auto", 1, 2, 2, ("nccl", "cuda:1", 1)),
    ("auto", 3, 4, 8, ("nccl", "cuda:3", 1)),
    ("auto", 3, 4, 1, ("gloo", "cuda:0", 4)),      # the one-GPU machine: every rank on cuda:0
    ("auto", 2, 3, 2, ("gloo", "cuda:0", 2)),      # ranks 0 and 2 share cuda:0
    ("auto", 1, 3, 2, ("gloo", "cuda:1", 1)),      # rank 1 alone on cuda:1, still gloo (one group)
    ("gloo", 1, 2, 4, ("gloo", "cpu", 0)),         # explicit gloo keeps the CPU path on a GPU machine
    ("nccl", 1, 2, 2, ("nccl", "cuda:1", 1)),
])
def test_placement_table(backend, rank, world, gpus, want):
    p = choose_placement(backend, rank, world, gpus)
    assert (p.backend, p.device, p.ranks_per_gpu) == want
    assert p.shared_gpu == (want[2] > 1)
    assert p.reason and p.as_dict()["shared_gpu"] == p.shared_gpu


def test_placement_refuses_nccl_with_ranks_sharing_a_gpu_and_bad_arguments():
    with pytest.raises(ValueError, match="one GPU per local rank: 4 ranks but 1 GPU"):
        choose_placement("nccl", 0, 4, 1)
    with pytest.raises(ValueError, match="auto, gloo, nccl"):
        choose_placement("mpi", 0, 2, 1)
    with pytest.raises(ValueError, match="not a rank"):
        choose_placement("auto", 2, 2, 1)


def _fake_torchrun(monkeypatch, gpus: int, local_rank: int, world: int):
    """torchrun's environment, ``gpus`` visible CUDA devices, and torch.distributed stubbed:
    returns the dict that records what init_from_env asked for."""
    seen = {}
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    monkeypatch.setattr(placement, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(lowbit_dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(lowbit_dist.dist, "init_process_group",
                        lambda backend, timeout: seen.update(backend=backend, timeout=timeout.total_seconds()))
    monkeypatch.setattr(lowbit_dist.torch.cuda, "set_device", lambda d: seen.update(cuda_device=str(d)))
    monkeypatch.setattr(lowbit_dist.dist, "get_rank", lambda group=None: local_rank)
    monkeypatch.setattr(lowbit_dist.dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(lowbit_dist.dist, "get_backend", lambda group=None: seen.get("backend"))
    return seen


@pytest.mark.parametrize("gpus,want_backend,want_device", [(1, "gloo", "cuda:0"), (4, "nccl", "cuda:2"),
                                                           (0, "gloo", "cpu")])
def test_init_from_env_places_ranks_and_device_for_follows(monkeypatch, gpus, want_backend, want_device):
    seen = _fake_torchrun(monkeypatch, gpus, local_rank=2, world=4)
    group = lowbit_dist.init_from_env("auto", timeout_s=7)
    assert seen["backend"] == want_backend and seen["timeout"] == 7
    assert seen.get("cuda_device") == (None if want_device == "cpu" else want_device)
    assert group.placement.device == want_device and group.backend == want_backend
    assert lowbit_dist.device_for(group) == torch.device(want_device)


def test_init_from_env_refuses_nccl_before_any_process_group(monkeypatch):
    seen = _fake_torchrun(monkeypatch, gpus=1, local_rank=0, world=2)
    with pytest.raises(ValueError, match="NCCL refuses two ranks on one device"):
        lowbit_dist.init_from_env("nccl")
    assert "backend" not in seen


def test_device_for_groups_without_a_placement():
    class Old:
        backend = "gloo"
    assert lowbit_dist.device_for(Old()) == torch.device("cpu")
    assert lowbit_dist.device_for(lowbit_dist.ThreadWorld(1).group(0)) == torch.device("cpu")


@pytest.mark.parametrize("gpus,words", [(0, "gloo (CPU)"), (1, "nccl up to TP 1; above: gloo with CUDA tensors")])
def test_machine_panel_says_what_auto_picks(monkeypatch, gpus, words):
    from launch.store import machine
    monkeypatch.setattr(machine, "available_gpus", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    info = machine.machine_info()
    assert info["gpus"] == gpus and words in info["backend"]


def test_run_record_carries_the_placement():
    from launch.worker import _placement

    class G:
        placement = Placement("gloo", "cuda:0", 4, "shared")
    assert _placement(G()) == dict(backend="gloo", device="cuda:0", ranks_per_gpu=4, reason="shared", shared_gpu=True)
    assert _placement(object()) is None


# -- the orchestrator: every step leaves its file -------------------------------------------------
FAKE_STEP = REPO / "tests" / "scripts" / "fake_gpu_check_step.py"


def _fake_steps(monkeypatch, **modes):
    """Run tests/scripts/fake_gpu_check_step.py in place of the named steps (mode ``hang``: a step
    that cannot finish; ``finish``: one that ends at once); other steps stay real."""
    real = gpu_check.step_command

    def command(name, out, device, quick, limit_s):
        if name not in modes:
            return real(name, out, device, quick, limit_s)
        return [sys.executable, str(FAKE_STEP), modes[name], name, str(out), device, str(limit_s)]
    monkeypatch.setattr(gpu_check, "step_command", command)


@pytest.mark.slow
def test_a_failing_step_leaves_its_file_with_the_log_tail(tmp_path):
    log = tmp_path / gpu_check.LOG
    # --device cuda on a machine without one: the child exits before writing anything
    failed = gpu_check.run_step("collectives", tmp_path, "cuda", True, 60, log)
    assert failed["status"] == "failed" and "exit code" in failed["error"] and "no CUDA device" in failed["log_tail"]
    saved = json.loads((tmp_path / "collectives.json").read_text())
    assert saved["status"] == "failed" and all(k in saved for k in gpu_check.COMMON_FIELDS)


def test_a_step_that_cannot_finish_is_killed_at_its_limit_and_its_file_says_so(tmp_path, monkeypatch):
    _fake_steps(monkeypatch, kernel_speed="hang")
    log = tmp_path / gpu_check.LOG
    timed = gpu_check.run_step("kernel_speed", tmp_path, "cpu", True, 1.0, log)
    assert timed["status"] == "timeout" and "killed at its limit of 1 s" in timed["error"], timed
    assert timed["seconds"] >= 1.0  # not before its limit
    saved = json.loads((tmp_path / "kernel_speed.json").read_text())
    assert saved == timed and all(k in saved for k in gpu_check.COMMON_FIELDS)
    assert "==== kernel_speed" in saved["log_tail"]  # the step's part of the log, for the reader


def _in_subprocess_wait(thread_id: int) -> bool:
    """Is the thread blocked in ``Popen.wait`` (run_step waiting for its child)?"""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("subprocess.py"):
            return True
        frame = frame.f_back
    return False


def test_a_stopped_run_keeps_the_steps_partial_results_and_ends_its_process_group(tmp_path, monkeypatch):
    """SIGTERM to the orchestrator (the shell's timeout) while a step that cannot finish runs: sent
    only once the step has saved partial results and run_step waits for it, so no timing decides
    what the file holds."""
    import signal
    import threading
    import time

    from launch import procs
    _fake_steps(monkeypatch, tp_engine="hang")
    path, main = gpu_check.step_file(tmp_path, "tp_engine"), threading.get_ident()

    def stop_once_partial_results_are_saved():
        deadline = time.monotonic() + 120  # a hang bound only: the step writes in well under a second
        while time.monotonic() < deadline:
            data = gpu_check.read_json(path)
            if data and data["checks"].get("partial") and _in_subprocess_wait(main):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)
    previous = signal.signal(signal.SIGTERM, gpu_check._raise_stop)
    stopper = threading.Thread(target=stop_once_partial_results_are_saved, daemon=True)
    try:
        stopper.start()
        with pytest.raises(gpu_check.StopRun) as stop:
            gpu_check.run_step("tp_engine", tmp_path, "cpu", True, 600, tmp_path / gpu_check.LOG)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stopper.join()
    data = stop.value.args[0]
    assert data["status"] == "timeout" and "stop of the whole run" in data["error"], data
    assert data["checks"] == {"partial": True}  # what the step had saved is kept
    assert json.loads(path.read_text()) == data
    assert data["helper_pid"] not in procs.live_pids(), "the step's process group outlived the stop"


def test_the_orchestrator_goes_on_after_a_timed_out_step(tmp_path, monkeypatch):
    _fake_steps(monkeypatch, shared_gpu="hang", kernel_speed="finish")
    monkeypatch.setattr(gpu_check, "QUICK_LIMIT_S", dict(gpu_check.QUICK_LIMIT_S, shared_gpu=1.0))
    summary = gpu_check.run_all(tmp_path, "cpu", True, ["shared_gpu", "kernel_speed"], 200)
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("shared_gpu", "timeout"), ("kernel_speed", "ok")]
    assert summary["steps"][0]["limit_s"] == 1.0 and "limit" in summary["steps"][0]["error"]
    assert json.loads((tmp_path / "kernel_speed.json").read_text())["checks"] == {"measured": True}
    assert summary["finished"] is not None


def test_a_spent_total_budget_skips_the_remaining_steps(tmp_path):
    summary = gpu_check.run_all(tmp_path, "cpu", True, ["tp_engine"], total_limit_s=5)
    assert summary["steps"][0]["status"] == "skipped"
    assert json.loads((tmp_path / "tp_engine.json").read_text())["status"] == "skipped"


# -- end to end, CPU-safe mode --------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--device", "cpu", "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    return out, proc


@pytest.mark.slow
def test_quick_run_writes_every_file_with_the_fields_the_readme_reads(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / gpu_check.SUMMARY).read_text())
    assert all(k in summary for k in gpu_check.SUMMARY_FIELDS)
    assert summary["device"] == "cpu" and summary["quick"] and summary["torch"] == torch.__version__
    assert [s["step"] for s in summary["steps"]] == list(gpu_check.STEPS)
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    assert summary["compat"]["gloo"] and summary["compat"]["all_to_all_single"]
    files = {name: json.loads((out / f"{name}.json").read_text()) for name in gpu_check.STEPS}
    for name, data in files.items():
        assert all(k in data for k in gpu_check.COMMON_FIELDS + gpu_check.STEP_FIELDS[name]), name
        assert data["status"] == "ok" and data["seconds"] > 0 and data["checks"], name
    # 8 files at most come back from the device machine, none deeper than 2 folders
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8


@pytest.mark.slow
def test_quick_run_results_hold_measured_values(quick_run):
    out, _ = quick_run
    shared = json.loads((out / "shared_gpu.json").read_text())
    run = shared["gloo_cuda"][0]["result"]
    assert run["placement"]["backend"] == "gloo" and run["all_ok"] and run["allreduce_16mb_bf16_median_ms"] > 0
    assert shared["nccl_same_device"]["skipped"] == "no CUDA device"

    kernels = json.loads((out / "kernels_equal.json").read_text())
    assert kernels["pytest"]["passed"] > 0 and kernels["pytest"]["failed"] == 0
    kinds = {r["kernel"] for r in kernels["large"]}
    assert kinds == {"quantize_pack", "unpack_dequant_sum", "unpack_dequant_sum_requant", "block_hadamard"}
    assert all(r["same_device"]["equal"] for r in kernels["large"] if r["kernel"] != "block_hadamard")
    # the rotation sums in another order than the reference's matmul: within the bound, not bitwise
    assert all(r["within_bound"] for r in kernels["large"] if r["kernel"] == "block_hadamard")
    assert any("cpu_reference" in r for r in kernels["large"])

    speed = json.loads((out / "kernel_speed.json").read_text())
    row = speed["rows"][0]
    for key in ("kernel", "scheme", "bytes_moved", "median_us", "gbps", "copy_gbps", "of_copy", "wall_us"):
        assert key in row
    assert all(r["median_us"] > 0 and r["copy_gbps"] > 0 for r in speed["rows"])
    assert set(speed["fixed_cost_us"]) >= {"quantize_pack:int4-static-top1/64", "unpack_dequant_sum:int8-token"}
    assert speed["target"]["of_copy"] == 0.8

    tp = json.loads((out / "tp_engine.json").read_text())
    run = tp["runs"][0]
    assert run["tp"] == 2 and run["logits_match"] and run["max_abs_logit_diff"] <= run["atol"]
    assert [s["scheme"] for s in run["schemes"]] == ["bf16", "int4-static-top1/64"]
    for s in run["schemes"]:
        assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
        assert 0 < s["comm_share"]["prefill"] <= 1 and 0 < s["comm_share"]["decode"] <= 1
    assert run["schemes"][1]["bits_per_value"] < 5  # the int4 payload went through the collectives

    coll = json.loads((out / "collectives.json").read_text())
    assert coll["jobs"][0]["status"] == "ok" and coll["jobs"][0]["placement"]["placement"]["backend"] == "gloo"
    assert {r["scheme"] for r in coll["records"]} == {"bf16", "int4-static-top1/64"}
    assert all(r["median_ms"] > 0 for r in coll["records"])

    text = gpu_check.report(out)
    assert "kernel_speed: ok" in text and "| 2 |" in text
