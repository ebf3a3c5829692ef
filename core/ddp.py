"""Training on several GPUs or machines: PyTorch DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node N -m core.cli.main train ...`` (or ``episeg`` in
place of ``-m core.cli.main``) starts N processes; :func:`core.train.train`
sees the ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` variables torchrun sets and:

* joins the process group (NCCL on CUDA GPUs, gloo on CPUs), one GPU per
  process (``cuda:LOCAL_RANK``);
* starts every process from the same weights and gives each its own patch
  stream, so one step averages the gradients of N x batch_size patches;
* stops every process on the same iteration (the time budget is agreed on) and
  uses process 0's learning rate (a time-budgeted schedule follows its clock);
* validates, reports and writes the model file in process 0 only, and checks at
  the end that all processes hold the same weights.

Without torchrun (WORLD_SIZE unset or 1) nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from core.errors import ConfigError, EpiSegError


@dataclass
class World:
    """This process' place in a distributed run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The run described by torchrun's environment variables (a single process without them)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise ConfigError(f"WORLD_SIZE / RANK / LOCAL_RANK are not whole numbers ({err}); start "
                          "distributed training with torchrun.") from None
    return World(rank, size, local)


def setup(world: World, device: torch.device) -> torch.device:
    """Join the process group; returns the device of this process (its own GPU on CUDA)."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"Process {world.rank} wants GPU {world.local_rank} but only "
                              f"{torch.cuda.device_count()} are visible; start at most that many "
                              "processes per machine (torchrun --nproc_per_node).")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The model to step with: DistributedDataParallel in a distributed run, else itself."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def agree_any(flag: bool, world: World, device: torch.device) -> bool:
    """True on every process when ``flag`` is True on any (e.g. 'out of time')."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_main(value: float, world: World, device: torch.device) -> float:
    """Process 0's ``value`` on every process (e.g. a learning rate that follows its clock)."""
    if not world.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def check_same_weights(model: torch.nn.Module, world: World, device: torch.device) -> None:
    """Raise when the processes' weights differ (they must: gradients are averaged)."""
    if not world.distributed:
        return
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
        t = total.reshape(1).to(device)
        low, high = t.clone(), t.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.isclose(low, high, rtol=1e-9, atol=1e-9).item():
        raise EpiSegError(f"Distributed training: the {world.size} processes ended with different "
                          f"weights (checksums {low.item():.9g} .. {high.item():.9g}).")


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, world: World) -> Optional[list]:
    """Seed of this process' patch stream: the plain seed alone, else [seed, rank]."""
    return seed if not world.distributed else [int(seed), int(world.rank)]
