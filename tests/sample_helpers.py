"""Shared inputs of the sampler tests: the tiny bundle, a reference image, speech, files."""

from __future__ import annotations

import math

import av
import numpy as np
import torch

SIZE = 64  # pixels; the FramePack motion encoder needs latents of at least 8x8


def reference_image(height: int = 80, width: int = 96) -> torch.Tensor:
    """[1, H, W, 3] in [0, 1], a smooth pattern (not the output size: the sampler resizes)."""
    y = torch.linspace(-1, 1, height)[:, None]
    x = torch.linspace(-1, 1, width)[None, :]
    rgb = torch.stack([torch.sin(3 * x + y), torch.cos(2 * y - x), x * y], dim=-1)
    return ((rgb + 1) / 2).clamp(0, 1)[None]


def speech(seconds: float, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    """[C, N] float32 voiced-sounding signal."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = sum(np.sin(2 * math.pi * 140 * k * t) / k for k in range(1, 6))
    wave = (0.3 * pitch * 0.5 * (1 - np.cos(2 * math.pi * 4 * t))).astype(np.float32)
    return np.stack([wave * (1 - 0.3 * c) for c in range(channels)])


def write_wav(path, wave: np.ndarray, rate: int) -> None:
    layout = "mono" if wave.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        data = (np.clip(wave.T.reshape(1, -1), -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_png(path, image: torch.Tensor) -> None:
    array = (image[0].numpy() * 255).round().astype(np.uint8)
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = array.shape[1], array.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def lora_file(transformer, path, rank: int = 4, seed: int = 1, fmt: str = "comfyui"):
    """A LoRA with non-zero weights on the attention projections of `transformer`, saved to `path`
    (the transformer itself is left without adapters)."""
    from trainer.lora.io import save_lora

    modules = sorted({n.removesuffix(".base_layer") for n, m in transformer.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")
                      and n.removesuffix(".base_layer").endswith(("to_q", "to_k", "to_v", "to_out.0"))})
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in modules:
        layer = transformer.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        state[f"{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.2
        state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.2
    return save_lora(state, path, fmt=fmt, alphas={"*": float(rank)})
