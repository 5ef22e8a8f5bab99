"""Key and config converters (trainer/model/convert.py) on the real 14B key lists and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from trainer.model.convert import (
    DEFAULT_AUDIO_INJECT_LAYERS,
    KeyCollisionError,
    config_from_original,
    config_to_original,
    convert_keys,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_original,
    detect_key_layout,
    diffusers_to_original_key,
    infer_config_from_state_dict,
    normalize_diffusers_key,
    original_to_diffusers_key,
    strip_prefix,
)

SPEC_KEYS = Path("/work/shared/spec/keys")
GOLDEN = Path("/work/shared/golden")

needs_spec = pytest.mark.skipif(not SPEC_KEYS.is_dir(), reason="shared key lists not available")
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason="shared golden files not available")


def _load(name: str) -> dict:
    return json.loads((SPEC_KEYS / name).read_text())


@pytest.fixture(scope="module")
def original_keys() -> dict[str, list[int]]:
    return _load("original_and_comfyui_keys_14B.json")


@pytest.fixture(scope="module")
def layout_a() -> dict[str, list[int]]:
    return _load("diffusers_layoutA_keys_14B.json")


@pytest.fixture(scope="module")
def layout_b() -> dict[str, list[int]]:
    return _load("diffusers_layoutB_keys_14B.json")


@pytest.fixture(scope="module")
def reference_map() -> dict[str, str]:
    return _load("map_original_to_diffusers_layoutA.json")


def _header_shapes(file: Path) -> dict[str, list[int]]:
    with safe_open(str(file), framework="pt") as handle:
        return {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # noqa: SIM118 (not a dict)


# --------------------------------------------------------------------------- 14B key lists


@needs_spec
def test_original_to_diffusers_matches_reference_map(reference_map):
    assert len(reference_map) == 1260
    for original, diffusers in reference_map.items():
        assert original_to_diffusers_key(original) == diffusers


@needs_spec
def test_diffusers_to_original_inverts_reference_map(reference_map):
    for original, diffusers in reference_map.items():
        assert diffusers_to_original_key(diffusers) == original


@needs_spec
def test_every_original_key_round_trips(original_keys, layout_a):
    converted = {original_to_diffusers_key(k): v for k, v in original_keys.items()}
    assert converted == layout_a  # names and shapes: a pure rename
    assert {diffusers_to_original_key(k) for k in converted} == set(original_keys)


@needs_spec
def test_layout_b_is_normalized_to_a(layout_a, layout_b, original_keys):
    assert set(layout_b) != set(layout_a)
    normalized = {normalize_diffusers_key(k): v for k, v in layout_b.items()}
    assert normalized == layout_a
    assert {diffusers_to_original_key(k) for k in layout_b} == set(original_keys)
    # Layout A is a fixed point of the normalisation.
    assert all(normalize_diffusers_key(k) == k for k in layout_a)


@needs_spec
def test_layout_b_renames_exactly_five_tensors(layout_b):
    renamed = [k for k in layout_b if normalize_diffusers_key(k) != k]
    assert len(renamed) == 5
    assert "condition_embedder.causal_audio_encoder.weighted_avg.weights" in renamed


@needs_spec
@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_prefixes_are_stripped(original_keys, layout_a, layout_b, prefix):
    assert {original_to_diffusers_key(prefix + k) for k in original_keys} == set(layout_a)
    assert {normalize_diffusers_key(prefix + k) for k in layout_b} == set(layout_a)
    mapping = convert_keys([prefix + k for k in original_keys], to="diffusers")
    assert set(mapping.values()) == set(layout_a)
    assert strip_prefix(prefix + "head.modulation") == "head.modulation"


@needs_spec
def test_detect_key_layout(original_keys, layout_a, layout_b):
    assert detect_key_layout(original_keys) == "original"
    assert detect_key_layout(layout_a) == "diffusers"
    assert detect_key_layout(layout_b) == "diffusers"
    assert detect_key_layout(["model.diffusion_model." + k for k in original_keys]) == "original"
    assert detect_key_layout(["encoder.conv1.weight"]) == "unknown"


@needs_spec
def test_convert_keys_both_directions(original_keys, layout_a, layout_b):
    to_original = convert_keys(layout_b, to="original")
    assert set(to_original.values()) == set(original_keys)
    assert convert_keys(original_keys, to="original") == {k: k for k in original_keys}
    assert convert_keys(layout_a, to="diffusers") == {k: k for k in layout_a}


def test_state_dict_converters_keep_values():
    sd = {"model.diffusion_model.head.modulation": 1, "model.diffusion_model.blocks.3.self_attn.o.bias": 2}
    assert convert_state_dict_to_diffusers(sd) == {"scale_shift_table": 1, "blocks.3.attn1.to_out.0.bias": 2}
    assert convert_state_dict_to_original(convert_state_dict_to_diffusers(sd)) == {
        "head.modulation": 1,
        "blocks.3.self_attn.o.bias": 2,
    }


def test_collisions_are_errors():
    with pytest.raises(KeyCollisionError, match="scale_shift_table"):
        convert_keys(
            ["head.modulation", "scale_shift_table", "blocks.0.self_attn.q.weight"],
            to="diffusers",
            layout="mixed",
        )


def test_unknown_keys_pass_through():
    assert original_to_diffusers_key("img_emb.proj.0.weight") == "img_emb.proj.0.weight"
    assert (
        diffusers_to_original_key("blocks.0.attn1.to_q.lora_A.weight") == "blocks.0.self_attn.q.lora_A.weight"
    )
    # Whole-component matching: "blocks.1.ffn.0" must not match "blocks.1.ffn.01".
    assert original_to_diffusers_key("blocks.1.ffn.01.weight") == "blocks.1.ffn.01.weight"
    assert original_to_diffusers_key("audio_injector.injector_adain_layers.3.linear.weight") == (
        "audio_injector.injector_adain_layers.3.linear.weight"
    )


# --------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_model_keys() -> list[str]:
    from trainer.model.transformer_s2v import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

    return list(WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).state_dict())


def test_tiny_model_keys_round_trip(tiny_model_keys):
    original = [diffusers_to_original_key(k) for k in tiny_model_keys]
    assert len(set(original)) == len(tiny_model_keys)
    assert detect_key_layout(original) == "original"
    assert [original_to_diffusers_key(k) for k in original] == tiny_model_keys


@needs_golden
def test_tiny_golden_file_names_are_the_tiny_model_names(tiny_model_keys):
    shapes = _header_shapes(GOLDEN / "tiny_f32" / "model.safetensors")
    assert sorted(original_to_diffusers_key(k) for k in shapes) == sorted(tiny_model_keys)


# --------------------------------------------------------------------------- config


@needs_spec
@pytest.mark.parametrize(
    "name",
    [
        "original_and_comfyui_keys_14B.json",
        "diffusers_layoutA_keys_14B.json",
        "diffusers_layoutB_keys_14B.json",
    ],
)
def test_infer_config_14b(name):
    cfg = infer_config_from_state_dict(_load(name))
    assert cfg == {
        "dim": 5120,
        "patch_size": (1, 2, 2),
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "pose_dim": 16,
        "num_layers": 40,
        "ffn_dim": 13824,
        "cross_attn_norm": True,
        "audio_dim": 1024,
        "num_audio_token": 4,
        "num_wav2vec_layers": 25,
        "num_audio_injectors": 12,
        "enable_adain": True,
        "num_attention_heads": 40,
        "attention_head_dim": 128,
        "audio_inject_layers": list(DEFAULT_AUDIO_INJECT_LAYERS),
    }


@needs_spec
def test_infer_config_accepts_pairs_and_partial_files(original_keys):
    pairs = [(k, v) for k, v in original_keys.items() if not k.startswith("audio_injector.")]
    cfg = infer_config_from_state_dict(pairs)
    assert cfg["dim"] == 5120 and cfg["num_layers"] == 40
    assert "num_audio_injectors" not in cfg and "audio_inject_layers" not in cfg


def test_infer_config_heads_guess_needs_multiple_of_128():
    cfg = infer_config_from_state_dict({"patch_embedding.weight": [64, 16, 1, 2, 2]})
    assert cfg["dim"] == 64 and "num_attention_heads" not in cfg


@needs_golden
def test_infer_config_tiny_golden_agrees_with_its_config():
    shapes = _header_shapes(GOLDEN / "tiny_f32" / "model.safetensors")
    inferred = infer_config_from_state_dict(shapes)
    explicit = config_from_original(json.loads((GOLDEN / "tiny_f32" / "config.json").read_text()))
    for key in (
        "ffn_dim",
        "num_layers",
        "in_channels",
        "out_channels",
        "text_dim",
        "audio_dim",
        "num_audio_token",
        "pose_dim",
        "freq_dim",
        "patch_size",
        "cross_attn_norm",
        "enable_adain",
    ):
        assert inferred[key] == explicit[key], key
    assert inferred["num_audio_injectors"] == len(explicit["audio_inject_layers"]) == 2
    assert inferred["dim"] == explicit["num_attention_heads"] * explicit["attention_head_dim"]


@needs_golden
def test_config_from_original_golden_configs():
    full = config_from_original(json.loads((GOLDEN / "config.json").read_text()))
    assert full["num_attention_heads"] == 2 and full["attention_head_dim"] == 128
    assert full["in_channels"] == 16 and full["out_channels"] == 16 and full["pose_dim"] == 16
    assert full["audio_inject_layers"] == list(DEFAULT_AUDIO_INJECT_LAYERS)
    assert full["num_wav2vec_layers"] == 25 and full["patch_size"] == (1, 2, 2)
    assert "qk_norm" not in full and "dim" not in full
    tiny = config_from_original(json.loads((GOLDEN / "tiny_f32" / "config.json").read_text()))
    assert (tiny["num_attention_heads"], tiny["attention_head_dim"]) == (2, 32)


def test_config_from_original_naming_variants():
    assert config_from_original({"dim": 5120}) == {"num_attention_heads": 40, "attention_head_dim": 128}
    ours = {"num_attention_heads": 2, "attention_head_dim": 32, "pose_dim": 16, "numerics": "comfyui"}
    assert config_from_original(ours) == ours
    published = {
        "_class_name": "WanS2VTransformer3DModel",
        "num_weighted_avg_layers": 25,
        "qk_norm": "rms_norm_across_heads",
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    }
    assert config_from_original(published) == {"num_wav2vec_layers": 25}


@pytest.mark.parametrize(
    "bad",
    [
        {"qk_norm": False},
        {"dim": 100, "num_heads": 3},
        {"window_size": [4, 4]},
        {"dim": 256, "num_heads": 2, "attention_head_dim": 64},
    ],
)
def test_config_from_original_rejects_unsupported(bad):
    with pytest.raises(ValueError):
        config_from_original(bad)


def test_config_to_original_round_trip():
    from trainer.model.transformer_s2v import TINY_TRANSFORMER_CONFIG

    original = config_to_original(TINY_TRANSFORMER_CONFIG)
    assert original["dim"] == 64 and original["num_heads"] == 2
    assert config_from_original(original) == {**TINY_TRANSFORMER_CONFIG, "audio_inject_layers": [0, 2]}
    assert config_to_original({"in_channels": 16, "pose_dim": 16, "patch_size": (1, 2, 2)}) == {
        "in_dim": 16,
        "cond_dim": 16,
        "patch_size": [1, 2, 2],
    }
