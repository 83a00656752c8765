"""Data-parallel training under torchrun: gloo on CPU, NCCL on CUDA, via DistributedDataParallel.

Outside torchrun (no WORLD_SIZE in the environment, or 1) everything here is a no-op, so the trainer
has one code path. `current_launch` is the one reader of torchrun's environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch as its environment states it, before any group is joined."""

    rank: int = 0  # RANK: this process among all of them
    world: int = 1  # WORLD_SIZE: how many processes train together
    local_rank: int = 0  # LOCAL_RANK: this process among those of its machine (its GPU's index)


def current_launch() -> Launch:
    """WORLD_SIZE, RANK and LOCAL_RANK as torchrun sets them; rank 0 of 1 outside torchrun."""
    env = os.environ
    return Launch(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, metrics and the progress bar."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str) -> Distributed:
        """Join the process group torchrun describes in the environment, if there is one."""
        launch = current_launch()
        if launch.world <= 1:
            return cls()
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(launch.local_rank)
            target = torch.device("cuda", launch.local_rank)
        else:
            target = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), target)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: DDP around the model when distributed."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks (the local value when not distributed)."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world
        return float(value)

    def agree(self, elapsed: float, stop: bool) -> tuple[float, bool]:
        """The longest elapsed time of any rank, and whether any rank was asked to stop (as given when alone).

        Every rank decides its learning rate, the time budget and an interrupt from these, so that all
        of them take the same steps with the same schedule and stop together.
        """
        if not self.enabled:
            return elapsed, stop
        values = torch.tensor([elapsed, float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return float(values[0]), bool(values[1])

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
