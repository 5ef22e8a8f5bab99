"""Host offload of the checkpointed block inputs, overlapped with compute.

With gradient checkpointing every block keeps its input hidden states ([B, S, dim] bf16,
about 0.36 GB a block at 832x480x81) until the backward pass: 14 GB for the 40 blocks of
the 14B model. `ActivationOffload` moves those tensors to pinned host memory while the
forward pass goes on, and brings each one back a block ahead of the backward pass that
needs it. Both copies run on a side CUDA stream, so the ~0.3 s out and ~0.4 s back (at the
measured 49 / 37 GB/s) hide behind the blocks' matmuls instead of stalling them, which is
what `torch.autograd.graph.save_on_cpu` does (its copies run on the compute stream).

Only tensors of at least `min_bytes` move (the hidden states); the small per-block inputs
that every block shares (RoPE tables, timestep embeddings, text context) stay put, and a
tensor saved by several blocks is copied once. With compiled checkpoint regions everything
large a block saves goes this way (its input and its attention output, about 0.95 GB a 14B
block); the backward then fetches a whole block's worth ahead. A block's tensors leave when
the next block starts, so the last block of a forward keeps its own on the device: its
backward runs first and would otherwise wait for the round trip (profiled at 14B: 66 ms a
step at the start of the backward). Host buffers come from
`HostBufferPool`: exact sizes, reused every step, and never so many that the host runs out
(a tensor that finds no room stays on the device).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class HostBufferPool:
    """Page-locked host buffers of exact sizes, reused from step to step.

    torch's pinned-memory cache rounds every allocation up to a power of two (a 0.33 GiB
    activation takes 0.5 GiB), which at tens of GiB per step is host RAM a machine may not
    have. Here each buffer is an ordinary allocation of exactly the bytes needed, page-locked
    with cudaHostRegister once, and handed out again for a tensor of the same size. A new
    buffer is refused (None) when it would leave less than `reserve_bytes` of host RAM
    available; the caller then keeps the tensor where it is.
    """

    def __init__(self, reserve_bytes: int = 8 * 2**30, register: bool = True):
        self.reserve_bytes = reserve_bytes
        self.register = register
        self.held_bytes = 0  # all buffers, free or in use
        self._free: dict[int, list[torch.Tensor]] = {}

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 host buffer of `nbytes` (page-locked when `register`), or None."""
        free = self._free.get(nbytes)
        if free:
            return free.pop()
        available = available_host_bytes()
        if available is not None and available - nbytes < self.reserve_bytes:
            return None
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if self.register:
            error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
            if int(getattr(error, "value", error)) != 0:
                return None
            weakref.finalize(buffer, torch.cuda.cudart().cudaHostUnregister, buffer.data_ptr())
        self.held_bytes += nbytes
        return buffer

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return a buffer for reuse. Safe while a copy from it is still queued: every copy
        in or out of these buffers runs on one side stream, in order."""
        self._free.setdefault(buffer.numel(), []).append(buffer)


def _host_view(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`buffer` (uint8, exactly `like`'s bytes) as a tensor of `like`'s dtype, shape and,
    where `like` is dense, strides (a compiled backward checks the strides it gets back)."""
    typed = buffer.view(like.dtype)
    return typed.as_strided(like.shape, like.stride()) if _is_dense(like) else typed.view(like.shape)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s elements fill its memory exactly (a permuted contiguous layout)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass(eq=False)
class _Saved:
    """One saved tensor: on the device until it is sent out (`resident`), then its host
    copy and, once fetched back, its device copy."""

    device: torch.device
    nbytes: int
    resident: torch.Tensor | None = None
    host: torch.Tensor | None = None
    copied_out: torch.cuda.Event | None = None
    fetched: torch.Tensor | None = None
    fetched_event: torch.cuda.Event | None = None
    used: bool = False  # handed to the backward once; never fetched again


class ActivationOffload:
    """Saved-tensor hooks for the checkpoint calls (see module doc).

    Use ``with offload.hooks(): checkpoint(block, ...)`` for each block. Blocks pack in
    forward order and the backward unpacks them block by block in reverse; the prefetch
    follows that order and keeps up to one block's bytes (the most any one `hooks()` context
    packed) in flight.
    The offloaded tensors are owned by the autograd graph; this object keeps only weak
    references, so a step that never runs its backward leaks nothing. On a CPU model the
    tensors already live in host memory: a copy is still made (the bookkeeping runs the same
    way, which the tests rely on) when `min_bytes` lets a tensor through.
    """

    def __init__(self, min_bytes: int = 64 * 2**20, prefetch: bool = True, host_reserve_bytes: int = 8 * 2**30):
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self.pool = HostBufferPool(host_reserve_bytes)
        self.kept_bytes = 0  # bytes left on the device since `reset_stats` (host RAM short)
        self.moved_bytes = 0  # bytes sent to the host since the last `reset_stats`
        self.window_bytes = 0  # the most bytes one `hooks()` context packed: the prefetch depth
        self._context_bytes = 0
        self._order: list[weakref.ref[_Saved]] = []  # sent to the host, in forward order
        self._pending: list[weakref.ref[_Saved]] = []  # the current block's, still on the device
        self._stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def hooks(self):
        """Saved-tensor hooks for one checkpointed block; the previous block's tensors
        leave for the host now."""
        self._send_pending()
        self._context_bytes = 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def reset_stats(self) -> None:
        self.moved_bytes = self.kept_bytes = 0

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    # ------------------------------------------------------------------ forward
    def _pack(self, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if size < self.min_bytes or tensor.layout != torch.strided:
            return tensor
        saved = _Saved(device=tensor.device, nbytes=size, resident=tensor)
        self._pending.append(weakref.ref(saved))  # the autograd graph owns it
        self._context_bytes += size
        self.window_bytes = max(self.window_bytes, self._context_bytes)
        return saved

    def _send_pending(self) -> None:
        """Send the tensors the last `hooks()` context packed to the host (those the backward
        has not taken yet); a tensor that finds no host buffer stays where it is."""
        pending, self._pending = self._pending, []
        self._order = [ref for ref in self._order if ref() is not None]
        for saved in (ref() for ref in pending):
            if saved is None or saved.resident is None:
                continue
            if self._copy_out(saved):
                self._order.append(weakref.ref(saved))
                self.moved_bytes += saved.nbytes
            else:
                self.kept_bytes += saved.nbytes

    def _copy_out(self, saved: _Saved) -> bool:
        """Start the device -> host copy of `saved` on the side stream; False when no host
        buffer is left."""
        tensor = saved.resident
        if tensor.device.type != "cuda":
            saved.host, saved.resident = tensor.detach().clone(), None
            return True
        buffer = self.pool.take(saved.nbytes)
        if buffer is None:
            return False
        stream = self._side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
        with torch.cuda.stream(stream):
            saved.host = _host_view(buffer, tensor)
            saved.host.copy_(tensor.detach(), non_blocking=True)
            saved.copied_out = torch.cuda.Event()
            saved.copied_out.record(stream)
        tensor.record_stream(stream)  # its memory is reused only once the copy is done
        saved.resident = None
        weakref.finalize(saved, self.pool.give_back, buffer)
        return True

    # ------------------------------------------------------------------ backward
    def _fetch(self, saved: _Saved) -> None:
        """Start the host -> device copy of `saved` on the side stream (no wait)."""
        if saved.fetched is not None or saved.used or saved.device.type != "cuda":
            return
        stream = self._side_stream(saved.device)
        with torch.cuda.stream(stream):
            if saved.copied_out is not None:
                stream.wait_event(saved.copied_out)
            saved.fetched = saved.host.to(saved.device, non_blocking=True)
            saved.fetched_event = torch.cuda.Event()
            saved.fetched_event.record(stream)

    def _prefetch_before(self, saved: _Saved) -> None:
        """Fetch the tensors packed before `saved` (the next ones the backward needs), up to
        `window_bytes` of them not yet handed over."""
        live = [s for s in (ref() for ref in self._order) if s is not None]
        self._order = [weakref.ref(s) for s in live]
        # a tensor that never left (the last block's) comes after everything sent out
        position = next((i for i in range(len(live) - 1, -1, -1) if live[i] is saved), len(live))
        budget = self.window_bytes
        for earlier in reversed(live[:position]):
            if budget <= 0:
                break
            if not earlier.used:
                self._fetch(earlier)
                budget -= earlier.nbytes

    def _unpack(self, packed):
        if not isinstance(packed, _Saved):
            return packed
        if packed.resident is not None:  # never left the device (the last block's)
            tensor, packed.resident = packed.resident, None
        elif packed.device.type != "cuda":
            return packed.host
        else:
            self._fetch(packed)
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(packed.fetched_event)
            tensor, packed.fetched = packed.fetched, None  # from here on only the caller holds the device copy
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        packed.used = True
        if self.prefetch and tensor.device.type == "cuda":
            self._prefetch_before(packed)
        return tensor


def offloaded_checkpoint(run, offload: ActivationOffload):
    """Wrap a checkpoint call ``run(fn, *args, **kwargs)`` so that its saved inputs go
    through `offload` (the non-reentrant checkpoint saves its inputs through the saved-tensor
    hooks active outside it; everything inside the region uses the checkpoint's own hooks)."""

    @functools.wraps(run)
    def wrapped(fn, *args, **kwargs):
        with offload.hooks():
            return run(fn, *args, **kwargs)

    wrapped.offload = offload
    return wrapped


__all__ = ["ActivationOffload", "HostBufferPool", "available_host_bytes", "offloaded_checkpoint"]
