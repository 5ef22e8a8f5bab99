"""A training run's own copy of a model it must leave exactly as it found it.

ComfyUI caches node outputs: the transformer a loader node returns is the same object for
every prompt queued after it, for the training node and for the sampler beside it. A
training run changes the model it trains in many ways: peft wraps its Linears, int8/fp8
replace them, block offload swaps weights for placeholders and wraps a method, the
checkpoint policy, feed-forward chunking, TREAD routes, compiled blocks, train mode and the
device are set on it. None of that may reach the cached model, whether the run succeeds,
fails half-way or is cancelled.

`run_local_model(model)` therefore trains on a structural copy: every module object of the
copy is new, with its own parameter, buffer and submodule tables, hooks and attributes,
while the weight tensors are shared (new `nn.Parameter` objects over the same storage; no
second copy of a 14B model). Whatever a run does to modules (replace, wrap, hook, compile,
move, cast, quantize, offload) happens on the copy; conversions and moves make new tensors
for the copy only. The one thing a run must not do is write into a base weight in place;
training never does (the base weights are frozen). When the block ends, the copy's tensors
are dropped at once (device copies, quantized weights, offload buffers and spill file), even
while a traceback still refers to the copy.

Tensors created under `torch.inference_mode()` (ComfyUI runs every node in it) cannot be
saved for the backward pass; the copy's parameters over them are normal tensors on the same
storage, so nothing is cloned.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_CONTAINERS = (dict, list, set, collections.OrderedDict)


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor object over `tensor`'s storage (a normal tensor, even for an inference one)."""
    data = tensor.detach()
    if data.is_inference() and type(data) is torch.Tensor:
        data = torch.empty(0, dtype=data.dtype, device=data.device).set_(
            data.untyped_storage(), data.storage_offset(), data.size(), data.stride())
    return data


def shared_weight_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree that shares its weight storage (see module doc):
    same module types, attributes (containers copied one level) and hooks; tied weights
    and shared submodules stay shared within the copy."""
    tensors: dict[int, torch.Tensor] = {}
    modules: dict[int, nn.Module] = {}

    def tensor(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in tensors:
            alias = _alias(t)
            if isinstance(t, nn.Parameter):
                alias = nn.Parameter(alias, requires_grad=t.requires_grad)
            tensors[id(t)] = alias
        return tensors[id(t)]

    def module(m: nn.Module) -> nn.Module:
        if id(m) in modules:
            return modules[id(m)]
        new = object.__new__(type(m))
        modules[id(m)] = new
        state = {key: type(value)(value) if type(value) in _CONTAINERS else value
                 for key, value in m.__dict__.items()}
        state["_parameters"] = {name: tensor(p) for name, p in m._parameters.items()}
        state["_buffers"] = {name: tensor(b) for name, b in m._buffers.items()}
        state["_modules"] = {name: None if c is None else module(c) for name, c in m._modules.items()}
        new.__dict__.update(state)
        return new

    with torch.inference_mode(False):
        return module(model)


def release(copy: nn.Module) -> None:
    """Drop every tensor the run's copy holds (and its block offloader's buffers and spill
    file); the copy is unusable afterwards, the model it was made from untouched."""
    offloader = getattr(copy, "_block_offloader", None)
    if offloader is not None:
        offloader.close()
    for m in copy.modules():
        m._parameters.clear()
        m._buffers.clear()


@contextlib.contextmanager
def run_local_model(model: nn.Module) -> Iterator[nn.Module]:
    """The run's copy of `model` (`shared_weight_copy`), released when the block ends."""
    copy = shared_weight_copy(model)
    try:
        yield copy
    finally:
        release(copy)


__all__ = ["release", "run_local_model", "shared_weight_copy"]
