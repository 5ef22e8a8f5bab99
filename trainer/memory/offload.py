"""Block swap that trains: frozen block weights live in pinned host memory (or a disk file)
and are copied to the compute device just before their block runs, prefetched on a CUDA
side stream, in the forward pass AND in the checkpoint recompute of the backward pass.

Unit of swapping ("region"): block i together with the audio injector that runs after it
(its AdaIN projection and attention), i.e. exactly what the model runs as one
`_block_and_audio(i, ...)` call and what gradient checkpointing recomputes as one piece.
The offloader wraps that method on the model instance, so it works whether or not the blocks
are compiled (no module hooks inside a compiled region).

Why the backward pass is safe: with non-reentrant checkpointing the original forward saves
no weight; the recompute stores detached aliases of the weights it used, so the device copy
of region i stays alive exactly until region i's backward has consumed it, even though the
module's tensors were already swapped back to host placeholders. Trainable parameters
(the LoRA, anything with requires_grad) are never swapped: they stay on the device.
Order of device work: the copy for region i-1 (backward) or i+1 (forward) is issued on the
side stream while region i computes; the compute stream waits on its event before using it,
and every copied tensor is `record_stream`-ed on the compute stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

META = torch.device("meta")


def map_tensor(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `fn` to the plain tensors inside `t` (recursing into traceable subclasses such as
    optimum-quanto's QBytesTensor) and rebuild it."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if type(t) in (torch.Tensor, nn.Parameter) or flatten is None:
        return fn(t)
    names, meta = t.__tensor_flatten__()
    inner = {name: map_tensor(getattr(t, name), fn) for name in names}
    return type(t).__tensor_unflatten__(inner, meta, t.size(), t.stride())


def tensor_leaves(t: torch.Tensor) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensor(t, lambda x: out.append(x) or x)
    return out


def in_backward() -> bool:
    """True while the autograd engine runs (checkpoint recompute happens there)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Entry:
    owner: nn.Module
    name: str
    is_param: bool
    home: torch.Tensor | None  # host copy (None when on disk)
    placeholder: torch.Tensor
    disk_keys: list[str] | None = None
    template: torch.Tensor | None = None  # meta-structure for rebuilding from disk leaves


class BlockOffloader:
    """Installs the block swap on a `WanS2VTransformer3DModel` (after the LoRA is added).

    Args:
        model: the transformer.
        device: compute device (cuda; "cpu" works for tests: the same mechanism with
            host-to-host "copies").
        prefetch: regions to copy ahead on the side stream (0: synchronous loads).
        disk_dir: write the swapped weights to ``<disk_dir>/block_offload.safetensors`` and read
            them back memory-mapped instead of keeping them in host RAM.
        pin: pin the host copies (default: when the device is CUDA).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, prefetch: int = 1,
                 disk_dir: str | os.PathLike | None = None, pin: bool | None = None):
        self.model = model
        self.device = torch.device(device)
        self.prefetch = max(0, int(prefetch))
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.pin = (self.device.type == "cuda") if pin is None else pin
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda and self.prefetch else None
        injector = getattr(model, "audio_injector", None)
        mapping = getattr(injector, "block_to_injector", {}) if injector is not None else {}
        self.regions: list[list[nn.Module]] = []
        for index, block in enumerate(model.blocks):
            units = [block]
            if index in mapping:
                k = mapping[index]
                units += [injector.injector_adain_layers[k], injector.injector[k]]
            self.regions.append(units)
        self.entries: list[list[_Entry]] = [[] for _ in self.regions]
        self.pending: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self.active: set[int] = set()
        self.log: list[tuple[str, int]] = []  # ("load"/"prefetch"/"offload", region), for tests
        self.record = False
        self._disk = None
        self._original: Callable | None = None
        self.host_bytes = 0

    # ------------------------------------------------------------------ install

    def install(self) -> BlockOffloader:
        if self._original is not None:
            return self
        disk_tensors: dict[str, torch.Tensor] = {}
        for r, units in enumerate(self.regions):
            for unit in units:
                for module_name, module in unit.named_modules():
                    trainable_module = "lora_" in module_name
                    for name, param in list(module._parameters.items()):
                        if param is None:
                            continue
                        if param.requires_grad or trainable_module:
                            if param.device != self.device:
                                param.data = param.data.to(self.device)
                            continue
                        self._add(r, module, name, param.detach(), True, disk_tensors)
                    for name, buf in list(module._buffers.items()):
                        if buf is not None and not trainable_module:
                            self._add(r, module, name, buf, False, disk_tensors)
        if self.disk_dir is not None:
            from safetensors.torch import safe_open, save_file

            from ..paths import confine

            self.disk_dir.mkdir(parents=True, exist_ok=True)
            # a link in place of the file must not lead the write out of the folder
            path = confine(self.disk_dir / "block_offload.safetensors", [self.disk_dir], what="offload file")
            save_file(disk_tensors, str(path))
            disk_tensors.clear()
            self._disk = safe_open(str(path), framework="pt", device="cpu")
        for r in range(len(self.regions)):
            self._offload(r)
        self._original = self.model._block_and_audio
        self.model._block_and_audio = self._run_region
        self.model._block_offloader = self
        return self

    def _add(self, r: int, owner: nn.Module, name: str, tensor: torch.Tensor, is_param: bool,
             disk_tensors: dict[str, torch.Tensor]) -> None:
        placeholder = map_tensor(tensor, lambda x: torch.empty_like(x, device=META))
        entry = _Entry(owner, name, is_param, None, placeholder)
        if self.disk_dir is not None:
            leaves = tensor_leaves(tensor)
            entry.disk_keys = []
            for j, leaf in enumerate(leaves):
                key = f"r{r}.{len(self.entries[r])}.{j}"
                disk_tensors[key] = leaf.detach().to("cpu").contiguous()
                entry.disk_keys.append(key)
            entry.template = placeholder
        else:
            def to_host(x: torch.Tensor) -> torch.Tensor:
                x = x.detach().to("cpu", copy=True).contiguous()
                return x.pin_memory() if self.pin else x
            entry.home = map_tensor(tensor, to_host)
            self.host_bytes += sum(leaf.numel() * leaf.element_size() for leaf in tensor_leaves(entry.home))
        self.entries[r].append(entry)

    def remove(self) -> None:
        """Put every weight back on the device and drop the wrapper."""
        if self._original is None:
            return
        for r in range(len(self.regions)):
            self._load(r, asynchronous=False)
            self._activate(r)
        self.active.clear()
        del self.model.__dict__["_block_and_audio"]
        self.model.__dict__.pop("_block_offloader", None)
        self._original = None

    def close(self) -> None:
        """End of the run without putting the weights back (`remove` does that): drop the
        wrapper, the host copies, the copies in flight and the spill file. The swapped
        weights stay placeholders, so the model cannot run blocks afterwards."""
        self.model.__dict__.pop("_block_and_audio", None)
        self.model.__dict__.pop("_block_offloader", None)
        self._original = None
        self.entries = [[] for _ in self.regions]
        self.pending.clear()
        self.active.clear()
        if self._disk is not None:
            self._disk = None
            with contextlib.suppress(OSError):  # Windows keeps a file that is still mapped
                (self.disk_dir / "block_offload.safetensors").unlink()

    # ------------------------------------------------------------------ swapping

    def _host_tensor(self, entry: _Entry) -> torch.Tensor:
        if entry.home is not None:
            return entry.home
        leaves = iter([self._disk.get_tensor(key) for key in entry.disk_keys])
        return map_tensor(entry.template, lambda _: next(leaves))

    def _load(self, r: int, asynchronous: bool) -> None:
        if r in self.active or r in self.pending:
            return
        stream = self.stream if asynchronous else None
        tensors = []
        if stream is not None:
            with torch.cuda.stream(stream):
                for entry in self.entries[r]:
                    tensors.append(map_tensor(self._host_tensor(entry), lambda x: x.to(self.device, non_blocking=True)))
                event = torch.cuda.Event()
                event.record(stream)
        else:
            for entry in self.entries[r]:
                tensors.append(map_tensor(self._host_tensor(entry), lambda x: x.to(self.device, non_blocking=self.pin)))
            event = None
        self.pending[r] = (tensors, event)
        if self.record:
            self.log.append(("prefetch" if asynchronous else "load", r))

    def _activate(self, r: int) -> None:
        if r in self.active:
            return
        if r not in self.pending:
            self._load(r, asynchronous=False)
        tensors, event = self.pending.pop(r)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:
                for leaf in tensor_leaves(t):
                    leaf.record_stream(current)
        for entry, t in zip(self.entries[r], tensors):
            self._set(entry, t)
        self.active.add(r)

    def _offload(self, r: int) -> None:
        for entry in self.entries[r]:
            self._set(entry, entry.placeholder)
        self.active.discard(r)
        if self.record:
            self.log.append(("offload", r))

    @staticmethod
    def _set(entry: _Entry, tensor: torch.Tensor) -> None:
        if entry.is_param:
            entry.owner._parameters[entry.name] = nn.Parameter(tensor, requires_grad=False)
        else:
            entry.owner._buffers[entry.name] = tensor

    # ------------------------------------------------------------------ the wrapped region

    def _next_regions(self, r: int, backward: bool) -> list[int]:
        step = -1 if backward else 1
        out, n = [], r + step
        while len(out) < self.prefetch and 0 <= n < len(self.regions):
            out.append(n)
            n += step
        return out

    def _run_region(self, index: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        backward = in_backward()
        if self.record:
            self.log.append(("run-backward" if backward else "run", index))
        self._activate(index)
        for n in self._next_regions(index, backward):
            self._load(n, asynchronous=True)
        try:
            return self._original(index, *args, **kwargs)
        finally:
            self._offload(index)
            last = len(self.regions) - 1
            if not backward and index == last and torch.is_grad_enabled() and self.prefetch:
                # The backward pass starts by recomputing the last region.
                self._load(last, asynchronous=True)

    def device_bytes(self) -> int:
        """Bytes of swapped weights currently held on the device by this offloader."""
        total = 0
        for r in self.active:
            for entry in self.entries[r]:
                t = entry.owner._parameters[entry.name] if entry.is_param else entry.owner._buffers[entry.name]
                total += sum(leaf.numel() * leaf.element_size() for leaf in tensor_leaves(t))
        return total


def enable_block_offload(model: nn.Module, device: torch.device | str, prefetch: int = 1,
                         disk_dir: str | os.PathLike | None = None) -> BlockOffloader:
    """Install the block swap on `model` (call it after the LoRA is added). Everything outside
    the blocks and audio injectors moves to `device`; the blocks' frozen weights go to host
    memory (or `disk_dir`)."""
    if getattr(model, "_block_offloader", None) is not None:
        return model._block_offloader
    if getattr(model, "_hf_hook", None) is not None or any(hasattr(m, "_hf_hook") for m in model.modules()):
        from .config import EXCLUSIVE_OFFLOAD_MESSAGE

        raise RuntimeError(EXCLUSIVE_OFFLOAD_MESSAGE)
    device = torch.device(device)
    swapped = {id(m) for m in model.blocks.modules()}
    if getattr(model, "audio_injector", None) is not None:
        swapped |= {id(m) for m in model.audio_injector.modules()}
    for module in model.modules():
        if id(module) in swapped:
            continue
        for name, param in module._parameters.items():
            if param is not None and param.device != device:
                param.data = param.data.to(device)
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return BlockOffloader(model, device, prefetch=prefetch, disk_dir=disk_dir).install()


__all__ = ["BlockOffloader", "enable_block_offload", "in_backward", "map_tensor", "tensor_leaves"]
