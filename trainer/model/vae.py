"""Wan 2.1 VAE (diffusers `AutoencoderKLWan`: z_dim 16, 4x temporal and 8x8 spatial compression).

Formats:
- Diffusers: a `vae/` folder (config.json + safetensors) or the pipeline root holding it.
- ComfyUI single file (`models/vae/wan_2.1_vae.safetensors`): the original Wan key names
  (`encoder.downsamples.N.residual.K`, `decoder.upsamples.N`, `conv1`/`conv2`, ...), converted
  with diffusers' own `convert_wan_vae_to_diffusers`; saving inverts that map.

Latent spaces: the VAE encoder's distribution lives in *raw* latent space; the transformer sees
*normalized* latents, (raw - latents_mean) / latents_std per channel (config values).
`encode_video` returns normalized latents and `decode_latents` takes them, unless told otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ..io_utils import atomic_folder
from .single_file import (
    CheckpointKeyError,
    PathLike,
    check_loading_info,
    is_saved_model_folder,
    is_single_file,
    load_single_file,
    meta_device_init,
    read_header,
    save_single_file,
    state_dict_for_saving,
)

#: Resnets per decoder up block (num_res_blocks + 1) plus its upsampler, in the original flat list.
_UP_BLOCK_STRIDE = 4
_RESIDUAL_TO_DIFFUSERS = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                          "shortcut": "conv_shortcut"}
_DIFFUSERS_TO_RESIDUAL = {v: k for k, v in _RESIDUAL_TO_DIFFUSERS.items()}


# ----------------------------------------------------------------------------- key names


def original_to_diffusers_vae_keys(keys: Iterable[str]) -> dict[str, str]:
    """Original Wan VAE names -> diffusers names, by diffusers' own converter (a pure rename)."""
    converted = convert_wan_vae_to_diffusers({key: key for key in keys})
    return {original: new for new, original in converted.items()}


def _resnet_part(rest: str) -> str:
    """`norm1.gamma` -> `residual.0.gamma` etc. (diffusers resnet -> original residual block)."""
    name, _, tail = rest.partition(".")
    return f"{_DIFFUSERS_TO_RESIDUAL[name]}.{tail}" if name in _DIFFUSERS_TO_RESIDUAL else rest


def diffusers_to_original_vae_key(key: str) -> str:
    """Inverse of diffusers' Wan VAE converter for one key (standard Wan 2.1 layout)."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    side = head  # encoder / decoder
    simple = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2.", "mid_block.attentions.0.": "middle.1."}
    for new, old in simple.items():
        if rest.startswith(new):
            return f"{side}.{old}{rest[len(new):]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.middle.{2 * int(m.group(1))}.{_resnet_part(m.group(2))}"
    if m := re.match(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{side}.downsamples.{m.group(1)}.{_resnet_part(m.group(2))}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        index = _UP_BLOCK_STRIDE * int(m.group(1)) + int(m.group(2))
        return f"{side}.upsamples.{index}.{_resnet_part(m.group(3))}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        return f"{side}.upsamples.{_UP_BLOCK_STRIDE * int(m.group(1)) + 3}.{m.group(2)}"
    raise KeyError(f"no original Wan VAE name for {key}")


# ----------------------------------------------------------------------------- loading


def _vae_hint(header: dict) -> str | None:
    keys = set(header)
    if "conv2.weight" in header and header["conv2.weight"][0][0] == 48:
        return "z_dim 48: this is the Wan 2.2 (TI2V-5B) VAE; S2V uses the Wan 2.1 VAE (wan_2.1_vae.safetensors)"
    if any(k.startswith(("first_stage_model.", "vae.")) for k in keys):
        return "keys carry a checkpoint prefix: extract the VAE first"
    if "decoder.middle.0.residual.0.gamma" not in keys:
        return "this is not a Wan VAE file"
    return None


def vae_config_from_header(header: dict[str, tuple[tuple[int, ...], str]]) -> dict:
    """AutoencoderKLWan config of an original-layout single file (widths from tensor shapes;
    the Wan 2.1 structure and latent statistics otherwise)."""
    if "encoder.conv1.weight" not in header or "conv2.weight" not in header:
        raise CheckpointKeyError(f"not a Wan 2.1 VAE file: {_vae_hint(header) or 'no encoder.conv1/conv2 weights'}")
    base_dim, in_channels = header["encoder.conv1.weight"][0][:2]
    z_dim = header["conv2.weight"][0][0]
    if z_dim != 16:
        raise CheckpointKeyError(f"VAE with z_dim {z_dim}: {_vae_hint(header) or 'expected the Wan 2.1 VAE (z_dim 16)'}")
    out_channels = header["decoder.head.2.weight"][0][0] if "decoder.head.2.weight" in header else 3
    return {"base_dim": base_dim, "z_dim": z_dim, "in_channels": in_channels, "out_channels": out_channels}


def _load_single_file(path: Path, dtype: torch.dtype, device: str | torch.device) -> AutoencoderKLWan:
    header = read_header(path)
    config = vae_config_from_header(header)
    with meta_device_init():
        vae = AutoencoderKLWan(**config)
    mapping = original_to_diffusers_vae_keys(header)
    load_single_file(vae, path, lambda key: mapping.get(key, key), dtype, device, what="Wan VAE",
                     hint=lambda missing, unexpected: _vae_hint(header))
    return vae


def _load_diffusers(path: Path, dtype: torch.dtype, device: str | torch.device) -> AutoencoderKLWan:
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a vae folder (config.json) nor a pipeline root")
    vae, info = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, output_loading_info=True)
    check_loading_info(info, f"Wan VAE {folder}")
    return vae.to(device)


def load_vae(path: PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKLWan:
    """Load the Wan 2.1 VAE (eval mode, frozen) from a Diffusers folder / pipeline root or a
    ComfyUI `wan_2.1_vae.safetensors`. Strict: any missing or unexpected key is an error."""
    path = Path(path)
    vae = _load_single_file(path, dtype, device) if is_single_file(path) else _load_diffusers(path, dtype, device)
    return vae.eval().requires_grad_(False)


def comfyui_vae_state_dict(vae: AutoencoderKLWan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The VAE's weights under the original Wan names (ComfyUI's wan_2.1_vae layout)."""
    return {diffusers_to_original_vae_key(k): v for k, v in state_dict_for_saving(vae, dtype).items()}


def save_vae(vae: AutoencoderKLWan, path: PathLike, layout: str = "diffusers", dtype: torch.dtype | None = None) -> Path:
    """Save as a Diffusers folder (`layout="diffusers"`) or a ComfyUI single file (`"comfyui"`).
    Written atomically (`trainer.io_utils`); an existing folder is replaced only if it holds
    nothing but a saved model (else FileExistsError)."""
    path = Path(path)
    if layout == "diffusers":
        state = None if dtype is None else state_dict_for_saving(vae, dtype)
        with atomic_folder(path, replaceable=is_saved_model_folder) as tmp:
            vae.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state} if state else {}))
        return path
    if layout == "comfyui":
        return save_single_file(comfyui_vae_state_dict(vae, dtype), path)
    raise ValueError(f"layout must be 'diffusers' or 'comfyui', got {layout!r}")


# ----------------------------------------------------------------------------- latents


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Raw VAE latents [B, 16, T, H, W] -> normalized (raw - mean) / std, float32."""
    mean, std = _latent_stats(vae, latents)
    return (latents.float() - mean) / std


def denormalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Normalized latents [B, 16, T, H, W] -> raw VAE latents latents * std + mean, float32."""
    mean, std = _latent_stats(vae, latents)
    return latents.float() * std + mean


@torch.no_grad()
def encode_video(
    vae: AutoencoderKLWan,
    frames: torch.Tensor,
    sample: bool = False,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Frames [B, 3, F, H, W] in [-1, 1] -> latents [B, 16, 1 + (F - 1) // 4, H / 8, W / 8], float32.

    The mode (mean) of the latent distribution by default, a sample with `sample=True`.
    Normalized (what the transformer sees) unless `normalize=False`. A single image is F = 1.
    """
    parameter = next(vae.parameters())
    distribution = vae.encode(frames.to(parameter.device, parameter.dtype)).latent_dist
    latents = distribution.sample(generator) if sample else distribution.mode()
    return normalize_latents(latents, vae) if normalize else latents.float()


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor, denormalize: bool = True) -> torch.Tensor:
    """Latents [B, 16, T, h, w] (normalized unless `denormalize=False`) -> frames
    [B, 3, 1 + 4 (T - 1), 8 h, 8 w] in [-1, 1], float32."""
    parameter = next(vae.parameters())
    raw = denormalize_latents(latents, vae) if denormalize else latents
    return vae.decode(raw.to(parameter.device, parameter.dtype)).sample.float().clamp(-1, 1)


__all__ = [
    "comfyui_vae_state_dict",
    "decode_latents",
    "denormalize_latents",
    "diffusers_to_original_vae_key",
    "encode_video",
    "load_vae",
    "normalize_latents",
    "original_to_diffusers_vae_keys",
    "save_vae",
    "vae_config_from_header",
]
