"""Acceptance test of numerical identity with the reference S2V implementations.

Every folder below the golden root that holds a `config.json` and `case_*.safetensors` is a
golden set: its weights file is loaded through `load_transformer` (the path a user's
ComfyUI file takes), and every case runs our forward in fp32 with the numerics the set was
made with: `comfyui` (ComfyUI 0.3.64's WanModel_S2V, the sets present today) unless the
set's config.json or the case's .json names another in a "numerics" field (the official
Wan2.2 sets announced for the same root).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden import golden_folders, golden_root, relative_error
from safetensors.torch import load_file

from trainer.model import load_transformer

TOLERANCE = 1e-5

#: Golden case keys (ComfyUI's forward argument names) -> our forward's argument names.
ARGUMENTS = {
    "audio_embed": "audio_embeds",
    "reference_latent": "reference_latents",
    "control_video": "pose_latents",
    "reference_motion": "motion_latents",
}

SETS = [folder for folder in golden_folders("config.json") if any(folder.glob("case_*.safetensors"))]
CASES = [(folder, case) for folder in SETS for case in sorted(folder.glob("case_*.safetensors"))]


def test_golden_sets_are_present():
    assert golden_root() is not None, "no golden folder found: set S2V_GOLDEN_DIR"
    assert SETS, f"no golden set (config.json + case_*.safetensors) below {golden_root()}"


@pytest.fixture(scope="module")
def models():
    cache: dict[Path, torch.nn.Module] = {}

    def get(folder: Path) -> torch.nn.Module:
        if folder not in cache:
            model = load_transformer(
                folder / "model.safetensors", dtype=torch.float32, config=folder / "config.json", numerics="comfyui"
            )
            cache[folder] = model.eval()
        return cache[folder]

    return get


def numerics_of(folder: Path, case: Path) -> str:
    """The numerics a golden case was computed with ("comfyui" unless a json says otherwise)."""
    for meta in (case.with_suffix(".json"), folder / "config.json"):
        if meta.is_file():
            value = json.loads(meta.read_text()).get("numerics")
            if value:
                return value
    return "comfyui"


@pytest.mark.parametrize(("folder", "case"), CASES, ids=[f"{f.name}/{c.stem}" for f, c in CASES])
def test_forward_matches_reference(models, folder: Path, case: Path):
    tensors = load_file(str(case))
    kwargs = {ours: tensors[theirs] for theirs, ours in ARGUMENTS.items() if theirs in tensors}
    numerics = numerics_of(folder, case)
    with torch.no_grad():
        out = models(folder)(tensors["x"], tensors["timestep"], tensors["context"], numerics=numerics, **kwargs).sample
    error = relative_error(out, tensors["out"])
    assert error < TOLERANCE, f"{case.name} ({numerics}): relative L2 error {error:.3e}"
