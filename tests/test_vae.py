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
    CUDA_DECODE_LATENT_FRAMES_PER_CALL,
    causal_decode,
    causal_encode,
    comfyui_vae_state_dict,
    compute_dtype,
    decode_frames_per_call,
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


# ----------------------------------------------------------------------------- the CUDA path's logic, on the CPU


def test_cpu_keeps_diffusers_own_path():
    """On the CPU `encode_video` / `decode_latents` are exactly diffusers' float32 calls."""
    vae = build_tiny_vae(seed=2)
    frames = video(frames=9, seed=3)
    assert compute_dtype(torch.float32, "cpu") == torch.float32
    assert torch.equal(encode_video(vae, frames, normalize=False), vae.encode(frames).latent_dist.mode())
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(decode_latents(vae, latents, denormalize=False), vae.decode(latents).sample.clamp(-1, 1))


@pytest.mark.parametrize("per_call", [1, 2, 3, 5, 8])
def test_causal_decode_several_latent_frames_per_call_is_the_same_function(per_call):
    """The causal decoder fed k latent frames per call (one feature cache) gives diffusers'
    one-frame-per-call video, also when the last call gets fewer frames, for a batch of 2."""
    vae = build_tiny_vae(seed=5)
    latents = torch.randn(2, 16, 8, 3, 5, generator=torch.Generator().manual_seed(6))
    expected = vae.decode(latents).sample
    decoded = causal_decode(vae, latents, per_call, channels_last=per_call % 2 == 1)
    assert decoded.shape == expected.shape == (2, 3, 29, 24, 40) and decoded.dtype == torch.float32
    # float32 rounding only (channels-last convolutions sum in another order); a wrong cache
    # or frame order moves pixels by tenths
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("per_call", "frames"), [(4, 17), (8, 17), (12, 23), (16, 5), (8, 1)])
def test_causal_encode_several_frames_per_call_is_the_same_function(per_call, frames):
    """Encoder moments with 4k frames per call equal diffusers' 4 per call; frames past
    1 + 4 m are dropped as diffusers drops them."""
    vae = build_tiny_vae(seed=7)
    clip = video(frames=frames, height=16, width=24, seed=8)
    expected = vae.encode(clip).latent_dist.parameters
    moments = causal_encode(vae, clip, per_call)
    assert moments.shape == expected.shape == (1, 32, 1 + (frames - 1) // 4, 2, 3)
    torch.testing.assert_close(moments, expected, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        causal_encode(vae, clip, 6)


def test_lower_precision_leaves_the_weights_alone():
    """A bfloat16 decode of a float32 VAE runs on cast copies of the weights: afterwards the
    module holds the same float32 tensors, and the result is near the float32 one."""
    vae = build_tiny_vae(seed=9)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    latents = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(10))
    low = causal_decode(vae, latents, 2, dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    reference = vae.decode(latents).sample
    assert 0 < (low - reference).abs().max() < 0.25


def test_decode_frames_per_call_follows_free_memory():
    """At 832x480 one more latent frame per call is estimated at 8 live tensors of 96 channels
    x 4 frames x 480 x 832 pixels in bf16 (2.45 GB); half the free memory must hold the frames."""
    with meta_device_init():
        vae = AutoencoderKLWan()
    shape = (1, 16, 39, 60, 104)
    per_frame = 8 * 96 * 4 * 480 * 832 * 2
    assert decode_frames_per_call(vae, shape, torch.bfloat16, free_bytes=100 * 2**30) == CUDA_DECODE_LATENT_FRAMES_PER_CALL
    assert decode_frames_per_call(vae, shape, torch.bfloat16, free_bytes=2 * per_frame * 2 + 1) == 2
    assert decode_frames_per_call(vae, shape, torch.bfloat16, free_bytes=2 * 2**30) == 1
    assert decode_frames_per_call(vae, shape, torch.float32, free_bytes=2 * per_frame * 2 + 1) == 1
    assert decode_frames_per_call(vae, (2, 16, 39, 60, 104), torch.bfloat16, free_bytes=2 * per_frame * 2 + 1) == 1
