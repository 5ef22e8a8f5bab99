"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    """A tiny random DINOv2 (transformers Dinov2Model) saved as a local folder: CREPA's teacher."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=28)
    folder = tmp_path_factory.mktemp("dinov2_tiny")
    Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def comfyui_ctx():
    """A running ComfyUI server (COMFYUI_PATH) with the pack linked in, shared by one module's
    tests; skipped when no ComfyUI checkout is named."""
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to run the checks against "
                    "(README: \"End-to-end check against a real ComfyUI\")")
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import comfyui_e2e as e2e  # scripts/ is not a package

    with e2e.ComfyUIServer(comfyui) as server:
        yield e2e.make_context(server)
