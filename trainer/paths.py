"""Keeping every file the pack reads or writes inside the folders it may use.

A path is *confined* when it resolves - symlinks followed, ``..`` collapsed - to one of the
allowed roots or to something below one. In ComfyUI the roots are ComfyUI's own folders
(input, output, temp, models and the extra model paths it is configured with; see
`nodes.comfy_adapter.allowed_roots`); on the command line they are the folders and files the
user named (plus the output folder; see `TrainConfig.roots` / `DatasetConfig.roots`).

`confine` returns the resolved path, and callers open that one: a link inside an allowed
folder that points elsewhere is refused instead of followed, for reading and for writing
alike (a link whose target stays inside the roots is fine).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutsideAllowedFoldersError", "confine", "is_inside", "resolve_roots"]

PathLike = str | os.PathLike


class OutsideAllowedFoldersError(PermissionError):
    """A file or folder resolves outside the allowed folders; the message names both."""


def resolve_roots(roots: Iterable[PathLike | None]) -> tuple[Path, ...]:
    """`roots` resolved, in order, without empty entries and without roots that lie inside
    another one (they allow nothing more)."""
    resolved: list[Path] = []
    for root in roots:
        if root is None or not str(root).strip():
            continue
        path = Path(root).expanduser().resolve()
        if path not in resolved:
            resolved.append(path)
    return tuple(p for p in resolved if not any(other in p.parents for other in resolved))


def _within(resolved: Path, roots: tuple[Path, ...]) -> bool:
    return any(resolved == root or root in resolved.parents for root in roots)


def is_inside(path: PathLike, roots: Iterable[PathLike]) -> bool:
    """Whether `path` resolves to one of `roots` or below one."""
    return _within(Path(path).expanduser().resolve(), resolve_roots(roots))


def confine(path: PathLike, roots: Iterable[PathLike], *, base: PathLike | None = None, what: str = "") -> Path:
    """`path` resolved (symlinks followed) when it lies inside one of `roots`.

    A relative `path` is taken relative to `base` (default: the working directory). `what`
    names the path in errors ("dataset folder", "LoRA file", ...).

    Raises:
        ValueError: `path` is empty (an empty name is no file or folder, not the working
            directory).
        OutsideAllowedFoldersError: `path` resolves outside the roots (or there are none);
            the message names the path, what it resolves to and the allowed folders.
    """
    label = f"{what} " if what else ""
    if path is None or not str(path).strip():
        raise ValueError(f"{label or 'the path '}is empty; an empty name is not a file or folder")
    raw = Path(path).expanduser()
    candidate = raw if raw.is_absolute() or base is None else Path(base) / raw
    resolved = candidate.resolve()
    allowed = resolve_roots(roots)
    if _within(resolved, allowed):
        return resolved
    via = f" (it resolves to {resolved})" if resolved != candidate.absolute() else ""
    folders = ", ".join(str(root) for root in allowed) or "none configured"
    raise OutsideAllowedFoldersError(f"{label}'{path}'{via} is outside the allowed folders ({folders})")
