"""Where the golden reference outputs live (see ../shared/golden/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def golden_root() -> Path | None:
    """`S2V_GOLDEN_DIR`, else `shared/golden` beside the repository (or above it)."""
    if os.environ.get("S2V_GOLDEN_DIR"):
        return Path(os.environ["S2V_GOLDEN_DIR"])
    for ancestor in Path(__file__).resolve().parents[1:]:
        candidate = ancestor / "shared" / "golden"
        if candidate.is_dir():
            return candidate
    return None


def golden_folders(marker: str) -> list[Path]:
    """Every folder below the golden root that holds a file named `marker`."""
    root = golden_root()
    if root is None or not root.is_dir():
        return []
    return sorted(p.parent for p in root.rglob(marker))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()
