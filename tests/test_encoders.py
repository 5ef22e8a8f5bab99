"""Text encoder (UMT5) and speech encoder (wav2vec2) loaders on the tiny model set.

Real libraries and real files: each test writes safetensors files and loads them back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.model.audio_encoder import (
    comfyui_audio_encoder_state_dict,
    encode_speech,
    load_audio_encoder,
    num_audio_frames,
    save_audio_encoder,
)
from trainer.model.single_file import SCALED_FP8_MARKER, CheckpointKeyError
from trainer.model.text_encoder import (
    SPIECE_KEY,
    comfyui_text_encoder_state_dict,
    encode_prompt,
    load_text_encoder,
    load_tokenizer,
    save_text_encoder,
)
from trainer.model.tiny import build_tiny_audio_encoder, build_tiny_text_encoder, train_tiny_tokenizer

PROMPTS = ["A woman talks to the camera.", "A man sings a slow song into a microphone, natural light, close-up."]
TEXT_DIM = 32
AUDIO_DIM = 48


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict[str, Path]:
    """The tiny UMT5 in a Diffusers folder and as ComfyUI fp32 and scaled-fp8 files."""
    root = tmp_path_factory.mktemp("text")
    spiece = train_tiny_tokenizer()
    (root / "spiece.model").write_bytes(spiece)
    tokenizer = load_tokenizer(root / "spiece.model")
    model = build_tiny_text_encoder(TEXT_DIM, seed=2)
    save_text_encoder(model, root / "diffusers" / "text_encoder", "diffusers", tokenizer=tokenizer, spiece_model=spiece)
    save_text_encoder(model, root / "comfy" / "umt5.safetensors", "comfyui", spiece_model=spiece)
    save_text_encoder(model, root / "comfy" / "umt5_fp8.safetensors", "comfyui", spiece_model=spiece, scaled_fp8=True)
    return {
        "root": root, "spiece": root / "spiece.model", "diffusers": root / "diffusers",
        "text_encoder": root / "diffusers" / "text_encoder", "tokenizer": root / "diffusers" / "tokenizer",
        "comfy": root / "comfy" / "umt5.safetensors", "fp8": root / "comfy" / "umt5_fp8.safetensors",
    }


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audio")
    model = build_tiny_audio_encoder(AUDIO_DIM, 25, seed=3)
    save_audio_encoder(model, root / "diffusers" / "audio_encoder", "diffusers")
    save_audio_encoder(model, root / "comfy" / "wav2vec2.safetensors", "comfyui")
    return {"root": root, "diffusers": root / "diffusers", "audio_encoder": root / "diffusers" / "audio_encoder",
            "comfy": root / "comfy" / "wav2vec2.safetensors"}


def speech(seconds: float, seed: int = 0) -> torch.Tensor:
    """A voice-like test signal at 16 kHz: a few harmonics with vibrato and noise."""
    t = torch.arange(int(seconds * 16000)) / 16000
    generator = torch.Generator().manual_seed(seed)
    f0 = 140 + 20 * torch.sin(2 * torch.pi * 3 * t)
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / 16000
    wave = sum(torch.sin(k * phase) / k for k in range(1, 6))
    return 0.3 * wave + 0.01 * torch.randn(t.shape, generator=generator)


def rewrite(source: Path, target: Path, edit) -> Path:
    tensors = load_file(str(source))
    edit(tensors)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


# ----------------------------------------------------------------------------- text encoder


def test_text_encoder_formats_give_identical_outputs(text_files):
    outputs = []
    for path in (text_files["diffusers"], text_files["text_encoder"], text_files["comfy"]):
        model, tokenizer = load_text_encoder(path, dtype=torch.float32)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        outputs.append(encode_prompt(model, tokenizer, PROMPTS))
    assert outputs[0].shape == (2, 512, TEXT_DIM)
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


def test_comfyui_file_embeds_tokenizer_and_uses_transformers_names(text_files):
    model, _ = load_text_encoder(text_files["diffusers"], dtype=torch.float32)
    with safe_open(str(text_files["comfy"]), "pt") as handle:
        file_keys = set(handle.keys())
        assert handle.get_tensor(SPIECE_KEY).numpy().tobytes() == text_files["spiece"].read_bytes()
    expected = set(model.state_dict()) - {"encoder.embed_tokens.weight"} | {SPIECE_KEY}
    assert file_keys == expected
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in file_keys  # UMT5: per layer
    resaved = comfyui_text_encoder_state_dict(model, text_files["spiece"])
    original = load_file(str(text_files["comfy"]))
    assert resaved.keys() == original.keys()
    assert all(torch.equal(resaved[k], original[k]) for k in original)


def test_encode_prompt_zeroes_padding(text_files):
    model, tokenizer = load_text_encoder(text_files["comfy"], dtype=torch.float32)
    context = encode_prompt(model, tokenizer, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt").input_ids  # ends with </s>, no padding
        length = ids.shape[1]
        assert context[row, :length].abs().sum(-1).gt(0).all()
        assert torch.count_nonzero(context[row, length:]) == 0
        # the real tokens equal an encoding without any padding (official: cut, then zero-pad)
        alone = model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(context[row, :length], alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(encode_prompt(model, tokenizer, PROMPTS[0]), context[:1])


def test_encode_prompt_cleans_whitespace_and_html(text_files):
    model, tokenizer = load_text_encoder(text_files["comfy"], dtype=torch.float32)
    messy = encode_prompt(model, tokenizer, ["  A woman\n talks   to the camera.&amp;  "])
    clean = encode_prompt(model, tokenizer, ["A woman talks to the camera.&"])
    assert torch.equal(messy, clean)


def test_scaled_fp8_file_is_dequantized(text_files):
    quantized, _ = load_text_encoder(text_files["fp8"], dtype=torch.float32)
    state = quantized.state_dict()
    with safe_open(str(text_files["fp8"]), "pt") as handle:
        assert handle.get_tensor(SCALED_FP8_MARKER).dtype == torch.float8_e4m3fn
        key = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
        weight, scale = handle.get_tensor(key), handle.get_tensor(key.replace(".weight", ".scale_weight"))
        assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert torch.equal(state[key], weight.float() * scale)
        assert torch.equal(state["shared.weight"], handle.get_tensor("shared.weight"))
    reference, tokenizer = load_text_encoder(text_files["comfy"], dtype=torch.float32)
    a, b = encode_prompt(reference, tokenizer, PROMPTS), encode_prompt(quantized, tokenizer, PROMPTS)
    assert not torch.equal(a, b)
    assert ((a - b).norm() / a.norm()).item() < 0.1


def test_hand_built_scaled_fp8_file(text_files, tmp_path):
    """A scaled-fp8 file written by hand (bf16 extras, scale_input present) loads as w = fp8 * scale."""
    scales = {}

    def quantize(tensors):
        for key in [k for k in tensors if k.endswith(("q.weight", "wo.weight"))]:
            scale = torch.tensor(0.0123, dtype=torch.float32)
            tensors[key] = (tensors[key] / scale).to(torch.float8_e4m3fn)
            tensors[key.replace(".weight", ".scale_weight")] = scale
            tensors[key.replace(".weight", ".scale_input")] = torch.tensor(1.0)
            scales[key] = scale
        tensors["encoder.final_layer_norm.weight"] = tensors["encoder.final_layer_norm.weight"].to(torch.bfloat16)
        tensors[SCALED_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)

    path = rewrite(text_files["comfy"], tmp_path / "umt5_fp8_e4m3fn_scaled.safetensors", quantize)
    model, _ = load_text_encoder(path, dtype=torch.bfloat16)
    raw = load_file(str(path))
    state = model.state_dict()
    assert scales
    for key, scale in scales.items():
        assert state[key].dtype == torch.bfloat16
        assert torch.equal(state[key], (raw[key].float() * scale).to(torch.bfloat16))


def test_text_encoder_strict_keys(text_files, tmp_path):
    missing = rewrite(text_files["comfy"], tmp_path / "missing.safetensors",
                      lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"))
    with pytest.raises(CheckpointKeyError, match=r"missing.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"):
        load_text_encoder(missing, dtype=torch.float32)
    unexpected = rewrite(text_files["comfy"], tmp_path / "unexpected.safetensors",
                         lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointKeyError, match=r"unexpected.*SelfAttention\.extra\.weight"):
        load_text_encoder(unexpected, dtype=torch.float32)
    folder = tmp_path / "pipeline"
    shutil.copytree(text_files["diffusers"], folder)
    weights = folder / "text_encoder" / "model.safetensors"
    rewrite(weights, weights, lambda t: t.pop("encoder.final_layer_norm.weight"))
    with pytest.raises(CheckpointKeyError, match="encoder.final_layer_norm.weight"):
        load_text_encoder(folder, dtype=torch.float32)


def test_single_file_tokenizer_sources(text_files, tmp_path):
    bare = rewrite(text_files["comfy"], tmp_path / "bare" / "umt5_xxl_fp16.safetensors", lambda t: t.pop(SPIECE_KEY))
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        load_text_encoder(bare, dtype=torch.float32)
    reference, reference_tokenizer = load_text_encoder(text_files["comfy"], dtype=torch.float32)
    expected = encode_prompt(reference, reference_tokenizer, PROMPTS)
    for tokenizer_path in (text_files["tokenizer"], text_files["spiece"]):
        model, tokenizer = load_text_encoder(bare, dtype=torch.float32, tokenizer_path=tokenizer_path)
        assert torch.equal(encode_prompt(model, tokenizer, PROMPTS), expected)
    shutil.copytree(text_files["tokenizer"], bare.parent / "tokenizer")  # found beside the file
    model, tokenizer = load_text_encoder(bare, dtype=torch.float32)
    assert torch.equal(encode_prompt(model, tokenizer, PROMPTS), expected)


def test_text_encoder_float16_keeps_wo_in_float32_in_both_formats(text_files):
    states = [load_text_encoder(p, dtype=torch.float16)[0].state_dict() for p in (text_files["diffusers"], text_files["comfy"])]
    for state in states:
        assert state["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
        assert state["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float16
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_text_encoder_config_from_shapes(text_files):
    model, _ = load_text_encoder(text_files["comfy"], dtype=torch.float32)
    config = model.config
    assert (config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff) == (TEXT_DIM, 2, 4, 8, 64)
    assert config.is_gated_act and config.vocab_size == 64


# ----------------------------------------------------------------------------- audio encoder


def test_audio_encoder_formats_give_identical_outputs(audio_files):
    wave = speech(2.0)
    outputs = []
    for path in (audio_files["diffusers"], audio_files["audio_encoder"], audio_files["comfy"]):
        model = load_audio_encoder(path, dtype=torch.float32)
        assert not model.training
        outputs.append(encode_speech(model, wave))
    assert outputs[0].shape == (25, num_audio_frames(len(wave)), AUDIO_DIM)
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


def test_encode_speech_shape_and_rate(audio_files):
    model = load_audio_encoder(audio_files["comfy"])
    for seconds in (1.0, 3.0):
        hidden = encode_speech(model, speech(seconds))
        assert hidden.shape[0] == 25 and hidden.shape[2] == AUDIO_DIM
        assert abs(hidden.shape[1] - 50 * seconds) <= 1  # 49 at 1 s, 149 at 3 s
        assert hidden.dtype == torch.float32


def test_encode_speech_matches_official_computation(audio_files):
    """Processor normalisation (x - mean) / sqrt(var + 1e-7) in float32 numpy, one forward,
    torch.cat of all hidden states, as wan/modules/s2v/audio_encoder.py does; the last one is
    the encoder's layer-normed output (transformers 4.x's hidden_states[-1], ComfyUI's too)."""
    model = load_audio_encoder(audio_files["diffusers"])
    wave = speech(1.5, seed=1)
    x = wave.numpy().astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    raw = []
    hook = model.wav2vec2.encoder.layers[-1].register_forward_hook(lambda m, i, o: raw.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model.wav2vec2(torch.from_numpy(x)[None], output_hidden_states=True)
    hook.remove()
    expected = torch.cat([*out.hidden_states[:-1], out.last_hidden_state])
    hidden = encode_speech(model, wave)
    assert torch.equal(hidden, expected)
    # the last state is the final LayerNorm of the last layer's output (wav2vec2-large's
    # stable-layer-norm encoder), whichever of the two transformers puts in hidden_states[-1]
    assert model.config.do_stable_layer_norm
    with torch.no_grad():
        torch.testing.assert_close(hidden[-1:], model.wav2vec2.encoder.layer_norm(raw[0]), rtol=1e-5, atol=1e-5)
    # loudness does not matter after the normalisation
    torch.testing.assert_close(encode_speech(model, 3 * wave), hidden, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="16000"):
        encode_speech(model, wave, sampling_rate=44100)


def test_audio_encoder_hf_style_single_file(audio_files, tmp_path):
    """`wav2vec2.` prefix, CTC head and weight_g/weight_v (transformers' checkpoint names) load too."""
    model = load_audio_encoder(audio_files["diffusers"])
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        state[key] = value.contiguous()
    path = tmp_path / "wav2vec2_hf.safetensors"
    save_file(state, str(path))
    loaded = load_audio_encoder(path)
    assert type(loaded).__name__ == "Wav2Vec2ForCTC"
    wave = speech(1.0)
    assert torch.equal(encode_speech(loaded, wave), encode_speech(model, wave))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_audio_encoder_comfyui_names_round_trip(audio_files):
    model = load_audio_encoder(audio_files["comfy"])
    original = load_file(str(audio_files["comfy"]))
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in original
    assert not any(k.startswith(("wav2vec2.", "lm_head.")) for k in original)
    resaved = comfyui_audio_encoder_state_dict(model)
    assert resaved.keys() == original.keys()
    assert all(torch.equal(resaved[k], original[k]) for k in original)


def test_scaled_fp8_scales_weights_not_biases(audio_files, tmp_path):
    """`<layer>.scale_weight` multiplies `<layer>.weight` only; the layer's bias is stored
    unscaled (ComfyUI's scaled-fp8 layout), so it loads unchanged."""
    from trainer.model.single_file import quantize_scaled_fp8

    original = load_file(str(audio_files["comfy"]))
    quantized = quantize_scaled_fp8(original, lambda key, value: key.endswith("attention.q_proj.weight"))
    path = tmp_path / "wav2vec2_fp8_scaled.safetensors"
    save_file(quantized, str(path))
    state = load_audio_encoder(path, dtype=torch.float32).state_dict()
    weights = [k for k in quantized if k.endswith("q_proj.weight")]
    assert weights
    for key in weights:
        scale = quantized[key.replace(".weight", ".scale_weight")]
        assert torch.equal(state[key], quantized[key].float() * scale)
        bias = key.replace(".weight", ".bias")
        assert torch.equal(state[bias], original[bias])


def test_audio_encoder_strict_keys(audio_files, tmp_path):
    missing = rewrite(audio_files["comfy"], tmp_path / "missing.safetensors",
                      lambda t: t.pop("encoder.layers.3.attention.q_proj.bias"))
    with pytest.raises(CheckpointKeyError, match=r"missing.*encoder\.layers\.3\.attention\.q_proj\.bias"):
        load_audio_encoder(missing)
    unexpected = rewrite(audio_files["comfy"], tmp_path / "unexpected.safetensors",
                         lambda t: t.update({"encoder.layers.0.attention.rotary.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointKeyError, match=r"unexpected.*encoder\.layers\.0\.attention\.rotary\.weight"):
        load_audio_encoder(unexpected)
    folder = tmp_path / "audio_encoder"
    shutil.copytree(audio_files["audio_encoder"], folder)
    weights = folder / "model.safetensors"
    rewrite(weights, weights, lambda t: t.update({"wav2vec2.extra": torch.zeros(1)}))
    with pytest.raises(CheckpointKeyError, match="wav2vec2.extra"):
        load_audio_encoder(folder)


def test_audio_encoder_reads_feature_extractor_config(audio_files):
    model = load_audio_encoder(audio_files["diffusers"])
    extractor = model.wan_feature_extractor
    assert extractor.do_normalize and extractor.sampling_rate == 16000


# ----------------------------------------------------------------------------- full-size headers


def meta_header(model: torch.nn.Module, rename=lambda k: k) -> dict:
    """What read_header returns for a file holding `model`'s weights (shapes only)."""
    return {rename(k): (tuple(v.shape), "F16") for k, v in model.state_dict().items()}


def test_full_size_umt5_config_from_shapes():
    from transformers import UMT5Config, UMT5EncoderModel

    from trainer.model.single_file import meta_device_init
    from trainer.model.text_encoder import UMT5_XXL_DEFAULTS, umt5_config_from_header

    with meta_device_init():
        model = UMT5EncoderModel(UMT5Config(**UMT5_XXL_DEFAULTS))
    header = meta_header(model)
    header.pop("encoder.embed_tokens.weight")
    header[SPIECE_KEY] = ((4_548_313,), "U8")
    config = umt5_config_from_header(header)
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff", "relative_attention_num_buckets"):
        assert getattr(config, name) == UMT5_XXL_DEFAULTS[name], name
    assert (config.d_model, config.num_layers, config.num_heads, config.d_ff) == (4096, 24, 64, 10240)
    assert config.is_gated_act and config.dense_act_fn in ("gelu_new", "gelu_pytorch_tanh")


def test_full_size_wav2vec2_config_from_shapes():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from trainer.model.audio_encoder import XLSR53_ENGLISH_CONFIG, wav2vec2_config_from_header
    from trainer.model.single_file import meta_device_init

    with meta_device_init():
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**XLSR53_ENGLISH_CONFIG))
    comfy_names = meta_header(model, lambda k: k.removeprefix("wav2vec2."))
    comfy_names = {k: v for k, v in comfy_names.items() if not k.startswith("lm_head.")}
    for header in (comfy_names, meta_header(model)):
        config = wav2vec2_config_from_header(header)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                     "conv_kernel", "conv_stride", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups"):
            assert getattr(config, name) == getattr(model.config, name), name
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 24, 16)
