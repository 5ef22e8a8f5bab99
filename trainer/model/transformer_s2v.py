"""Wan 2.2 S2V transformer (speech-to-video), in diffusers style with Diffusers module names.

Token sequence: noisy video tokens (frame-major, row-major), then the reference image
tokens, then the FramePack motion tokens. Video tokens are modulated with the diffusion
timestep, reference and motion tokens with timestep 0. Audio tokens are injected into the
video tokens frame by frame after selected blocks.

Two numerics are available behind `numerics` (config default, overridable per call):
- "official": the Wan2.2 reference forward the weights were trained with (audio encoder
  sees 73 prepended copies of the first audio frame; FramePack RoPE times -1, -3,
  -19/-14/-9/-4 with integer spatial positions; reference at time 30).
- "comfyui": ComfyUI's WanModel_S2V (audio encoder on exactly 4T frames; FramePack RoPE
  times -1, -3, -19..-16 with fractional spatial positions; reference at max(30, T + 9);
  per-token timesteps stretched over the sequence as ComfyUI does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..constants import DEFAULT_AUDIO_INJECT_LAYERS, MOTION_FRAMES
from .attention import WanS2VAttention
from .audio_modules import AudioInjector, CausalAudioEncoder, inject_audio
from .checkpointing import CHECKPOINT_POLICIES, checkpoint_function, compiled_checkpoint
from .framepack import FramePackMotioner
from .rope import rope_tables, video_positions
from .routing import TokenRoute, kept_video_tokens, parse_routes

NUMERICS = ("official", "comfyui")

#: A complete model small enough for CPU tests (same widths as the shared tiny golden set).
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "ffn_dim": 96,
    "num_layers": 4,
    "text_dim": 32,
    "audio_dim": 48,
    "num_audio_token": 4,
    "audio_inject_layers": [0, 2],
}


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int, numerics: str) -> torch.Tensor:
    """[N] timesteps (0..1000) -> [N, dim] (cos, sin) embedding, float32.

    The official code computes it in float64, ComfyUI in float32; at t ~ 1000 that
    differs by ~1e-4, so each numerics keeps its own precision.
    """
    dtype = torch.float64 if numerics == "official" else torch.float32
    half = dim // 2
    position = timesteps.to(dtype)
    freqs = torch.pow(10000, -torch.arange(half, dtype=dtype, device=timesteps.device).div(half))
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def _segment_select(params: torch.Tensor, split: int, length: int) -> torch.Tensor:
    """Per-token view of two-segment parameters [B, 2, C]: index 0 for tokens [0, split)
    (timestep t), index 1 for [split, length) (timestep 0). Returns [B, length, C]
    (a broadcast view when one segment covers everything).

    Under torch.compile this is an indexed load fused into the consumer kernel; in eager
    mode the callers split the tokens instead of materialising it.
    """
    if split >= length:
        return params[:, :1]
    segment = (torch.arange(length, device=params.device) >= split).long()
    return params[:, segment]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int) -> torch.Tensor:
    """x * (1 + scale) + shift with two parameter sets: tokens [0, split) use index 0
    (timestep t), tokens [split, L) index 1 (timestep 0). x [B, L, C]; shift/scale [B, 2, C]."""
    length = x.shape[1]
    if split >= length or torch.compiler.is_compiling():
        return x * (1 + _segment_select(scale, split, length)) + _segment_select(shift, split, length)
    head = x[:, :split] * (1 + scale[:, :1]) + shift[:, :1]
    tail = x[:, split:] * (1 + scale[:, 1:]) + shift[:, 1:]
    return torch.cat([head, tail], dim=1)


def _gate(x: torch.Tensor, gate: torch.Tensor, split: int) -> torch.Tensor:
    """x * gate with the same two-segment layout as `_modulate`."""
    length = x.shape[1]
    if split >= length or torch.compiler.is_compiling():
        return x * _segment_select(gate, split, length)
    return torch.cat([x[:, :split] * gate[:, :1], x[:, split:] * gate[:, 1:]], dim=1)


@dataclass
class WanS2VTransformerOutput(BaseOutput):
    """
    Args:
        sample: [B, 16, T, H, W] velocity prediction.
        captured_hidden_states: [B, T * h * w, C] video tokens after block `capture_block`
            (after its audio injection), when a capture was asked for.
        captured_mask: [T * h * w] bool, when the captured block ran inside a TREAD route:
            True for the tokens that went through it; the others hold their values from
            before the route.
    """

    sample: torch.Tensor
    captured_hidden_states: torch.Tensor | None = None
    captured_mask: torch.Tensor | None = None


class WanS2VTransformerBlock(nn.Module):
    """Self-attention (RoPE), text cross-attention and feed-forward with 6-way modulation."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, head_dim: int, cross_attn_norm: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanS2VAttention(dim, num_heads, head_dim, eps)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.attn2 = WanS2VAttention(dim, num_heads, head_dim, eps)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.ffn_chunk_size: int | None = None

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """FFN over [B, L, C], optionally `ffn_chunk_size` tokens at a time.

        The [B, chunk, ffn_dim] hidden state is the largest activation of a block. With
        gradients on, each chunk is also checkpointed on its own, so the backward pass holds
        one chunk's hidden state at a time instead of all of them (chunking alone would keep
        every chunk's activations for the backward pass and save nothing).
        """
        chunk = self.ffn_chunk_size
        if not chunk or x.shape[1] <= chunk:
            return self.ffn(x)
        parts = x.split(chunk, dim=1)
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(self.ffn, part, use_reentrant=False) for part in parts], dim=1)
        return torch.cat([self.ffn(part) for part in parts], dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        split: int,
        rotary: tuple[torch.Tensor, torch.Tensor],
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: [B, L, C].
            temb: [B, 2, 6, C] float32 projected timestep embeddings for (t, 0).
            split: tokens before it use timestep t, the rest timestep 0.
            rotary: (cos, sin) [L, D / 2].
            encoder_hidden_states: [B, L_text, C] embedded text.
        """
        mod = (self.scale_shift_table.float().unsqueeze(1) + temb).unbind(2)  # 6 x [B, 2, C]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod
        dtype = hidden_states.dtype

        normed = _modulate(self.norm1(hidden_states.float()), shift_msa, scale_msa, split)
        attn = self.attn1(normed.to(dtype), rotary=rotary)
        hidden_states = (hidden_states.float() + _gate(attn.float(), gate_msa, split)).to(dtype)

        hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), encoder_hidden_states)

        normed = _modulate(self.norm3(hidden_states.float()), shift_ffn, scale_ffn, split)
        ff = self._feed_forward(normed.to(dtype))
        return (hidden_states.float() + _gate(ff.float(), gate_ffn, split)).to(dtype)


class WanS2VConditionEmbedder(nn.Module):
    """Timestep, text, audio and pose embedders."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, audio_dim: int, num_audio_token: int,
                 num_wav2vec_layers: int, pose_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.time_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = PixArtAlphaTextProjection(text_dim, dim, act_fn="gelu_tanh")
        self.causal_audio_encoder = CausalAudioEncoder(audio_dim, dim, num_audio_token, num_wav2vec_layers)
        self.pose_embedder = nn.Conv3d(pose_dim, dim, kernel_size=patch_size, stride=patch_size)


def block_and_audio(
    block: nn.Module,
    injector: tuple[nn.Module, nn.Module] | None,
    x: torch.Tensor,
    temb: torch.Tensor,
    split: int,
    rotary: tuple[torch.Tensor, torch.Tensor],
    context: torch.Tensor,
    num_video: int,
    audio: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """`block` on the sequence [B, S, C], then the audio `injector` (AdaIN, attention) on its
    first `num_video` tokens. Modules are arguments (not looked up by index), so one compiled
    graph serves every block."""
    x = block(x, temb, split, rotary, context)
    if audio is None or injector is None:
        return x
    residual = inject_audio(x[:, :num_video], injector, audio[1], audio[0])
    return torch.cat([x[:, :num_video] + residual, x[:, num_video:]], dim=1)


class WanS2VTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Wan 2.2 S2V 14B transformer; the defaults are the published 14B configuration (the
    official Wan2.2 code's `wan/configs/wan_s2v_14B.py`).

    Args:
        patch_size: (t, h, w) latent patch of one video token.
        num_attention_heads, attention_head_dim: heads and width per head; the model width is
            their product (5120 for 14B).
        in_channels, out_channels: latent channels of the Wan 2.1 VAE (16).
        text_dim: width of the UMT5-XXL prompt embeddings.
        freq_dim: width of the sinusoidal timestep embedding.
        ffn_dim: hidden width of each block's feed-forward.
        num_layers: transformer blocks.
        cross_attn_norm: LayerNorm before the text cross-attention.
        eps: epsilon of the norms.
        audio_dim: width of the wav2vec2 hidden states.
        num_audio_token: tokens per latent frame the causal audio encoder makes.
        num_wav2vec_layers: wav2vec2 hidden states (layers + embeddings) the audio encoder
            averages with learned weights.
        audio_inject_layers: blocks followed by an audio injector (cross-attention to the audio).
        enable_adain, adain_mode: the injectors' AdaLN; only the published variant
            (True, "attn_norm") is supported.
        pose_dim: latent channels of the pose video.
        framepack_drop_mode: the official config's FramePack setting; kept in the config for
            round trips, the forward implements the published "padd".
        motion_frames: pixel frames of FramePack motion context (73).
        rope_theta: base of the 3D rotary position embedding.
        numerics: "official" (the official Wan2.2 code's float64 timestep embedding and
            motion RoPE positions) or "comfyui" (ComfyUI's float32 / fractional ones).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["WanS2VTransformerBlock"]
    #: None: every weight loads in the requested dtype, as the official code and ComfyUI hold
    #: them; the forward computes modulation, norms and residuals in float32 itself.
    _keep_in_fp32_modules = None
    #: Kept in the compute dtype by diffusers' `enable_layerwise_casting` (as diffusers' Wan).
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = [
        "patch_embedding", "condition_embedder", "frame_packer", "trainable_condition_mask", "norm",
    ]
    #: What diffusers' `compile_repeated_blocks` compiles (`compile_blocks` does the same here).
    _repeated_blocks: ClassVar[list[str]] = ["WanS2VTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        audio_dim: int = 1024,
        num_audio_token: int = 4,
        num_wav2vec_layers: int = 25,
        audio_inject_layers: tuple[int, ...] | list[int] = DEFAULT_AUDIO_INJECT_LAYERS,
        enable_adain: bool = True,
        adain_mode: str = "attn_norm",
        pose_dim: int = 16,
        framepack_drop_mode: str = "padd",
        motion_frames: int = MOTION_FRAMES,
        rope_theta: float = 10000.0,
        numerics: str = "official",
    ):
        super().__init__()
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got '{numerics}'")
        if not enable_adain or adain_mode != "attn_norm":
            raise ValueError("only the published S2V variant (enable_adain=True, adain_mode='attn_norm') is supported")
        dim = num_attention_heads * attention_head_dim
        patch_size = tuple(patch_size)
        self.numerics = numerics
        self.gradient_checkpointing = False
        self.token_routes: list[TokenRoute] = []

        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.frame_packer = FramePackMotioner(dim, in_channels)
        self.trainable_condition_mask = nn.Embedding(3, dim)
        self.condition_embedder = WanS2VConditionEmbedder(
            dim, freq_dim, text_dim, audio_dim, num_audio_token, num_wav2vec_layers, pose_dim, patch_size
        )
        self.blocks = nn.ModuleList(
            [
                WanS2VTransformerBlock(dim, ffn_dim, num_attention_heads, attention_head_dim, cross_attn_norm, eps)
                for _ in range(num_layers)
            ]
        )
        self.audio_injector = AudioInjector(dim, num_attention_heads, attention_head_dim, list(audio_inject_layers), eps)
        self.norm_out = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def set_feed_forward_chunk_size(self, chunk_size: int | None) -> None:
        """Run every block's feed-forward `chunk_size` tokens at a time (None: all at once)."""
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"feed_forward_chunk_size must be positive, got {chunk_size}")
        for block in self.blocks:
            block.ffn_chunk_size = chunk_size

    def set_token_routes(self, routes: Any) -> None:
        """TREAD routes for training (`{"routes": [{"selection_ratio", "start_layer_idx",
        "end_layer_idx"}]}` or a list); see `trainer.model.routing`. None or [] turns it off."""
        self.token_routes = parse_routes(routes, len(self.blocks))

    def configure_gradient_checkpointing(
        self, policy: str = "full", attention_blocks: int | None = None, interval: int = 1,
        compile_regions: bool = False, linear_blocks: int = 0,
    ) -> None:
        """Choose how blocks are checkpointed in training.

        Args:
            policy: "none", "full" (recompute whole blocks) or "attention" (blocks keep
                their attention outputs, so the backward pass does not recompute attention).
            attention_blocks: with "attention", only the first this many blocks keep their
                attention outputs and the rest are fully recomputed (a memory/speed dial);
                None means all blocks.
            interval: checkpoint every `interval`-th block only (the others keep all their
                activations).
            compile_regions: compile each checkpointed block (with its audio injection) as
                one graph with the checkpoint inside it, so the compiler decides what the
                backward recomputes and fuses that work into its kernels instead of
                re-running the whole compiled forward. Same gradients as eager; on the 14B
                model it is faster and keeps far less (see docs/benchmarks.md). Not with
                block offload.
            linear_blocks: with "attention", the first this many blocks also keep their
                large linear outputs ("linears" in `trainer.model.checkpointing`), so their
                backward recomputes no large matmul.
        """
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"policy must be one of {CHECKPOINT_POLICIES}, got '{policy}'")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if linear_blocks and policy != "attention":
            raise ValueError("linear_blocks needs the 'attention' policy")
        keep = len(self.blocks) if attention_blocks is None else attention_blocks
        make = self._compiled_region if compile_regions else checkpoint_function
        for block in self.blocks:
            block.attn1.contiguous_heads = compile_regions
        functions = [
            None if policy == "none" or index % interval
            else make(self.block_policy(policy, index, keep, linear_blocks))
            for index in range(len(self.blocks))
        ]
        self.set_block_checkpointing(functions)

    @staticmethod
    def block_policy(policy: str, index: int, attention_blocks: int, linear_blocks: int = 0) -> str:
        """What checkpointed block `index` keeps under `policy` (one of `BLOCK_POLICIES`)."""
        if policy != "attention" or index >= max(attention_blocks, linear_blocks):
            return "full"
        return "linears" if index < linear_blocks else "attention"

    def _compiled_region(self, policy: str) -> Callable:
        """A `run(fn, index, *args)` checkpoint function whose whole region, checkpoint
        included, is one compiled graph (`fn`, the model's own `_block_and_audio`, is replaced
        by `block_and_audio` on the block's modules)."""
        region = compiled_checkpoint(policy, block_and_audio)

        def run(fn: Callable, index: int, *args: Any) -> torch.Tensor:
            if getattr(self, "_block_offloader", None) is not None:
                raise ValueError("compile_regions does not work with block offload (the swap runs between regions)")
            return region(self.blocks[index], self.audio_injector.parts(index), *args)

        return run

    @property
    def block_checkpointing(self) -> list[Callable | None]:
        """The checkpoint function of every block (None: not checkpointed)."""
        return list(getattr(self, "_block_checkpoint", None) or [None] * len(self.blocks))

    def set_block_checkpointing(self, functions: Sequence[Callable | None]) -> None:
        """Set one `checkpoint(fn, *args)`-style function per block (None: no checkpointing);
        the memory modes wrap these (e.g. to move the saved inputs to host memory)."""
        if len(functions) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} checkpoint functions, got {len(functions)}")
        self._block_checkpoint = list(functions)
        self.gradient_checkpointing = any(f is not None for f in functions)

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """torch.compile every block in place: fuses the norm, modulation, gating and RoPE
        work around the matmuls and attention. All blocks share one compiled graph."""
        for block in self.blocks:
            block.compile(**compile_kwargs)

    # ------------------------------------------------------------------ inputs

    def _encode_audio(
        self, audio_embeds: torch.Tensor, latent_frames: int, numerics: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 25, D, F>=4T] per-video-frame features -> (global, local) tokens for T latent frames."""
        needed = 4 * latent_frames
        if audio_embeds.shape[-1] < needed:
            raise ValueError(
                f"audio_embeds has {audio_embeds.shape[-1]} frames; {needed} (4 per latent frame) are needed"
            )
        audio = audio_embeds[..., :needed].to(self.dtype)
        encoder = self.condition_embedder.causal_audio_encoder
        if numerics == "comfyui":
            return encoder(audio)
        prepend = self.config.motion_frames
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], prepend), audio], dim=-1)
        audio_global, audio_local = encoder(audio)
        skip = (prepend + 3) // 4
        return audio_global[:, skip : skip + latent_frames], audio_local[:, skip : skip + latent_frames]

    def _timestep_split(self, num_video: int, latent_frames: int, total: int, has_ref: bool, has_motion: bool,
                        numerics: str) -> int:
        """Number of leading tokens modulated with the diffusion timestep (the rest get 0).

        Official: exactly the video tokens. ComfyUI builds a per-entry list
        ([t] * T + [0] for the reference, each doubled and [0, 0, 0] appended with motion)
        and stretches it over the sequence; the t entries then cover a prefix whose length
        this reproduces.
        """
        if numerics == "official":
            return num_video
        t_entries, zero_entries = latent_frames, int(has_ref)
        if has_motion:
            t_entries, zero_entries = 2 * t_entries, 2 * zero_entries + 3
        entries = t_entries + zero_entries
        if entries == 1:
            return total
        repeats = total // entries
        if repeats == 1 and entries != total:
            raise ValueError("sequence too short for ComfyUI's per-token timestep layout")
        per_entry = repeats if repeats * entries == total else repeats + 1
        return min(total, t_entries * per_entry)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        audio_embeds: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        pose_latents: torch.Tensor | None = None,
        motion_latents: torch.Tensor | None = None,
        numerics: str | None = None,
        capture_block: int | None = None,
        return_dict: bool = True,
    ) -> WanS2VTransformerOutput | tuple[torch.Tensor, ...]:
        """Velocity prediction for the noisy video latents.

        Args:
            hidden_states: [B, 16, T, H, W] noisy latents (normalised latent space); H, W even.
            timestep: [B] (or scalar) 1000 x sigma.
            encoder_hidden_states: [B, L, text_dim] UMT5 output (padding zeroed).
            audio_embeds: [B, 25, audio_dim, F] per-video-frame wav2vec2 features, F >= 4T
                (the first 4T are used). None: no audio injection.
            reference_latents: [B, 16, 1, H, W] reference image latent.
            pose_latents: [B, 16, T, H, W] pose latents through the pose embedder. Zeros are
                not the same as None: zeros still add the embedder's bias.
            motion_latents: [B, 16, Tm, H, W] previous-clip latents for FramePack tokens.
            numerics: "official" or "comfyui"; default `self.numerics`.
            capture_block: also return the video tokens after this block (CREPA's student
                features), captured once, never a buffer of every block.

        Returns:
            [B, 16, T, H, W] velocity (noise - x0) for the video tokens.
        """
        numerics = numerics or self.numerics
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got '{numerics}'")
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if frames % p_t or height % p_h or width % p_w:
            raise ValueError(f"latent size {frames}x{height}x{width} is not a multiple of the patch {p_t}x{p_h}x{p_w}")
        grid = (frames // p_t, height // p_h, width // p_w)
        dtype = self.dtype
        if capture_block is not None and not 0 <= capture_block < len(self.blocks):
            raise ValueError(f"capture_block {capture_block} is not a block of this model (0..{len(self.blocks) - 1}); "
                             "lower crepa_block_index")

        audio = None if audio_embeds is None else self._encode_audio(audio_embeds, grid[0], numerics)
        x, positions, num_video = self._embed_tokens(hidden_states, reference_latents, pose_latents, motion_latents,
                                                     grid, numerics)
        rotary = rope_tables(positions.to(x.device), self.config.attention_head_dim, self.config.rope_theta)
        split = self._timestep_split(
            num_video, grid[0], x.shape[1], reference_latents is not None, motion_latents is not None, numerics
        )
        temb, temb_blocks = self._embed_timestep(timestep, batch, numerics)
        context = self.condition_embedder.text_embedder(encoder_hidden_states.to(dtype))

        x, captured, captured_mask = self._run_blocks(
            x, temb_blocks, split, rotary, context, num_video, audio, grid, capture_block
        )
        x = x[:, :num_video]
        shift, scale = (self.scale_shift_table.float().unsqueeze(1) + temb.unsqueeze(2)).unbind(2)
        x = self.proj_out(_modulate(self.norm_out(x.float()), shift, scale, split).to(dtype))
        out = self._unpatchify(x, grid)
        if not return_dict:
            return (out,) if capture_block is None else (out, captured, captured_mask)
        return WanS2VTransformerOutput(sample=out, captured_hidden_states=captured, captured_mask=captured_mask)

    def _embed_tokens(
        self,
        hidden_states: torch.Tensor,
        reference_latents: torch.Tensor | None,
        pose_latents: torch.Tensor | None,
        motion_latents: torch.Tensor | None,
        grid: tuple[int, int, int],
        numerics: str,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Patch-embed the video (+ pose), reference and FramePack motion latents into one
        sequence [B, S, C] (video first, each part plus its condition-mask row), with the
        RoPE positions [S, 3] of every token and the number of video tokens."""
        dtype = self.dtype
        mask = self.trainable_condition_mask.weight.to(dtype)
        x = self.patch_embedding(hidden_states.to(dtype))
        if pose_latents is not None:
            x = x + self.condition_embedder.pose_embedder(pose_latents.to(dtype))
        tokens = [x.flatten(2).transpose(1, 2) + mask[0]]
        positions = [video_positions(*grid)]
        num_video = tokens[0].shape[1]

        if reference_latents is not None:
            ref = self.patch_embedding(reference_latents.to(dtype)).flatten(2).transpose(1, 2)
            tokens.append(ref + mask[1])
            ref_time = 30 if numerics == "official" else max(30, grid[0] + 9)
            ref_frames = reference_latents.shape[2] // self.config.patch_size[0]
            positions.append(video_positions(ref_frames, grid[1], grid[2], t_start=ref_time))

        if motion_latents is not None:
            motion, motion_positions = self.frame_packer(motion_latents.to(dtype), numerics)
            tokens.append(motion + mask[2])
            positions.append(motion_positions)
        return torch.cat(tokens, dim=1), torch.cat(positions), num_video

    def _embed_timestep(self, timestep: torch.Tensor, batch: int, numerics: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of (t, 0) per sample: [B, 2, C] for the head and [B, 2, 6, C] for the
        blocks' modulation, float32 (index 1 = the zero timestep of reference/motion tokens)."""
        dtype = self.dtype
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(batch)
        pair = torch.stack([timestep, torch.zeros_like(timestep)], dim=1).flatten()  # [B * 2]
        sinusoid = sinusoidal_timestep_embedding(pair, self.config.freq_dim, numerics)
        embedder = self.condition_embedder
        temb = embedder.time_embedder(sinusoid.to(dtype)).float()  # [B * 2, C]
        temb_blocks = embedder.time_proj(F.silu(temb).to(dtype)).float().unflatten(1, (6, -1))
        return temb.unflatten(0, (batch, 2)), temb_blocks.unflatten(0, (batch, 2))

    def _run_blocks(
        self,
        x: torch.Tensor,
        temb_blocks: torch.Tensor,
        split: int,
        rotary: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor,
        num_video: int,
        audio: tuple[torch.Tensor, torch.Tensor] | None,
        grid: tuple[int, int, int],
        capture_block: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The blocks (each with its audio injection, checkpointed as configured), TREAD
        routes in training, and the capture of block `capture_block`'s video tokens.
        Returns the sequence [B, S, C] and (captured tokens, their route mask) or Nones."""
        captured = captured_mask = None
        routing = self.training and torch.is_grad_enabled()
        routes = {route.start_layer_idx: route for route in self.token_routes} if routing else {}
        state = (num_video, split, rotary)  # (video tokens, timestep split, RoPE) of the sequence
        outside = None  # (full sequence's video tokens, kept indices, last routed block)
        for index in range(len(self.blocks)):
            if index in routes:
                x, state, outside = self._enter_route(x, routes[index], grid, num_video, rotary)
            args = (index, x, temb_blocks, state[1], state[2], context, state[0], audio)
            run = self._checkpoint_function(index)
            x = self._block_and_audio(*args) if run is None else run(self._block_and_audio, *args)
            if index == capture_block:
                captured, captured_mask = self._capture_video(x, state[0], outside, num_video)
            if outside is not None and index == outside[2]:
                video = outside[0].index_copy(1, outside[1], x[:, : state[0]])
                x = torch.cat([video, x[:, state[0] :]], dim=1)
                state, outside = (num_video, split, rotary), None
        return x, captured, captured_mask

    @staticmethod
    def _capture_video(
        x: torch.Tensor, video_count: int, outside: tuple | None, num_video: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Video tokens [B, num_video, C] of the current sequence (restored to the full grid
        inside a route) and the mask of tokens that went through the route (or None)."""
        if outside is None:
            return x[:, :num_video], None
        video, keep, _ = outside
        mask = torch.zeros(num_video, dtype=torch.bool, device=x.device)
        mask[keep] = True
        return video.index_copy(1, keep, x[:, :video_count]), mask

    def _checkpoint_function(self, index: int) -> Callable | None:
        """How block `index` is checkpointed now (None: run it plainly)."""
        if not (torch.is_grad_enabled() and self.gradient_checkpointing):
            return None
        configured = getattr(self, "_block_checkpoint", None)
        return configured[index] if configured else self._gradient_checkpointing_func

    def _enter_route(
        self,
        x: torch.Tensor,
        route: TokenRoute,
        grid: tuple[int, int, int],
        num_video: int,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, tuple, tuple]:
        """Drop `route.selection_ratio` of the video tokens (equally per frame) for the route.

        Returns the routed sequence (kept video tokens, then every other token), its state
        (video token count, timestep split, RoPE rows of the kept tokens) and what restoring
        needs (the full video tokens, the kept indices, the route's last block).
        """
        keep = kept_video_tokens(grid[0], grid[1] * grid[2], route.selection_ratio, x.device)
        video = x[:, :num_video]
        routed = torch.cat([video.index_select(1, keep), x[:, num_video:]], dim=1)
        rows = torch.cat([keep, torch.arange(num_video, x.shape[1], device=x.device)])
        kept = keep.numel()
        # Inside a route exactly the kept video tokens carry the diffusion timestep.
        return routed, (kept, kept, (rotary[0][rows], rotary[1][rows])), (video, keep, route.end_layer_idx)

    def _block_and_audio(self, index: int, *args: Any) -> torch.Tensor:
        """`block_and_audio` (same further arguments) on block `index` and its injector: one
        unit for gradient checkpointing and block swap, so the injector's activations are
        not kept either."""
        return block_and_audio(self.blocks[index], self.audio_injector.parts(index), *args)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, T*h*w, p_t*p_h*p_w*C] -> [B, C, T*p_t, h*p_h, w*p_w]."""
        p_t, p_h, p_w = self.config.patch_size
        t, h, w = grid
        x = x.reshape(x.shape[0], t, h, w, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], t * p_t, h * p_h, w * p_w)


__all__ = [
    "DEFAULT_AUDIO_INJECT_LAYERS",
    "NUMERICS",
    "TINY_TRANSFORMER_CONFIG",
    "WanS2VTransformer3DModel",
    "WanS2VTransformerOutput",
]
