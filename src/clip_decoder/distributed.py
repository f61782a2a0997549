"""torch.distributed under torchrun (training, extraction): who am I, one writer, gathers that backprop.

One process without torchrun is the world of size 1, and every helper here is then a no-op,
so the training code has a single path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` training processes."""

    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        """This process's place as torchrun set it (RANK, WORLD_SIZE), without joining the process group."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and the model folder; it alone shows progress."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous share of ``items`` (sizes differ by at most one)."""
        per, extra = divmod(len(items), self.size)
        start = self.rank * per + min(self.rank, extra)
        return items[start : start + per + (self.rank < extra)]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def main_first(self, work: Callable[[], object]) -> None:
        """Run ``work`` on rank 0 alone, then wait for it on every rank (e.g. clearing a folder others write to)."""
        if self.is_main:
            work()
        self.barrier()

    def all_gather_objects(self, value) -> list:
        """Every rank's ``value``, in rank order (picklable Python objects from our own ranks)."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's mean over ranks, in one all-reduce."""
        if self.size == 1:
            return values
        # NCCL reduces only tensors on the GPU; gloo, tensors on the CPU.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return dict(zip(values, (tensor / self.size).tolist()))


def local_device() -> torch.device:
    """This process's device: the GPU init_world picked (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_world() -> World:
    """Join the process group when started by torchrun (RANK / WORLD_SIZE set), else a world of one.

    gloo on CPU, nccl when each rank has a GPU (LOCAL_RANK picks it).
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        store, rank, size = _attempt_store()
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=size)
    return World(dist.get_rank(), dist.get_world_size())


def _attempt_store() -> tuple[dist.Store, int, int]:
    """torchrun's rendezvous store, its keys scoped to this attempt of the group (and our rank and size).

    torchrun's agent keeps one store for all the restarts of a group (``--max-restarts``;
    TORCHELASTIC_USE_AGENT_STORE), so without a scope the keys a dead attempt left (gloo's and
    NCCL's peer addresses) would be read as this attempt's: a rank then connects to a dead
    worker's port and fails, or waits. Each agent counts its restarts (pytorch/pytorch#135712);
    with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 each attempt has a store of its own instead.
    """
    store, rank, size = next(dist.rendezvous("env://"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store, rank, size
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"clip-decoder/attempt-{attempt}", store), rank, size


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank computed the same global loss: sum their gradients
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Rows of ``local`` from every rank, in rank order, differentiable; identity for one process.

    Each rank then computes the same global loss over the gathered rows. Its backward sums the
    ranks' gradients, and DDP's mean over ranks brings that back to the global loss's gradient.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    count = torch.tensor([len(local)], dtype=torch.long)
    if local.is_cuda:
        sizes, count = [s.cuda() for s in sizes], count.cuda()
    dist.all_gather(sizes, count)
    return _GatherRows.apply(local, [int(s) for s in sizes])
