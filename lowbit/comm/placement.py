"""Which collective backend and which device a torchrun rank uses, and why.

    from lowbit.comm.placement import choose_placement
    choose_placement("auto", local_rank=1, local_world=4, gpus=1)
    # Placement(backend='gloo', device='cuda:0', ranks_per_gpu=4, reason='4 local ranks, 1 GPU: ...')

The rules (``backend`` as a job spec names it):

=========  ==============================  ==================================================
backend    GPUs here vs local ranks        result
=========  ==============================  ==================================================
auto       none                            gloo, every rank on the CPU
auto       at least one per rank           nccl, rank r on cuda:r
auto       fewer than ranks (at least 1)   gloo with CUDA tensors, rank r on cuda:(r % GPUs):
                                           ranks share a GPU
gloo       any                             gloo on the CPU (the CPU path, also on a GPU machine)
nccl       at least one per rank           nccl, rank r on cuda:r
nccl       fewer than ranks                refused (ValueError)
=========  ==============================  ==================================================

Why not NCCL for ranks that share a GPU: NCCL (since 2.5) refuses two ranks of one
communicator on the same device at init ("Duplicate GPU detected : rank 1 and rank 0 both on
CUDA device ..."), and its maintainers say removing the check would not make it work (its
topology search assumes one rank per GPU); no environment variable lifts it. torch's gloo
backend takes CUDA tensors for all_reduce, all_gather, all_to_all_single, broadcast and
barrier: it copies each tensor to pinned host memory on a side stream, runs the collective
on the host over TCP, and copies the result back (``ProcessGroupGloo``'s ``*CUDAWork``). So
shared-GPU ranks compute on the GPU and talk through the host: correct, and slower than
NCCL would be on separate GPUs. ``bench/gpu_check.py``'s ``shared_gpu`` step checks both
claims on the GPU machine and records what it saw.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Placement:
    backend: str  # "nccl" or "gloo" (what torch.distributed is initialised with)
    device: str  # "cpu" or "cuda:<index>"
    ranks_per_gpu: int  # local ranks on this rank's GPU (0 on the CPU)
    reason: str  # one sentence for the run record and the Machine panel

    @property
    def shared_gpu(self) -> bool:
        return self.ranks_per_gpu > 1

    def as_dict(self) -> dict:
        return dict(asdict(self), shared_gpu=self.shared_gpu)


def _ranks_on(gpu: int, local_world: int, gpus: int) -> int:
    return len(range(gpu, local_world, gpus))


def choose_placement(backend: str, local_rank: int, local_world: int, gpus: int) -> Placement:
    """The backend and device of local rank ``local_rank`` of ``local_world`` ranks on a machine
    with ``gpus`` visible CUDA devices (see the module docstring for the table)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise ValueError(f"local rank {local_rank} of {local_world} ranks is not a rank")
    gpus = max(0, int(gpus))
    if backend == "gloo":
        return Placement("gloo", "cpu", 0, "gloo requested: ranks compute on the CPU")
    if gpus >= local_world:
        return Placement("nccl", f"cuda:{local_rank}", 1,
                         f"{local_world} local rank(s), {gpus} GPU(s): one GPU per rank, NCCL")
    if backend == "nccl":
        raise ValueError(f"nccl needs one GPU per local rank: {local_world} ranks but {gpus} GPU(s) here "
                         "(NCCL refuses two ranks on one device); use auto (gloo with CUDA tensors) or gloo")
    if gpus == 0:
        return Placement("gloo", "cpu", 0, "no CUDA device: gloo on the CPU")
    gpu = local_rank % gpus
    return Placement("gloo", f"cuda:{gpu}", _ranks_on(gpu, local_world, gpus),
                     f"{local_world} local ranks, {gpus} GPU(s): ranks share a GPU, and NCCL refuses two ranks "
                     "on one device, so gloo with CUDA tensors (collectives staged through host memory)")


def describe_auto(gpus: int) -> str:
    """What ``auto`` picks on a machine with ``gpus`` GPUs, for every TP size (the Machine panel)."""
    if gpus <= 0:
        return "gloo (CPU)"
    return f"nccl up to TP {gpus}; above: gloo with CUDA tensors, ranks sharing a GPU"


def visible_gpus() -> int:
    """CUDA devices torch sees here (0 without a usable CUDA build)."""
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch CUDA means no GPUs
        return 0
