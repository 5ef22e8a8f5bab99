"""Data-parallel helpers for `python -m trainer train` under `torchrun` / `accelerate launch`.

Nothing here is used (and torch.distributed is never initialised) when ``WORLD_SIZE`` is
unset or 1: the single-process path stays exactly as it was.

Under a launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu
--num_processes N``; a plain ``accelerate launch`` without ``--multi_gpu`` starts one process)
`init_from_env` initialises the default process group (``nccl`` when the run
trains on CUDA, ``gloo`` otherwise) and pins each process to ``cuda:LOCAL_RANK``. The loop then
gets a `Dist` from `current()`: every process holds the whole model, the LoRA (and CREPA
projector) gradients are summed across processes after backward (each process weights its
loss by its share of the global batch, so the sum is the gradient of the global batch mean),
and only rank 0 writes files. NCCL settings from the environment (e.g. ``NCCL_NVLS_ENABLE``)
are left as they are.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    # Every method is a no-op (or the identity) in a single process.

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def _device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_floats(self, values: list[float], op: str = "sum") -> list[float]:
        """Reduce a list of Python floats across processes (float64)."""
        if not self.enabled or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t, op=_OPS[op]())
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is True on any."""
        if not self.enabled:
            return bool(flag)
        return self.all_reduce_floats([1.0 if flag else 0.0], "max")[0] > 0

    def all(self, flag: bool) -> bool:
        if not self.enabled:
            return bool(flag)
        return self.all_reduce_floats([1.0 if flag else 0.0], "min")[0] > 0

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=src)
        return holder[0]

    @torch.no_grad()
    def broadcast_parameters(self, params: list[torch.Tensor], src: int = 0) -> None:
        """Copy rank `src`'s values into `params` on every process (one flat buffer)."""
        if not self.enabled or not params:
            return
        dev = self._device()
        flat = torch.cat([p.detach().reshape(-1).to(dev, torch.float32) for p in params])
        torch.distributed.broadcast(flat, src=src)
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p).to(p.device, p.dtype))
            offset += n

    @torch.no_grad()
    def sum_gradients(self, params: list[torch.nn.Parameter], bucket_mb: float = 256.0) -> None:
        """Sum `.grad` of `params` over processes, in place.

        A gradient that is None on every process stays None (the optimizer then skips that
        parameter, as it would in one process); one that is None on some processes counts as
        zeros there. Gradients travel in flat float32 buckets of at most `bucket_mb` MiB.
        """
        if not self.enabled or not params:
            return
        dev = self._device()
        present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=dev)
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX)
        active = [p for p, flag in zip(params, present.tolist()) if flag > 0]
        for p in active:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        limit = max(1, int(bucket_mb * 2**20 / 4))
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in active + [None]:
            if p is not None and (not bucket or size + p.numel() <= limit):
                bucket.append(p)
                size += p.numel()
                continue
            if bucket:
                flat = torch.cat([q.grad.reshape(-1).to(dev, torch.float32) for q in bucket])
                torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
                offset = 0
                for q in bucket:
                    n = q.numel()
                    q.grad.copy_(flat[offset : offset + n].view_as(q.grad).to(q.grad.device, q.grad.dtype))
                    offset += n
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)


_OPS = {
    "sum": lambda: torch.distributed.ReduceOp.SUM,
    "max": lambda: torch.distributed.ReduceOp.MAX,
    "min": lambda: torch.distributed.ReduceOp.MIN,
}

SINGLE = Dist()


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current() -> Dist:
    """The `Dist` of this process: from the initialised default group, else single-process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    return SINGLE


def init_from_env(device: str | torch.device | None = "auto") -> Dist:
    """Initialise the default process group from the launcher's environment when
    ``WORLD_SIZE`` > 1 (idempotent); returns `current()`. `device` is the training config's
    device ("auto", "cuda", "cpu", ...): CUDA gets nccl and ``cuda:LOCAL_RANK``."""
    if env_world_size() <= 1:
        return current()
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.distributed.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = str(device or "auto")
    use_cuda = torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # Rank 0 alone caches the dataset and renders validation clips while the others wait in a
    # barrier: a 14B render or a first cache pass can outlast the default 10 minutes.
    timeout = datetime.timedelta(minutes=float(os.environ.get("WAN_S2V_DIST_TIMEOUT_MIN", "120")))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    return current()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, length) of rank's contiguous share of `count` items (the first
    ``count % world_size`` ranks get one more); a share may be empty."""
    base, extra = divmod(count, world_size)
    length = base + (1 if rank < extra else 0)
    offset = rank * base + min(rank, extra)
    return offset, length
