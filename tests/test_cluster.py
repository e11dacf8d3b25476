"""The emulated cluster (launch.cluster): link rates, the refusal without namespace rights, and,
where this process is root, real 3-node clusters behind 100 Mbit/s links run through the queue,
cancelled, timed out, and crashed -- never leaving a namespace, an interface or a process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import cluster, procs
from launch.events import read_events
from launch.layout import RunPaths
from launch.queue import JobQueue, failure_text
from launch.spec import JobSpec, rate_bits

# Runs of torchrun on a shared 2-core machine take 5-30 s to start (see test_launch_jobs).
START_S = 120


def test_link_rates_parse_to_bits_per_second():
    assert rate_bits("100mbit") == 100e6
    assert rate_bits("1gbit") == 1e9
    assert rate_bits("2.5gbit") == 2.5e9
    assert rate_bits("500kbit") == 500e3
    for bad in ("loopback", "100mb", "0mbit", "-1gbit", "", "1gbit; rm -rf /"):
        with pytest.raises(ValueError, match="link rate"):
            rate_bits(bad)


def test_names_and_addresses_stay_in_the_private_subnet_and_prefix():
    c = cluster.Cluster("20250101-000000-selftest-abcdef", 4, "1gbit")
    names = [c.hub] + [c.ns(i) for i in range(4)]
    assert all(cluster._NS_PATTERN.match(n) for n in names), names
    assert [c.address(i) for i in range(4)] == ["10.213.0.1", "10.213.0.2", "10.213.0.3", "10.213.0.4"]
    assert c.master_addr == "10.213.0.1"
    cmd = cluster.node_torchrun(c, 2, RunPaths("runs", "r1").spec, None)
    assert cmd[:4] == ["ip", "netns", "exec", c.ns(2)]
    assert cmd[cmd.index("--nnodes") + 1] == "4" and cmd[cmd.index("--node-rank") + 1] == "2"
    assert cmd[cmd.index("--master-addr") + 1] == "10.213.0.1"
    assert all(isinstance(a, str) for a in cmd)  # an argument list, never a shell string


def test_loopback_needs_nothing_and_a_rate_needs_namespace_rights(monkeypatch):
    assert cluster.link_problem("loopback") is None
    monkeypatch.setattr(cluster, "_effective_caps", lambda: 1 << cluster.CAP_SYS_ADMIN)
    problem = cluster.link_problem("100mbit")
    assert "CAP_NET_ADMIN" in problem and "'loopback'" in problem and "CAP_SYS_ADMIN" not in problem.split("without")[1]
    monkeypatch.setattr(cluster, "_effective_caps", lambda: 0)
    assert "CAP_NET_ADMIN and CAP_SYS_ADMIN" in cluster.link_problem("1gbit")


def test_queue_refuses_an_emulated_link_without_rights_on_field_link(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "_effective_caps", lambda: 0)
    q = JobQueue(tmp_path / "runs", poll_s=0.05)
    run_id = q.submit(dict(kind="selftest", model="none", tp=2, link="100mbit"))
    row = q.wait(run_id, timeout_s=30)
    assert row["status"] == "failed"
    assert "link:" in row["error"] and "loopback" in row["error"], row["error"]
    assert procs.descendants(os.getpid()) == []



class _FakeLinks:
    """Stands in for a Cluster in LinkWatch: the faults it reports are set by the test."""
    faults: list[str] = []

    def link_faults(self):
        return list(self.faults)


def test_link_watch_logs_each_fault_once_and_gives_up_when_it_lasts(capsys):
    fake = _FakeLinks()
    watch = cluster.LinkWatch(fake, give_up_s=20.0)
    assert watch.check(0.0) is False and capsys.readouterr().out == ""
    fake.faults = ["node 1 (namespace lowbit-00000000-n1), link veth0 down"]
    assert watch.check(0.5) is False          # not due yet: one read per LINK_CHECK_S
    assert watch.check(0.5, force=True) is False
    assert watch.check(2.0) is False
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(cluster.FAULT_PREFIX + fake.faults[0]), out
    assert watch.check(21.0) is True          # down for 20.5 s > give_up_s
    assert "ending the nodes" in capsys.readouterr().out
    fake.faults = []
    assert watch.check(30.0) is False and "link restored" in capsys.readouterr().out


def test_failure_text_puts_the_supervisors_link_faults_first(tmp_path):
    paths = RunPaths(tmp_path, "r1")
    paths.make()
    fault = "node 1 (namespace lowbit-00000000-n1), link veth0 down (at 12:00:00)"
    paths.launcher_log.write_text(f"[cluster] {{}}\n{cluster.FAULT_PREFIX}{fault}\n{cluster.FAULT_PREFIX}{fault}\n"
                                  "RuntimeError: Timed out waiting 5000ms for recv operation to complete\n")
    text = failure_text(paths, 1)
    lines = text.splitlines()
    assert lines[0] == f"link fault: {fault}" and not lines[1].startswith("link fault:"), text  # once
    assert "Timed out waiting 5000ms" in text  # the log tail still follows


# -- real clusters (root) -----------------------------------------------------------------------
needs_root = pytest.mark.skipif(cluster.link_problem("100mbit") is not None,
                                reason=f"no network namespaces here: {cluster.link_problem('100mbit')}")


def _root_interfaces() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _our_namespaces(run_id: str) -> list[str]:
    return [n for n in cluster.namespaces() if n.startswith(f"{cluster.PREFIX}{cluster.tag_for(run_id)}-")]


@pytest.fixture
def clean_host():
    """Root namespace interfaces before == after; no lowbit- namespace of this test remains."""
    before = _root_interfaces()
    made: list[str] = []
    yield made
    leftovers = [n for run_id in made for n in _our_namespaces(run_id)]
    for run_id in made:  # leave the machine clean even when the test failed
        cluster._remove_tag(cluster.tag_for(run_id))
    assert not leftovers, f"namespaces left behind: {leftovers}"
    added = _root_interfaces() - before
    assert not added, f"interfaces left in the root namespace: {added}"


def _assert_no_processes(queue, run_id):
    spec = str(RunPaths(queue.root, run_id).spec)
    deadline = time.monotonic() + 15
    while any(spec in procs.cmdline(p) for p in procs.live_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in procs.live_pids() if spec in procs.cmdline(p)]
    assert not left, "; ".join(f"{p}: {procs.cmdline(p)}" for p in left)


@pytest.mark.slow
@needs_root
def test_three_node_cluster_at_100mbit_runs_exact_and_quantized_all_reduce(queue, clean_host):
    """bf16 ring all-reduce: each rank sends (and receives) 2 (N - 1) / N x the tensor's bytes,
    so at rate R it takes t = 2 (N - 1) / N * bytes * 8 / R; for 2048 x 576 bf16 (2.36 MB) at
    N = 3 and 100 Mbit/s that is 252 ms. No repeat can beat the shaped wire, and the fastest
    repeat (the one the fewest scheduling delays reached) stays near it."""
    tokens, hidden, n, rate = 2048, 576, 3, 100e6
    spec = JobSpec(kind="collective-bench", model="none", tp=n, link="100mbit", collective_timeout_s=120,
                   params=dict(tokens=[tokens], hidden=[hidden], repeats=3, min_repeats=3, warmup=1, codec="reference",
                               schemes=["bf16", "int4-static-top1/64@twoshot+int4-token"]))
    run_id = queue.submit(spec)
    clean_host.append(run_id)
    row = queue.wait(run_id, timeout_s=START_S + 120)
    assert row["status"] == "done", row["error"]
    paths = RunPaths(queue.root, run_id)
    records = {r["scheme"]: r for r in json.loads(paths.result.read_text())["records"]}

    exact = records["bf16"]
    expected_ms = 2 * (n - 1) / n * tokens * hidden * 2 * 8 / rate * 1e3
    ratio = exact["min_ms"] / expected_ms
    print(f"bf16 all_reduce fastest {exact['min_ms']:.1f} ms vs 2(N-1)/N*bytes/rate = {expected_ms:.1f} ms: x{ratio:.2f}")
    # The fastest repeat, not the median: it is the link's time with the fewest scheduling delays
    # (with both cores busy beside the test, gloo's ring threads wait for a core between steps and
    # the slowest rank ends a repeat), so the bound tells the link, not the machine's load. 1.5 both
    # ways: TCP/IP + Ethernet headers add ~4.5 % at MTU 1500 and gloo's ring steps a few ms; faster
    # would mean the link is not shaped (loopback is ~100x faster here).
    assert 1 / 1.5 <= ratio <= 1.5, (exact, expected_ms)
    assert exact["link"] == "100mbit" and exact["tp"] == n

    quant = records["int4-static-top1/64@twoshot+int4-token"]
    # int4 on both legs with the top 1/64 features in bf16: bench_on_group on threaded ranks with
    # the same seeded 2048 x 576 partials measured 0.067 (a link changes times, never values);
    # 0.15 is about 2x that.
    assert quant["rel_error"] < 0.15, quant
    assert quant["bytes_per_rank"] < exact["bytes_per_rank"] / 3, quant  # ~4.2 of 16 bits per value

    log = paths.launcher_log.read_text()
    topology = json.loads(next(line for line in log.splitlines() if line.startswith("[cluster] {"))[10:])
    assert topology["nodes"] == n and topology["addresses"][0] == "10.213.0.1", topology
    node_logs = [d for d in paths.logs.iterdir() if d.is_dir()]
    assert len(node_logs) == n, f"one torchrun log dir per node expected, got {node_logs}"
    _assert_no_processes(queue, run_id)


@pytest.mark.slow
@needs_root
@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancelled_or_timed_out_cluster_job_leaves_nothing(queue, clean_host, how):
    # timeout: 20 s ends the 120 s job whether or not its ranks have started by then (the
    # namespaces exist from the first second on); cancel: only once the ranks all-reduce.
    limit = 20.0 if how == "timeout" else 1000.0
    run_id = queue.submit(dict(kind="selftest", model="none", tp=2, link="100mbit", collective_timeout_s=60,
                               time_limit_s=limit, params=dict(sleep_s=120, step_s=0.2)))
    clean_host.append(run_id)
    paths = RunPaths(queue.root, run_id)
    if how == "cancel":
        deadline = time.monotonic() + START_S
        while not any((e.get("step") or 0) >= 2 for e in read_events(paths.events)):
            assert time.monotonic() < deadline, "the cluster job never reached step 2"
            assert queue.get(run_id)["status"] in ("queued", "running"), queue.get(run_id)
            time.sleep(0.2)
        assert len(_our_namespaces(run_id)) == 3  # hub + 2 nodes while it runs
        assert queue.cancel(run_id) == "cancelled"
    row = queue.wait(run_id, timeout_s=limit + 60)
    assert row["status"] == ("cancelled" if how == "cancel" else "timeout"), row
    _assert_no_processes(queue, run_id)
    deadline = time.monotonic() + 10
    while _our_namespaces(run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _our_namespaces(run_id) == []


@needs_root
def test_namespaces_of_a_killed_supervisor_are_removed_when_a_queue_takes_over(tmp_path, clean_host):
    """A supervisor killed with SIGKILL cannot clean up; its lock dies with it, so the next
    queue (or cluster run) finds the namespaces unowned and removes them."""
    run_id = "crashed-supervisor-test"
    clean_host.append(run_id)
    repo = str(Path(cluster.__file__).resolve().parent.parent)
    code = (f"import sys, time; sys.path.insert(0, {repo!r}); from launch.cluster import Cluster; "
            f"c = Cluster({run_id!r}, 2, '1gbit'); c.create(); print('up', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert len(_our_namespaces(run_id)) == 3
        cluster.remove_stale()
        assert len(_our_namespaces(run_id)) == 3, "a live supervisor's cluster must survive remove_stale"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(_our_namespaces(run_id)) == 3, "SIGKILL cannot clean up: the leftovers this test is about"
    JobQueue(tmp_path / "runs").step()  # takes the queue lock -> recover -> remove_stale
    assert _our_namespaces(run_id) == []


@pytest.mark.slow
@needs_root
def test_evaluate_over_an_emulated_link_gives_the_loopback_metrics_to_the_last_digit(queue, clean_host):
    """The link changes how long communication takes, never what arrives: an evaluate job on two
    namespaced nodes behind a 100 Mbit/s link reports the very perplexity, KL and top-1 of the
    same job over loopback (and records the link it ran on)."""
    base = dict(kind="evaluate", model="tiny-llama", tp=2, schemes=["int4-token", "int8-token@min32k"],
                calib_tokens=128, eval_tokens=128, tasks=[], items_per_task=0, collective_timeout_s=120,
                params=dict(seq_len=64, batch_size=2, layer_error=False))
    records = {}
    for link in ("loopback", "100mbit"):
        run_id = queue.submit(JobSpec(**dict(base, link=link)))
        clean_host.append(run_id)
        row = queue.wait(run_id, timeout_s=START_S + 240)
        assert row["status"] == "done", row["error"]
        result = json.loads(RunPaths(queue.root, run_id).result.read_text())
        records[link] = {r["scheme"]: r for r in result["records"]}
    for scheme, r in records["loopback"].items():
        other = records["100mbit"][scheme]
        for key in ("ppl", "kl", "top1_agreement", "bits_per_value", "clamped", "gated_calls"):
            assert other[key] == r[key], (scheme, key, r[key], other[key])  # bit-identical, not close
    assert records["100mbit"]["int8-token@min32k"]["gated_calls"] > 0  # decode-sized messages went exact


def _set_link(ns: str, dev: str, state: str) -> None:
    subprocess.run(["ip", "-n", ns, "link", "set", dev, state], check=True, capture_output=True, text=True)


@needs_root
def test_link_faults_name_the_node_its_namespace_and_the_interface(clean_host):
    """What the supervisor reports for each way a link can go: a node's veth0 down, its hub port
    down, the bridge down, a node namespace deleted; nothing when all is up again."""
    run_id = "link-faults-test"
    clean_host.append(run_id)
    with cluster.Cluster(run_id, 3, "1gbit") as c:
        assert c.link_faults() == []
        _set_link(c.ns(2), cluster.NODE_IFNAME, "down")
        _set_link(c.hub, "p1", "down")
        assert c.link_faults() == [f"node 1 (namespace {c.ns(1)}), hub port p1 (namespace {c.hub}) down",
                                   f"node 2 (namespace {c.ns(2)}), link veth0 down"]
        _set_link(c.ns(2), cluster.NODE_IFNAME, "up")
        _set_link(c.hub, "p1", "up")
        _set_link(c.hub, cluster.BRIDGE, "down")
        assert c.link_faults() == [f"hub bridge br0 (namespace {c.hub}) down"]
        _set_link(c.hub, cluster.BRIDGE, "up")
        assert c.link_faults() == []
        subprocess.run(["ip", "netns", "delete", c.ns(0)], check=True)
        assert c.link_faults() == [f"node 0 (namespace {c.ns(0)}): namespace or link veth0 is gone"]
    assert _our_namespaces(run_id) == []


@pytest.mark.slow
@needs_root
def test_a_link_taken_down_mid_run_fails_the_job_naming_the_node_and_link(queue, clean_host):
    """``ip link set veth0 down`` in node 1's namespace while the ranks all-reduce in a loop: the
    job fails within the collective timeout (plus torchrun's monitor and the supervisor's
    polling), its error names node 1, its namespace and the link, and nothing is left."""
    timeout_s = 5.0
    run_id = queue.submit(dict(kind="selftest", model="none", tp=2, link="1gbit", collective_timeout_s=timeout_s,
                               params=dict(sleep_s=120, step_s=0.1)))
    clean_host.append(run_id)
    paths = RunPaths(queue.root, run_id)
    deadline = time.monotonic() + START_S
    while not any((e.get("step") or 0) >= 2 for e in read_events(paths.events)):
        assert time.monotonic() < deadline, "the cluster job never reached step 2"
        assert queue.get(run_id)["status"] in ("queued", "running"), queue.get(run_id)
        time.sleep(0.2)
    node_ns = f"{cluster.PREFIX}{cluster.tag_for(run_id)}-n1"
    _set_link(node_ns, cluster.NODE_IFNAME, "down")
    down_at = time.time()
    row = queue.wait(run_id, timeout_s=timeout_s + cluster.PEER_GRACE_S + 60)
    print(f"link down -> {row['status']} after {row['finished'] - down_at:.1f} s:\n{row['error'][:300]}")
    assert row["status"] == "failed", row
    assert row["error"].startswith(f"link fault: node 1 (namespace {node_ns}), link veth0 down"), row["error"]
    assert "Timed out" in row["error"]  # the rank's own error follows: what the dead link did to it
    # collective timeout + torchrun's monitor interval + the supervisor's peer grace + polling
    assert row["finished"] - down_at < timeout_s + cluster.PEER_GRACE_S + 10, row
    _assert_no_processes(queue, run_id)
    deadline = time.monotonic() + 10
    while _our_namespaces(run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _our_namespaces(run_id) == []
