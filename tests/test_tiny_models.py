"""The tiny model set: both formats written, loadable, consistent with each other and with
the tiny transformer's widths, and usable end to end on CPU."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from trainer.model import transformer_io, transformer_s2v
from trainer.model.audio_encoder import encode_speech, load_audio_encoder
from trainer.model.audio_features import audio_features_for_video, audio_window
from trainer.model.text_encoder import encode_prompt, load_text_encoder
from trainer.model.tiny import build_tiny_model_set
from trainer.model.vae import encode_video, load_vae

TINY = transformer_s2v.TINY_TRANSFORMER_CONFIG


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    start = time.perf_counter()
    paths = build_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)
    paths["_seconds"] = time.perf_counter() - start
    return paths


def test_all_files_written_and_small(tiny):
    files = [p for k, p in tiny.items() if not k.startswith("_")]
    assert all(p.exists() for p in files)
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "audio_encoder"):
        assert tiny[f"{name}_diffusers"] == tiny["diffusers"] / name
    assert (tiny["diffusers"] / "model_index.json").is_file()
    for key in ("transformer_comfyui", "vae_comfyui", "text_encoder_comfyui", "text_encoder_fp8_comfyui", "audio_encoder_comfyui"):
        assert tiny[key].suffix == ".safetensors" and tiny[key].name.startswith("tiny_")
        assert tiny[key].parent.parent == tiny["comfyui"]
    total = sum(f.stat().st_size for p in (tiny["diffusers"], tiny["comfyui"]) for f in p.rglob("*") if f.is_file())
    assert total < 20e6
    assert tiny["_seconds"] < 60


def test_same_seed_same_weights(tiny, tmp_path):
    again = build_tiny_model_set(tmp_path / "again", seed=0)
    for key in ("vae_comfyui", "text_encoder_comfyui", "audio_encoder_comfyui", "transformer_comfyui"):
        a, b = load_file(str(tiny[key])), load_file(str(again[key]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    other = build_tiny_model_set(tmp_path / "other", seed=1)
    a, b = load_file(str(tiny["vae_comfyui"])), load_file(str(other["vae_comfyui"]))
    assert not torch.equal(a["encoder.conv1.weight"], b["encoder.conv1.weight"])


def test_tokenizer_folder_loads_with_auto_tokenizer(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny["tokenizer_diffusers"]))
    ids = tokenizer("A woman talks to the camera.").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert tokenizer.unk_token_id not in ids[:-1]


def test_widths_match_the_transformer(tiny):
    text_encoder, _ = load_text_encoder(tiny["text_encoder_comfyui"], dtype=torch.float32)
    audio_encoder = load_audio_encoder(tiny["audio_encoder_comfyui"])
    assert text_encoder.config.d_model == TINY["text_dim"]
    assert audio_encoder.config.hidden_size == TINY["audio_dim"]
    assert audio_encoder.config.num_hidden_layers + 1 == TINY.get("num_wav2vec_layers", 25)


def test_transformer_formats_hold_the_same_weights(tiny):
    a = transformer_io.load_transformer(tiny["transformer_diffusers"], dtype=torch.float32)
    b = transformer_io.load_transformer(tiny["transformer_comfyui"], dtype=torch.float32)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_end_to_end_forward(tiny, layout):
    """Prompt, speech and frames through the tiny encoders into one transformer forward."""
    suffix = f"_{layout}"
    text_encoder, tokenizer = load_text_encoder(tiny["text_encoder" + suffix], dtype=torch.float32)
    audio_encoder = load_audio_encoder(tiny["audio_encoder" + suffix])
    vae = load_vae(tiny["vae" + suffix])
    transformer = transformer_io.load_transformer(tiny["transformer" + suffix], dtype=torch.float32)

    length = 5  # video frames -> 2 latent frames
    batch_frames = 4 * ((length - 1) // 4 + 1)
    context = encode_prompt(text_encoder, tokenizer, "A woman talks to the camera.")
    hidden = encode_speech(audio_encoder, torch.randn(16000, generator=torch.Generator().manual_seed(0)))
    features, windows = audio_features_for_video(hidden, batch_frames)
    audio = audio_window(features, 0, batch_frames)
    frames = torch.rand(1, 3, length, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = encode_video(vae, frames)
    reference = encode_video(vae, frames[:, :, :1])

    assert context.shape == (1, 512, TINY["text_dim"])
    assert audio.shape == (1, 25, TINY["audio_dim"], batch_frames) and windows == 2  # 1 s = 29 frames at 30 fps
    assert latents.shape == (1, 16, 2, 4, 6) and reference.shape == (1, 16, 1, 4, 6)
    with torch.no_grad():
        out = transformer(torch.randn_like(latents), torch.tensor([500.0]), context,
                          audio_embeds=audio, reference_latents=reference).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
