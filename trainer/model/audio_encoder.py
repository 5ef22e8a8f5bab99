"""Speech encoder: wav2vec2 (transformers `Wav2Vec2ForCTC`, wav2vec2-large-xlsr-53-english:
24 layers, hidden 1024, so 25 hidden states).

Formats:
- Diffusers: an `audio_encoder/` folder (config.json + safetensors) or the pipeline root; the
  feature extractor config (`preprocessor_config.json`) is looked up in that folder, then in
  `audio_processor/` / `feature_extractor/` beside it (xlsr-53-english defaults otherwise).
- ComfyUI single file (`models/audio_encoders/wav2vec2_large_english_fp16.safetensors`):
  transformers' names, with or without the `wav2vec2.` prefix (ComfyUI strips it), with or
  without the CTC head (`lm_head.*`, unused by S2V), the positional conv's weight norm as
  `weight_g`/`weight_v` or `parametrizations.weight.original0/1`. A file without the CTC head
  loads as `Wav2Vec2Model` (the same encoder and hidden states).

`encode_speech` computes what the official Wan2.2 `AudioEncoder.extract_audio_feat` computes
before its interpolation: the whole 16 kHz mono clip normalised by the feature extractor
(zero mean, unit variance, no padding), one forward pass, all hidden states stacked.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model
from transformers.modeling_utils import PreTrainedModel

from ..constants import SPEECH_SAMPLE_RATE
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
    transformers_dtype_kwargs,
)

logger = logging.getLogger(__name__)

#: wav2vec2 frames per second of audio (conv feature encoder stride 320 at 16 kHz).
FRAMES_PER_SECOND = 50
#: jonatasgrosman/wav2vec2-large-xlsr-53-english (what the official code downloads).
XLSR53_ENGLISH_CONFIG = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
    "hidden_act": "gelu", "feat_extract_norm": "layer", "feat_extract_activation": "gelu", "conv_bias": True,
    "conv_dim": (512,) * 7, "conv_kernel": (10, 3, 3, 3, 3, 2, 2), "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "do_stable_layer_norm": True,
    "layer_norm_eps": 1e-5, "vocab_size": 33, "pad_token_id": 0,
}
FEATURE_EXTRACTOR_DEFAULTS = {
    "feature_size": 1, "sampling_rate": SPEECH_SAMPLE_RATE, "padding_value": 0.0, "do_normalize": True, "return_attention_mask": True,
}
_POS_CONV = "encoder.pos_conv_embed.conv."
_FEATURE_EXTRACTOR_FOLDERS = ("audio_processor", "feature_extractor", "processor")

AudioEncoder = Wav2Vec2ForCTC | Wav2Vec2Model


# ----------------------------------------------------------------------------- key names


def comfyui_to_transformers_audio_key(key: str, with_head: bool) -> str:
    """A ComfyUI/HF file key -> the key of `Wav2Vec2ForCTC` (`with_head`) or `Wav2Vec2Model`."""
    key = key.removeprefix("wav2vec2.")
    key = key.replace(_POS_CONV + "weight_g", _POS_CONV + "parametrizations.weight.original0")
    key = key.replace(_POS_CONV + "weight_v", _POS_CONV + "parametrizations.weight.original1")
    if key.startswith("lm_head.") or not with_head:
        return key
    return "wav2vec2." + key


def wav2vec2_config_from_header(header: dict[str, tuple[tuple[int, ...], str]]) -> Wav2Vec2Config:
    """Wav2Vec2 config from the shapes of a single file (xlsr-53-english structure otherwise)."""
    shapes = {k.removeprefix("wav2vec2."): v[0] for k, v in header.items()}
    if "encoder.layer_norm.weight" not in shapes or "encoder.layers.0.attention.q_proj.weight" not in shapes:
        raise CheckpointKeyError(f"not a wav2vec2 file{_audio_hint(set(shapes))}")
    hidden = shapes["encoder.layer_norm.weight"][0]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
    conv_layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("feature_extractor.conv_layers."))
    pos_key = next((k for k in shapes if k.startswith(_POS_CONV) and k.endswith(("weight_v", "original1"))), None)
    if pos_key is None:
        raise CheckpointKeyError(f"wav2vec2 file without the positional convolution ({_POS_CONV}weight_v)")
    _, per_group, kernel = shapes[pos_key]
    config = dict(XLSR53_ENGLISH_CONFIG)
    if "feature_extractor.conv_layers.1.layer_norm.weight" not in shapes:
        raise CheckpointKeyError(
            "wav2vec2 base-style file (group-norm feature encoder): S2V uses wav2vec2-large-xlsr-53-english"
        )
    config.update(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=shapes["encoder.layers.0.feed_forward.intermediate_dense.weight"][0],
        conv_dim=tuple(shapes[f"feature_extractor.conv_layers.{i}.conv.weight"][0] for i in range(conv_layers)),
        conv_kernel=tuple(shapes[f"feature_extractor.conv_layers.{i}.conv.weight"][2] for i in range(conv_layers)),
        num_conv_pos_embeddings=kernel, num_conv_pos_embedding_groups=hidden // per_group,
        num_attention_heads=attention_heads_for_width(hidden),
    )
    if "lm_head.weight" in shapes:
        config["vocab_size"] = shapes["lm_head.weight"][0]
    config["conv_stride"] = XLSR53_ENGLISH_CONFIG["conv_stride"][:conv_layers]
    return Wav2Vec2Config(**config)


def attention_heads_for_width(hidden: int) -> int:
    """Attention heads are not visible in the weights: 16 for the large model (head dim 64),
    else the largest of 16/8/4/2/1 dividing the width (tiny test models)."""
    if hidden % 64 == 0:
        return hidden // 64
    return next(h for h in (16, 8, 4, 2, 1) if hidden % h == 0)


def _audio_hint(keys: set[str]) -> str:
    if any(k.startswith(("model.encoder.embed_positions", "encoder.embed_positions")) for k in keys):
        return " (this looks like a Whisper encoder; S2V uses wav2vec2-large-xlsr-53-english)"
    return ""


# ----------------------------------------------------------------------------- loading


def load_feature_extractor(path: PathLike | None = None) -> Wav2Vec2FeatureExtractor:
    """Feature extractor from `path` (a folder with preprocessor_config.json, or an
    `audio_encoder/` folder whose siblings hold one); xlsr-53-english defaults if none."""
    if path is not None:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        for candidate in (folder, *(folder.parent / name for name in _FEATURE_EXTRACTOR_FOLDERS),
                          *(folder / name for name in _FEATURE_EXTRACTOR_FOLDERS)):
            if (candidate / "preprocessor_config.json").is_file():
                return Wav2Vec2FeatureExtractor.from_pretrained(str(candidate))
    return Wav2Vec2FeatureExtractor(**FEATURE_EXTRACTOR_DEFAULTS)


def _load_single_file(path: Path, dtype: torch.dtype, device: str | torch.device) -> AudioEncoder:
    header = read_header(path)
    config = wav2vec2_config_from_header(header)
    with_head = any(k.startswith("lm_head.") for k in header)
    with meta_device_init():
        model = Wav2Vec2ForCTC(config) if with_head else Wav2Vec2Model(config)
    load_single_file(model, path, lambda key: comfyui_to_transformers_audio_key(key, with_head), dtype, device,
                     what="wav2vec2 audio encoder", hint=lambda missing, unexpected: _audio_hint(set(header)) or None)
    return model


def _load_diffusers(path: Path, dtype: torch.dtype, device: str | torch.device) -> Wav2Vec2ForCTC:
    folder = path / "audio_encoder" if (path / "audio_encoder" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither an audio_encoder folder (config.json) nor a pipeline root")
    model, info = Wav2Vec2ForCTC.from_pretrained(str(folder), output_loading_info=True, **transformers_dtype_kwargs(dtype))
    check_loading_info(info, f"wav2vec2 audio encoder {folder}")
    model.wan_feature_extractor = load_feature_extractor(folder)
    return model.to(device)


def load_audio_encoder(
    path: PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> AudioEncoder:
    """Load wav2vec2 (eval mode, frozen) from a Diffusers folder / pipeline root or a ComfyUI
    single file. The feature extractor found with it is attached as `.wan_feature_extractor`
    (used by `encode_speech`). Strict: any missing or unexpected key is an error."""
    path = Path(path)
    if is_single_file(path):
        model = _load_single_file(path, dtype, device)
        model.wan_feature_extractor = load_feature_extractor(None)  # xlsr-53-english settings
    else:
        model = _load_diffusers(path, dtype, device)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- encoding


def normalize_waveform(waveform: torch.Tensor | np.ndarray, feature_extractor: Wav2Vec2FeatureExtractor | None = None) -> torch.Tensor:
    """16 kHz mono waveform [N] -> the model input [1, N], float32: the feature extractor's
    zero-mean unit-variance normalisation ((x - mean) / sqrt(var + 1e-7), population variance,
    in float32 numpy), exactly as `Wav2Vec2Processor` does in the official code."""
    feature_extractor = feature_extractor or Wav2Vec2FeatureExtractor(**FEATURE_EXTRACTOR_DEFAULTS)
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().float().numpy()
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform [N], got shape {waveform.shape}")
    inputs = feature_extractor(waveform, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt")
    return inputs.input_values.float()


def num_audio_frames(num_samples: int, config: Wav2Vec2Config | None = None) -> int:
    """wav2vec2 output frames for `num_samples` input samples (about 50 per second at 16 kHz)."""
    config = config or Wav2Vec2Config(**XLSR53_ENGLISH_CONFIG)
    length = num_samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
    return length


@torch.no_grad()
def encode_speech(
    audio_encoder: AudioEncoder,
    waveform: torch.Tensor | np.ndarray,
    feature_extractor: Wav2Vec2FeatureExtractor | None = None,
    sampling_rate: int = SPEECH_SAMPLE_RATE,
) -> torch.Tensor:
    """16 kHz mono waveform [N] (float, any scale) -> all hidden states [L + 1, N50, D], float32.

    L + 1 = 25 and D = 1024 for wav2vec2-large; N50 = `num_audio_frames(N)` ~ 50 per second.
    Hidden state 0 is the input of the first transformer layer, 24 the final layer-normed
    output (transformers' `output_hidden_states`, as the official code concatenates them).
    Resample to 16 kHz before calling (e.g. PyAV's AudioResampler); other rates are refused.
    """
    if sampling_rate != SPEECH_SAMPLE_RATE:
        raise ValueError(f"encode_speech needs {SPEECH_SAMPLE_RATE} Hz audio, got {sampling_rate} Hz: resample first")
    feature_extractor = feature_extractor or getattr(audio_encoder, "wan_feature_extractor", None)
    inputs = normalize_waveform(waveform, feature_extractor)
    parameter = next(audio_encoder.parameters())
    base = audio_encoder.wav2vec2 if isinstance(audio_encoder, Wav2Vec2ForCTC) else audio_encoder
    output = base(inputs.to(parameter.device, parameter.dtype), output_hidden_states=True)
    states = list(output.hidden_states)
    # transformers 5 collects the last layer's output before the encoder's final LayerNorm;
    # 4.x (which the official code ran) and ComfyUI use the normed one, `last_hidden_state`.
    states[-1] = output.last_hidden_state
    return torch.cat(states, dim=0).float()


# ----------------------------------------------------------------------------- saving


def comfyui_audio_encoder_state_dict(model: AudioEncoder, dtype: torch.dtype | None = None, with_head: bool = False) -> dict[str, torch.Tensor]:
    """ComfyUI's names (its `Wav2Vec2Model` module: no `wav2vec2.` prefix, weight norm as
    `parametrizations.weight.original0/1`); the CTC head only with `with_head`."""
    state = state_dict_for_saving(model, dtype)
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            if with_head:
                out[key] = value
            continue
        out[key.removeprefix("wav2vec2.")] = value
    return out


def save_audio_encoder(
    model: AudioEncoder,
    path: PathLike,
    layout: str = "diffusers",
    feature_extractor: Wav2Vec2FeatureExtractor | None = None,
    dtype: torch.dtype | None = None,
    with_head: bool = False,
) -> Path:
    """Save as a Diffusers `audio_encoder/` folder (with `preprocessor_config.json`) or a
    ComfyUI single file (`layout="comfyui"`). Written atomically (`trainer.io_utils`); an
    existing folder is replaced only if it holds nothing but a saved model (else FileExistsError)."""
    path = Path(path)
    if layout == "diffusers":
        if not isinstance(model, PreTrainedModel) or not isinstance(model, Wav2Vec2ForCTC):
            raise TypeError("the Diffusers layout holds a Wav2Vec2ForCTC")
        state = None if dtype is None else state_dict_for_saving(model, dtype)
        extractor = (feature_extractor or getattr(model, "wan_feature_extractor", None)
                     or Wav2Vec2FeatureExtractor(**FEATURE_EXTRACTOR_DEFAULTS))
        with atomic_folder(path, replaceable=is_saved_model_folder) as tmp:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            extractor.save_pretrained(str(tmp))
        return path
    if layout == "comfyui":
        return save_single_file(comfyui_audio_encoder_state_dict(model, dtype, with_head), path)
    raise ValueError(f"layout must be 'diffusers' or 'comfyui', got {layout!r}")


__all__ = [
    "FRAMES_PER_SECOND",
    "XLSR53_ENGLISH_CONFIG",
    "attention_heads_for_width",
    "comfyui_audio_encoder_state_dict",
    "comfyui_to_transformers_audio_key",
    "encode_speech",
    "load_audio_encoder",
    "load_feature_extractor",
    "normalize_waveform",
    "num_audio_frames",
    "save_audio_encoder",
    "wav2vec2_config_from_header",
]
