"""Data-parallel training under torchrun: gloo on CPU, NCCL on CUDA, via DistributedDataParallel.

Outside torchrun (no WORLD_SIZE in the environment, or 1) everything here is a no-op, so the trainer
has one code path. `current_launch` is the one reader of torchrun's environment variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


class RankFailedError(RuntimeError):
    """Another rank failed a check before training (a file missing from its disk, another corpus): its message."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch as its environment states it, before any group is joined."""

    rank: int = 0  # RANK: this process among all of them
    world: int = 1  # WORLD_SIZE: how many processes train together
    local_rank: int = 0  # LOCAL_RANK: this process among those of its machine (its GPU's index)


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors as float32 bytes, in the order of their names: equal weights, equal digests."""
    sha = hashlib.sha256()
    for name in sorted(weights):
        sha.update(name.encode())
        sha.update(weights[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()


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

    def gather_digests(self, count: int, digest: str) -> list[tuple[int, str]]:
        """Every rank's count and sha256 (in hex), in rank order (this rank's alone when not distributed): to
        check that ranks on different machines read the same corpus and end with the same weights."""
        if not self.enabled:
            return [(count, digest)]
        mine = torch.tensor([count, *bytes.fromhex(digest)], dtype=torch.int64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        return [(int(t[0]), bytes(t[1:].tolist()).hex()) for t in everyone]

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's (layers, batch, hidden) tensor side by side: (layers, batch x world, hidden), rank 0's
        rows first. Each rank carries the state of its own tracks; a checkpoint keeps all of them."""
        if not self.enabled:
            return tensor
        everyone = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(everyone, tensor.contiguous())
        return torch.cat(everyone, dim=1)

    def own_rows(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        """This rank's rows of a tensor that `gather_rows` made (as it is when it holds one rank's rows only)."""
        if tensor.shape[1] != batch * self.world:
            return tensor
        return tensor[:, self.rank * batch : (self.rank + 1) * batch]

    @contextlib.contextmanager
    def failing_together(self, stage: str = "before training") -> Iterator[None]:
        """Run a block on every rank; when it raises on any rank, it raises on every rank, right after it.

        The block must hold no collective. A check that fails on one machine only (a file missing from its
        disk) would otherwise end that rank alone and leave the others waiting in their next collective until
        the timeout. The failing rank raises its own error; the others raise RankFailedError with its message.
        """
        error: Exception | None = None
        try:
            yield
        except Exception as exc:
            if not self.enabled:
                raise
            error = exc
        if not self.enabled:
            return
        messages = self._gather_texts("" if error is None else str(error) or type(error).__name__)
        failed = [(rank, text) for rank, text in enumerate(messages) if text]
        if failed:  # the job ends here on every rank: leave the group now, not in gloo's teardown at exit
            self.close()
        if error is not None:
            raise error
        if failed:
            rank, text = failed[0]
            raise RankFailedError(f"rank {rank} of {self.world} failed {stage}, so every rank stops: {text}")

    def _gather_texts(self, text: str) -> list[str]:
        """Every rank's text, in rank order (sizes first, then the UTF-8 bytes padded to the longest)."""
        data = text.encode()
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        if longest == 0:
            return [""] * self.world
        mine = torch.tensor(list(data.ljust(longest, b"\0")), dtype=torch.uint8, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        return [bytes(t[: int(n)].tolist()).decode() for t, n in zip(everyone, sizes, strict=True)]

    @contextlib.contextmanager
    def rank0_file(self, path: Path) -> Iterator[Path | None]:
        """Rank 0's file at `path`, on every rank (None on every rank when rank 0 has none).

        Only rank 0 writes checkpoints, so on other machines (other disks) `path` is missing or stale: rank 0
        sends its bytes and every other rank reads them from a temporary copy, so that all resume from the
        same checkpoint whether or not the machines share a file system.
        """
        if not self.enabled:
            yield path if path.is_file() else None
            return
        exists = self.is_main and path.is_file()
        data = path.read_bytes() if exists else b""
        size = torch.tensor([len(data) if exists else -1], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0)
        if int(size) < 0:
            yield None
            return
        buffer = torch.empty(int(size), dtype=torch.uint8)
        if data:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # no copy of the bytes: a view
        if len(buffer):
            buffer = buffer.to(self.device)
            dist.broadcast(buffer, src=0)
        if self.is_main:
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="charrnn-rank0-") as folder:
            copy = Path(folder) / path.name
            copy.write_bytes(buffer.cpu().numpy().tobytes())
            yield copy

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
