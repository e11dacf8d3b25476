# Size: ~530 lines: namespaces, links, their state while a job runs, their teardown and the per-node torchrun are one lifecycle.
"""An emulated cluster on one machine: each TP rank is a torchrun *node* in its own network
namespace, behind a rate-limited link, so the link is the bottleneck as between real nodes.

    .venv/bin/python -m launch.cluster check                  # can this process build one? (root)
    .venv/bin/python -m launch.cluster run runs/<id>/spec.json  # what the queue starts for link != loopback
    .venv/bin/python -m launch.cluster cleanup                # remove leftovers of crashed runs

Topology of one cluster of N nodes at rate R (tag = 8 hex digits of the run id's sha256)::

    namespace lowbit-<tag>-hub:   bridge br0 -- ports p0 .. p<N-1>     (tbf R on each port: node i's ingress)
                                                  |veth pair|
    namespace lowbit-<tag>-n<i>:  lo + veth0 10.213.0.<i+1>/24          (tbf R on veth0: node i's egress)

Every interface and address lives inside these namespaces: the root namespace gets nothing
(no veth, no bridge, no route), the subnet 10.213.0.0/24 has no gateway and no default route,
and every listening socket (torchrun's rendezvous store on node 0, gloo's pairs) is bound
inside a node namespace. Each node's link is full duplex at R, like a switch port: a token
bucket (``tc qdisc tbf``; netem is not available) shapes both directions. tbf counts Ethernet
frames, so TCP goodput is about 1448/1514 = 95.6 % of R.

One torchrun per node, started as an argument list through ``ip netns exec <ns>``::

    python -m torch.distributed.run --nnodes N --node-rank i --nproc-per-node 1
        --master-addr 10.213.0.1 --master-port 29500 ... -m launch.worker runs/<id>/spec.json

with ``GLOO_SOCKET_IFNAME=veth0``. Rank outputs land in the run directory as for any job
(result.json from rank 0, per-rank logs under logs/).

Teardown is always done: by the supervisor (``run``) when its nodes end, on SIGTERM/SIGINT, and
by the queue's cleanup hook (``teardown_run``) when a run ends, is cancelled or times out. A
supervisor holds an ``flock`` on ``<LOCK_DIR>/<tag>.lock`` for the whole life of its cluster, so
namespaces named ``lowbit-*`` whose lock nobody holds are leftovers of a crash or restart;
``remove_stale`` deletes them (the queue calls it when it takes over, every ``run`` before it
builds its own).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from launch.layout import RunPaths
from launch.procs import lock_held
from launch.spec import JobSpec, rate_bits
from launch.submit import job_env
from launch.torchrun import master, torchrun_args, worker_program

PREFIX = "lowbit-"
SUBNET = "10.213.0"          # /24, exists only inside the node namespaces of one cluster
NODE_IFNAME = "veth0"       # the node side of each veth pair (same name in every node namespace)
BRIDGE = "br0"
NETNS_DIR = "/var/run/netns"  # where iproute2 names namespaces (ip netns list reads it)
MASTER_PORT = 29500          # node 0's torchrun store; the namespace is private, so no clash
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
_NS_PATTERN = re.compile(rf"^{re.escape(PREFIX)}([0-9a-f]{{8}})-(hub|n[0-9]+)$")
# How long a supervisor lets the other nodes run after one node failed (they usually fail
# themselves within torchrun's monitor interval once their peer's sockets close).
PEER_GRACE_S = 10.0
# How often a supervisor reads the state of its links (N + 1 short `ip` calls each time).
LINK_CHECK_S = 1.0
# The launcher-log line a supervisor writes for each link fault it sees; the queue's failure
# text puts these lines first (launch.failures.failure_text).
FAULT_PREFIX = "[cluster] link fault: "


class ClusterError(RuntimeError):
    """A cluster that cannot be built or run; ``field`` names the job spec field to change."""

    def __init__(self, message: str, field: str = "link"):
        super().__init__(f"{field}: {message}")
        self.field = field


def lock_dir() -> Path:
    """Where supervisors hold their locks: /run (tmpfs, emptied at boot like the namespaces)."""
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    return base / "lowbit-cluster"


def tag_for(run_id: str) -> str:
    return hashlib.sha256(run_id.encode()).hexdigest()[:8]


# -- can this process build one? ----------------------------------------------------------------
def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def link_problem(link: str) -> str | None:
    """Why this process cannot run a job at ``link``, or None (``loopback`` always works)."""
    if link == "loopback":
        return None
    try:
        rate_bits(link)
    except ValueError as exc:
        return str(exc)
    caps = _effective_caps()
    missing = [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
               if not caps >> bit & 1]
    if missing:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} (not root)"
        return (f"an emulated {link} link needs network namespaces, which need root with CAP_NET_ADMIN and "
                f"CAP_SYS_ADMIN; this process is {who} without {' and '.join(missing)}. Use link 'loopback' "
                f"(every rank on this machine's loopback interface) or run the queue as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return (f"an emulated {link} link needs the '{tool}' command (iproute2), not found on PATH; "
                    "use link 'loopback'")
    return None


# -- namespaces ---------------------------------------------------------------------------------
def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise ClusterError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def namespaces() -> list[str]:
    """Every named network namespace called ``lowbit-*`` (ours): the entries of the directory
    where ``ip netns`` keeps them (read directly: cheap enough for a hook run at every job end)."""
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(PREFIX))


def _pids_in(ns: str) -> list[int]:
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _delete_namespace(ns: str) -> None:
    """Kill what still runs inside ``ns`` (only this cluster's processes can be there), then
    delete it; its interfaces go with it."""
    for _ in range(3):
        pids = [p for p in _pids_in(ns) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    _run("ip", "netns", "delete", ns, check=False)


def _lock_held(tag: str) -> bool:
    """Does a live supervisor hold the lock of cluster ``tag``?"""
    return lock_held(lock_dir() / f"{tag}.lock")


def _remove_tag(tag: str) -> list[str]:
    removed = []
    for ns in namespaces():
        m = _NS_PATTERN.match(ns)
        if m and m.group(1) == tag:
            _delete_namespace(ns)
            removed.append(ns)
    try:
        (lock_dir() / f"{tag}.lock").unlink()
    except OSError:
        pass
    return removed


def remove_stale() -> list[str]:
    """Delete every ``lowbit-*`` namespace whose supervisor is gone; returns the names removed."""
    removed = []
    tags = {m.group(1) for m in map(_NS_PATTERN.match, namespaces()) if m}
    for ns in namespaces():
        if ns.startswith(PREFIX) and not _NS_PATTERN.match(ns):
            _delete_namespace(ns)  # a lowbit- name this module never makes: a foreign leftover of ours
            removed.append(ns)
    for tag in sorted(tags):
        if not _lock_held(tag):
            removed += _remove_tag(tag)
    return removed


def teardown_run(run_id: str) -> list[str]:
    """The queue's cleanup hook for a run that has ended: remove its cluster unless a live
    supervisor still owns it (that one removes it itself). Cheap when there is nothing."""
    tag = tag_for(run_id)
    if not any(n.startswith(f"{PREFIX}{tag}-") for n in namespaces()) or _lock_held(tag):
        return []
    return _remove_tag(tag)


def _tbf(ns: str, dev: str, bits_per_s: float) -> None:
    # Bucket: 2 ms of traffic, at least 4 full frames (so a TSO burst is cut into frames, not
    # dropped) -- short enough that a message much larger than it sees the rate, not the bucket.
    burst = max(4 * 1514, int(bits_per_s / 8 * 0.002))
    # Queue: 200 ms of traffic; TCP's own small-queue limits keep it far from full.
    limit = max(64 * 1514, int(bits_per_s / 8 * 0.2))
    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
         "rate", f"{int(bits_per_s)}bit", "burst", str(burst), "limit", str(limit))


@dataclass
class Cluster:
    """N node namespaces joined by a bridge at ``rate`` per link; a context manager that always
    tears down what it built.

        with Cluster("run-1", 3, "100mbit") as c:
            subprocess.run(c.exec_prefix(0) + ["ip", "addr"])
    """

    run_id: str
    nodes: int
    link: str

    def __post_init__(self):
        if self.nodes < 1:
            raise ClusterError(f"a cluster needs at least one node, got {self.nodes}", field="tp")
        if self.nodes > 250:
            raise ClusterError(f"at most 250 nodes fit the /24 subnet, got {self.nodes}", field="tp")
        self.bits_per_s = rate_bits(self.link)
        self.tag = tag_for(self.run_id)
        self._lock = None

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.tag}-hub"

    def ns(self, node: int) -> str:
        return f"{PREFIX}{self.tag}-n{node}"

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    @property
    def master_addr(self) -> str:
        return self.address(0)

    def exec_prefix(self, node: int) -> list[str]:
        """Argument list that runs a command inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.ns(node)]

    def __enter__(self) -> "Cluster":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def create(self) -> None:
        problem = link_problem(self.link)
        if problem:
            raise ClusterError(problem)
        directory = lock_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(directory / f"{self.tag}.lock", "a+")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # before any namespace exists: never seen as stale
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(json.dumps(dict(run_id=self.run_id, pid=os.getpid(), nodes=self.nodes, link=self.link)))
        self._lock.flush()
        try:
            _remove_tag_namespaces_only(self.tag)  # a crashed earlier attempt of this very run
            self._build()
        except BaseException:
            self.teardown()
            raise

    def _build(self) -> None:
        hub = self.hub
        _run("ip", "netns", "add", hub)
        _run("ip", "-n", hub, "link", "set", "lo", "up")
        _run("ip", "-n", hub, "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "-n", hub, "link", "set", BRIDGE, "up")
        for i in range(self.nodes):
            ns, port = self.ns(i), f"p{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", hub, "link", "add", port, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns)
            _run("ip", "-n", hub, "link", "set", port, "master", BRIDGE)
            _run("ip", "-n", hub, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", NODE_IFNAME)
            _run("ip", "-n", ns, "link", "set", NODE_IFNAME, "up")
            _tbf(ns, NODE_IFNAME, self.bits_per_s)   # node i -> switch
            _tbf(hub, port, self.bits_per_s)         # switch -> node i

    def teardown(self) -> None:
        _remove_tag_namespaces_only(self.tag)
        if self._lock is not None:
            try:
                (lock_dir() / f"{self.tag}.lock").unlink()
            except OSError:
                pass
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def link_faults(self) -> list[str]:
        """What is wrong with this cluster's links now, one line per fault naming the node, its
        namespace and the interface (empty when every link is up): a node's veth0 or its hub port
        set down, a link without carrier, the bridge down, a namespace gone."""
        hub = _link_states(self.hub)
        if hub is None:
            return [f"hub (namespace {self.hub}) is gone"]
        faults = []
        if BRIDGE in hub and not hub[BRIDGE][0]:
            faults.append(f"hub bridge {BRIDGE} (namespace {self.hub}) down")
        for i in range(self.nodes):
            node, ns, port = _link_states(self.ns(i)), self.ns(i), f"p{i}"
            where = f"node {i} (namespace {ns})"
            if node is None or NODE_IFNAME not in node:
                faults.append(f"{where}: namespace or link {NODE_IFNAME} is gone")
                continue
            (node_up, node_state), (port_up, port_state) = node[NODE_IFNAME], hub.get(port, (False, "MISSING"))
            if not node_up:
                faults.append(f"{where}, link {NODE_IFNAME} down")
            if not port_up:
                faults.append(f"{where}, hub port {port} (namespace {self.hub}) down")
            if node_up and port_up and {node_state, port_state} - {"UP", "UNKNOWN"}:
                faults.append(f"{where}, link {NODE_IFNAME} has no carrier (state {node_state}, hub port {port_state})")
        return faults

    def describe(self) -> dict:
        return dict(nodes=self.nodes, link=self.link, bits_per_s=self.bits_per_s, hub=self.hub,
                    namespaces=[self.ns(i) for i in range(self.nodes)],
                    addresses=[self.address(i) for i in range(self.nodes)], ifname=NODE_IFNAME)


def _link_states(ns: str) -> dict[str, tuple[bool, str]] | None:
    """ifname -> (administratively up, operstate) of every link in ``ns``; None if ``ns`` is gone."""
    proc = _run("ip", "-j", "-n", ns, "link", "show", check=False)
    if proc.returncode:
        return None
    try:
        links = json.loads(proc.stdout or "[]")
    except ValueError:
        return None
    return {link["ifname"]: ("UP" in link.get("flags", ()), link.get("operstate", "UNKNOWN")) for link in links}


def _remove_tag_namespaces_only(tag: str) -> None:
    for ns in namespaces():
        m = _NS_PATTERN.match(ns)
        if m and m.group(1) == tag:
            _delete_namespace(ns)


# -- running a job on it ------------------------------------------------------------------------
def node_torchrun(cluster: Cluster, node: int, spec_path: Path, log_dir: Path | None) -> list[str]:
    """The argument list that starts node ``node``'s torchrun inside its namespace."""
    return cluster.exec_prefix(node) + torchrun_args(worker_program(spec_path), 1, cluster.nodes, node,
                                                     master(cluster.master_addr, MASTER_PORT), log_dir)


def supervisor_command(spec_path: Path) -> list[str]:
    """What the queue starts (in a new session) for a job whose link is not loopback."""
    return [sys.executable, "-m", "launch.cluster", "run", str(spec_path)]


def run_spec(spec_path: Path) -> int:
    """Build the cluster for the spec at ``spec_path`` (one node per TP rank), run one torchrun
    per node, tear everything down; returns the first failing node's exit code, else 0."""

    spec_path = Path(spec_path).resolve()
    spec = JobSpec.load_trusted(spec_path)  # validated at submit
    paths = RunPaths(spec_path.parent.parent, spec_path.parent.name)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    nodes: list[subprocess.Popen] = []
    try:
        stale = remove_stale()
        if stale:
            print(f"[cluster] removed leftover namespaces: {', '.join(stale)}", flush=True)
        with Cluster(paths.run_id, spec.tp, spec.link) as cluster:
            print(f"[cluster] {json.dumps(cluster.describe())}", flush=True)
            base_env = job_env(spec, paths)
            for node in range(cluster.nodes):
                env = dict(base_env, GLOO_SOCKET_IFNAME=NODE_IFNAME, TP_SOCKET_IFNAME=NODE_IFNAME,
                           LOWBIT_LINK=spec.link, LOWBIT_NODE=str(node))
                nodes.append(subprocess.Popen(node_torchrun(cluster, node, spec_path, paths.logs),
                                              env=env, stdin=subprocess.DEVNULL))
            code = _wait_nodes(nodes, stop, LinkWatch(cluster, spec.collective_timeout_s + PEER_GRACE_S))
            print(f"[cluster] nodes ended (exit {code}); removing {cluster.hub} and {cluster.nodes} node namespaces",
                  flush=True)
            return code
    except ClusterError as exc:
        print(f"[cluster] {exc}", file=sys.stderr, flush=True)
        _write_error(paths.error, str(exc))
        return 2
    finally:
        _end(nodes)
        for s, handler in old.items():
            signal.signal(s, handler)


class LinkWatch:
    """Reads the cluster's link state every ``LINK_CHECK_S`` while its nodes run and writes each
    new fault to the launcher log as ``FAULT_PREFIX`` + where it is (node, namespace, interface).
    A fault that lasts ``give_up_s`` (the collective timeout plus the peer grace: by then every
    rank should have failed on its own) ends the nodes, so a job never outlives a dead link by
    more than that, whatever its ranks do."""

    def __init__(self, cluster: Cluster, give_up_s: float):
        self.cluster, self.give_up_s = cluster, give_up_s
        self.seen: dict[str, float] = {}     # fault -> monotonic time first seen (while it lasts)
        self._next = 0.0

    def check(self, now: float, force: bool = False) -> bool:
        """Read the links if due (or ``force``); True when a fault has lasted ``give_up_s``."""
        if not force and now < self._next:
            return False
        self._next = now + LINK_CHECK_S
        current = self.cluster.link_faults()
        for fault in current:
            if fault not in self.seen:
                self.seen[fault] = now
                print(f"{FAULT_PREFIX}{fault} (at {time.strftime('%H:%M:%S')})", flush=True)
        for fault in [f for f in self.seen if f not in current]:
            print(f"[cluster] link restored: {fault}", flush=True)
            del self.seen[fault]
        lasting = [f for f, t in self.seen.items() if now - t > self.give_up_s]
        if lasting:
            print(f"[cluster] ending the nodes: {lasting[0]} for more than {self.give_up_s:g} s", flush=True)
        return bool(lasting)


def _wait_nodes(nodes: list[subprocess.Popen], stop: dict, links: LinkWatch | None = None) -> int:
    failed_at = None
    while True:
        codes = [p.poll() for p in nodes]
        if stop["signal"] is not None:
            _end(nodes)
            return 128 + stop["signal"]
        if all(c is not None for c in codes):
            if any(codes) and links is not None:
                links.check(time.monotonic(), force=True)  # a node failed: was a link the cause?
            return next((c for c in codes if c), 0)
        if failed_at is None and any(c for c in codes if c is not None):
            failed_at = time.monotonic()
            if links is not None:
                links.check(failed_at, force=True)
        if links is not None and links.check(time.monotonic()):
            _end(nodes)
            return next((c for c in (p.poll() for p in nodes) if c), 1)
        if failed_at is not None and time.monotonic() - failed_at > PEER_GRACE_S:
            _end(nodes)
            return next(c for c in codes if c)
        time.sleep(0.1)


def _end(nodes: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM the node torchruns still running (torchrun stops its ranks), SIGKILL after grace."""
    for p in nodes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in nodes:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _write_error(path: Path, message: str) -> None:
    """torchrun's error-file format, so the queue's failure report shows the cluster's reason."""
    try:
        path.write_text(json.dumps({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="can this process build an emulated cluster?")
    check.add_argument("--link", default="1gbit")
    run = sub.add_parser("run", help="run a job spec on an emulated cluster (what the queue starts)")
    run.add_argument("spec", type=Path)
    sub.add_parser("cleanup", help="remove lowbit- namespaces left by crashed runs")
    sub.add_parser("list", help="list lowbit- namespaces")
    args = parser.parse_args(argv)
    if args.cmd == "check":
        problem = link_problem(args.link)
        print(problem or f"ok: this process can build emulated {args.link} clusters")
        return 1 if problem else 0
    if args.cmd == "run":
        return run_spec(args.spec)
    if args.cmd == "cleanup":
        removed = remove_stale()
        print("removed: " + (", ".join(removed) if removed else "nothing"))
        return 0
    print("\n".join(namespaces()) or "no lowbit- namespaces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
