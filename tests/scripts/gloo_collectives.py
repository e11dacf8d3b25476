"""Run by tests under torchrun: every rank reduces seeded partials with each scheme over real
gloo and saves its outputs, so the test can compare with the single-process math.

    python -m torch.distributed.run --standalone --nproc-per-node 3 tests/scripts/gloo_collectives.py OUT_DIR
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lowbit.site import Site  # noqa: E402
from lowbit.comm.dist import init_from_env  # noqa: E402
from tests.collective_cases import SCHEMES, fake_calibration, partials  # noqa: E402

group = init_from_env("gloo", timeout_s=60)
from lowbit.comm.collectives import QuantCommunicator  # noqa: E402

out = {}
for scheme in SCHEMES:
    comm = QuantCommunicator(group, scheme, fake_calibration(group.world_size))
    out[scheme] = comm.reduce(partials(group.world_size)[group.rank], Site(1, "down_proj"))
torch.save(out, Path(sys.argv[1]) / f"rank{group.rank}.pt")
group.barrier()
# Tear the group down before the interpreter exits: a gloo group left to the process's atexit can
# abort a rank ("terminate called without an active exception", SIGABRT), seen once in CI runs.
torch.distributed.destroy_process_group()
