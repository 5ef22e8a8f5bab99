"""Typed memory settings for training the S2V transformer.

One `MemoryConfig` covers the base weights' precision, offload, gradient checkpointing,
the chunked feed-forward and the automatic plan. The CLI reads it from a ``[memory]`` section
of the training config (or flat keys with the same names); the loader node exposes the same
fields. `MemoryConfig.from_dict` rejects unknown keys and refused combinations with messages
that say why.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..checks import check_number

if TYPE_CHECKING:
    import torch

PRECISIONS = ("no_change", "int8-quanto", "fp8")
#: Accepted spellings -> canonical name.
PRECISION_ALIASES = {
    "no_change": "no_change", "bf16": "no_change", "none": "no_change", "default": "no_change",
    "int8-quanto": "int8-quanto", "int8_quanto": "int8-quanto", "int8": "int8-quanto", "qint8": "int8-quanto",
    "fp8": "fp8", "fp8_e4m3fn": "fp8", "fp8-e4m3": "fp8", "float8": "fp8", "fp8_scaled": "fp8",
}
#: Precisions that are refused, with the reason.
REFUSED_PRECISIONS = ("nf4", "int4", "int4-quanto", "int4_quanto", "qint4", "fp4", "nf4-bnb", "int2", "int2-quanto")
REFUSED_PRECISION_MESSAGE = (
    "base_model_precision '{name}' is refused: Wan 2.2 S2V is sensitive to 4-bit (NF4/int4) base "
    "weights (lip sync and identity degrade), so only no_change (bf16), int8-quanto and fp8 are "
    "offered. Use int8-quanto or fp8 with block offload to fit a small card."
)
OFFLOAD_MODES = ("none", "model", "blocks")
CHECKPOINT_POLICIES = ("none", "full", "interval", "attention")
EXCLUSIVE_OFFLOAD_MESSAGE = (
    "block offload (offload='blocks') and whole-model CPU offload (offload='model' / "
    "enable_model_cpu_offload) are mutually exclusive: block offload already keeps the weights "
    "in host memory and streams them block by block; choose one."
)
FEED_FORWARD_ENV = "WAN_FEED_FORWARD_CHUNK_SIZE"
#: Settings that leave the automatic plan free: a config that sets only these gets it by default.
AUTO_NEUTRAL_KEYS = frozenset({"device", "vram_budget_gib", "fp8_attention"})


class MemoryConfigError(ValueError):
    """A memory setting that cannot be used, with the reason."""


def normalize_precision(name: str) -> str:
    key = str(name).strip().lower()
    if key in REFUSED_PRECISIONS or "nf4" in key or "int4" in key or "fp4" in key:
        raise MemoryConfigError(REFUSED_PRECISION_MESSAGE.format(name=name))
    if key not in PRECISION_ALIASES:
        raise MemoryConfigError(f"base_model_precision must be one of {PRECISIONS}, got {name!r}")
    return PRECISION_ALIASES[key]


@dataclass
class MemoryConfig:
    """How the transformer is held in memory while a LoRA trains on it."""

    #: "no_change" (weights as loaded, bf16), "int8-quanto" (optimum-quanto qint8 weights on
    #: every Linear of the blocks and audio injectors) or "fp8" (float8_e4m3fn weights with a
    #: per-tensor scale, dequantized layer by layer in the forward).
    base_model_precision: str = "no_change"
    #: Where training runs: "auto" (CUDA when available, else CPU), "cuda", "cuda:N" or "cpu".
    device: str = "auto"
    #: "none": everything on the compute device; "model": the whole model lives in host memory
    #: and is moved in and out as a unit (for sampling/encoders between steps; not for a
    #: training step); "blocks": block swap - each block's frozen weights live in pinned host
    #: memory and are copied in just before the block runs (prefetched on a side stream), in
    #: the forward, the checkpoint recompute and the backward.
    offload: str = "none"
    #: With offload="blocks": a folder where the offloaded weights are written and read back
    #: (memory-mapped) instead of being held in host RAM. A training run writes them into a
    #: subfolder of its own (``.wan_s2v_offload-<run id>-rank<r>``), removed when it ends.
    offload_blocks_to_disk: str | None = None
    #: With offload="blocks": how many units ahead to prefetch on the side stream (0: load
    #: synchronously when the unit runs).
    prefetch: int = 1
    #: "none", "full" (every block recomputed), "interval" (every `checkpoint_interval`-th
    #: block checkpointed, the others keep all activations) or "attention" (every block
    #: checkpointed but the first `attention_blocks` keep their self-attention output).
    gradient_checkpointing: str = "full"
    checkpoint_interval: int = 1
    attention_blocks: int | None = None
    #: With "attention": the first this many blocks also keep the outputs of their large
    #: linear layers on the device (never in host memory), so their backward recomputes no
    #: large matmul: about 24 ms less per 14B block at 832x480x81 for about 3.3 GiB more
    #: device memory per block (the block's other saved tensors stay on the device too).
    linear_blocks: int = 0
    #: With compiled checkpoint regions (CUDA training, bf16 weights): run each LoRA Linear
    #: as one matmul with the merged weight W + s B A (`trainer.lora.merged_linear`): the
    #: same gradients as peft's two extra matmuls without their [tokens, dim] traffic (0.19 s
    #: less per 14B step). The forward then sees the LoRA rounded into the bf16 weight, as
    #: ComfyUI's sampling does; off gives peft's separate bf16 LoRA product.
    merged_lora: bool = True
    #: Run the frozen base Linears of the blocks and audio injectors on FP8 tensor cores:
    #: weights held in e4m3 once (per-channel scales; a scaled-fp8 file's bytes as shipped),
    #: activations and output gradients quantized per token on the fly, the forward and the
    #: input-gradient matmuls in FP8 (`trainer.memory.fp8_compute`). The LoRA, norms,
    #: modulation and attention keep their dtype. Needs compute capability 8.9 or newer
    #: (Ada, Hopper, Blackwell); works with base_model_precision no_change or fp8.
    fp8_compute: bool = False
    #: Run the self-attention of the blocks on FP8 tensor cores (cuDNN's FP8 attention,
    #: forward and backward; `trainer.model.fp8_attention`): Q, K, V and the output gradient
    #: quantized to e4m3 per tensor on the fly. Needs a Hopper or newer GPU and the
    #: nvidia-cudnn-frontend package. Independent of `fp8_compute`.
    fp8_attention: bool = False
    #: Copy the checkpointed block inputs to pinned host memory and back in the backward pass
    #: (with compiled checkpoint regions: everything large a checkpointed block saves).
    offload_activations: bool = False
    #: Feed-forward in chunks of this many tokens (each chunk checkpointed). None: the
    #: WAN_FEED_FORWARD_CHUNK_SIZE environment variable if set and
    #: `enable_chunked_feed_forward`, else off.
    enable_chunked_feed_forward: bool = False
    feed_forward_chunk_size: int | None = None
    #: Automatic plan: with `auto`, the fields above (except the refused/explicit precision
    #: when `auto_keep_precision`) are chosen by `trainer.memory.plan.plan_memory` for
    #: `vram_budget_gib` (None: the detected GPU's memory), FP8 compute included where the GPU
    #: has it. On a CPU the plan is the defaults above. The training CLI and the Memory
    #: Settings node default to it (`from_dict(..., auto_by_default=True)`).
    auto: bool = False
    vram_budget_gib: float | None = None
    auto_keep_precision: bool = False

    # ------------------------------------------------------------------ helpers

    def resolved_feed_forward_chunk_size(self) -> int | None:
        """The chunk size that applies (explicit value, then the environment variable)."""
        if not self.enable_chunked_feed_forward:
            return None
        if self.feed_forward_chunk_size:
            return int(self.feed_forward_chunk_size)
        env = os.environ.get(FEED_FORWARD_ENV, "").strip()
        if env:
            try:
                value = int(env)
            except ValueError as exc:
                raise MemoryConfigError(f"{FEED_FORWARD_ENV} must be an integer, got {env!r}") from exc
            if value <= 0:
                raise MemoryConfigError(f"{FEED_FORWARD_ENV} must be positive, got {value}")
            return value
        return 4096

    def resolved_device(self) -> torch.device:
        """The compute device `device` names."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def validate(self) -> MemoryConfig:
        self.base_model_precision = normalize_precision(self.base_model_precision)
        if isinstance(self.gradient_checkpointing, bool):  # SimpleTuner-style configs spell it as a boolean
            self.gradient_checkpointing = "full" if self.gradient_checkpointing else "none"
        if self.offload not in OFFLOAD_MODES:
            raise MemoryConfigError(f"offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if self.gradient_checkpointing not in CHECKPOINT_POLICIES:
            raise MemoryConfigError(
                f"gradient_checkpointing must be one of {CHECKPOINT_POLICIES}, got {self.gradient_checkpointing!r}"
            )
        check_number("checkpoint_interval", self.checkpoint_interval, 1, integer=True, error=MemoryConfigError)
        if self.attention_blocks is not None:
            check_number("attention_blocks", self.attention_blocks, 0, integer=True, hint="(or None: all)",
                         error=MemoryConfigError)
        check_number("linear_blocks", self.linear_blocks, 0, integer=True, error=MemoryConfigError)
        if self.linear_blocks and self.gradient_checkpointing != "attention":
            raise MemoryConfigError("linear_blocks needs gradient_checkpointing='attention'")
        check_number("prefetch", self.prefetch, 0, integer=True, error=MemoryConfigError)
        if self.feed_forward_chunk_size is not None:
            check_number("feed_forward_chunk_size", self.feed_forward_chunk_size, 1, integer=True,
                         hint="(or None: the default)", error=MemoryConfigError)
        if self.vram_budget_gib is not None:
            check_number("vram_budget_gib", self.vram_budget_gib, 0, low_open=True, hint="(or None: not set)",
                         error=MemoryConfigError)
        if self.offload_blocks_to_disk and self.offload != "blocks":
            raise MemoryConfigError("offload_blocks_to_disk needs offload='blocks'")
        if self.offload == "blocks":
            every_block = self.gradient_checkpointing in ("full", "attention") or (
                self.gradient_checkpointing == "interval" and self.checkpoint_interval == 1
            )
            if not every_block:
                raise MemoryConfigError(
                    "offload='blocks' needs every block checkpointed (gradient_checkpointing 'full' or "
                    "'attention', or 'interval' with checkpoint_interval=1): a block that is not "
                    "checkpointed would keep its weights on the device until the backward pass"
                )
        if self.offload_activations and self.gradient_checkpointing == "none":
            raise MemoryConfigError("offload_activations needs gradient checkpointing")
        if self.fp8_compute and not self.auto:
            self.check_fp8_compute()
        if self.fp8_attention:
            self.check_fp8_attention()
        return self

    def check_fp8_attention(self, device: torch.device | str | None = None) -> None:
        """Refuse `fp8_attention` where it cannot run (no Hopper or newer GPU, or no
        nvidia-cudnn-frontend), naming the reason."""
        from ..model.fp8_attention import refusal

        reason = refusal(self.resolved_device() if device is None else device)
        if reason:
            raise MemoryConfigError(reason)

    def check_fp8_compute(self, device: torch.device | str | None = None) -> None:
        """Refuse `fp8_compute` where it cannot run: int8 base weights (they would be
        requantized to fp8), or a compute device without FP8 tensor cores (named)."""
        from .fp8_compute import fp8_compute_refusal

        if self.base_model_precision == "int8-quanto":
            raise MemoryConfigError(
                "fp8_compute holds the base weights in fp8 itself; with base_model_precision 'int8-quanto' they "
                "would be requantized from int8. Use no_change (bf16 weights, quantized once to fp8) or fp8."
            )
        reason = fp8_compute_refusal(self.resolved_device() if device is None else device)
        if reason:
            raise MemoryConfigError(reason)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, auto_by_default: bool = False) -> MemoryConfig:
        """Build from a mapping (unknown keys are an error). Accepts `enable_model_cpu_offload`
        and `enable_block_offload`/`enable_group_offload` booleans as other spellings of
        `offload` and refuses both at once. With `auto_by_default`, a mapping that sets no
        `auto` and nothing the plan chooses (only `device`, `vram_budget_gib`) gets the
        automatic plan."""
        data = dict(raw or {})
        if auto_by_default and "auto" not in data and set(data) <= AUTO_NEUTRAL_KEYS:
            data["auto"] = True
        model_flag = bool(data.pop("enable_model_cpu_offload", False))
        block_flag = bool(data.pop("enable_block_offload", False)) | bool(data.pop("enable_group_offload", False))
        offload = data.get("offload")
        wants_blocks = block_flag or offload == "blocks"
        wants_model = model_flag or offload == "model"
        if wants_blocks and wants_model:
            raise MemoryConfigError(EXCLUSIVE_OFFLOAD_MESSAGE)
        if block_flag:
            data["offload"] = "blocks"
        elif model_flag:
            data["offload"] = "model"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MemoryConfigError(f"unknown memory setting(s): {', '.join(unknown)}")
        return cls(**data).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for logs: precision, offload, checkpointing, chunking."""
        if self.auto:
            budget = f"{self.vram_budget_gib:g} GiB" if self.vram_budget_gib else "the detected GPU memory"
            return f"automatic plan for {budget}"
        parts = [f"precision={self.base_model_precision}", f"offload={self.offload}"]
        if self.offload == "blocks":
            parts.append("disk=" + self.offload_blocks_to_disk if self.offload_blocks_to_disk else "pinned host RAM")
        ckpt = self.gradient_checkpointing
        if ckpt == "interval":
            ckpt += f":{self.checkpoint_interval}"
        if ckpt == "attention" and self.attention_blocks is not None:
            ckpt += f":{self.attention_blocks}"
        if self.linear_blocks:
            ckpt += f", linears:{self.linear_blocks}"
        parts.append(f"checkpointing={ckpt}")
        if self.fp8_compute:
            parts.append("fp8 compute")
        if self.fp8_attention:
            parts.append("fp8 attention")
        if self.offload_activations:
            parts.append("activations->host")
        chunk = self.resolved_feed_forward_chunk_size()
        if chunk:
            parts.append(f"ffn_chunk={chunk}")
        return ", ".join(parts)


__all__ = [
    "CHECKPOINT_POLICIES",
    "EXCLUSIVE_OFFLOAD_MESSAGE",
    "FEED_FORWARD_ENV",
    "OFFLOAD_MODES",
    "PRECISIONS",
    "MemoryConfig",
    "MemoryConfigError",
    "normalize_precision",
]
