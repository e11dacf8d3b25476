"""The Slurm executor against a real Slurm (Debian's slurm-wlm 22.05 + munge, ``tests/slurm_cluster``):
slurmctld and two slurmd (nodes n1, n2 on this host) started for the session on localhost ports,
stopped by PID afterwards, with no job, daemon or process of a run left behind.

Cases: an evaluate at TP 2 gives the local executor's metrics to the last digit; a sweep of 4
points runs as 4 array tasks, at most 2 at once, with the local sweep's best-per-budget table;
cancel from the Runs page (scancel); a job over its time limit ends as timeout; a node set down
mid-run fails the run naming the node and the reason; a restarted queue re-attaches and the run
finishes, indexed, once; bad fields submit nothing; a two-node torchrun spans n1 and n2; a runs
folder the nodes cannot see is refused at submit; the sidebar's Machine panel lists the cluster.

Slurm counts time limits in whole minutes and checks them every 30 s, so the over-limit job ends
60-90 s after it starts. The cluster and that job start as soon as collection shows these tests
will run (``start_early``, called by tests/conftest.py), so in ``make test`` it ends during the
tests before this module. The runs compared with the local executor are submitted when the
module starts and run while the other cases do.

Where the cluster cannot run (not root, Slurm not installed) the module is skipped with the
reason, except under CI (``$CI`` set, as CI services do), where that is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from launch import procs
from launch.store.evaluate import sweep_summary
from launch.store.machine import cluster_frame
from launch.store.runs import log_tail, runs_frame
from launch.events import read_events
from launch.index import RunIndex
from launch.layout import RunPaths
from launch.queue import JobQueue
from launch.spec import SpecError
from tests.conftest import REPO
from tests.slurm_cluster import PARTITIONS, LocalSlurm, why_not
from tests.test_launch_jobs import wait_for

pytestmark = pytest.mark.slow

MODEL, TP, SEQ_LEN = "tiny-llama", 2, 32
# torchrun + ranks importing torch on a shared 2-core machine take 5-30 s to start, more while the
# module's other runs compete for the cores; the bounds catch a hang, not a slow machine.
START_S = 240
CALIBRATION_RUN = "cal-tiny"
EVAL = dict(kind="evaluate", model=MODEL, tp=TP, backend="gloo", schemes=["int4-token", "int4-static-top1/64"],
            calib_from=CALIBRATION_RUN, calib_tokens=8 * SEQ_LEN, eval_tokens=2 * SEQ_LEN, tasks=[],
            time_limit_s=1800, params=dict(seq_len=SEQ_LEN, batch_size=2, layer_error=False))
# 3 explicit schemes + the paper's int4-static-top1/64 (include_paper): 4 points
SWEEP = dict(kind="sweep", model=MODEL, tp=TP, backend="gloo", schemes=["int4-token", "int3-token", "int2-token"],
             calib_from=CALIBRATION_RUN, calib_tokens=8 * SEQ_LEN, eval_tokens=2 * SEQ_LEN, time_limit_s=1800,
             params=dict(seq_len=SEQ_LEN, batch_size=2))
SLURM = dict(executor="slurm", partition="main")


def selftest(tp=1, **params):
    return dict(kind="selftest", model="none", tp=tp, collective_timeout_s=60, time_limit_s=600, params=params)


def wait_running_step(root, run_id, step=1):
    wait_for(lambda: any((e.get("step") or 0) >= step and e["stage"] == "running"
                         for e in read_events(RunPaths(root, run_id).events)), START_S, f"{run_id} to reach step {step}")


def run_processes(root, run_id) -> list[int]:
    """Live processes of a run (every rank and torchrun names its spec file)."""
    spec = str(RunPaths(root, run_id).spec)
    return [p for p in procs.live_pids() if spec in procs.cmdline(p)]


def assert_nothing_left(cluster, root, run_id):
    """No job of the run in squeue, no process of the run on this machine."""
    name = f"lowbit-{run_id}"
    wait_for(lambda: not cluster.command("squeue", "-h", "--name", name).strip(), 60, f"{name} to leave squeue")
    wait_for(lambda: not run_processes(root, run_id), 60, f"the processes of {run_id} to end")


# -- the cluster and the long runs ---------------------------------------------------------------
EARLY: dict = {}   # the cluster, its folder, the over-limit run: from start_early to stop_early


@contextmanager
def slurm_conf(cluster):
    """$SLURM_CONF of ``cluster`` for this process while inside (Slurm's commands read it)."""
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def start_early() -> None:
    """Start the test cluster and submit the over-limit run (a TP 1 selftest, ``--time=1``),
    once; an error is kept for the ``slurm_cluster`` fixture to raise."""
    if EARLY or why_not():
        return
    EARLY["base"] = Path(tempfile.mkdtemp(prefix="lowbit-slurm-"))
    try:
        EARLY["cluster"] = LocalSlurm(EARLY["base"] / "cluster", partitions=PARTITIONS)
        EARLY["cluster"].start()
        EARLY["root"] = EARLY["base"] / "runs"
        with slurm_conf(EARLY["cluster"]):
            queue = JobQueue(EARLY["root"])
            EARLY["over_limit"] = queue.submit(dict(selftest(sleep_s=600), **SLURM, time_limit_s=60))
            queue.step()  # claims it and sbatches it; the test's queue re-attaches it
            queue.stop()
    except Exception as exc:  # noqa: BLE001 - raised by the fixture, in a test, not at collection
        EARLY["error"] = exc


def stop_early() -> None:
    """Stop the cluster (every job cancelled, daemons stopped by PID) and remove its folder."""
    cluster, base = EARLY.pop("cluster", None), EARLY.pop("base", None)
    EARLY.clear()
    try:
        if cluster is not None:
            cluster.stop()  # raises when a daemon outlives SIGKILL
    finally:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    """The cluster, with $SLURM_CONF pointing at it for this module's tests only. (Session-scoped,
    it left $SLURM_CONF set and the daemons up for every later test: the app's sidebar then showed
    the cluster's partitions, and a page test failed or passed by the shuffled order.)"""
    problem = why_not()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm tests cannot run under CI: {problem}")
        pytest.skip(problem)
    start_early()  # already done at collection in a normal run
    if "error" in EARLY:
        raise EARLY["error"]
    try:
        with slurm_conf(EARLY["cluster"]):
            yield EARLY["cluster"]
    finally:
        stop_early()


def _calibrate(root: Path) -> None:
    """The shared calibration both executors' runs read (``calib_from``), made in this process."""
    from lowbit.comm.dist import ThreadWorld
    from lowbit.method.calibrate import calibrate
    from lowbit.model.models import load_model
    load_model(MODEL)  # transformers' lazy imports happen here, not racing in the rank threads
    paths = RunPaths(root, CALIBRATION_RUN)
    paths.make()
    spec = dict(kind="calibrate", model=MODEL, tp=TP, calib_tokens=8 * SEQ_LEN, run_id=CALIBRATION_RUN,
                params=dict(seq_len=SEQ_LEN, batch_size=2))
    paths.spec.write_text(json.dumps(spec))
    params = dict(model=MODEL, source="wikipedia", chunks=8, seq_len=SEQ_LEN, batch_size=2, gamma=0.01,
                  out=str(paths.dir / "calibration"), force=True)
    ThreadWorld(TP).run(calibrate, params)
    index = RunIndex(root)
    index.add(CALIBRATION_RUN, spec)
    index.claim(CALIBRATION_RUN)
    index.finish(CALIBRATION_RUN, "done")


def most_at_once(intervals: list[tuple[str, str]]) -> int:
    """The most of (start, end) intervals (Slurm's ISO times, whole seconds) open at one time; a
    task that starts in the second another ends follows it (ends are exclusive)."""
    edges = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.fixture(scope="module", autouse=True)
def batch(slurm_cluster, tmp_path_factory):
    """One runs root and queue for the module; the long runs submitted at once: the evaluate and
    the sweep, on Slurm and on the local executor."""
    root = tmp_path_factory.mktemp("slurm-runs") / "runs"
    root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_RUNS", str(root))
        _calibrate(root)
        queue = JobQueue(root, max_parallel=2, poll_s=0.5, kill_grace_s=3.0).start()
        runs = dict(eval_slurm=queue.submit(dict(EVAL, **SLURM)), eval_local=queue.submit(EVAL),
                    sweep_slurm=queue.submit(dict(SWEEP, **SLURM, max_concurrent=2)),
                    sweep_local=queue.submit(SWEEP))
        try:
            yield dict(root=root, queue=queue, runs=runs, cluster=slurm_cluster)
        finally:
            queue.stop(kill_running=True)
            for run_id in runs.values():
                assert_nothing_left(slurm_cluster, root, run_id)


# -- the cases -----------------------------------------------------------------------------------
def test_evaluate_through_slurm_matches_the_local_executor_to_the_last_digit(batch):
    q, runs = batch["queue"], batch["runs"]
    rows = {k: q.wait(runs[k], timeout_s=START_S * 3) for k in ("eval_slurm", "eval_local")}
    assert [r["status"] for r in rows.values()] == ["done", "done"], [r["error"] for r in rows.values()]
    results = {k: json.loads(RunPaths(batch["root"], runs[k]).result.read_text()) for k in rows}

    def metrics(result):  # everything but the measured communication time
        return [{k: v for k, v in r.items() if k != "comm_seconds"} for r in result["records"]]
    assert [r["scheme"] for r in results["eval_slurm"]["records"]] == ["fp32", "int4-token", "int4-static-top1/64"]
    assert metrics(results["eval_slurm"]) == metrics(results["eval_local"])
    assert results["eval_slurm"]["records"][2]["kl"] > 0  # the quantized scheme really differs from fp32
    record = json.loads(RunPaths(batch["root"], runs["eval_slurm"]).slurm_record.read_text())
    assert record["command"] == f"sbatch {RunPaths(batch['root'], runs['eval_slurm']).slurm_script()}"
    assert rows["eval_slurm"]["result_paths"] == rows["eval_local"]["result_paths"] == ["result.json"]
    assert "logs/launcher.log" in log_tail(runs["eval_slurm"], batch["root"]), "Slurm's output file is its log"


def test_sweep_runs_four_array_jobs_two_at_once_with_the_local_best_per_budget_table(batch):
    q, runs, root = batch["queue"], batch["runs"], batch["root"]
    rows = {k: q.wait(runs[k], timeout_s=START_S * 4) for k in ("sweep_slurm", "sweep_local")}
    assert [r["status"] for r in rows.values()] == ["done", "done"], [r["error"] for r in rows.values()]
    record = json.loads(RunPaths(root, runs["sweep_slurm"]).slurm_record.read_text())
    assert record["pieces"] == 4 and record["prepare"] is None  # the calibration was there: no prepare job
    tasks = batch["cluster"].command("squeue", "-h", "--states=all", "--array", "-j", record["job"],
                                     "-o", "%i|%T|%S|%e").split()
    assert sorted(t.split("|")[:2] for t in tasks) == [[f"{record['job']}_{i}", "COMPLETED"] for i in range(4)]
    # Slurm's own start and end times: the array limit %2 held the points to 2 at once, and 2 did run at once
    assert most_at_once([tuple(t.split("|")[2:]) for t in tasks]) == 2, tasks
    slurm, local = (json.loads(RunPaths(root, runs[k]).result.read_text()) for k in ("sweep_slurm", "sweep_local"))
    pd.testing.assert_frame_equal(sweep_summary(slurm), sweep_summary(local))
    assert [(p["scheme"], p["kl"], p["bits_per_value"]) for p in slurm["points"]] == \
        [(p["scheme"], p["kl"], p["bits_per_value"]) for p in local["points"]]
    assert (slurm["frontier"], slurm["best_at"], slurm["evaluated"]) == (local["frontier"], local["best_at"], 4)
    assert runs_frame(root).set_index("id").loc[runs["sweep_slurm"], "status"] == "done"
    assert {f"logs/task-{i}.log" for i in range(4)} <= set(log_tail(runs["sweep_slurm"], root))
    messages = [e["message"] for e in read_events(RunPaths(root, runs["sweep_slurm"]).events) if e["stage"] == "running"]
    assert any("2 running, 2 waiting (JobArrayTaskLimit)" in m for m in messages), messages  # Slurm's reason


def test_a_job_over_its_time_limit_ends_as_timeout(slurm_cluster):
    root, run_id = EARLY["root"], EARLY["over_limit"]
    queue = JobQueue(root, poll_s=0.2).start()  # re-attaches the run submitted by start_early
    try:
        row = queue.wait(run_id, timeout_s=START_S + 120)  # Slurm's limit is 1 min, checked every 30 s
    finally:
        queue.stop(kill_running=True)
    assert row["status"] == "timeout", row["error"]
    assert "TIMEOUT" in row["error"] and "--time=1 min" in row["error"]
    assert row["finished"] - row["started"] >= 60, "Slurm stopped it at its limit, not before"
    assert not RunPaths(root, run_id).result.exists()
    assert_nothing_left(slurm_cluster, root, run_id)


def test_cancel_from_the_runs_page_calls_scancel_and_leaves_nothing(batch):
    from streamlit.testing.v1 import AppTest
    root, cluster = batch["root"], batch["cluster"]
    run_id = batch["queue"].submit(dict(selftest(sleep_s=300), **SLURM))
    wait_running_step(root, run_id)
    assert run_processes(root, run_id), "the ranks run on this machine (the node is this host)"
    cluster_frame(max_age_s=0)  # the sidebar reads the cluster now, not a cached empty answer
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    sidebar = [d.value for d in at.sidebar.dataframe if "partition" in d.value.columns]
    assert sidebar and sorted(sidebar[0]["partition"]) == sorted(PARTITIONS), "the Machine panel lists the cluster"
    at.switch_page("pages/runs.py").run()
    at.button(key=f"cancel_{run_id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    row = RunIndex(root).get(run_id)
    assert row["status"] == "cancelled" and row["error"] == "cancelled by user"
    assert_nothing_left(cluster, root, run_id)
    state = cluster.command("squeue", "-h", "--states=all", "--name", f"lowbit-{run_id}", "-o", "%T")
    assert state.split() == ["CANCELLED"]


def test_a_node_set_down_mid_run_fails_the_run_naming_the_node_and_reason(batch):
    root, cluster = batch["root"], batch["cluster"]
    run_id = batch["queue"].submit(dict(selftest(sleep_s=300), executor="slurm", partition="spare"))
    wait_running_step(root, run_id)
    reason = "lowbit test: node pulled"
    cluster.command("scontrol", "update", "nodename=n2", "state=down", f"reason={reason}")
    waiting = None
    try:
        row = batch["queue"].wait(run_id, timeout_s=60)
        # the partition's only node is down: a new run waits, and says why in Slurm's words
        waiting = batch["queue"].submit(dict(selftest(), executor="slurm", partition="spare"))
        message = wait_for(lambda: [e["message"] for e in read_events(RunPaths(root, waiting).events)
                                    if e["stage"] == "pending" and "reason" in e["message"]], 60, "a pending reason")
        assert RunIndex(root).get(waiting)["status"] == "pending"
        # Slurm states this reason by its code or, once its scheduler has set the job's state
        # description, in words (both seen with 22.05 here, depending on which pass saw the job first)
        assert any(words in message[-1] for words in ("ReqNodeNotAvail", "NodeDown", "Nodes required for job are DOWN")), \
            message
        assert batch["queue"].cancel(waiting) == "cancelled"
        assert_nothing_left(cluster, root, waiting)
    finally:  # leave the cluster as the next test expects, whatever failed above: n2 back in service
        if waiting is not None and RunIndex(root).get(waiting)["status"] in ("pending", "running"):
            batch["queue"].cancel(waiting)
        cluster.command("scontrol", "update", "nodename=n2", "state=resume")
        wait_for(lambda: cluster.command("sinfo", "-h", "-n", "n2", "-o", "%T").strip() in ("idle", "mixed"),
                 60, "n2 to return to service")
    assert row["status"] == "failed"
    assert "NODE_FAIL" in row["error"] and "n2" in row["error"] and reason in row["error"], row["error"]
    assert_nothing_left(cluster, root, run_id)


def test_a_crashing_rank_fails_the_run_with_slurms_state_exit_code_and_the_ranks_error(batch):
    root = batch["root"]
    run_id = batch["queue"].submit(dict(selftest(sleep_s=60, crash_rank=0, crash_step=2), **SLURM))
    row = batch["queue"].wait(run_id, timeout_s=START_S)
    assert row["status"] == "failed" and row["returncode"] == 1, row
    assert "ended FAILED with exit code 1" in row["error"], row["error"]
    assert "rank 0 failed" in row["error"] and "deliberate crash on rank 0 at step 2" in row["error"], row["error"]
    assert "logs/launcher.log" in log_tail(run_id, root), "the Runs page tails Slurm's output file"
    assert_nothing_left(batch["cluster"], root, run_id)


def test_a_restarted_queue_reattaches_and_the_run_finishes_indexed_once(slurm_cluster, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("LOWBIT_RUNS", str(root))
    first = JobQueue(root, poll_s=0.2).start()
    run_id = first.submit(dict(selftest(sleep_s=6, step_s=0.2), **SLURM))
    wait_running_step(root, run_id)
    first.stop()  # the app restarts; Slurm keeps the job
    assert RunIndex(root).get(run_id)["status"] in ("pending", "running")
    second = JobQueue(root, poll_s=0.2).start()
    try:
        row = second.wait(run_id, timeout_s=START_S)
    finally:
        second.stop(kill_running=True)
    assert row["status"] == "done", row["error"]
    assert row["result_paths"] == ["result.json"]
    assert json.loads(RunPaths(root, run_id).result.read_text())["all_reduce_ok"]
    jobs = slurm_cluster.command("squeue", "-h", "--states=all", "--name", f"lowbit-{run_id}", "-o", "%i|%T")
    assert jobs.split() == [f"{json.loads(RunPaths(root, run_id).slurm_record.read_text())['job']}|COMPLETED"]


@pytest.mark.parametrize("fields, field, words", [
    (dict(partition="gpu-a100"), "partition", ["unknown partition 'gpu-a100'", "allowed: debug, main, spare"]),
    (dict(nnodes=0), "nnodes", ["between 1 and 64", "got 0"]),
    (dict(time_limit_s=-60), "time_limit_s", ["must be > 0", "got -60"]),
    (dict(partition="main;touch pwned"), "partition", ["plain name", "no spaces or shell characters"]),
    (dict(nnodes=3, tp=3), "nnodes", ["3 nodes, but partition 'debug' has 2", "allowed: 1 to 2"]),
])
def test_bad_slurm_fields_name_the_field_and_submit_nothing(batch, fields, field, words):
    root, cluster = batch["root"], batch["cluster"]

    # sqlite's write-ahead files (index.sqlite-wal/-shm) come and go with the index's own
    # checkpoints and the queue's lock with its polling: neither is something a submit left
    transient = {"index.sqlite-wal", "index.sqlite-shm", "queue.lock"}

    def state():  # runs, run folders, and the names of every job Slurm knows (new array tasks keep theirs)
        return (RunIndex(root).ids(), {p.name for p in root.iterdir()} - transient,
                set(cluster.command("squeue", "-h", "--states=all", "-o", "%j").split()))
    before = state()
    with pytest.raises(SpecError) as err:
        batch["queue"].submit(dict(selftest(), executor="slurm", **fields))
    assert field in err.value.fields(), err.value
    assert all(w in str(err.value) for w in words), str(err.value)
    assert state() == before, "a refused spec left nothing: no run folder, no index row, no job"


def test_two_node_torchrun_spans_both_slurmd(batch):
    root = batch["root"]
    run_id = batch["queue"].submit(dict(selftest(tp=2, sleep_s=0.5), executor="slurm", partition="debug", nnodes=2))
    row = batch["queue"].wait(run_id, timeout_s=START_S)
    assert row["status"] == "done", row["error"]
    result = json.loads(RunPaths(root, run_id).result.read_text())
    assert result["world_size"] == 2 and result["all_reduce_ok"] and sorted(result["hosts"]) == ["n1", "n2"]
    script = RunPaths(root, run_id).slurm_script().read_text()
    assert "--rdzv-backend c10d" in script and "--nnodes 2 --nproc-per-node 1" in script


def test_a_runs_folder_the_nodes_cannot_see_is_refused_at_submit(slurm_cluster, tmp_path):
    """The submitting process sees a private tmpfs at the runs root (its own mount namespace);
    slurmd, outside it, sees the empty folder underneath, as a node would see a login node's disk."""
    root = tmp_path / "private-runs"
    root.mkdir()
    script = ("import sys; from launch.queue import JobQueue; from launch.spec import SpecError\n"
              "try:\n"
              f"    JobQueue(sys.argv[1]).submit({selftest()!r} | dict(executor='slurm', partition='main'))\n"
              "except SpecError as exc:\n    print(exc); sys.exit(3)\n")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f'mount -t tmpfs lowbit-private "$1" && exec "$2" -c "$3" "$1"', "sh", str(root),
                           sys.executable, script], cwd=REPO, env=dict(os.environ, LOWBIT_RUNS=str(root)),
                          capture_output=True, text=True, timeout=START_S)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "executor: the runs folder" in done.stdout and "filesystem the nodes share" in done.stdout, done.stdout
    assert not any(root.iterdir()), "nothing was written where the nodes look"
    assert not slurm_cluster.command("squeue", "-h", "--name", "lowbit-shared-check").strip()
