"""Audio path of the S2V transformer: causal audio encoder and the audio injectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.normalization import AdaLayerNorm
from torch import nn

from .attention import WanS2VAttention


class CausalConv1d(nn.Module):
    """1-D convolution padded on the left only (replicate), so output t sees inputs <= t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [B, C_out, ceil(T / stride)]."""
        return self.conv(F.pad(x, (self.left_pad, 0), mode="replicate"))


class CausalAudioMotionEncoder(nn.Module):
    """Downsamples per-video-frame audio features 4x in time into audio tokens.

    A local path yields `num_tokens` tokens per latent frame (plus one learned padding
    token); a global path yields one vector per latent frame that drives AdaIN.
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_tokens, 3, stride=1)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim // 4, eps=1e-6, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(hidden_dim // 2, eps=1e-6, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(hidden_dim, eps=1e-6, elementwise_affine=False)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, C/4] (after conv1 + norm1 + SiLU) -> [N, T/4, C]."""
        for conv, norm in ((self.conv2, self.norm2), (self.conv3, self.norm3)):
            x = F.silu(norm(conv(x.transpose(1, 2)).transpose(1, 2)))
        return x

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features: [B, F, audio_dim], one vector per video frame.

        Returns:
            global [B, F/4, 1, C] and local [B, F/4, num_tokens + 1, C] tokens.
        """
        batch = features.shape[0]
        x = features.transpose(1, 2)
        local = self.conv1_local(x).unflatten(1, (self.num_tokens, -1))  # [B, n, C/4, F]
        local = local.flatten(0, 1).transpose(1, 2)  # [B n, F, C/4]
        local = self._downsample(F.silu(self.norm1(local)))
        local = local.unflatten(0, (batch, self.num_tokens)).transpose(1, 2)  # [B, T, n, C]
        padding = self.padding_tokens.to(local.dtype).expand(batch, local.shape[1], 1, -1)
        local = torch.cat([local, padding], dim=2)

        glob = F.silu(self.norm1(self.conv1_global(x).transpose(1, 2)))
        glob = self.final_linear(self._downsample(glob)).unsqueeze(2)  # [B, T, 1, C]
        return glob, local


class CausalAudioEncoder(nn.Module):
    """Learned softmax-like average of the wav2vec2 hidden states, then the motion encoder."""

    def __init__(self, audio_dim: int, hidden_dim: int, num_tokens: int, num_layers: int = 25):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.encoder = CausalAudioMotionEncoder(audio_dim, hidden_dim, num_tokens)

    def forward(self, audio_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, num_layers, audio_dim, F] -> (global [B, F/4, 1, C], local [B, F/4, n+1, C])."""
        weights = F.silu(self.weights.to(audio_embeds.dtype))
        averaged = (audio_embeds * weights / weights.sum(dim=1, keepdim=True)).sum(dim=1)
        return self.encoder(averaged.transpose(1, 2))


class AudioInjector(nn.Module):
    """Per-frame cross-attention from video tokens to audio tokens after selected blocks.

    One injector is built for every entry of `inject_layers` (the published checkpoint
    holds all of them even when a smaller model has fewer blocks); entry i serves block
    `inject_layers[i]`.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, inject_layers: list[int], eps: float = 1e-6):
        super().__init__()
        self.block_to_injector = {block: i for i, block in enumerate(inject_layers)}
        count = len(inject_layers)
        self.injector = nn.ModuleList([WanS2VAttention(dim, num_heads, head_dim, eps) for _ in range(count)])
        self.injector_adain_layers = nn.ModuleList(
            [AdaLayerNorm(embedding_dim=dim, output_dim=2 * dim, chunk_dim=1) for _ in range(count)]
        )

    def parts(self, block_index: int) -> tuple[nn.Module, nn.Module] | None:
        """(AdaIN layer, attention) of the injector after block `block_index`, or None."""
        index = self.block_to_injector.get(block_index)
        return None if index is None else (self.injector_adain_layers[index], self.injector[index])

    def forward(
        self, hidden_states: torch.Tensor, block_index: int, audio_local: torch.Tensor, audio_global: torch.Tensor
    ) -> torch.Tensor:
        """Residual update of the video tokens by the injector after block `block_index`;
        see `inject_audio`."""
        return inject_audio(hidden_states, self.parts(block_index), audio_local, audio_global)


def inject_audio(
    hidden_states: torch.Tensor, parts: tuple[nn.Module, nn.Module], audio_local: torch.Tensor,
    audio_global: torch.Tensor,
) -> torch.Tensor:
    """Per-frame AdaIN + cross-attention of the video tokens to their frame's audio tokens.

    Args:
        hidden_states: [B, T * N, C] video tokens, frame-major (N tokens per frame).
        parts: (AdaIN layer, attention) of one injector (`AudioInjector.parts`).
        audio_local: [B, T, A, C] audio tokens per latent frame.
        audio_global: [B, T, 1, C] AdaIN conditioning per latent frame.

    Returns:
        [B, T * N, C] residual to add to the video tokens.
    """
    adain, attention = parts
    batch, frames = audio_local.shape[:2]
    per_frame = hidden_states.unflatten(1, (frames, -1)).flatten(0, 1)  # [B T, N, C]
    normed = adain(per_frame, temb=audio_global.flatten(0, 1)[:, 0])
    residual = attention(normed, encoder_hidden_states=audio_local.flatten(0, 1))
    return residual.unflatten(0, (batch, frames)).flatten(1, 2)
