"""Defining the pack's torch custom ops once per process."""

from __future__ import annotations

from collections.abc import Callable

import torch


def define_once(names: tuple[str, ...], define: Callable[[], tuple]) -> tuple:
    """The ops `torch.ops.wan_s2v.<name>` for `names`, made by `define()` unless they exist:
    the pack may be imported twice in one process (as `trainer` and under ComfyUI's package
    name), and an op can be defined only once."""
    try:
        return tuple(getattr(torch.ops.wan_s2v, name) for name in names)
    except (AttributeError, RuntimeError):
        return define()
