"""torch.distributed plumbing for `torchrun --nproc_per_node N -m sae train`.

A plain `sae train` is one process and never touches torch.distributed. Under torchrun (which sets RANK,
WORLD_SIZE and LOCAL_RANK) each process joins one process group — nccl on CUDA, gloo on the CPU — and the trainer
uses the few collectives below. There is no scheduler of our own: torchrun starts, watches and stops the processes.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sae.config import UserError
from sae.data.model import pick_device


class PeerLost(UserError):
    """A collective failed: another process of the job died or stopped answering."""


class PeerFailed(UserError):
    """Another process of the job failed on its own (its device, its share of the data, its disk) and said why
    (``fail_together``)."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size` processes (1 when not under torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files every rank would otherwise write (checkpoints, SAE folders, wandb)."""
        return self.rank == 0


def init(device: str = "auto", timeout: timedelta | None = None) -> tuple[World, torch.device]:
    """Join torchrun's process group if there is one, and pick this process's device.

    Under torchrun, "auto" and "cuda" mean the GPU numbered LOCAL_RANK (one GPU per process, as torchrun expects),
    "auto" the CPU when there is none; the backend follows the device: nccl for CUDA, gloo for the CPU. `timeout`:
    how long a collective waits for the other processes before it fails (None: torch's default, 10 minutes under
    nccl). The picked GPU becomes the current device in a single process too (device=cuda:1): CUDA events,
    `torch.cuda.synchronize()` and the allocator's statistics act on the current device, not on the tensors'.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    wants_gpu = device == "auto" and torch.cuda.is_available() or device.startswith("cuda")
    if size == 1 or not wants_gpu:
        picked = pick_device(device)
    elif local >= torch.cuda.device_count():
        raise UserError(f"process {local} of this node needs GPU {local} but {torch.cuda.device_count()} are visible; "
                        "start at most one process per GPU (torchrun --nproc_per_node) or use device=cpu")
    else:
        picked = torch.device("cuda", local)  # one GPU per process, whatever index the config named
    if picked.type == "cuda":
        torch.cuda.set_device(picked)
    if size == 1:
        return World(), picked
    if not dist.is_initialized():
        # Tensors go over nccl; Python objects (metrics, checkpoint metadata, a sharded SAE gathered for saving) and
        # the CPU flags of `fail_together` over gloo, so they never pass through a GPU.
        dist.init_process_group("cpu:gloo,cuda:nccl" if picked.type == "cuda" else "gloo",
                                device_id=picked if picked.type == "cuda" else None, timeout=timeout)
    return World(rank, size), picked


def _collective(fn: Any, *args: Any) -> None:
    """Run one collective, turning the backend's bare RuntimeError (gloo: "Connection reset by peer") into
    `PeerLost`, so the trainer can say which checkpoint to resume from."""
    try:
        fn(*args)
    except RuntimeError as err:
        reason = re.sub(r"^\[[^\]]*\] ", "", str(err).strip().splitlines()[0])  # gloo prefixes its source line
        raise PeerLost(f"rank {dist.get_rank()} lost another process of the job ({reason})") from err


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the job (0 in a single process)."""
    return dist.get_rank() if _active() else 0


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce over the job ("sum", "max" or "mean"); a no-op in a single process."""
    if _active():
        _collective(dist.all_reduce, t, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy `module`'s parameters and buffers from rank `src` to every rank (initialisation computed once)."""
    if _active():
        for t in [*module.parameters(), *module.buffers()]:
            _collective(dist.broadcast, t.data, src)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    _collective(dist.all_gather_object, out, obj)
    return out


def all_gather(t: Tensor) -> Tensor:
    """Every rank's `t` (same shape on every rank), stacked in rank order: [world size, *t.shape]."""
    if not _active():
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    _collective(dist.all_gather, out, t.contiguous())
    return torch.stack(out)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0, in rank order (None on the other ranks): unlike `gather_objects`, only one
    process holds them all (the shards of an SAE too wide for one device)."""
    if not _active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    _collective(dist.gather_object, obj, out, 0)
    return out


@contextmanager
def fail_together() -> Iterator[None]:
    """Run a block that may fail on some processes only, and have every process leave it the same way.

    A process that raises alone (a plan that does not fit its GPU, a NaN in its share of a batch, a full disk under
    rank 0's checkpoint) would never reach its next collective, and under nccl the others would wait there until the
    timeout: torchrun's SIGTERM cannot interrupt a thread blocked on the GPU, so no process would say what went
    wrong. Here a process that failed stays for one more collective: a flag all-reduced after the block (a CPU
    tensor, so gloo carries it: no device sync). If any process failed, their messages are gathered; each failed
    process raises its own error and the others `PeerFailed` with the first one's message, so every process stops
    at once, saying why (SIGTERM is ignored from then on; call it from the main thread). The block must not fail on
    some processes before a collective that the others then wait in.
    """
    if not _active():
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - raised again below, here and (its message) on every other process
        failure = err
    said: list[str | None] = []
    try:
        if all_reduce_(torch.tensor(failure is not None, dtype=torch.int32), "max"):
            # The job is over: torchrun answers the first process to exit by terminating the others, which must not
            # cut their messages short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            said = gather_objects(None if failure is None else str(failure) if isinstance(failure, UserError)
                                  else f"{type(failure).__name__}: {failure}")
    except PeerLost:
        if failure is None:  # a process died instead: nothing more to tell
            raise
    if failure is not None:  # its own error, with its traceback when it is no UserError
        raise failure
    for rank, message in enumerate(said):
        if message is not None:
            raise PeerFailed(f"rank {rank} failed: {message}")


def barrier() -> None:
    if _active():
        _collective(dist.barrier)


def shutdown() -> None:
    """Leave the process group cleanly at the end of a run (torchrun warns otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()
