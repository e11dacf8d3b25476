"""Real torchrun jobs through the queue (gloo, CPU): completion, rank crash and kill, time limit,
cancel, ordering, restart with re-attach. Each test checks that no process of the run is left."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from launch import procs
from launch.events import read_events
from launch.layout import RunPaths
from launch.queue import JobQueue

pytestmark = pytest.mark.slow

# torchrun + N python ranks importing torch on a shared 2-core machine take ~5-15 s to start;
# the bounds below leave room for that and still catch a hang (collectives time out at 30 s).
START_S = 90


def selftest(tp=2, collective_timeout_s=30, **params):
    return dict(kind="selftest", model="none", tp=tp, collective_timeout_s=collective_timeout_s, params=params)


# A rank that crashes or is killed must end its job through torchrun, not through its peer's
# collective time-out: these tests give the peer a time-out far beyond their bounds, and a job
# that cannot finish inside them either, so only the detection of the dead rank can pass them.
DEAD_PEER_TIMEOUT_S = 600


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_running_step(queue, run_id, step=2):
    """Wait until the ranks are inside the job's loop; returns the index row."""
    paths = RunPaths(queue.root, run_id)
    wait_for(lambda: any((e.get("step") or 0) >= step for e in read_events(paths.events)), START_S,
             f"{run_id} to reach step {step}")
    return queue.get(run_id)


def rank_pids(queue, run_id):
    """The rank processes (torch >= 2.13 gives each rank its own session: found by spec path)."""
    row = queue.get(run_id)
    return [p for p in procs.group_members(row["pgid"], str(RunPaths(queue.root, run_id).spec))
            if "launch.worker" in procs.cmdline(p) and "torch.distributed.run" not in procs.cmdline(p)]


def assert_no_processes_left(queue, run_id):
    row = queue.get(run_id)
    spec = str(RunPaths(queue.root, run_id).spec)

    def leftovers():
        return sorted(set(procs.group_members(row["pgid"]) if row["pgid"] else [])
                      | {p for p in procs.live_pids() if spec in procs.cmdline(p)})
    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = leftovers()
    assert not left, f"orphans of {run_id}: " + "; ".join(f"{p}: {procs.cmdline(p)}" for p in left)
    assert procs.descendants(os.getpid()) == [], "the test process still has children"


def test_three_rank_generate_on_a_tiny_model_completes_and_is_indexed(queue, tmp_path):
    """A tiny Llama with 6 heads / 3 KV heads (TP 3 valid), saved as a local model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.model.models import load_tokenizer
    model_dir = tmp_path / "tiny-llama-6h"
    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=96, intermediate_size=192,
                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                                  max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    load_tokenizer().save_pretrained(model_dir)

    canary = tmp_path / "PWNED"
    prompt = f"Hello $(touch {canary}) `touch {canary}`; echo"  # must reach the model as text, never a shell
    run_id = queue.submit(dict(kind="generate", model=str(model_dir), tp=3, backend="gloo", prompt=prompt,
                               max_new_tokens=4, collective_timeout_s=60))
    row = queue.wait(run_id, timeout_s=240)
    assert row["status"] == "done", row["error"]
    assert row["result_paths"] == ["result.json"] and row["started"] <= row["finished"]
    result = json.loads(RunPaths(queue.root, run_id).result.read_text())
    assert result["tp"] == 3 and result["backend"] == "gloo" and result["prompt"] == prompt
    assert len(result["tokens"]) == 4 and isinstance(result["text"], str)
    assert result["run"]["id"] == run_id
    assert not canary.exists()
    stages = [e["stage"] for e in read_events(RunPaths(queue.root, run_id).events)]
    assert stages[0] == "loading" and "running" in stages and stages[-1] == "done"
    assert len({p.parent.name for p in RunPaths(queue.root, run_id).rank_logs()}) == 3  # a log dir per rank
    assert_no_processes_left(queue, run_id)


def test_two_jobs_run_one_after_the_other_and_a_new_queue_finds_them(queue):
    first = queue.submit(dict(kind="tp-check", model="tiny-llama-mqa", tp=2, backend="gloo", max_new_tokens=3))
    second = queue.submit(selftest(sleep_s=0.3))
    rows = [queue.wait(first, timeout_s=240), queue.wait(second, timeout_s=240)]
    assert [r["status"] for r in rows] == ["done", "done"], [r["error"] for r in rows]
    assert rows[1]["started"] >= rows[0]["finished"], "the second job started before the first ended"
    report = json.loads(RunPaths(queue.root, first).result.read_text())
    assert report["ok"] and report["max_abs_logit_diff"] <= report["atol"]
    queue.stop()
    again = JobQueue(queue.root)
    found = {r["id"]: r["status"] for r in again.list_runs()}
    assert found == {first: "done", second: "done"}


def test_a_crashing_rank_fails_the_job_with_its_error(queue):
    run_id = queue.submit(selftest(sleep_s=600, crash_rank=1, crash_step=3, collective_timeout_s=DEAD_PEER_TIMEOUT_S))
    row = queue.wait(run_id, timeout_s=START_S + 30)
    assert row["status"] == "failed"
    assert "deliberate crash on rank 1 at step 3" in row["error"] and "rank 1" in row["error"]
    assert row["finished"] - row["started"] < START_S  # a hang bound: start-up plus the crash's detection
    assert_no_processes_left(queue, run_id)


def test_killing_one_rank_marks_the_job_failed_within_30_s(queue):
    run_id = queue.submit(selftest(sleep_s=600, step_s=0.1, collective_timeout_s=DEAD_PEER_TIMEOUT_S))
    row = wait_running_step(queue, run_id)
    victims = rank_pids(queue, run_id)
    assert len(victims) == 2, f"expected 2 ranks in group {row['pgid']}, got {victims}"
    os.kill(victims[-1], signal.SIGKILL)
    killed_at = time.time()
    row = queue.wait(run_id, timeout_s=30)
    assert row["status"] == "failed"
    assert row["finished"] - killed_at < 30
    assert "rank" in row["error"] and ("SIGKILL" in row["error"] or "Signal 9" in row["error"]), row["error"]
    assert_no_processes_left(queue, run_id)


def test_a_job_over_its_time_limit_is_stopped(queue):
    run_id = queue.submit(dict(selftest(sleep_s=120), time_limit_s=2.0))
    row = queue.wait(run_id, timeout_s=START_S + 30)
    assert row["status"] == "timeout" and "time limit of 2 s" in row["error"]
    # never before the limit; after it, within the queue's polling (the kill grace comes after the
    # finish stamp): 10 s is a hang bound, a hundred poll intervals
    assert 2.0 < row["finished"] - row["started"] < 2.0 + 10
    assert not RunPaths(queue.root, run_id).result.exists()
    assert_no_processes_left(queue, run_id)


def test_cancel_ends_the_whole_process_group(queue):
    run_id = queue.submit(selftest(sleep_s=120))
    wait_running_step(queue, run_id, step=1)
    assert queue.cancel(run_id) == "cancelled"
    row = queue.wait(run_id, timeout_s=20)
    assert row["status"] == "cancelled" and row["error"] == "cancelled by user"
    assert_no_processes_left(queue, run_id)


def test_a_restarted_queue_reattaches_a_live_run(queue):
    run_id = queue.submit(selftest(sleep_s=4, step_s=0.2))
    wait_running_step(queue, run_id, step=1)
    queue.stop()  # the app restarts; the job keeps running in its own session
    assert queue.get(run_id)["status"] == "running"
    assert procs.group_alive(queue.get(run_id)["pgid"], str(RunPaths(queue.root, run_id).spec))

    second = JobQueue(queue.root, poll_s=0.1).start()
    try:
        row = second.wait(run_id, timeout_s=START_S)
    finally:
        second.stop(kill_running=True)
    assert row["status"] == "done", row["error"]
    assert json.loads(RunPaths(queue.root, run_id).result.read_text())["all_reduce_ok"]
    assert_no_processes_left(queue, run_id)


def test_lock_held_sees_a_live_owner_and_not_a_dead_one(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "locks" / "owner.lock"
    assert not procs.lock_held(path) and path.exists()  # created, nobody holds it
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert procs.lock_held(path)
    finally:
        holder.kill()
        holder.wait()
    assert not procs.lock_held(path)  # the lock died with its owner
