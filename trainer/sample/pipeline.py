"""The S2V sampling loop (headless), following the official Wan2.2 `WanS2V.generate`.

Per chunk r of `frames_per_chunk` (F, 4k) video frames:
- noise [1, 16, F/4, H/8, W/8] from a CPU generator seeded with seed + r (as the official
  code seeds each clip);
- audio features: window r of the per-frame wav2vec2 features (frames [rF, (r+1)F));
  the unconditional pass gets zeroed audio features and the negative prompt;
- pose: F frames of the pose video (with its first frame prepended, VAE-encoded, first
  latent dropped), or zero latents without a pose video (`trainer.model.conditioning`, the
  same forward inputs training uses);
- chunk 0 runs without motion tokens (the official `drop_first_motion`); it is decoded with
  the reference latent prepended, the last F frames kept and their first 3 dropped
  (F - 3 frames out);
- the last 73 decoded frames (zero frames in front while fewer exist) are VAE-encoded again
  and condition every later chunk as FramePack motion latents; those chunks are decoded with
  the motion latents prepended and keep their last F frames.
Solver: diffusers' UniPC multistep (flow prediction, bh2, order 2) or flow-matching Euler on
the official shifted sigmas: linspace(0.999, 0, steps + 1)[:-1], sigma' = s sigma / (1 + (s - 1) sigma).
The number of chunks is the official one from the audio length (`num_windows`), capped by
`max_chunks`. The driving audio is cut to the video length and muxed from time 0 (as the
official `merge_video_audio`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import MOTION_FRAMES, SPEECH_SAMPLE_RATE
from ..media import (
    cover_resize,
    cut_audio,
    decode_audio_file,
    load_image_tensor,
    read_video_frames,
    speech_16k_mono,
    write_mp4,
)
from ..model.audio_encoder import encode_speech
from ..model.audio_features import audio_features_for_video, audio_window
from ..model.conditioning import stack_pose_latents, transformer_inputs
from ..model.fp8_attention import fp8_attention_during
from ..model.text_encoder import encode_prompt
from ..model.vae import decode_latents, encode_video
from .bundle import ModelBundle
from .config import SamplerConfig
from .lora import LoraSpec, applied_loras

ProgressFn = Callable[[int, int, "torch.Tensor | None"], None]
FIRST_CHUNK_DROP = 3  # frames the official decode drops after the reference frame in chunk 0


class SamplingCancelled(RuntimeError):
    """`should_stop()` returned True: sampling stopped between two steps."""


@dataclass
class SampleResult:
    """frames: [F, H, W, 3] float32 in [0, 1] (ComfyUI IMAGE); audio: [C, N] float32, the
    driving audio cut to the video length; path: the mp4 when one was written."""

    frames: torch.Tensor
    audio: np.ndarray
    sample_rate: int
    fps: int
    config: SamplerConfig
    notes: list[str] = field(default_factory=list)
    chunk_frames: list[int] = field(default_factory=list)
    path: Path | None = None
    seconds: float = 0.0

    def comfy_audio(self) -> dict[str, Any]:
        """ComfyUI's AUDIO: {"waveform": [1, C, N] float, "sample_rate": int}."""
        return {"waveform": torch.from_numpy(np.ascontiguousarray(self.audio))[None], "sample_rate": self.sample_rate}


# ----------------------------------------------------------------------------- helpers


def flow_sigmas(steps: int, shift: float) -> np.ndarray:
    """The official unshifted sigmas linspace(0.999, 0, steps + 1)[:-1]; schedulers shift them."""
    return np.linspace(0.999, 0.0, steps + 1)[:-1].copy()


def make_scheduler(config: SamplerConfig, device: torch.device | str = "cpu"):
    """A fresh diffusers scheduler with the official shifted sigmas set (one per chunk)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if config.scheduler == "unipc":
        scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=config.shift, solver_order=2,
                                            solver_type="bh2", lower_order_final=True, predict_x0=True)
    elif config.scheduler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift)
    else:
        raise ValueError(f"unknown scheduler {config.scheduler!r}")
    scheduler.set_timesteps(sigmas=flow_sigmas(config.steps, config.shift), device=device)
    return scheduler


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _placed(module: torch.nn.Module, device: torch.device, offload: bool) -> Iterator[torch.nn.Module]:
    """The module on `device` inside; moved back afterwards when `offload`."""
    before = _module_device(module)
    if before != device:
        module.to(device)
    try:
        yield module
    finally:
        if offload and before != device:
            module.to(before)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _image_tensor(image: torch.Tensor | str | os.PathLike) -> torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        image = load_image_tensor(image)
    image = torch.as_tensor(image).float()
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an image [B, H, W, C>=3] in [0, 1], got {tuple(image.shape)}")
    return image[:1, ..., :3].cpu()


def _audio_array(audio: Any, sample_rate: int | None) -> tuple[np.ndarray, int]:
    """Path, ComfyUI AUDIO dict, tensor or array -> ([C, N] float32, rate)."""
    if isinstance(audio, (str, os.PathLike)):
        return decode_audio_file(audio)
    if isinstance(audio, dict):
        waveform, sample_rate = audio["waveform"], int(audio["sample_rate"])
        if isinstance(waveform, torch.Tensor) and waveform.ndim == 3:
            waveform = waveform[0]
        audio = waveform
    if sample_rate is None:
        raise ValueError("a waveform needs its sample_rate")
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().float().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise ValueError(f"expected audio [C, N] or [N], got {audio.shape}")
    if audio.shape[0] > audio.shape[1]:
        raise ValueError(f"audio [C, N] with more channels than samples ({audio.shape}): pass [C, N], not [N, C]")
    return audio, int(sample_rate)


def _to_video(pixels: torch.Tensor) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [1, 3, F, H, W] in [-1, 1]."""
    return (pixels.movedim(-1, 0)[None] * 2 - 1).float()


# ----------------------------------------------------------------------------- sampler


@torch.no_grad()
def sample_s2v(
    bundle: ModelBundle,
    image: torch.Tensor | str | os.PathLike,
    audio: Any,
    config: SamplerConfig,
    *,
    sample_rate: int | None = None,
    loras: Sequence[LoraSpec] | None = None,
    pose_video: torch.Tensor | str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    keep_active_adapters: bool = False,
    out_path: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> SampleResult:
    """Generate a talking video from a reference image, speech and a prompt.

    image: [1, H, W, 3] / [H, W, 3] float in [0, 1] (ComfyUI IMAGE) or an image path.
    audio: path, ComfyUI AUDIO dict, or waveform [C, N] / [N] with `sample_rate` (any rate,
        mono or stereo; wav2vec2 gets a 16 kHz mono mixdown, the output keeps the original).
    loras: applied (with their strengths) for this call only. keep_active_adapters: also keep
        the model's own active adapters (e.g. the LoRA being trained) on.
    pose_video: [F, H, W, 3] in [0, 1] or a video path (read at 16 fps from its start).
    progress(step, total, x0_latents | None) after every denoising step; should_stop() is
    checked before every step (raises `SamplingCancelled`).
    out_path: also write an mp4 with the audio muxed.
    """
    start = time.perf_counter()
    cfg, notes = config.resolved()
    say = log or (lambda message: None)
    for note in notes:
        say(note)
    image_t = _image_tensor(image)
    wave, rate = _audio_array(audio, sample_rate)
    conditions = _encode_conditions(bundle, cfg, image_t, speech_16k_mono(wave, rate), pose_video)
    outputs, chunk_frames = _generate_chunks(bundle, cfg, conditions, loras, keep_active_adapters, progress,
                                             should_stop, say)
    video = torch.cat(outputs, dim=2)[0]  # [3, F, H, W]
    frames = ((video.movedim(0, -1) + 1) / 2).clamp(0, 1).contiguous()  # [F, H, W, 3]
    seconds = frames.shape[0] / cfg.fps
    out_audio = cut_audio(wave, rate, seconds)
    result = SampleResult(frames, out_audio, rate, cfg.fps, cfg, notes, chunk_frames)
    if out_path is not None:
        result.path = write_mp4(out_path, frames, cfg.fps, out_audio, rate)
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class _Conditions:
    """The encoded inputs of every chunk: prompt embeddings [1, 512, 4096] (negative: None
    without CFG), per-frame audio features, the reference latent [1, 16, 1, h, w] and one pose
    latent [1, 16, F/4, h, w] per chunk (None without a pose video)."""

    context: torch.Tensor
    context_null: torch.Tensor | None
    features: torch.Tensor
    chunks: int
    ref_latents: torch.Tensor
    pose_latents: list[torch.Tensor] | None


def _encode_conditions(bundle: ModelBundle, cfg: SamplerConfig, image_t: torch.Tensor, speech: np.ndarray,
                       pose_video) -> _Conditions:
    """Encode the prompt(s), the 16 kHz mono `speech`, the reference image and the pose video;
    each encoder is on the device only while it runs when `cfg.offload`."""
    device, offload, F = bundle.device, cfg.offload, cfg.frames_per_chunk
    if len(speech) < SPEECH_SAMPLE_RATE // 10:
        raise ValueError(f"the audio is too short ({len(speech) / SPEECH_SAMPLE_RATE:.3f} s); "
                         "at least 0.1 s is needed")
    with _placed(bundle.text_encoder, device, offload) as text_encoder:
        context = encode_prompt(text_encoder, bundle.tokenizer, [cfg.prompt]).to(device)
        context_null = (encode_prompt(text_encoder, bundle.tokenizer, [cfg.negative_prompt]).to(device)
                        if cfg.guidance > 1.0 else None)
    with _placed(bundle.audio_encoder, device, offload) as audio_encoder:
        hidden = encode_speech(audio_encoder, speech)
    features, windows = audio_features_for_video(hidden, F)
    chunks = windows if cfg.max_chunks == 0 else min(cfg.max_chunks, windows)
    features = features.to(device)
    ref_pixels = cover_resize(image_t, cfg.width, cfg.height)
    with _placed(bundle.vae, device, offload):
        ref_latents = encode_video(bundle.vae, _to_video(ref_pixels).to(device)).to(device)
        pose_latents = _pose_latents(bundle.vae, pose_video, chunks, F, cfg.width, cfg.height, device)
    return _Conditions(context, context_null, features, chunks, ref_latents, pose_latents)


def _generate_chunks(bundle: ModelBundle, cfg: SamplerConfig, c: _Conditions, loras: Sequence[LoraSpec] | None,
                     keep_active_adapters: bool, progress: ProgressFn | None,
                     should_stop: Callable[[], bool] | None, say: Callable[[str], None],
                     ) -> tuple[list[torch.Tensor], list[int]]:
    """Denoise and decode every chunk, each after the first conditioned on the last
    `MOTION_FRAMES` decoded frames; returns the chunks' videos [1, 3, f, H, W] (float32, CPU,
    in [-1, 1]) and their frame counts."""
    device, offload, F = bundle.device, cfg.offload, cfg.frames_per_chunk
    transformer, vae, chunks = bundle.transformer, bundle.vae, c.chunks
    latent_shape = (1, 16, F // 4, cfg.height // 8, cfg.width // 8)
    total = chunks * cfg.steps
    numerics = None if cfg.numerics == "model" else cfg.numerics
    was_training = transformer.training
    transformer.eval()
    outputs: list[torch.Tensor] = []
    chunk_frames: list[int] = []
    last_frames = torch.zeros(1, 3, MOTION_FRAMES, cfg.height, cfg.width, device=device)
    motion_latents = None
    try:
        with applied_loras(transformer, loras, keep_active=keep_active_adapters, log=say), \
                _placed(transformer, device, offload), fp8_attention_during(transformer, device, bundle.fp8_attention):
            for r in range(chunks):
                audio_in = audio_window(c.features, r, F)
                pose = c.pose_latents[r] if c.pose_latents is not None else None
                cond = {"context": c.context, "audio": audio_in, "pose": pose}
                uncond = ({"context": c.context_null, "audio": audio_in * 0.0, "pose": pose}
                          if cfg.guidance > 1.0 else None)
                latents = denoise_chunk(
                    transformer, cfg, r, latent_shape, c.ref_latents,
                    None if r == 0 else motion_latents, cond, uncond, numerics=numerics, device=device,
                    progress=progress, should_stop=should_stop, step_offset=r * cfg.steps, total=total,
                    label=f"chunk {r + 1}/{chunks}",
                )
                with _placed(vae, device, offload):
                    head = c.ref_latents if r == 0 else motion_latents
                    video = decode_latents(vae, torch.cat([head, latents.float()], dim=2))[:, :, -F:]
                    if r == 0:
                        video = video[:, :, FIRST_CHUNK_DROP:]
                    overlap = min(MOTION_FRAMES, video.shape[2])
                    last_frames = torch.cat([last_frames[:, :, overlap:], video[:, :, -overlap:].to(device)], dim=2)
                    if r + 1 < chunks:
                        motion_latents = encode_video(vae, last_frames).to(device)
                outputs.append(video.float().cpu())
                chunk_frames.append(int(video.shape[2]))
                say(f"chunk {r + 1}/{chunks}: {video.shape[2]} frames")
    finally:
        transformer.train(was_training)
    return outputs, chunk_frames


def denoise_chunk(
    transformer, cfg: SamplerConfig, chunk: int, shape: tuple[int, ...], ref_latents: torch.Tensor,
    motion_latents: torch.Tensor | None, cond: dict, uncond: dict | None, *, numerics: str | None = None,
    device: torch.device | str = "cpu", progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None, step_offset: int = 0, total: int | None = None,
    label: str = "",
) -> torch.Tensor:
    """Denoise one chunk from the noise of seed `cfg.seed + chunk`; returns the clean latents
    [1, 16, T, h, w] (float32). cond/uncond: {"context", "audio", "pose"} ("pose": None without a
    pose video); uncond None = no CFG."""
    generator = torch.Generator().manual_seed(int(cfg.seed) + chunk)
    latents = torch.randn(*shape, generator=generator).to(device)
    scheduler = make_scheduler(cfg, device)
    total = total or cfg.steps
    for i, t in enumerate(scheduler.timesteps):
        if should_stop is not None and should_stop():
            raise SamplingCancelled(f"sampling cancelled ({label or 'chunk'}, step {i + 1}/{cfg.steps})")
        t_model = t.float().reshape(1).to(device)
        if cfg.integer_timesteps:
            t_model = t_model.floor()
        velocity = _guided_velocity(transformer, latents, t_model, ref_latents, motion_latents, cond, uncond,
                                    cfg.guidance, cfg.cfg_mode, numerics)
        preview = None
        if progress is not None:
            preview = latents - float(scheduler.sigmas[i]) * velocity
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if progress is not None:
            progress(step_offset + i + 1, total, preview)
    return latents.float()


def _pose_latents(vae, pose_video, chunks: int, F: int, width: int, height: int,
                  device: torch.device) -> list[torch.Tensor] | None:
    """Per-chunk pose latents [1, 16, F/4, h, w] (official `load_pose_cond`), or None."""
    if pose_video is None:
        return None
    if isinstance(pose_video, (str, os.PathLike)):
        pose_video = read_video_frames(pose_video, chunks * F)
    pose = cover_resize(torch.as_tensor(pose_video).float()[: chunks * F, ..., :3], width, height)
    pixels = _to_video(pose)  # [1, 3, n, H, W] in [-1, 1]
    if pixels.shape[2] < chunks * F:
        pad = -torch.ones(1, 3, chunks * F - pixels.shape[2], height, width)
        pixels = torch.cat([pixels, pad], dim=2)
    out = []
    for r in range(chunks):
        clip = pixels[:, :, r * F:(r + 1) * F]
        clip = torch.cat([clip[:, :, :1], clip], dim=2).to(device)
        out.append(encode_video(vae, clip)[:, :, 1:].to(device))
    return out


def _guided_velocity(transformer, latents, timestep, ref_latents, motion, cond, uncond, guidance: float,
                     cfg_mode: str, numerics: str | None) -> torch.Tensor:
    """Classifier-free guided velocity u + g (c - u); uncond = negative prompt + zero audio.
    cond/uncond["pose"]: [1, 16, T, h, w] pose latents or None (no pose video)."""
    numerics = numerics or transformer.numerics  # None: the model's own setting

    def run(x, t, context, audio, pose, ref, mot):
        kwargs = transformer_inputs(x, t, context, audio, ref, numerics=numerics, pose_latents=pose,
                                    motion_latents=mot)
        return transformer(**kwargs).sample.float()

    if uncond is None:
        return run(latents, timestep, cond["context"], cond["audio"], cond["pose"], ref_latents, motion)
    if cfg_mode == "batch":
        pose = stack_pose_latents([None if p is None else p[0] for p in (cond["pose"], uncond["pose"])],
                                  torch.cat([latents, latents]))
        both = run(
            torch.cat([latents, latents]), timestep.expand(2),
            torch.cat([cond["context"], uncond["context"]]),
            torch.cat([cond["audio"], uncond["audio"]]),
            pose,
            torch.cat([ref_latents, ref_latents]),
            None if motion is None else torch.cat([motion, motion]),
        )
        v_cond, v_uncond = both.chunk(2)
    else:
        v_cond = run(latents, timestep, cond["context"], cond["audio"], cond["pose"], ref_latents, motion)
        v_uncond = run(latents, timestep, uncond["context"], uncond["audio"], uncond["pose"], ref_latents, motion)
    return v_uncond + guidance * (v_cond - v_uncond)
