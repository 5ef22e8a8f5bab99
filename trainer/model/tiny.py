"""Tiny random-initialised model set for CPU tests, in both on-disk formats.

`build_tiny_model_set(out_dir)` writes, in a few seconds and about 10 MB:

    <out>/diffusers/{transformer,vae,text_encoder,tokenizer,audio_encoder}/   (+ model_index.json)
    <out>/comfyui/models/diffusion_models/tiny_wan2.2_s2v_14B_bf16.safetensors
    <out>/comfyui/models/vae/tiny_wan_2.1_vae.safetensors
    <out>/comfyui/models/text_encoders/tiny_umt5_xxl_fp16.safetensors
    <out>/comfyui/models/text_encoders/tiny_umt5_xxl_fp8_e4m3fn_scaled.safetensors
    <out>/comfyui/models/audio_encoders/tiny_wav2vec2_large_english_fp16.safetensors

Both formats hold the same float32 weights (the fp8 text encoder excepted: ComfyUI's scaled
fp8 of the same weights), so loading either must give identical outputs. The file names are
the real ones with a `tiny_` prefix; the dtypes are not the ones the names say.
The widths fit together: UMT5 d_model = the transformer's text_dim, wav2vec2 hidden size =
its audio_dim and wav2vec2 layers + 1 = its num_wav2vec_layers (25, as the real model).
The tokenizer is a SentencePiece unigram model trained on a built-in corpus, saved so that
`AutoTokenizer` loads it and embedded in the ComfyUI text encoder files as ComfyUI does.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from transformers import (
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
)

from ..constants import SPEECH_SAMPLE_RATE
from .audio_encoder import XLSR53_ENGLISH_CONFIG, attention_heads_for_width, save_audio_encoder
from .single_file import PathLike
from .text_encoder import UMT5_XXL_DEFAULTS, load_tokenizer, save_text_encoder
from .vae import save_vae

#: Widths of the tiny encoders not fixed by the transformer's config.
TINY_VAE_CONFIG = {"base_dim": 4, "z_dim": 16}
TINY_TEXT_ENCODER_CONFIG = {"vocab_size": 64, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2}
TINY_AUDIO_ENCODER_CONFIG = {"intermediate_size": 48, "conv_dim": (16,) * 7}
TINY_VOCAB_SIZE = 60

COMFYUI_FILES = {
    "transformer": "diffusion_models/tiny_wan2.2_s2v_14B_bf16.safetensors",
    "vae": "vae/tiny_wan_2.1_vae.safetensors",
    "text_encoder": "text_encoders/tiny_umt5_xxl_fp16.safetensors",
    "text_encoder_fp8": "text_encoders/tiny_umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "audio_encoder": "audio_encoders/tiny_wav2vec2_large_english_fp16.safetensors",
}

_CORPUS = [
    "A woman with long dark hair talks to the camera in a bright kitchen.",
    "A man in a grey suit gives a speech on a stage, gesturing with both hands.",
    "Close-up of a singer performing a slow song into a vintage microphone.",
    "A child laughs and tells a story while sitting on a wooden chair.",
    "An old fisherman speaks quietly by the harbour at sunset, waves behind him.",
    "A news anchor reads the evening headlines in a studio with blue lights.",
    "Two friends chat over coffee at a small table near the window.",
    "A teacher explains a math problem in front of a green chalkboard.",
    "The rapper moves his head to the beat and sings the chorus.",
    "A calm narrator describes the mountains, natural light, soft shadows.",
    "Low quality, blurry, static, still picture, worst quality, deformed face.",
    "Bright colors, overexposed, subtitles, watermark, extra fingers, jpeg artifacts.",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global torch RNG seeded inside, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _perturb(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Add noise to every parameter so that norm scales and zero biases differ too (a
    swapped or dropped tensor then changes the outputs)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * std)
    return model.eval()


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> bytes:
    """A SentencePiece unigram model (T5 ids: pad 0, eos 1, unk 2) trained on a built-in
    corpus; returns the serialized model (what ComfyUI embeds as `spiece_model`)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def build_tiny_text_encoder(d_model: int, seed: int = 0) -> UMT5EncoderModel:
    config = dict(UMT5_XXL_DEFAULTS)
    config.update(TINY_TEXT_ENCODER_CONFIG, d_model=d_model)
    with _seeded(seed):
        return _perturb(UMT5EncoderModel(UMT5Config(**config)))


def build_tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    with _seeded(seed):
        return _perturb(AutoencoderKLWan(**TINY_VAE_CONFIG))


def build_tiny_audio_encoder(hidden_size: int, num_hidden_states: int = 25, seed: int = 0) -> Wav2Vec2ForCTC:
    """wav2vec2-large structure (conv kernels/strides, 128-tap positional conv in 16 groups,
    stable layer norm) at width `hidden_size` with `num_hidden_states - 1` layers."""
    config = dict(XLSR53_ENGLISH_CONFIG)
    config.update(TINY_AUDIO_ENCODER_CONFIG, hidden_size=hidden_size, num_hidden_layers=num_hidden_states - 1,
                  num_attention_heads=attention_heads_for_width(hidden_size))
    with _seeded(seed):
        return _perturb(Wav2Vec2ForCTC(Wav2Vec2Config(**config)))


def build_tiny_transformer(seed: int = 0):
    from .transformer_s2v import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

    with _seeded(seed):
        return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()


def _model_index(root: Path) -> None:
    index = {
        "_class_name": "WanSpeechToVideoPipeline",
        "transformer": ["trainer", "WanS2VTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "audio_encoder": ["transformers", "Wav2Vec2ForCTC"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_tiny_model_set(out_dir: PathLike, seed: int = 0) -> dict[str, Path]:
    """Build the tiny models and write them in both formats; returns their paths.

    Keys: "diffusers" (pipeline root), "comfyui" (the `models` folder), and
    "<component>_diffusers" / "<component>_comfyui" for component in transformer, vae,
    text_encoder, audio_encoder, plus "tokenizer_diffusers" and "text_encoder_fp8_comfyui".
    """
    from .transformer_io import save_transformer
    from .transformer_s2v import TINY_TRANSFORMER_CONFIG

    out = Path(out_dir)
    diffusers_root, comfy_root = out / "diffusers", out / "comfyui" / "models"
    paths: dict[str, Path] = {"diffusers": diffusers_root, "comfyui": comfy_root}
    paths.update({f"{name}_comfyui": comfy_root / file for name, file in COMFYUI_FILES.items()})
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "audio_encoder"):
        paths[f"{name}_diffusers"] = diffusers_root / name
    diffusers_root.mkdir(parents=True, exist_ok=True)

    transformer = build_tiny_transformer(seed)
    save_transformer(transformer, paths["transformer_diffusers"], layout="diffusers")
    save_transformer(transformer, paths["transformer_comfyui"], layout="comfyui")

    vae = build_tiny_vae(seed + 1)
    save_vae(vae, paths["vae_diffusers"], layout="diffusers")
    save_vae(vae, paths["vae_comfyui"], layout="comfyui")

    spiece = train_tiny_tokenizer()
    paths["tokenizer_diffusers"].mkdir(parents=True, exist_ok=True)
    (paths["tokenizer_diffusers"] / "spiece.model").write_bytes(spiece)
    tokenizer = load_tokenizer(paths["tokenizer_diffusers"] / "spiece.model")
    text_encoder = build_tiny_text_encoder(TINY_TRANSFORMER_CONFIG["text_dim"], seed + 2)
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, more than the encoder's vocabulary")
    save_text_encoder(text_encoder, paths["text_encoder_diffusers"], "diffusers", tokenizer=tokenizer, spiece_model=spiece)
    save_text_encoder(text_encoder, paths["text_encoder_comfyui"], "comfyui", spiece_model=spiece)
    save_text_encoder(text_encoder, paths["text_encoder_fp8_comfyui"], "comfyui", spiece_model=spiece, scaled_fp8=True)

    audio_encoder = build_tiny_audio_encoder(
        TINY_TRANSFORMER_CONFIG["audio_dim"], TINY_TRANSFORMER_CONFIG.get("num_wav2vec_layers", 25), seed + 3
    )
    feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SPEECH_SAMPLE_RATE, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)
    save_audio_encoder(audio_encoder, paths["audio_encoder_diffusers"], "diffusers", feature_extractor=feature_extractor)
    save_audio_encoder(audio_encoder, paths["audio_encoder_comfyui"], "comfyui")

    _model_index(diffusers_root)
    return paths


__all__ = [
    "COMFYUI_FILES",
    "TINY_AUDIO_ENCODER_CONFIG",
    "TINY_TEXT_ENCODER_CONFIG",
    "TINY_VAE_CONFIG",
    "build_tiny_audio_encoder",
    "build_tiny_model_set",
    "build_tiny_text_encoder",
    "build_tiny_transformer",
    "build_tiny_vae",
    "train_tiny_tokenizer",
]
