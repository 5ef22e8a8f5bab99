"""A tiny synthetic talking dataset of the training-data contract, for tests and the demo.

Items are dicts of CPU tensors, exactly as `trainer.data` datasets yield them:
``latents`` [16, T, h, w] (normalised), ``reference_latents`` [16, 1, h, w],
``audio_embeds`` [25, D, 4T], ``text_embeds`` [L, text_dim] (padding zeroed), plus
``caption``, ``source``, ``window_index``, ``bucket``. Windows after the first of a source
also carry ``motion_latents`` (the previous window's latents) for continuation training.
With ``teacher_frames=True`` items carry ``teacher_frames`` [3, T, 8h, 8w] in [-1, 1], the
pixel frames CREPA's teacher sees (one per latent frame).

The data is random but learnable: each source has a fixed "face" latent, and each window
adds a motion pattern that is a fixed linear function of its audio features, so a model can
lower the loss by learning the face (reference) and the audio -> motion mapping.
"""

from __future__ import annotations

import json

import torch
from torch.utils.data import Dataset


class SyntheticTalkingDataset(Dataset):
    def __init__(
        self,
        num_sources: int = 2,
        windows_per_source: int = 2,
        latent_frames: int = 2,
        height: int = 8,
        width: int = 8,
        audio_dim: int = 48,
        text_dim: int = 32,
        text_len: int = 512,
        caption_tokens: int = 6,
        channels: int = 16,
        seed: int = 0,
        buckets: tuple[tuple[int, int, int], ...] | None = None,
        teacher_frames: bool = False,
    ):
        # what makes the items (not teacher_frames: an extra input of the same items)
        self._recipe = [num_sources, windows_per_source, latent_frames, height, width, audio_dim, text_dim, text_len,
                        caption_tokens, channels, seed, buckets]
        g = torch.Generator().manual_seed(seed)
        self.items: list[dict] = []
        mix = torch.randn(audio_dim, channels, generator=g) / audio_dim**0.5
        shapes = buckets or ((latent_frames, height, width),)
        for s in range(num_sources):
            t, h, w = shapes[s % len(shapes)]
            face = torch.randn(channels, 1, h, w, generator=g)
            text = torch.zeros(text_len, text_dim)
            text[:caption_tokens] = torch.randn(caption_tokens, text_dim, generator=g)
            previous = None
            for k in range(windows_per_source):
                audio = torch.randn(25, audio_dim, 4 * t, generator=g) * 0.5
                per_frame = audio.mean(0).reshape(audio_dim, t, 4).mean(-1)  # [D, T]
                motion = torch.einsum("dt,dc->ct", per_frame, mix)[:, :, None, None]  # [C, T, 1, 1]
                ramp = torch.linspace(-1, 1, w).view(1, 1, 1, w)
                latents = 0.7 * face.expand(channels, t, h, w) + motion * ramp
                latents = latents + 0.05 * torch.randn(channels, t, h, w, generator=g)
                item = {
                    "latents": latents.contiguous(),
                    "reference_latents": face.clone(),
                    "audio_embeds": audio,
                    "text_embeds": text.clone(),
                    "caption": f"person {s} speaking",
                    "source": f"synthetic_{s}",
                    "window_index": k,
                    "bucket": f"{t}x{h}x{w}",
                }
                if previous is not None:
                    item["motion_latents"] = previous.clone()
                if teacher_frames:  # CREPA: one pixel frame per latent frame, in [-1, 1]
                    pixels = latents[:3].unsqueeze(0)  # [1, 3, T, h, w]
                    pixels = torch.nn.functional.interpolate(pixels, scale_factor=(1, 8, 8), mode="nearest")
                    item["teacher_frames"] = torch.tanh(pixels[0])
                self.items.append(item)
                previous = latents

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return dict(self.items[index])

    def bucket_of(self, index: int) -> str:
        return self.items[index]["bucket"]

    def fingerprint(self) -> str:
        """The dataset's identity for resuming (`trainer.train.runs.dataset_fingerprint`)."""
        return f"synthetic {json.dumps(self._recipe)}"
