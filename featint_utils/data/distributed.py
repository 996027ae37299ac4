"""Which process this is under ``torchrun``, its device, and the few collectives the stages use.

``torchrun --nproc_per_node N -m featint_utils stage 01 ...`` starts N processes whose environment names
their rank (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); :func:`init` joins them into one process group
(NCCL on GPUs, gloo on CPUs) and gives each its device (``cuda:<local rank>``). A plain process (a notebook
kernel, ``python``) is world size 1: :data:`SINGLE`, whose collectives do nothing, so one code path serves
both.

A rank that fails or is killed takes the job with it: ``torchrun`` stops the others, and a rank that was
waiting on the lost one in a collective raises :class:`RankLostError` (after at most ``timeout_s``) instead
of hanging. Checkpoints are written by rank 0 only and atomically, so a rerun resumes from the last one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from .models import resolve_device

TIMEOUT_ENV = "FEATINT_DIST_TIMEOUT"  # seconds a rank waits for the others in a collective (default 1800)


class RankLostError(RuntimeError):
    """Another rank of the job failed or was killed while this one waited for it."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, and the device its work runs on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared files (checkpoints, manifests) and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def part(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (``n`` must divide evenly: every rank does equal work)."""
        if n % self.world_size:
            raise ValueError(f"{n} rows do not split evenly over {self.world_size} ranks")
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def _collective(self, op, *args):
        try:
            return op(*args)
        except RuntimeError as err:  # gloo and NCCL report a lost peer as RuntimeError subclasses
            raise RankLostError(
                f"rank {self.rank} of {self.world_size}: another rank failed or was killed ({err}); the job "
                "stops. Rerun the same command: it resumes from the last checkpoint."
            ) from err

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced over the ranks (in place, and returned)."""
        if self.distributed:
            reduce_op = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX}[op]
            self._collective(torch_dist.all_reduce, tensor, reduce_op)
        return tensor

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        self._collective(torch_dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        self._collective(torch_dist.broadcast_object_list, box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            self._collective(torch_dist.barrier)


SINGLE = Dist()


def launched() -> bool:
    """Whether this process was started by ``torchrun`` as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto", timeout_s: float | None = None) -> Dist:
    """This process's :class:`Dist`: joins the process group when started by ``torchrun`` with more than one
    rank. ``device`` is the profile's (auto/cpu/cuda/cuda:N); with several ranks on CUDA each rank takes
    ``cuda:<local rank>``, on CPU they share the host."""
    resolved = resolve_device(device)
    if not launched():
        return Dist(device=torch.device(resolved))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if resolved.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at most that many "
                "processes per node (--nproc_per_node)"
            )
        dev, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(dev)
    elif resolved == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"device {device!r} cannot be shared by several ranks; use auto, cpu or cuda")
    timeout = timedelta(seconds=timeout_s or float(os.environ.get(TIMEOUT_ENV, 1800)))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, timeout=timeout)
    return Dist(rank, world, local, dev)


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group. After success every rank first meets the others at a barrier: a rank that tears
    down its connections while another is still writing or sending can abort that rank (gloo). After a failure
    there is no barrier (the peers may be stuck in another collective); the job fails anyway."""
    if torch_dist.is_initialized():
        if wait_for_peers:
            torch_dist.barrier()
        torch_dist.destroy_process_group()
