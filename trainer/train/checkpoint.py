"""Training checkpoints: one folder per step, written atomically, read without pickle.

``<run folder>/checkpoints/checkpoint-<step>/`` holds

* ``lora.safetensors``: the trainable parameters by their exact names;
* ``ema.safetensors``: the EMA weights (when EMA is on);
* ``training_state.safetensors`` + ``training_state.json``: optimizer, LR scheduler, RNG
  states, data position, histories and CREPA projector, as tensors + structure
  (`trainer.train.state_io`: nothing in them can run code when read);
* ``state.json``: step, save time, loss, the run's config and the run it belongs to (id and
  identity, see `trainer.train.runs`); written last.

The folder is assembled under a temporary name (``.checkpoint-<step>.tmp-<id>``,
`trainer.io_utils.atomic_folder`), every file fsynced, then renamed in one step, so a crash
or kill at any moment leaves either the complete new checkpoint or none; earlier checkpoints
are never touched before the new one is in place. Leftover temporary folders are removed by
the next save or resume. Pruning (`total_limit`) and replacing a folder of the same step
only ever touch checkpoints of the saving run.

A checkpoint of an older version (``training_state.pt``, a pickle) is refused: unpickling a
file runs whatever code was put into it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io_utils import atomic_folder
from .state_io import load_state, save_state

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^\.checkpoint-\d+\.(tmp|old)-[0-9a-f]+$")
STATE_JSON = "state.json"
TRAINING_STATE = "training_state"  # .safetensors + .json
OLD_TRAINING_STATE = "training_state.pt"
FORMAT = 2


class CheckpointNotFoundError(FileNotFoundError):
    pass


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (older format, damaged, another run's shape)."""


class OlderCheckpointError(CheckpointError):
    """Written by an older version, whose training state is a pickle file (never read)."""


#: Why an older version's checkpoint is not resumed.
OLDER_VERSION = (f"written by an older version of this trainer: its training state is a pickle file "
                 f"({OLD_TRAINING_STATE}), which is not read, because loading a pickle file runs any code someone put "
                 "into it")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def _owned(entry: Path) -> bool:
    """A real folder of real files, the only kind this trainer writes, so the only kind that
    is listed, resumed from or deleted: a link (the folder, or a file in it) may lead to
    files outside the allowed folders, which are never read."""
    if not entry.is_dir() or entry.is_symlink():
        return False
    return not any(child.is_symlink() for child in entry.iterdir())


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


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint folder; `OlderCheckpointError` for an older
    version's checkpoint, `CheckpointError` when it is unreadable or incomplete."""
    path = Path(path)
    if not (path / f"{TRAINING_STATE}.json").is_file():
        if (path / OLD_TRAINING_STATE).exists():
            raise OlderCheckpointError(f"checkpoint {path} was {OLDER_VERSION}. Start a new run "
                                       "(resume_from_checkpoint 'none'); its lora.safetensors is a plain "
                                       "safetensors file of the LoRA weights and stays safe to read")
        raise CheckpointError(f"checkpoint {path} is incomplete (no {TRAINING_STATE}.json)")
    try:
        summary = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        summary["step"] = int(summary["step"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path}: {STATE_JSON} is unreadable ({error})") from None
    return summary


def run_id_of(path: str | os.PathLike) -> str | None:
    """The run a checkpoint belongs to (None: unreadable or older version)."""
    try:
        run = read_summary(path).get("run")
    except CheckpointError:
        return None
    return run.get("run_id") if isinstance(run, dict) else None


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
    run_id: str | None = None,
) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest of run `run_id`'s
    checkpoints beyond `total_limit` (None: of every checkpoint under `root`).

    `training_state` holds tensors, NumPy arrays, numbers, strings, lists, tuples and dicts
    (`trainer.train.state_io`). An existing folder of the same step is replaced only when it
    belongs to `run_id`. `on_file_written(name)` is called after each file is written
    (inside the temporary folder, before the fsync and the rename).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_partial(root)
    final = root / f"checkpoint-{step}"

    def ours(path: Path) -> bool:
        return _NAME.match(path.name) is not None and (run_id is None or run_id_of(path) == run_id)

    # replaces only this run's checkpoint folder of the same step (a re-save after a resume)
    with atomic_folder(final, replaceable=ours) as tmp:

        def done(name: str) -> None:
            if on_file_written is not None:
                on_file_written(name)

        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        done("lora.safetensors")
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
            done("ema.safetensors")
        save_state(training_state, tmp, TRAINING_STATE)
        done(f"{TRAINING_STATE}.safetensors")
        document = {"step": step, "format": FORMAT, "saved_at": time.time(), **summary}
        (tmp / STATE_JSON).write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
        done(STATE_JSON)
    if total_limit is not None:
        own = [path for _, path in list_checkpoints(root) if ours(path)]
        for path in own[: max(0, len(own) - total_limit)]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """{"step", "summary", "lora", "ema" (or None), "training_state"} of a checkpoint folder.

    Reads only safetensors and JSON; `OlderCheckpointError` for an older version's
    checkpoint, `CheckpointError` for a damaged one."""
    path = Path(path)
    summary = read_summary(path)
    ema_file = path / "ema.safetensors"
    try:
        lora = load_file(str(path / "lora.safetensors"))
        ema = load_file(str(ema_file)) if ema_file.is_file() else None
        training_state = load_state(path, TRAINING_STATE)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    return {"step": summary["step"], "summary": summary, "lora": lora, "ema": ema,
            "training_state": training_state}
