"""The model set the sampler runs: transformer, VAE, text encoder + tokenizer, audio encoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class ModelBundle:
    """Every model S2V sampling needs. `device`/`dtype`: where and in what precision the
    transformer computes (the other parts keep their own dtype). Components may sit on the
    CPU while `device` is a GPU: the sampler moves each one there when it needs it (and back,
    with `SamplerConfig.offload`)."""

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    audio_encoder: Any
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    #: Self-attention on FP8 tensor cores while sampling (`trainer.model.fp8_attention`).
    fp8_attention: bool = False

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return getattr(torch, names.get(value, value))


def build_tiny_bundle(seed: int = 0, device: str | torch.device = "cpu", numerics: str | None = None) -> ModelBundle:
    """The built-in tiny model set (random weights, float32) in memory: for tests, the demo
    and a ComfyUI graph that needs no model files."""
    import tempfile

    from ..model.text_encoder import load_tokenizer
    from ..model.tiny import (
        build_tiny_audio_encoder,
        build_tiny_text_encoder,
        build_tiny_transformer,
        build_tiny_vae,
        train_tiny_tokenizer,
    )
    from ..model.transformer_s2v import TINY_TRANSFORMER_CONFIG

    transformer = build_tiny_transformer(seed)
    if numerics:
        transformer.numerics = numerics
    vae = build_tiny_vae(seed + 1).eval().requires_grad_(False)
    text_encoder = build_tiny_text_encoder(TINY_TRANSFORMER_CONFIG["text_dim"], seed + 2).eval().requires_grad_(False)
    audio_encoder = build_tiny_audio_encoder(
        TINY_TRANSFORMER_CONFIG["audio_dim"], TINY_TRANSFORMER_CONFIG.get("num_wav2vec_layers", 25), seed + 3
    ).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        spiece = Path(tmp) / "spiece.model"
        spiece.write_bytes(train_tiny_tokenizer())
        tokenizer = load_tokenizer(spiece)
    transformer.requires_grad_(False)
    device = torch.device(device)
    for part in (transformer, vae, text_encoder, audio_encoder):
        part.to(device)
    return ModelBundle(transformer, vae, text_encoder, tokenizer, audio_encoder, device, torch.float32)


def load_encoder_bundle(
    transformer: Any,
    vae: str | os.PathLike,
    text_encoder: str | os.PathLike,
    audio_encoder: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.bfloat16,
    text_encoder_dtype: str | torch.dtype | None = None,
) -> ModelBundle:
    """A bundle around a transformer already in memory (e.g. the one being trained): the VAE,
    text encoder (+ tokenizer) and audio encoder load from ComfyUI files or Diffusers folders
    onto the CPU (the sampler moves each to `device` while it runs, with `offload`).
    VAE and audio encoder in float32 (on CUDA the VAE computes in bfloat16, `trainer.model.vae`),
    the text encoder in `text_encoder_dtype` (default `dtype`)."""
    from ..model.audio_encoder import load_audio_encoder
    from ..model.text_encoder import load_text_encoder
    from ..model.vae import load_vae

    vae_model = load_vae(Path(vae), dtype=torch.float32, device="cpu")
    text_model, tok = load_text_encoder(Path(text_encoder), dtype=_dtype(text_encoder_dtype or dtype), device="cpu",
                                        tokenizer_path=tokenizer)
    audio_model = load_audio_encoder(Path(audio_encoder), dtype=torch.float32, device="cpu")
    return ModelBundle(transformer, vae_model, text_model, tok, audio_model, torch.device(device), _dtype(dtype))


def load_model_bundle(
    transformer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    audio_encoder: str | os.PathLike | None = None,
    *,
    diffusers_root: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    dtype: str | torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    load_device: str | torch.device = "cpu",
    numerics: str | None = None,
    text_encoder_dtype: str | torch.dtype | None = None,
    tiny: bool = False,
    seed: int = 0,
    keep_fp8: bool = True,
    fp8_compute: bool = False,
    fp8_attention: bool = False,
) -> ModelBundle:
    """Load every part from ComfyUI files or Diffusers folders.

    Each of `transformer`, `vae`, `text_encoder`, `audio_encoder` is a ComfyUI single file or a
    Diffusers component folder; a missing one is taken from `diffusers_root` (a Diffusers
    pipeline root holding transformer/, vae/, text_encoder/, tokenizer/, audio_encoder/).
    `dtype` is the transformer's; the VAE and the audio encoder load in float32 (small; the
    official code runs the VAE in float32, and so does the CPU, while on CUDA the VAE computes
    in bfloat16 from those weights, as ComfyUI runs it), the text encoder in `text_encoder_dtype`
    (default `dtype`). Parts load onto `load_device` (CPU by default: the sampler moves each
    to `device` when it runs). `tiny=True` builds the built-in tiny set in memory instead.
    With `keep_fp8`, a scaled-fp8 transformer file keeps its block and audio-injector Linears
    in fp8 (half the memory of bf16; each layer dequantizes in its forward, as ComfyUI runs
    such files); other files load as usual. With `fp8_compute`, the transformer's block and
    audio-injector Linears then run their matmuls on `device`'s FP8 tensor cores
    (`trainer.memory.fp8_compute`; a scaled-fp8 file's bytes as shipped, a bf16 file's weights
    quantized once per output channel); a device without FP8 tensor cores is refused first.
    With `fp8_attention`, sampling runs the self-attention in FP8 (cuDNN's kernels on a Hopper
    or newer GPU, refused first elsewhere).
    """
    if fp8_compute:
        check_fp8_compute(device)
    if fp8_attention:
        from ..model.fp8_attention import check_device

        check_device(device)
    if tiny:
        bundle = build_tiny_bundle(seed=seed, device=device, numerics=numerics)
        bundle.fp8_attention = fp8_attention
        return with_fp8_compute(bundle, copy=False) if fp8_compute else bundle
    from ..model.audio_encoder import load_audio_encoder
    from ..model.text_encoder import load_text_encoder
    from ..model.transformer_io import load_transformer
    from ..model.vae import load_vae

    root = Path(diffusers_root) if diffusers_root else None

    def pick(value, sub: str) -> Path:
        if value:
            return Path(value)
        if root is None:
            raise ValueError(f"no {sub} given and no diffusers_root to take it from")
        return root / sub

    dtype = _dtype(dtype)
    kwargs = {"numerics": numerics} if numerics else {}
    model = load_transformer(pick(transformer, "transformer"), dtype=dtype, device=load_device, keep_fp8=keep_fp8,
                             **kwargs).eval()
    model.requires_grad_(False)
    vae_model = load_vae(pick(vae, "vae"), dtype=torch.float32, device=load_device)
    text_path = pick(text_encoder, "text_encoder")
    tok_path = tokenizer or (root / "tokenizer" if root is not None and not text_encoder else None)
    text_model, tok = load_text_encoder(text_path, dtype=_dtype(text_encoder_dtype or dtype), device=load_device,
                                        tokenizer_path=tok_path)
    audio_model = load_audio_encoder(pick(audio_encoder, "audio_encoder"), dtype=torch.float32, device=load_device)
    bundle = ModelBundle(model, vae_model, text_model, tok, audio_model, torch.device(device), dtype, fp8_attention)
    return with_fp8_compute(bundle, copy=False) if fp8_compute else bundle


def check_fp8_compute(device: str | torch.device) -> None:
    """Refuse FP8 compute for sampling on a device without FP8 tensor cores (named)."""
    from ..memory.fp8_compute import fp8_compute_refusal

    reason = fp8_compute_refusal(device)
    if reason:
        raise ValueError(reason)


def with_fp8_compute(bundle: ModelBundle, copy: bool = True, kind: str | None = None) -> ModelBundle:
    """The bundle with its transformer's base Linears computing in FP8 on `bundle.device`.

    `copy=True` leaves the given transformer as it is (a converted copy shares its other
    tensors: for a transformer that a training node or ComfyUI's cache holds too); `copy=False`
    converts it in place, one layer at a time (a transformer this bundle alone holds). `kind`
    overrides how the scaled product runs ("emulated": float32 reference math, any device)."""
    import dataclasses

    from ..memory.fp8_compute import enable_fp8_compute, fp8_compute_copy

    if kind is None:
        check_fp8_compute(bundle.device)
    if copy:
        return dataclasses.replace(bundle, transformer=fp8_compute_copy(bundle.transformer, bundle.device, kind))
    enable_fp8_compute(bundle.transformer, bundle.device, kind=kind)
    return bundle
