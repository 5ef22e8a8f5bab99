"""Data parallel for `python -m trainer train` (and the training node's child processes) under
`torchrun` / `accelerate launch`.

Nothing here is used, and torch.distributed is never initialised, when ``WORLD_SIZE`` is unset
or 1: the `Dist` of one process (`SINGLE`) answers every collective itself and never builds
Accelerate's state (a `PartialState` built under ``torchrun --nproc_per_node 1`` would
initialise a process group of one).

Under a launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu
--num_processes N``; a plain ``accelerate launch`` without ``--multi_gpu`` starts one process)
`init_from_env` sets up Accelerate's `PartialState` with the backend chosen here (``nccl`` when
the run trains on CUDA, ``gloo`` otherwise): it initialises the default process group from that
environment and pins each process to its GPU. The loop then gets a `Dist` from `current()`:
every process holds the whole model, the LoRA (and CREPA projector) gradients are summed across
processes after backward (each process weights its loss by its share of the global batch, so
the sum is the gradient of the global batch mean), and only rank 0 writes files. NCCL settings
from the environment (e.g. ``NCCL_NVLS_ENABLE``) are left as they are; note that Accelerate
refuses to start on several RTX 40-series GPUs with a driver older than 550.40.07 unless
``NCCL_P2P_DISABLE`` and ``NCCL_IB_DISABLE`` are set (``accelerate launch`` sets them there).

Accelerate does the process-group setup and device pinning (`PartialState`), the barriers
(`wait_for_everyone`, `main_process_first`) and the collectives on Python values, objects and
the initial parameters (`accelerate.utils.reduce`, `broadcast_object_list`, `broadcast`).
What stays here, and why:

* `Dist`, a plain value the loop, evaluation and checkpointing take as an argument: one process
  gets `SINGLE` and runs without any Accelerate state or process group (see above).
* `Dist.sum_gradients`: Accelerate syncs gradients in the DDP wrapper of `Accelerator.prepare`,
  which takes over the module and hooks every parameter's autograd; that does not fit a frozen
  14B base with compiled checkpoint regions, activation offload hooks and a few trainable LoRA
  tensors. Here the LoRA gradients are summed once after backward, in flat float32 buckets
  reduced in place (`accelerate.utils.reduce` returns a copy: a second bucket on the GPU).
* `shard`: the split of a global batch (the arithmetic of
  `PartialState.split_between_processes`), as an (offset, length) pair rather than the items:
  the offset picks this process's rows of the noise and dropout draws that every process makes
  for the whole global batch, which is what makes N processes train as one and lets a
  checkpoint resume on another process count. A process without a share gets none (Accelerate
  1.0 hands it the last item again, which would count that item twice).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, broadcast_object_list, reduce


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: `rank` of `world_size` processes (`local_rank` on its
    machine). Every collective is a no-op (or the identity) in a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            PartialState().wait_for_everyone()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds and caches the dataset), the others after it."""
        if not self.enabled:
            yield
            return
        with PartialState().main_process_first():
            yield

    def all_reduce_floats(self, values: list[float]) -> list[float]:
        """Sum a list of Python floats over processes (in float64)."""
        if not self.enabled or not values:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=PartialState().device)
        return reduce(tensor, reduction="sum").cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is True on any."""
        return self.all_reduce_floats([float(bool(flag))])[0] > 0

    def all(self, flag: bool) -> bool:
        """True on every process when `flag` is True on all."""
        return self.all_reduce_floats([float(bool(flag))])[0] == self.world_size

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` (picklable) on every process."""
        if not self.enabled:
            return obj
        return broadcast_object_list([obj], from_process=src)[0]

    @torch.no_grad()
    def broadcast_parameters(self, params: list[torch.Tensor], src: int = 0) -> None:
        """Copy rank `src`'s values into `params` on every process (one flat buffer)."""
        if not self.enabled or not params:
            return
        device = PartialState().device
        flat = torch.cat([p.detach().reshape(-1).to(device, torch.float32) for p in params])
        _copy_from_flat(broadcast(flat, from_process=src), params)

    @torch.no_grad()
    def sum_gradients(self, params: list[torch.nn.Parameter], bucket_mb: float = 256.0) -> None:
        """Sum `.grad` of `params` over processes, in place.

        A gradient that is None on every process stays None (the optimizer then skips that
        parameter, as it would in one process); one that is None on some processes counts as
        zeros there. Gradients travel in flat float32 buckets of at most `bucket_mb` MiB.
        """
        if not self.enabled or not params:
            return
        present = self.all_reduce_floats([0.0 if p.grad is None else 1.0 for p in params])
        active = [p for p, count in zip(params, present) if count > 0]
        for p in active:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        device = PartialState().device
        limit = max(1, int(bucket_mb * 2**20 / 4))  # float32 elements
        bucket: list[torch.Tensor] = []
        size = 0
        for p in active:
            if bucket and size + p.numel() > limit:
                _sum_in_place(bucket, device)
                bucket, size = [], 0
            bucket.append(p.grad)
            size += p.numel()
        if bucket:
            _sum_in_place(bucket, device)


def _sum_in_place(grads: list[torch.Tensor], device: torch.device) -> None:
    """Sum `grads` over processes through one flat float32 buffer, reduced in place."""
    flat = torch.cat([g.reshape(-1).to(device, torch.float32) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    _copy_from_flat(flat, grads)


def _copy_from_flat(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of `flat` into `tensors`, each keeping its device and dtype."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.device, t.dtype))
        offset += n


SINGLE = Dist()


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current() -> Dist:
    """The `Dist` of this process: Accelerate's view of the initialised default group, else
    single-process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return SINGLE
    # `cpu` only matters for a group initialised without `init_from_env`: it makes Accelerate
    # take a gloo group for the CPU group it is.
    state = PartialState(cpu=torch.distributed.get_backend() != "nccl")
    return Dist(rank=state.process_index, world_size=state.num_processes, local_rank=state.local_process_index)


def init_from_env(device: str | torch.device | None = "auto") -> Dist:
    """Initialise the default process group from the launcher's environment when
    ``WORLD_SIZE`` > 1 (idempotent); returns `current()`. `device` is the training config's
    device ("auto", "cuda", "cpu", ...): CUDA gets nccl and ``cuda:LOCAL_RANK``, anything else
    gloo."""
    if env_world_size() <= 1:
        return current()
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    name = str(device or "auto")
    use_cuda = torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))
    # Rank 0 alone caches the dataset and renders validation clips while the others wait in a
    # barrier: a 14B render or a first cache pass can outlast the default 10 minutes.
    timeout = datetime.timedelta(minutes=float(os.environ.get("WAN_S2V_DIST_TIMEOUT_MIN", "120")))
    # `cpu=True` makes Accelerate set up gloo on the CPU even where GPUs are visible.
    PartialState(cpu=not use_cuda, backend="nccl" if use_cuda else "gloo", timeout=timeout)
    if not torch.distributed.is_initialized():  # e.g. LOCAL_RANK unset: Accelerate sees one process
        raise RuntimeError(f"WORLD_SIZE is {env_world_size()} but no process group was initialised; "
                           "start the processes with torchrun or accelerate launch")
    return current()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        PartialState().destroy_process_group()


def shard(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, length) of rank's contiguous share of `count` items (the first
    ``count % world_size`` ranks get one more); a share may be empty."""
    base, extra = divmod(count, world_size)
    length = base + (1 if rank < extra else 0)
    offset = rank * base + min(rank, extra)
    return offset, length
