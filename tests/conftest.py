"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch


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
