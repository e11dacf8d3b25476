"""The one torchrun command line: every launcher builds its argument list here (the local queue,
the emulated cluster's nodes, the Slurm batch script's step, ``bench.gpu_check_ranks``).

    torchrun_args(["-m", "launch.worker", "runs/<id>/spec.json"], nproc=3)        # --standalone
    torchrun_args(program, nproc=2, nnodes=2, node_rank=None, rendezvous=c10d("node0:29400", "run1"))

An argument list, never a shell string; this module imports nothing heavy, so the GPU check's
own python can use it.
"""
from __future__ import annotations

import sys
from pathlib import Path

# How often torchrun checks its ranks: a crashed rank is noticed within this many seconds.
MONITOR_INTERVAL_S = 0.5
STANDALONE = ("--standalone",)


def c10d(endpoint: str, rdzv_id: str) -> list[str]:
    """torchrun's own c10d rendezvous at ``endpoint`` (host:port), shared by the nodes of one run."""
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]


def master(addr: str, port: int) -> list[str]:
    """The static rendezvous: node 0 hosts the store at ``addr:port`` (needs ``node_rank``)."""
    return ["--master-addr", addr, "--master-port", str(port)]


def worker_program(spec_path: Path | str) -> list[str]:
    """What every rank of a lowbit job runs: ``launch.worker`` on the run's spec file."""
    return ["-m", "launch.worker", str(spec_path)]


def torchrun_args(program: list[str], nproc: int, nnodes: int = 1, node_rank: int | None = 0,
                  rendezvous=STANDALONE, log_dir: Path | str | None = None, python: str = sys.executable) -> list[str]:
    """``nproc`` ranks of ``program`` on this node, one of ``nnodes`` (``node_rank`` None: the
    c10d rendezvous assigns it), torchrun's own ``rendezvous`` options, ranks tee'd to ``log_dir``."""
    cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes)]
    if node_rank is not None:
        cmd += ["--node-rank", str(node_rank)]
    cmd += ["--nproc-per-node", str(nproc), "--monitor-interval", str(MONITOR_INTERVAL_S), *rendezvous]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir), "--tee", "3"]
    return cmd + list(program)
