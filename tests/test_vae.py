"""Wan 2.1 VAE loader (Diffusers folder and ComfyUI/original single file) and latent helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from trainer.model.single_file import CheckpointKeyError, meta_device_init
from trainer.model.tiny import build_tiny_vae
from trainer.model.vae import (
    comfyui_vae_state_dict,
    decode_latents,
    denormalize_latents,
    diffusers_to_original_vae_key,
    encode_video,
    load_vae,
    normalize_latents,
    original_to_diffusers_vae_keys,
    save_vae,
)


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae")
    vae = build_tiny_vae(seed=1)
    save_vae(vae, root / "diffusers" / "vae", "diffusers")
    save_vae(vae, root / "comfy" / "wan_2.1_vae.safetensors", "comfyui")
    return {"root": root / "diffusers", "folder": root / "diffusers" / "vae", "comfy": root / "comfy" / "wan_2.1_vae.safetensors"}


def video(frames: int = 5, height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1


def rewrite(source: Path, target: Path, edit) -> Path:
    tensors = load_file(str(source))
    edit(tensors)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


def test_formats_give_identical_outputs(vae_files):
    frames = video()
    results = []
    for path in (vae_files["root"], vae_files["folder"], vae_files["comfy"]):
        vae = load_vae(path, dtype=torch.float32)
        assert not vae.training and not any(p.requires_grad for p in vae.parameters())
        latents = encode_video(vae, frames)
        results.append((latents, decode_latents(vae, latents)))
    for latents, decoded in results[1:]:
        assert torch.equal(latents, results[0][0])
        assert torch.equal(decoded, results[0][1])


def test_comfyui_file_uses_original_wan_names(vae_files):
    keys = set(load_file(str(vae_files["comfy"])))
    for key in ("encoder.conv1.weight", "conv1.weight", "conv2.bias", "decoder.middle.0.residual.0.gamma",
                "decoder.middle.1.to_qkv.weight", "encoder.downsamples.0.residual.2.weight",
                "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.3.time_conv.weight",
                "decoder.upsamples.11.resample.1.weight", "decoder.head.2.weight"):
        assert key in keys, key
    vae = load_vae(vae_files["comfy"])
    resaved = comfyui_vae_state_dict(vae)
    original = load_file(str(vae_files["comfy"]))
    assert resaved.keys() == original.keys()
    assert all(torch.equal(resaved[k], original[k]) for k in original)


def test_key_map_inverts_diffusers_converter_at_full_size():
    """Every key of the real-size VAE (meta device, no memory) maps to an original name that
    diffusers' own converter maps back to the same key."""
    with meta_device_init():
        vae = AutoencoderKLWan()
    keys = list(vae.state_dict())
    originals = [diffusers_to_original_vae_key(k) for k in keys]
    assert len(set(originals)) == len(keys) == 194
    assert original_to_diffusers_vae_keys(originals) == dict(zip(originals, keys))


def test_encode_video_shapes_and_normalization(vae_files):
    vae = load_vae(vae_files["comfy"])
    frames = video(frames=9, height=32, width=64)
    latents = encode_video(vae, frames)
    assert latents.shape == (1, 16, 3, 4, 8) and latents.dtype == torch.float32
    raw = encode_video(vae, frames, normalize=False)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    torch.testing.assert_close(denormalize_latents(normalize_latents(raw, vae), vae), raw)
    assert torch.equal(encode_video(vae, frames), latents)  # the mode is deterministic
    sampled = encode_video(vae, frames, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, latents)
    image = encode_video(vae, frames[:, :, :1])
    assert image.shape == (1, 16, 1, 4, 8)


def test_decode_latents_shape_and_range(vae_files):
    vae = load_vae(vae_files["folder"])
    latents = encode_video(vae, video(frames=5))
    decoded = decode_latents(vae, latents)
    assert decoded.shape == (1, 3, 5, 32, 48)
    assert decoded.min() >= -1 and decoded.max() <= 1
    raw = denormalize_latents(latents, vae)
    assert torch.equal(decode_latents(vae, raw, denormalize=False), decoded)


def test_bfloat16_load_from_both_formats(vae_files):
    a = load_vae(vae_files["folder"], dtype=torch.bfloat16)
    b = load_vae(vae_files["comfy"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in b.parameters())
    state_a, state_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_strict_keys(vae_files, tmp_path):
    missing = rewrite(vae_files["comfy"], tmp_path / "missing.safetensors", lambda t: t.pop("decoder.upsamples.4.shortcut.bias"))
    with pytest.raises(CheckpointKeyError, match=r"missing.*decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut\.bias"):
        load_vae(missing)
    unexpected = rewrite(vae_files["comfy"], tmp_path / "unexpected.safetensors",
                         lambda t: t.update({"decoder.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointKeyError, match=r"unexpected.*decoder\.extra\.weight"):
        load_vae(unexpected)
    wrong_z = rewrite(vae_files["comfy"], tmp_path / "wan2.2_vae.safetensors",
                      lambda t: t.update({"conv2.weight": torch.zeros(48, 48, 1, 1, 1)}))
    with pytest.raises(CheckpointKeyError, match="Wan 2.2"):
        load_vae(wrong_z)
    folder = tmp_path / "vae"
    shutil.copytree(vae_files["folder"], folder)
    weights = next(folder.glob("*.safetensors"))
    rewrite(weights, weights, lambda t: t.pop("quant_conv.bias"))
    with pytest.raises(CheckpointKeyError, match="quant_conv.bias"):
        load_vae(folder)


def test_refuses_pickle_checkpoints(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        load_vae(path)
