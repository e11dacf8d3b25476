"""Process groups for tensor parallelism: a thin, testable surface over torch.distributed.

The TP model and the communicators only need four things from a group: its rank, its size,
and the collectives all_reduce, all_gather and all_to_all. ``TorchGroup`` forwards them to
``torch.distributed`` (gloo on CPU or on a GPU that ranks share, NCCL on one GPU per rank;
``lowbit.comm.placement`` decides). ``ThreadWorld`` runs the same collectives between threads of one
process, so most tests exercise real TP math without starting processes (torch ops release the
GIL, so the threads really run side by side).
"""
from __future__ import annotations

import datetime
import os
import threading
from typing import Protocol

import torch
import torch.distributed as dist

from lowbit.comm import placement as _placement  # looked up at call time: tests stub the GPU count


class Group(Protocol):
    """What a communicator needs from a process group."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks; returns the reduced tensor (same dtype and shape)."""

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack every rank's ``tensor`` along a new dim 0: [world_size, *tensor.shape]."""

    def all_to_all(self, tensor: torch.Tensor, send_splits: list[int] | None = None,
                   recv_splits: list[int] | None = None) -> torch.Tensor:
        """Split dim 0 into chunks (equal, or ``send_splits`` long); chunk j goes to rank j.
        Returns the received chunks concatenated in rank order (``recv_splits`` long)."""

    def barrier(self) -> None:
        """Wait for every rank."""


class TorchGroup:
    """A ``Group`` backed by the default torch.distributed process group."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.placement = None  # lowbit.comm.placement.Placement, set by init_from_env

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather(list(out.unbind(0)), tensor, group=self.group)
        return out

    def all_to_all(self, tensor: torch.Tensor, send_splits: list[int] | None = None,
                   recv_splits: list[int] | None = None) -> torch.Tensor:
        tensor = tensor.contiguous()
        if send_splits is None:
            out = torch.empty_like(tensor)
        else:
            out = torch.empty((sum(recv_splits), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.all_to_all_single(out, tensor, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                               group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)


class ThreadWorld:
    """Shared state for ``world_size`` threads that act as ranks of one group.

    Each collective is two barriers: every rank posts its tensor, waits, reads what it needs,
    and waits again so no rank overwrites a slot that another is still reading.
    """

    def __init__(self, world_size: int, timeout_s: float = 120.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._slots: list[torch.Tensor | None] = [None] * world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)

    def group(self, rank: int) -> "ThreadGroup":
        return ThreadGroup(self, rank)

    def run(self, fn, *args, **kwargs) -> list:
        """Run ``fn(group, *args, **kwargs)`` on one thread per rank; return results by rank.
        An exception on any rank aborts the barrier and is re-raised here."""
        results: list = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def body(rank: int) -> None:
            try:
                results[rank] = fn(self.group(rank), *args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors[rank] = exc
                self._barrier.abort()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if real or any(errors):
            raise (real or [e for e in errors if e is not None])[0]
        return results


class ThreadGroup:
    """One rank's view of a ``ThreadWorld``."""

    backend = "threads"

    def __init__(self, world: ThreadWorld, rank: int):
        self.world = world
        self.rank = rank
        self.world_size = world.world_size

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        w = self.world
        w._slots[self.rank] = tensor.detach().contiguous().clone()
        w._barrier.wait()
        got = list(w._slots)  # type: ignore[arg-type]
        w._barrier.wait()
        return got

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(tensor)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(tensor))

    def all_to_all(self, tensor: torch.Tensor, send_splits: list[int] | None = None,
                   recv_splits: list[int] | None = None) -> torch.Tensor:
        if send_splits is None:
            if tensor.shape[0] % self.world_size:
                raise ValueError(f"all_to_all: dim 0 ({tensor.shape[0]}) not divisible by {self.world_size}")
            send_splits = [tensor.shape[0] // self.world_size] * self.world_size
        parts = self._exchange(tensor)
        splits = self._exchange_splits(send_splits)
        mine = []
        for src, part in enumerate(parts):
            start = sum(splits[src][:self.rank])
            mine.append(part[start:start + splits[src][self.rank]])
        return torch.cat(mine)

    def _exchange_splits(self, splits: list[int]) -> list[list[int]]:
        got = self._exchange(torch.tensor(splits, dtype=torch.long))
        return [g.tolist() for g in got]

    def barrier(self) -> None:
        self.world._barrier.wait()


def init_from_env(backend: str = "auto", timeout_s: float = 120.0) -> TorchGroup:
    """Initialise torch.distributed from torchrun's environment and return the group.

    ``backend='auto'`` picks NCCL when CUDA has a device for every local rank, gloo with CUDA
    tensors when ranks must share a GPU, else gloo on the CPU (``lowbit.comm.placement``; the choice
    and its reason are ``group.placement``). The timeout bounds every collective, so a dead
    peer fails the job instead of hanging it.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    placement = _placement.choose_placement(backend, local_rank, local_world,
                                            _placement.visible_gpus() if backend != "gloo" else 0)
    if placement.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(placement.device))
    if not dist.is_initialized():
        dist.init_process_group(backend=placement.backend, timeout=datetime.timedelta(seconds=timeout_s))
    group = TorchGroup()
    group.placement = placement
    return group


def device_for(group: Group) -> torch.device:
    """The device this rank computes on: its GPU under NCCL or on a shared GPU, else the CPU."""
    placement = getattr(group, "placement", None)
    if placement is not None:
        return torch.device(placement.device)
    if getattr(group, "backend", "") == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
