"""S2V sampling: model bundle, sampler settings, LoRA application, the denoising loop,
media (audio/mp4 through PyAV) and validation renders during training."""

from .bundle import ModelBundle, build_tiny_bundle, load_encoder_bundle, load_model_bundle
from .config import DEFAULT_NEGATIVE_PROMPT, SamplerConfig, SamplerConfigError, default_shift, snap_size
from .lora import LoraSpec, applied_loras, lora_from_model
from .pipeline import SampleResult, SamplingCancelled, denoise_chunk, make_scheduler, sample_s2v
from .validation import ValidationCase, render_validation

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "LoraSpec",
    "ModelBundle",
    "SampleResult",
    "SamplerConfig",
    "SamplerConfigError",
    "SamplingCancelled",
    "ValidationCase",
    "applied_loras",
    "build_tiny_bundle",
    "default_shift",
    "denoise_chunk",
    "load_encoder_bundle",
    "load_model_bundle",
    "lora_from_model",
    "make_scheduler",
    "render_validation",
    "sample_s2v",
    "snap_size",
]
