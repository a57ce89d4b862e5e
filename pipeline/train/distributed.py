"""torch.distributed for the trainer: one process per device, started by torchrun (or alone).

With torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) a process group is
created (nccl on CUDA, gloo on CPU), also for a single process that torchrun started (DDP of one rank);
without it every collective here is a local no-op, so the same training loop runs as a single process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("gkd.train")


@dataclass
class Dist:
    """This process's place in the job and the collectives the trainer needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    """The device this rank trains on."""
    grouped: bool = False
    """A process group exists (torchrun started this process), even with one rank."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.grouped

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a short vector of numbers (one all_reduce, float64)."""
        if not self.enabled:
            return list(values)
        comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=comm)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(x) for x in t.tolist()]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (also a barrier)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """`pref` is "cpu", "cuda" or "auto" (CUDA when available). Raises ValueError for cuda without one."""
    if pref not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device: expected cpu, cuda or auto, got {pref!r}")
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: expected a CUDA device for --device cuda, found none")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device, host_collectives: bool = False) -> str:
    """The process group backend: nccl on CUDA (plus gloo for host tensors when `host_collectives`:
    FSDP with CPU offload reduces gradient norms of host tensors), gloo on the CPU."""
    if device.type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl" if host_collectives else "nccl"


def init_distributed(device_pref: str, timeout_s: float = 1800.0, host_collectives: bool = False) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (else run alone); bind this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torchrun marks its children with TORCHELASTIC_RUN_ID: `torchrun --nproc_per_node 1` is DDP of one
    # rank (same collectives and wrapping as with many), not a plain single process.
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        backend = backend_for(device, host_collectives)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        log.info("process group: backend=%s rank=%d world_size=%d device=%s", backend, rank, world, device)
    return Dist(
        rank=rank, world_size=world, local_rank=local_rank, device=device, grouped=dist.is_initialized()
    )


def shutdown(wait_for_peers: bool = True) -> None:
    """Destroy the process group; first (`wait_for_peers`, on a clean exit of every rank) wait until no
    collective is in flight on any rank.

    FSDP issues collectives asynchronously; a gloo work item still alive when the interpreter exits can
    abort the process ("terminate called without an active exception") after all its work is done. A
    barrier completes only after every earlier collective. After an error on one rank the others may
    never reach it, so then the group is destroyed at once.
    """
    if dist.is_initialized():
        if wait_for_peers:
            try:
                dist.barrier()
            except (RuntimeError, ValueError) as exc:  # a peer already gone: nothing left to wait for
                log.debug("barrier before destroying the process group failed: %r", exc)
        dist.destroy_process_group()
