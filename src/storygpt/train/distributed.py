"""Training on several processes with PyTorch's own engine: DDP or FSDP2, launched by torchrun.

torchrun starts one process per GPU (or CPU worker) and tells each its place in environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). `setup()` turns them into a process
group (nccl on GPUs, gloo on CPU), `wrap()` hands the model to DDP or to FSDP2's `fully_shard`,
and the few collectives below make every rank take the same decision at the same step: a rank
that stopped alone, or evaluated alone, would leave the others waiting in a collective forever.

Without torchrun's variables (and without FSDP) nothing here does anything: `Dist()` is a world
of one, and the training loop runs exactly as the single-process loop always did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from storygpt.errors import StoryGPTError
from storygpt.model.checkpoint import PREV, save_checkpoint, save_sharded, shard_files, sharded_folder

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the default is a single process with no process group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    active: bool = False            # a process group was initialized by setup()
    device: str = "cpu"             # where collective tensors live: "cuda:N" for nccl

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, prints, and writes the run directory."""
        return self.rank == 0

    # --- collectives: each returns its input unchanged in a single process ---------------------
    def agree(self, train_time: float, stop: bool) -> tuple[float, bool]:
        """One clock and one stop decision for all ranks: the latest clock, and stop if any rank was signalled.

        The learning rate and the max_time limit follow the clock, so ranks that read their own
        clocks could step with different learning rates or stop at different steps.
        """
        if not self.active:
            return train_time, stop
        t = torch.tensor([train_time, float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0]), bool(t[1])

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor; gloo has no AVG, so means are sums / world_size)."""
        if not self.active or self.world_size == 1:
            return value
        value = value.detach().clone().to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def broadcast(self, value: float) -> float:
        """Rank 0's value on every rank (e.g. a validation loss that decides whether to save a checkpoint)."""
        if not self.active or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t[0])

    def gather(self, obj: object) -> list | None:
        """Every rank's `obj` (picklable), in rank order; None in a single process."""
        if not self.active or self.world_size == 1:
            return None
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def share(self, obj: object) -> object:
        """Rank 0's `obj` (picklable) on every rank."""
        if not self.active or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device, strategy: str) -> tuple[Dist, torch.device]:
    """Join the job torchrun started (nccl on CUDA, gloo otherwise) and pick this rank's GPU.

    FSDP needs a process group even in one process; started without torchrun it gets a world of one.
    Returns (Dist, the device this rank trains on).
    """
    if not launched_by_torchrun():
        if strategy != "fsdp":
            return Dist(), device
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1)
        return Dist(active=True, device=str(device) if device.type == "cuda" else "cpu"), device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device))
    comm_device = str(device) if device.type == "cuda" else "cpu"
    return Dist(rank, local_rank, world_size, active=True, device=comm_device), device


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, d: Dist, device: torch.device) -> torch.nn.Module:
    """The module to train: FSDP2 shards `model` in place (each block, then the root, which holds the
    tied embedding/output weight); DDP wraps it (the returned wrapper all-reduces gradients); a world
    of one with DDP trains `model` itself."""
    if strategy == "fsdp" and d.active:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """Context for one micro-step's forward and backward: gradients are reduced across ranks only on
    the last micro-step of an optimizer step (DDP: no_sync(); FSDP2: set_requires_gradient_sync)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(wrapped, DDP) and not sync:
        return wrapped.no_sync()
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): the folder is written by checkpoint.save_sharded, read by checkpoint.load_sharded
# --------------------------------------------------------------------------------------------
def save_sharded_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
                            d: Dist, prev: Path | None = None) -> None:
    """An FSDP checkpoint (collective): all ranks write their shards into a new folder next to `path`, then
    rank 0 reads them back (their sizes and sha256 go into `path`), writes `path` (the step, RNG states, ...
    and the folder's name) atomically, keeping the file it replaces as `prev` when given, then deletes the
    folders that neither `path` nor RUN/ckpt_prev.pt names. Killed at any moment, `path` still names a
    complete checkpoint. A write that fails (a full disk) deletes the new folder, leaves the checkpoints
    there as they were and raises StoryGPTError (on every rank when the shards failed; else on rank 0).
    """
    prefix = f"{path.stem}.dcp-"
    folder = d.share(f"{prefix}{meta['step']:08d}-{uuid.uuid4().hex[:8]}")  # one name for all ranks
    try:
        has_optimizer = save_sharded(path.parent / folder, model, optimizer)  # returns once all shards are written
        if d.is_main:
            files = shard_files(path.parent / folder)
            save_checkpoint(path, {**meta, "dcp": folder, "dcp_optimizer": has_optimizer, "dcp_files": files}, prev)
    except StoryGPTError:
        if d.is_main:
            shutil.rmtree(path.parent / folder, ignore_errors=True)
        raise
    if d.is_main:
        remove_stale(path.parent, prefix, keep={folder, sharded_folder(path.parent / PREV)})


def remove_stale(folder: Path, prefix: str, keep: set) -> None:
    """Delete the sharded-checkpoint folders `prefix*` in `folder` whose names are not in `keep` (older
    steps, or the leftovers of a save that was killed before its pointer file was written)."""
    for p in folder.glob(f"{prefix}*"):
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
