"""`python -m trainer demo`: the built-in tiny model set end to end on CPU.

For now (foundation): builds the tiny model set in both on-disk formats, loads every part
back through the real loaders (ComfyUI files and the Diffusers folder), encodes a prompt,
a reference image and a synthetic speech clip exactly as the real pipeline does, runs the
S2V transformer and decodes its prediction, printing every shape on the way.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

DEMO_FRAMES = 13  # 4k + 1 video frames at 16 fps
DEMO_HEIGHT, DEMO_WIDTH = 64, 128  # pixels; multiples of 16
SAMPLE_RATE = 16_000


def synthetic_speech(seconds: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A voiced-sounding test signal [N]: a 140 Hz pulse train with a slow syllable envelope."""
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    pitch = sum(torch.sin(2 * math.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = 0.5 * (1 - torch.cos(2 * math.pi * 4 * t))
    return (0.3 * pitch * envelope).float()


def reference_image(height: int, width: int) -> torch.Tensor:
    """A smooth colour pattern [1, 3, 1, H, W] in [-1, 1]."""
    y = torch.linspace(-1, 1, height)[:, None]
    x = torch.linspace(-1, 1, width)[None, :]
    rgb = torch.stack([torch.sin(3 * x + y), torch.cos(2 * y - x), x * y], dim=0)
    return rgb.clamp(-1, 1)[None, :, None]


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def run_demo(out_dir: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Run the demo, print a report, return the main tensors (for tests)."""
    from .model import load_transformer
    from .model.audio_encoder import encode_speech, load_audio_encoder
    from .model.audio_features import audio_features_for_video, audio_window, batch_frames_for_length
    from .model.text_encoder import encode_prompt, load_text_encoder
    from .model.tiny import build_tiny_model_set
    from .model.vae import decode_latents, encode_video, load_vae

    start = time.perf_counter()
    out = Path(out_dir)
    paths = build_tiny_model_set(out / "models", seed=seed)
    print(f"tiny model set written under {out / 'models'} ({time.perf_counter() - start:.1f} s)")
    for key in ("transformer_comfyui", "vae_comfyui", "text_encoder_comfyui", "audio_encoder_comfyui", "diffusers"):
        print(f"  {key:22s} {paths[key]}")

    transformer = load_transformer(paths["transformer_comfyui"], dtype=torch.float32).eval()
    from_diffusers = load_transformer(paths["transformer_diffusers"], dtype=torch.float32).eval()
    vae = load_vae(paths["vae_comfyui"])
    text_encoder, tokenizer = load_text_encoder(paths["text_encoder_comfyui"], dtype=torch.float32)
    audio_encoder = load_audio_encoder(paths["audio_encoder_comfyui"])
    params = sum(p.numel() for p in transformer.parameters())
    print(f"loaded: transformer {params:,} parameters ({transformer.numerics} numerics), VAE, UMT5, wav2vec2")

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        context = encode_prompt(text_encoder, tokenizer, ["a person talks to the camera"])
        ref_latent = encode_video(vae, reference_image(DEMO_HEIGHT, DEMO_WIDTH))
        speech = synthetic_speech(DEMO_FRAMES / 16 + 0.5)
        hidden = encode_speech(audio_encoder, speech)
        features, windows = audio_features_for_video(hidden, batch_frames_for_length(DEMO_FRAMES))
        audio = audio_window(features, 0, batch_frames_for_length(DEMO_FRAMES))
        latent_frames = (DEMO_FRAMES - 1) // 4 + 1
        noise = torch.randn(1, 16, latent_frames, DEMO_HEIGHT // 8, DEMO_WIDTH // 8, generator=gen)
        timestep = torch.tensor([500.0])
        kwargs = dict(audio_embeds=audio, reference_latents=ref_latent)
        velocity = transformer(noise, timestep, context, **kwargs).sample
        same = from_diffusers(noise, timestep, context, **kwargs).sample
        denoised = noise - 0.5 * velocity
        video = decode_latents(vae, denoised)

    if not torch.equal(velocity, same):
        raise RuntimeError("the ComfyUI file and the Diffusers folder gave different outputs")
    rows = [
        ("prompt embedding", context),
        ("reference latent", ref_latent),
        ("speech (16 kHz)", speech),
        ("wav2vec2 hidden states (50 Hz)", hidden),
        (f"audio features, window 0 of {windows}", audio),
        ("noisy latents", noise),
        ("velocity prediction", velocity),
        ("decoded video [B, 3, F, H, W]", video),
    ]
    for name, tensor in rows:
        print(f"  {name:34s} {_shape(tensor)}")
    print("ComfyUI file and Diffusers folder give identical predictions.")
    print(f"demo done in {time.perf_counter() - start:.1f} s; outputs in {out}")
    return {"velocity": velocity, "video": video, "audio": audio, "context": context}
