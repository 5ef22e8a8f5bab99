"""Wan 2.1 VAE (diffusers `AutoencoderKLWan`: z_dim 16, 4x temporal and 8x8 spatial compression).

Formats:
- Diffusers: a `vae/` folder (config.json + safetensors) or the pipeline root holding it.
- ComfyUI single file (`models/vae/wan_2.1_vae.safetensors`): the original Wan key names
  (`encoder.downsamples.N.residual.K`, `decoder.upsamples.N`, `conv1`/`conv2`, ...), converted
  with diffusers' own `convert_wan_vae_to_diffusers`; saving inverts that map.

Latent spaces: the VAE encoder's distribution lives in *raw* latent space; the transformer sees
*normalized* latents, (raw - latents_mean) / latents_std per channel (config values).
`encode_video` returns normalized latents and `decode_latents` takes them, unless told otherwise.

Speed: on the CPU both run diffusers' own `encode` / `decode` in the weights' dtype. On CUDA
they run the same encoder and decoder modules through `causal_encode` / `causal_decode`: in
bfloat16 (as ComfyUI runs this VAE; the module keeps its own weights), channels-last 3D
activations (cuDNN's native layout for bf16 convolutions), cuDNN's benchmarked algorithm
choice, and several latent frames per call of the causal decoder instead of one when memory
allows (`docs/benchmarks.md` has the times and the error against the float32 decode).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

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


# ----------------------------------------------------------------------------- fast causal encode / decode

#: Most latent frames per decoder call on CUDA. diffusers decodes one latent frame per call;
#: the decoder is causal (every temporal convolution reads the frames before its input from
#: the feature cache), so k frames per call give the same video from k times fewer calls, with
#: larger convolutions and a smaller share of copied cache frames. Measured at 832x480 on an
#: H200 (`bench/bench_vae.py`): 4 per call decodes a 39-latent chunk in 2.92 s against 3.43 s
#: for 1 per call, at a peak of 10.5 GiB against 4.5 GiB; `decode_frames_per_call` lowers it
#: when the GPU has less memory free.
CUDA_DECODE_LATENT_FRAMES_PER_CALL = 4
#: Video frames per encoder call on CUDA after the first frame (a multiple of 4). 16 per call
#: encoded no faster than diffusers' 4 (0.82 s for 73 frames at 832x480 either way) and took
#: 8.2 GiB instead of 3.0 GiB, so the encoder keeps 4.
CUDA_ENCODE_FRAMES_PER_CALL = 4
#: Activation tensors of the decoder's last (full-resolution) stage alive at once, per video
#: frame: a bound for the memory one more latent frame per call costs (the measurement above
#: gives about 2 GiB per latent frame at 832x480; this estimate gives 2.3 GiB).
_LIVE_TENSORS_AT_FULL_SIZE = 8


def compute_dtype(weights_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype `encode_video` / `decode_latents` compute in: bfloat16 on CUDA (ComfyUI's
    choice for this VAE on GPUs that have it), else the weights' own dtype (float32 on the CPU,
    as the official Wan2.2 code runs the VAE)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return weights_dtype


def decode_frames_per_call(vae: AutoencoderKLWan, latent_shape: tuple[int, ...], dtype: torch.dtype,
                           free_bytes: int | None = None) -> int:
    """Latent frames per decoder call for latents of `latent_shape` [B, 16, T, h, w]: as many as
    `CUDA_DECODE_LATENT_FRAMES_PER_CALL` while each extra frame's activations (estimated from
    the decoder's full-resolution width, four video frames of 8h x 8w pixels each) fit in half
    of `free_bytes` (default: the free memory of the VAE's CUDA device plus what PyTorch's
    allocator holds unused there), at least 1."""
    batch, _, _, height, width = latent_shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    channels = getattr(vae.config, "decoder_base_dim", None) or vae.config.base_dim
    per_frame = _LIVE_TENSORS_AT_FULL_SIZE * batch * channels * 4 * (8 * height) * (8 * width) * itemsize
    if free_bytes is None:
        device = next(vae.parameters()).device
        free_bytes = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                      - torch.cuda.memory_allocated(device))
    return max(1, min(CUDA_DECODE_LATENT_FRAMES_PER_CALL, int(free_bytes / 2 / per_frame)))


def supports_causal_calls(vae: AutoencoderKLWan) -> bool:
    """Whether `causal_encode` / `causal_decode` apply: the Wan 2.1 layout (no patching, no
    residual up/down blocks) with tiling off. Otherwise diffusers' own path runs."""
    config = vae.config
    return not getattr(vae, "use_tiling", False) and config.patch_size is None and not config.is_residual


@contextlib.contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    """cuDNN picks the fastest convolution algorithm per shape by timing them (once per shape
    and process); the flag is restored afterwards, so the rest of the process is unaffected."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class _Runner:
    """Calls submodules of the VAE with their weights cast to `dtype` (one cast per encode or
    decode call, through `torch.func.functional_call`), leaving the module's own weights as
    they are: a float32 VAE that is offloaded to the CPU between calls stays float32 there."""

    def __init__(self, vae: AutoencoderKLWan, dtype: torch.dtype, *names: str) -> None:
        self.vae = vae
        same = next(vae.parameters()).dtype == dtype
        self.params = {name: None if same else {key: value.to(dtype) for key, value in
                                                getattr(vae, name).named_parameters()} for name in names}

    def __call__(self, name: str, *args, **kwargs) -> torch.Tensor:
        module, params = getattr(self.vae, name), self.params[name]
        return module(*args, **kwargs) if params is None else torch.func.functional_call(module, params, args, kwargs)


def _conv_count(module: torch.nn.Module) -> int:
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Channels-last 3D: every convolution, norm and upsampling below keeps that layout, so
    cuDNN runs its NDHWC kernels without transposing each input."""
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x.contiguous()


@torch.no_grad()
def causal_decode(
    vae: AutoencoderKLWan,
    latents: torch.Tensor,
    latent_frames_per_call: int | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    cudnn_benchmark: bool = True,
) -> torch.Tensor:
    """Raw latents [B, 16, T, h, w] -> frames [B, 3, 1 + 4 (T - 1), 8 h, 8 w] in [-1, 1], float32.

    diffusers' `AutoencoderKLWan._decode` with the first latent frame alone (it yields one
    video frame, every later one four) and then `latent_frames_per_call` latent frames per
    decoder call (default: `decode_frames_per_call` on CUDA, 1 elsewhere), sharing one feature
    cache: the same function as one frame per call (the causal convolutions see the same
    zero-padded past either way), computed in `dtype` (default: `compute_dtype`).
    """
    parameter = next(vae.parameters())
    device = parameter.device
    dtype = dtype or compute_dtype(parameter.dtype, device)
    if latent_frames_per_call is None:
        latent_frames_per_call = (decode_frames_per_call(vae, tuple(latents.shape), dtype)
                                  if device.type == "cuda" else 1)
    if latent_frames_per_call < 1:
        raise ValueError(f"latent_frames_per_call must be >= 1, got {latent_frames_per_call}")
    run = _Runner(vae, dtype, "post_quant_conv", "decoder")
    benchmark = _cudnn_benchmark() if cudnn_benchmark and device.type == "cuda" else contextlib.nullcontext()
    with benchmark:
        x = run("post_quant_conv", _layout(latents.to(device, dtype), channels_last))
        feat_cache: list = [None] * _conv_count(vae.decoder)
        starts = [0, *range(1, x.shape[2], latent_frames_per_call)]
        ends = [*starts[1:], x.shape[2]]
        outputs = [run("decoder", x[:, :, start:end], feat_cache=feat_cache, feat_idx=[0], first_chunk=start == 0)
                   for start, end in zip(starts, ends) if end > start]
    return torch.cat(outputs, dim=2).float().clamp(-1, 1).contiguous()


@torch.no_grad()
def causal_encode(
    vae: AutoencoderKLWan,
    frames: torch.Tensor,
    frames_per_call: int = CUDA_ENCODE_FRAMES_PER_CALL,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    cudnn_benchmark: bool = True,
) -> torch.Tensor:
    """Frames [B, 3, F, H, W] in [-1, 1] -> the encoder's moments [B, 32, 1 + (F - 1) // 4,
    H / 8, W / 8] (mean and log-variance of the raw latents), float32.

    diffusers' `AutoencoderKLWan._encode` with the first frame alone and then
    `frames_per_call` frames (a multiple of 4; diffusers takes 4) per encoder call, sharing
    one feature cache: the temporal downsamplers (stride 2, twice) see the same frame pairs
    either way. Frames past 1 + 4 k are dropped, as diffusers drops them. Computed in `dtype`.
    """
    if frames_per_call < 4 or frames_per_call % 4:
        raise ValueError(f"frames_per_call must be a positive multiple of 4, got {frames_per_call}")
    parameter = next(vae.parameters())
    device = parameter.device
    dtype = dtype or compute_dtype(parameter.dtype, device)
    run = _Runner(vae, dtype, "encoder", "quant_conv")
    usable = 1 + 4 * ((frames.shape[2] - 1) // 4)
    benchmark = _cudnn_benchmark() if cudnn_benchmark and device.type == "cuda" else contextlib.nullcontext()
    with benchmark:
        x = _layout(frames[:, :, :usable].to(device, dtype), channels_last)
        feat_cache: list = [None] * _conv_count(vae.encoder)
        starts = [0, *range(1, usable, frames_per_call)]
        ends = [*starts[1:], usable]
        outputs = [run("encoder", x[:, :, start:end], feat_cache=feat_cache, feat_idx=[0])
                   for start, end in zip(starts, ends)]
        moments = run("quant_conv", torch.cat(outputs, dim=2))
    return moments.float().contiguous()


# ----------------------------------------------------------------------------- encode / decode


def _fast_path(vae: AutoencoderKLWan) -> bool:
    return next(vae.parameters()).device.type == "cuda" and supports_causal_calls(vae)


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
    On CUDA through `causal_encode` (bfloat16), elsewhere through diffusers' `encode`.
    """
    parameter = next(vae.parameters())
    if _fast_path(vae):
        distribution = DiagonalGaussianDistribution(causal_encode(vae, frames))
    else:
        distribution = vae.encode(frames.to(parameter.device, parameter.dtype)).latent_dist
    latents = distribution.sample(generator) if sample else distribution.mode()
    return normalize_latents(latents, vae) if normalize else latents.float()


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor, denormalize: bool = True) -> torch.Tensor:
    """Latents [B, 16, T, h, w] (normalized unless `denormalize=False`) -> frames
    [B, 3, 1 + 4 (T - 1), 8 h, 8 w] in [-1, 1], float32. On CUDA through `causal_decode`
    (bfloat16), elsewhere through diffusers' `decode`."""
    parameter = next(vae.parameters())
    raw = denormalize_latents(latents, vae) if denormalize else latents
    if _fast_path(vae):
        return causal_decode(vae, raw)
    return vae.decode(raw.to(parameter.device, parameter.dtype)).sample.float().clamp(-1, 1)


__all__ = [
    "CUDA_DECODE_LATENT_FRAMES_PER_CALL",
    "CUDA_ENCODE_FRAMES_PER_CALL",
    "causal_decode",
    "causal_encode",
    "comfyui_vae_state_dict",
    "compute_dtype",
    "decode_frames_per_call",
    "decode_latents",
    "denormalize_latents",
    "diffusers_to_original_vae_key",
    "encode_video",
    "load_vae",
    "normalize_latents",
    "original_to_diffusers_vae_keys",
    "save_vae",
    "supports_causal_calls",
    "vae_config_from_header",
]
