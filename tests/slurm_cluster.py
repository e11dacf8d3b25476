"""A throwaway Slurm cluster on this machine, for the Slurm tests and the docs transcript:
munged, slurmctld and one slurmd per node, all as root on free localhost ports, with a key and a
generated slurm.conf in a temporary folder. Two nodes, n1 and n2, share this host: Debian's build
(22.05) runs several slurmd on one host, each started with ``-N <node>`` on its own port.

    with LocalSlurm(tmp_dir) as cluster:        # cluster.env: SLURM_CONF for every Slurm command
        subprocess.run(["sinfo"], env=cluster.env)

``stop()`` cancels every job, waits until none is left, then stops the daemons by the PIDs they
wrote and checks they are gone. ``why_not()`` says why it cannot run here (not root, Slurm or
munge not installed: ``make test`` installs slurm-wlm and munge with apt).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("n1", "n2")
# partition -> its nodes; the first is the default. The tests keep jobs that run side by side
# apart: long runs on "main" (n1), the node that is set down on "spare" (n2), two-node jobs on "debug".
PARTITIONS = {"debug": NODES, "main": ("n1",), "spare": ("n2",)}
# Cores the config gives each node (the machine's 2 are shared: SlurmdParameters=config_overrides),
# so that the tests' jobs fit side by side and a sweep's array limit, not the cluster's size, is
# what holds its points to 2 at a time.
CPUS_PER_NODE = 12
START_TIMEOUT_S = 60.0


def why_not() -> str | None:
    """Why the local cluster cannot run here, or None."""
    absent = [d for d in (*DAEMONS, "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
              if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"Slurm/munge not installed (missing {', '.join(absent)}; `make test` installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "the Slurm test cluster runs slurmd, which starts jobs, as root: run the tests as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    def __init__(self, folder: Path, nodes: tuple[str, ...] = NODES, cpus_per_node: int = CPUS_PER_NODE,
                 partitions: dict[str, tuple[str, ...]] | None = None):
        self.dir = Path(folder).resolve()
        self.nodes, self.cpus_per_node = nodes, cpus_per_node
        self.partitions = partitions or {"debug": nodes}
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for sub in ("state", "log", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._write_conf()
        try:
            self._run([_daemon("munged"), "--force", f"--socket={self.dir / 'munge.sock'}", f"--key-file={key}",
                       f"--pid-file={self.dir / 'munged.pid'}", f"--log-file={self.dir / 'log' / 'munged.log'}",
                       f"--seed-file={self.dir / 'munged.seed'}"])
            self.pids["munged"] = self._pid("munged.pid")
            self._run([_daemon("slurmctld"), "-f", str(self.conf)])
            self.pids["slurmctld"] = self._pid("slurmctld.pid")
            for node in self.nodes:
                self._run([_daemon("slurmd"), "-f", str(self.conf), "-N", node])
                self.pids[f"slurmd {node}"] = self._pid(f"slurmd-{node}.pid")
            self._wait_idle()
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job and wait for none to be left, then stop the daemons (SIGTERM, then
        SIGKILL) by their PIDs; raises when one of them is still alive."""
        if self.pids.get("slurmctld"):
            subprocess.run(["scancel", "--user", str(os.getuid())], env=self.env, capture_output=True,
                           timeout=30)
            self._wait(lambda: not self.command("squeue", "-h").strip(), 60, "every job to end")
        for name in sorted(self.pids, key=lambda n: ("slurmd" not in n, n != "slurmctld")):
            _end(self.pids[name])
        alive = [f"{name} ({pid})" for name, pid in self.pids.items() if _alive(pid)]
        self.pids.clear()
        if alive:
            raise RuntimeError(f"Slurm test cluster: still alive after SIGKILL: {', '.join(alive)}")

    # -- helpers -----------------------------------------------------------------------------
    def command(self, *args: str, check: bool = True) -> str:
        """A Slurm command against this cluster; its stdout."""
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def _write_conf(self) -> None:
        ctld, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        d = self.dir
        lines = [
            "ClusterName=lowbit-test", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d / 'munge.sock'}",
            "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={d / 'log' / 'slurmd-%n.log'}",
            # what Debian's 22.05 runs here (checked): no cgroups, no task binding, cores as the unit
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SlurmdParameters=config_overrides", "MpiDefault=none",
            "SchedulerType=sched/builtin", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            # a node set down stays down, with its reason, until it is resumed
            "ReturnToService=1", "KillWait=2", "InactiveLimit=0", "SlurmdTimeout=30",
            # ended jobs stay in squeue for the whole test session (a queue re-attaches them later)
            "MinJobAge=65533",
        ]
        lines += [f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus_per_node} "
                  "State=UNKNOWN" for n, port in zip(self.nodes, node_ports)]
        lines += [f"PartitionName={name} Nodes={','.join(nodes)} Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE "
                  "State=UP" for i, (name, nodes) in enumerate(self.partitions.items())]
        self.conf.write_text("\n".join(lines) + "\n")

    def _run(self, args: list[str]) -> None:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            logs = "; ".join(f"{p.name}: {p.read_text()[-500:]}" for p in (self.dir / "log").glob("*.log"))
            raise RuntimeError(f"{args[0]} did not start: {done.stderr.strip()} {logs}")

    def _pid(self, name: str) -> int:
        path = self.dir / name
        self._wait(lambda: path.exists() and path.read_text().strip().isdigit(), 30, f"{name}")
        return int(path.read_text().strip())

    def _wait_idle(self) -> None:
        def idle():
            out = self.command("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            return {line.split()[0] for line in out.splitlines() if line.endswith("idle")} == set(self.nodes)
        self._wait(idle, START_TIMEOUT_S, f"nodes {', '.join(self.nodes)} to be idle")

    @staticmethod
    def _wait(predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"Slurm test cluster: timed out after {timeout_s:g} s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _end(pid: int, grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if not _alive(pid):
            return
