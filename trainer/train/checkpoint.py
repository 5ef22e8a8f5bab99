"""Training checkpoints: one folder per step, written atomically.

``<output_dir>/checkpoints/checkpoint-<step>/`` holds ``lora.safetensors`` (the trainable
parameters by their exact names), ``ema.safetensors`` (when EMA is on),
``training_state.pt`` (optimizer, scheduler, RNG states, data position, histories) and
``state.json`` (step and a summary; written last). The folder is assembled under a
temporary name (``.checkpoint-<step>.tmp-<id>``, `trainer.io_utils.atomic_folder`), every
file fsynced, then renamed in one step, so a crash or kill at any moment leaves either the
complete new checkpoint or none; earlier checkpoints are never touched before the new one is in place. Leftover temporary
folders are removed by the next save or resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io_utils import atomic_folder

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^\.checkpoint-\d+\.(tmp|old)-[0-9a-f]+$")
STATE_JSON = "state.json"


class CheckpointNotFoundError(FileNotFoundError):
    pass


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def _owned(entry: Path) -> bool:
    """A real folder of the checkpoints folder, not a symlink to a folder elsewhere: the only
    kind that is listed, resumed from or deleted."""
    return entry.is_dir() and not entry.is_symlink()


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (symlinks are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and _owned(entry) and (entry / STATE_JSON).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(value: str | None, root: str | os.PathLike) -> Path | None:
    """None/"" -> None; "latest" -> the newest complete checkpoint (None when there is none
    yet, so that a first run with `resume_from_checkpoint="latest"` starts fresh); anything
    else is a checkpoint folder that must exist."""
    if value is None or str(value).strip().lower() in ("", "none", "false"):
        return None
    if str(value).strip().lower() == "latest":
        return latest_checkpoint(root)
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = Path(root) / value
    if not (path / STATE_JSON).is_file():
        raise CheckpointNotFoundError(f"'{value}' is not a complete checkpoint folder (no {STATE_JSON})")
    return path


def remove_partial(root: str | os.PathLike) -> list[Path]:
    """Delete temporary folders left by an interrupted save."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if _TMP.match(entry.name) and _owned(entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    lora: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    summary: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    total_limit: int | None = None,
    on_file_written: Callable[[str], None] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest beyond `total_limit`.

    `on_file_written(name)` is called after each file is written (inside the temporary
    folder, before the fsync and the rename).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_partial(root)
    final = root / f"checkpoint-{step}"
    # replaces only a checkpoint folder of the same step (a re-save after a resume)
    with atomic_folder(final, replaceable=lambda path: _NAME.match(path.name) is not None) as tmp:

        def done(name: str) -> None:
            if on_file_written is not None:
                on_file_written(name)

        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        done("lora.safetensors")
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
            done("ema.safetensors")
        torch.save(training_state, tmp / "training_state.pt")
        done("training_state.pt")
        (tmp / STATE_JSON).write_text(json.dumps({"step": step, **summary}, indent=2, default=str))
        done(STATE_JSON)
    if total_limit is not None:
        for _, path in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """{"step", "summary", "lora", "ema" (or None), "training_state"} of a checkpoint folder."""
    path = Path(path)
    summary = json.loads((path / STATE_JSON).read_text())
    ema_file = path / "ema.safetensors"
    return {
        "step": int(summary["step"]),
        "summary": summary,
        "lora": load_file(str(path / "lora.safetensors")),
        "ema": load_file(str(ema_file)) if ema_file.is_file() else None,
        "training_state": torch.load(path / "training_state.pt", map_location="cpu", weights_only=False),
    }
