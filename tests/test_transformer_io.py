"""Loading, saving and inspecting transformer checkpoints (trainer/model/transformer_io.py, cli_inspect)."""

from __future__ import annotations

import argparse
import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.cli_inspect import add_inspect_parser
from trainer.model.convert import (
    config_to_original,
    convert_state_dict_to_diffusers,
    diffusers_to_original_key,
    infer_config_from_state_dict,
)
from trainer.model.transformer_io import (
    CheckpointError,
    UnreadableCheckpointError,
    compare_with_architecture,
    format_report,
    guess_checkpoint_kind,
    inspect_checkpoint,
    load_transformer,
    resolve_config,
    save_transformer,
)
from trainer.model.transformer_s2v import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

REPO = Path(__file__).resolve().parents[1]
SPEC_KEYS = Path("/work/shared/spec/keys")
GOLDEN = Path("/work/shared/golden")
needs_spec = pytest.mark.skipif(not SPEC_KEYS.is_dir(), reason="shared key lists not available")
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason="shared golden files not available")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_model() -> WanS2VTransformer3DModel:
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    with torch.no_grad():
        for param in model.parameters():  # every tensor distinct, so a swapped name cannot pass
            param.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def tiny_original_sd(tiny_model) -> dict[str, torch.Tensor]:
    return {diffusers_to_original_key(k): v.clone() for k, v in tiny_model.state_dict().items()}


def _tiny_original_config() -> dict:
    return config_to_original(TINY_TRANSFORMER_CONFIG)


def _write_original(path: Path, sd: dict[str, torch.Tensor], with_config: bool = True) -> Path:
    """A ComfyUI-style single file, optionally with a ComfyUI-named config.json beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    if with_config:
        (path.parent / "config.json").write_text(json.dumps(_tiny_original_config()))
    return path


def _assert_same_state_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype, key
        assert torch.equal(value, b[key]), key


def _write_header_only(
    path: Path, tensors: dict[str, tuple[str, list[int]]], metadata: dict | None = None
) -> None:
    """A valid safetensors file whose data is a sparse hole: real headers of any size, no disk use."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)


# --------------------------------------------------------------------------- golden weights


@needs_golden
@pytest.mark.parametrize("folder", [GOLDEN, GOLDEN / "tiny_f32"], ids=["golden", "tiny_f32"])
def test_golden_weights_load_exactly(folder):
    model = load_transformer(folder / "model.safetensors", dtype=torch.float32, config=folder / "config.json")
    expected = convert_state_dict_to_diffusers(load_file(str(folder / "model.safetensors")))
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value.float()), key
    raw = json.loads((folder / "config.json").read_text())
    assert model.config.num_attention_heads == raw["num_heads"]
    assert list(model.config.audio_inject_layers) == raw["audio_inject_layers"]
    assert not model.training


@needs_golden
def test_golden_file_resaved_for_comfyui_is_identical(tmp_path):
    """ComfyUI reads the golden file; our ComfyUI-layout save reproduces it tensor for tensor."""
    model = load_transformer(GOLDEN / "model.safetensors", dtype=torch.bfloat16)
    out = save_transformer(model, tmp_path / "resaved.safetensors", layout="comfyui")
    _assert_same_state_dict(load_file(str(out)), load_file(str(GOLDEN / "model.safetensors")))


@needs_golden
def test_golden_config_beside_the_file_is_used():
    model = load_transformer(GOLDEN / "tiny_f32" / "model.safetensors", dtype=torch.float32)
    assert model.config.attention_head_dim == 32 and list(model.config.audio_inject_layers) == [0, 2]
    report = inspect_checkpoint(GOLDEN / "model.safetensors")
    assert report.complete and report.kind == "s2v" and report.dtypes == {"BF16": 315}


# --------------------------------------------------------------------------- round trips


def test_diffusers_round_trip_is_bit_identical(tiny_model, tmp_path):
    out = save_transformer(tiny_model, tmp_path / "transformer", layout="diffusers")
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_transformer(out, dtype=torch.float32)
    _assert_same_state_dict(loaded.state_dict(), tiny_model.state_dict())
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert public(loaded.config) == public(tiny_model.config)
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]  # no temporary left behind


def test_comfyui_round_trip_is_bit_identical(tiny_model, tiny_original_sd, tmp_path):
    out = save_transformer(tiny_model, tmp_path / "s2v_tiny.safetensors", layout="comfyui")
    on_disk = load_file(str(out))
    _assert_same_state_dict(on_disk, tiny_original_sd)  # original names, no prefix
    # No config.json is written beside it: the config travels in the metadata.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s2v_tiny.safetensors"]
    loaded = load_transformer(out, dtype=torch.float32)
    _assert_same_state_dict(loaded.state_dict(), tiny_model.state_dict())
    assert loaded.config.audio_inject_layers == tiny_model.config.audio_inject_layers


def test_comfyui_file_to_diffusers_and_back(tiny_original_sd, tmp_path):
    src = _write_original(tmp_path / "in" / "model.safetensors", tiny_original_sd)
    model = load_transformer(src, dtype=torch.float32)
    folder = save_transformer(model, tmp_path / "diffusers", layout="diffusers")
    again = save_transformer(
        load_transformer(folder, dtype=torch.float32), tmp_path / "out.safetensors", layout="comfyui"
    )
    _assert_same_state_dict(load_file(str(again)), tiny_original_sd)


def test_sharded_folder_and_pipeline_root(tiny_model, tmp_path):
    folder = save_transformer(tiny_model, tmp_path / "pipe" / "transformer", max_shard_size="200KB")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for path in (folder, tmp_path / "pipe", folder / "diffusion_pytorch_model.safetensors.index.json"):
        loaded = load_transformer(path, dtype=torch.float32)
        _assert_same_state_dict(loaded.state_dict(), tiny_model.state_dict())
    report = inspect_checkpoint(tmp_path / "pipe")
    assert report.format == "diffusers-folder" and len(report.files) > 1 and report.complete


def test_overwrite_existing_outputs(tiny_model, tmp_path):
    for _ in range(2):
        save_transformer(tiny_model, tmp_path / "t", layout="diffusers")
        save_transformer(tiny_model, tmp_path / "t.safetensors", layout="comfyui")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "t.safetensors"]
    (tmp_path / "t" / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        save_transformer(tiny_model, tmp_path / "t", layout="diffusers")
    assert (tmp_path / "t" / "notes.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "t.safetensors"]


def test_save_dtype_and_load_dtype(tiny_model, tmp_path):
    folder = save_transformer(tiny_model, tmp_path / "bf16", dtype=torch.bfloat16)
    single = save_transformer(
        tiny_model, tmp_path / "fp16.safetensors", layout="comfyui", dtype=torch.float16
    )
    assert next(tiny_model.parameters()).dtype == torch.float32  # the model itself is untouched
    reference = tiny_model.state_dict()
    for path, dtype in ((folder, torch.bfloat16), (single, torch.float16)):
        loaded = load_transformer(path, dtype=dtype).state_dict()
        for key, value in reference.items():
            assert loaded[key].dtype == dtype
            assert torch.equal(loaded[key], value.to(dtype)), key
    upcast = load_transformer(single, dtype=torch.float32).state_dict()
    assert all(torch.equal(upcast[k], v.to(torch.float16).float()) for k, v in reference.items())


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_prefixed_single_file(tiny_original_sd, tmp_path, prefix):
    src = _write_original(tmp_path / "m.safetensors", {prefix + k: v for k, v in tiny_original_sd.items()})
    model = load_transformer(src, dtype=torch.float32)
    assert torch.equal(model.proj_out.weight, tiny_original_sd["head.head.weight"])
    assert inspect_checkpoint(src).prefix == prefix


def test_layout_b_single_file(tiny_model, tmp_path):
    renames = {
        "condition_embedder.causal_audio_encoder.weights": "condition_embedder.causal_audio_encoder.weighted_avg.weights",
        "condition_embedder.causal_audio_encoder.encoder.conv2.conv.weight": "condition_embedder.causal_audio_encoder.encoder.conv2.conv.conv.weight",
    }
    sd = {renames.get(k, k): v for k, v in tiny_model.state_dict().items()}
    src = tmp_path / "b.safetensors"
    save_file(sd, str(src))
    model = load_transformer(src, dtype=torch.float32, config=TINY_TRANSFORMER_CONFIG)
    _assert_same_state_dict(model.state_dict(), tiny_model.state_dict())


def test_numerics_argument(tiny_original_sd, tmp_path):
    src = _write_original(tmp_path / "m.safetensors", tiny_original_sd)
    model = load_transformer(src, dtype=torch.float32, numerics="comfyui")
    assert model.numerics == "comfyui" and model.config.numerics == "comfyui"
    assert load_transformer(src, dtype=torch.float32).numerics == "official"


# --------------------------------------------------------------------------- fp8 scaled


def _scaled_fp8(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """ComfyUI-style scaled fp8: 2-D block/injector weights in float8_e4m3fn with per-tensor scales."""
    out, quantized = {}, set()
    for key, value in sd.items():
        if (
            value.ndim == 2
            and key.endswith(".weight")
            and key.startswith(("blocks.", "audio_injector.injector."))
        ):
            scale = value.abs().max().float() / 448.0
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            out[key[: -len("weight")] + "scale_input"] = torch.ones(())
            quantized.add(key)
        else:
            out[key] = value.to(torch.bfloat16)
    out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return out, quantized


def test_fp8_scaled_single_file(tiny_original_sd, tmp_path):
    fp8_sd, quantized = _scaled_fp8(tiny_original_sd)
    src = _write_original(tmp_path / "fp8.safetensors", fp8_sd)
    model = load_transformer(src, dtype=torch.float32)
    loaded = {diffusers_to_original_key(k): v for k, v in model.state_dict().items()}
    assert loaded.keys() == tiny_original_sd.keys()
    for key, reference in tiny_original_sd.items():
        if key in quantized:
            exact = fp8_sd[key].float() * fp8_sd[key[: -len("weight")] + "scale_weight"]
            assert torch.equal(loaded[key], exact), key  # dequantized exactly
            rel = (loaded[key] - reference).norm() / reference.norm()
            assert rel < 0.04, (key, rel)  # e4m3 keeps 3 mantissa bits
        else:
            assert torch.equal(loaded[key], reference.to(torch.bfloat16).float()), key
    bf16 = load_transformer(src, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())

    report = inspect_checkpoint(src)
    assert report.complete and report.fp8_scaled
    assert report.dtypes["F8_E4M3"] == len(quantized)
    assert report.num_tensors == len(tiny_original_sd)
    assert "scaled fp8" in format_report(report)


# --------------------------------------------------------------------------- strictness


def _t2v_sd(original_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    s2v_only = (
        "casual_audio_encoder.",
        "audio_injector.",
        "cond_encoder.",
        "trainable_cond_mask.",
        "frame_packer.",
    )
    return {k: v for k, v in original_sd.items() if not k.startswith(s2v_only)}


def test_t2v_file_is_named_as_such(tiny_original_sd, tmp_path):
    src = _write_original(tmp_path / "t2v.safetensors", _t2v_sd(tiny_original_sd))
    with pytest.raises(CheckpointError, match="T2V") as info:
        load_transformer(src, dtype=torch.float32)
    assert info.value.kind == "wan-t2v"
    report = inspect_checkpoint(src)
    assert report.kind == "wan-t2v" and not report.complete


def test_i2v_file_is_named_as_such(tiny_original_sd, tmp_path):
    sd = {**_t2v_sd(tiny_original_sd), "img_emb.proj.0.weight": torch.zeros(4)}
    src = _write_original(tmp_path / "i2v.safetensors", sd)
    with pytest.raises(CheckpointError, match="I2V"):
        load_transformer(src, dtype=torch.float32)


def test_lora_file_is_named_as_such(tmp_path):
    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4),
    }
    src = _write_original(tmp_path / "lora.safetensors", sd, with_config=False)
    with pytest.raises(CheckpointError, match="LoRA") as info:
        load_transformer(src)
    assert info.value.kind == "lora"
    kohya = {
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0),
    }
    src2 = _write_original(tmp_path / "kohya.safetensors", kohya, with_config=False)
    assert inspect_checkpoint(src2).kind == "lora"


def test_incomplete_s2v_lists_keys(tiny_original_sd, tmp_path):
    sd = dict(tiny_original_sd)
    del sd["blocks.1.cross_attn.k.bias"]
    sd["blocks.1.cross_attn.extra.weight"] = torch.zeros(3)
    src = _write_original(tmp_path / "broken.safetensors", sd)
    with pytest.raises(CheckpointError) as info:
        load_transformer(src, dtype=torch.float32)
    message = str(info.value)
    assert "S2V" in message and "incomplete" in message
    assert "blocks.1.cross_attn.k.bias" in message and "blocks.1.cross_attn.extra.weight" in message
    assert info.value.missing_keys == ["blocks.1.cross_attn.k.bias"]
    assert info.value.unexpected_keys == ["blocks.1.cross_attn.extra.weight"]
    report = inspect_checkpoint(src)
    assert not report.complete and report.kind_label.endswith("(incomplete)")
    assert report.missing_keys == ["blocks.1.cross_attn.k.bias"]


def test_shape_mismatch_and_config_conflicts(tiny_original_sd, tmp_path):
    sd = dict(tiny_original_sd)
    sd["blocks.0.norm3.weight"] = torch.zeros(65)
    src = _write_original(tmp_path / "shape.safetensors", sd)
    with pytest.raises(CheckpointError, match="blocks.0.norm3.weight expected"):
        load_transformer(src, dtype=torch.float32)

    good = _write_original(tmp_path / "good" / "m.safetensors", tiny_original_sd)
    with pytest.raises(CheckpointError, match="ffn_dim"):
        load_transformer(good, config={**_tiny_original_config(), "ffn_dim": 128})
    with pytest.raises(CheckpointError, match="audio_inject_layers"):
        load_transformer(good, config={**_tiny_original_config(), "audio_inject_layers": [0, 1, 2]})
    with pytest.raises(CheckpointError, match="heads"):
        load_transformer(good, config={**_tiny_original_config(), "dim": 96, "num_heads": 3})
    with pytest.raises(CheckpointError, match="cannot be built"):
        load_transformer(good, config={**_tiny_original_config(), "adain_mode": "other"})
    report = inspect_checkpoint(good, config={**_tiny_original_config(), "adain_mode": "other"})
    assert not report.complete and report.config is None


def test_tiny_file_without_config_needs_one(tiny_original_sd, tmp_path):
    src = _write_original(tmp_path / "bare.safetensors", tiny_original_sd, with_config=False)
    with pytest.raises(CheckpointError) as info:
        load_transformer(src)
    assert "num_heads" in str(info.value) and "audio_inject_layers" in str(info.value)
    report = inspect_checkpoint(src)  # the keys themselves are all there
    assert not report.complete and not report.missing_keys and not report.unexpected_keys and report.notes


def test_unreadable_inputs(tiny_original_sd, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    truncated = _write_original(tmp_path / "cut" / "m.safetensors", tiny_original_sd)
    with open(truncated, "r+b") as handle:  # an interrupted download
        handle.truncate(truncated.stat().st_size - 100)
    for path in (tmp_path / "nope.safetensors", garbage, pickle_file, empty_dir, truncated):
        with pytest.raises(UnreadableCheckpointError):
            load_transformer(path)
        with pytest.raises(UnreadableCheckpointError):
            inspect_checkpoint(path)


@pytest.mark.parametrize(
    ("keys", "kind"),
    [
        (["encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight"], "vae"),
        (["encoder.conv_in.weight", "decoder.conv_in.weight", "quant_conv.weight"], "vae"),
        (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "text-encoder"),
        (["token_embedding.weight", "blocks.0.attn.q.weight"], "text-encoder"),
        (
            ["feature_extractor.conv_layers.0.conv.weight", "encoder.layers.0.attention.k_proj.weight"],
            "wav2vec2",
        ),
        (["wav2vec2.encoder.layer_norm.bias"], "wav2vec2"),
        (
            ["head.modulation", "blocks.0.self_attn.q.weight", "vace_blocks.0.before_proj.weight"],
            "wan-variant",
        ),
        (["condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight"], "wan-t2v"),
        (["something.else"], "unknown"),
    ],
)
def test_guess_checkpoint_kind(keys, kind):
    assert guess_checkpoint_kind(keys) == kind


# --------------------------------------------------------------------------- 14B layout, headers only


@needs_spec
@pytest.mark.parametrize("name", ["original_and_comfyui_keys_14B.json", "diffusers_layoutB_keys_14B.json"])
def test_14b_key_lists_match_the_architecture(name):
    shapes = json.loads((SPEC_KEYS / name).read_text())
    inferred = infer_config_from_state_dict(shapes)
    cfg, notes = resolve_config(inferred)
    assert notes == [] and cfg["num_attention_heads"] == 40
    from trainer.model.convert import convert_keys

    mapping = convert_keys(shapes, to="diffusers")
    found = {mapping[k]: v for k, v in shapes.items()}
    assert compare_with_architecture(found, cfg) == ([], [], [])
    found.pop("blocks.7.attn2.norm_k.weight")
    found["blocks.7.attn2.norm_k.bias"] = [5120]
    found["proj_out.weight"] = [32, 5120]
    missing, unexpected, mismatched = compare_with_architecture(found, cfg)
    assert missing == ["blocks.7.attn2.norm_k.weight"] and unexpected == ["blocks.7.attn2.norm_k.bias"]
    assert mismatched == [("proj_out.weight", (64, 5120), (32, 5120))]


def _14b_headers(fp8: bool) -> dict[str, tuple[str, list[int]]]:
    shapes = json.loads((SPEC_KEYS / "original_and_comfyui_keys_14B.json").read_text())
    tensors: dict[str, tuple[str, list[int]]] = {}
    for key, shape in shapes.items():
        if fp8 and len(shape) == 2 and key.startswith("blocks."):
            tensors[key] = ("F8_E4M3", shape)
            tensors[key[: -len("weight")] + "scale_weight"] = ("F32", [])
        else:
            tensors[key] = ("BF16", shape)
    if fp8:
        tensors["scaled_fp8"] = ("F8_E4M3", [2])
    return tensors


@needs_spec
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8_scaled"])
def test_inspect_14b_shaped_file(tmp_path, fp8):
    src = tmp_path / "wan2.2_s2v_14B.safetensors"
    _write_header_only(src, _14b_headers(fp8))
    start = time.perf_counter()
    report = inspect_checkpoint(src)
    assert time.perf_counter() - start < 10
    assert report.complete, format_report(report)
    assert report.parameter_count == 16_295_755_609 and report.num_tensors == 1260
    assert report.fp8_scaled is fp8
    assert report.config["num_attention_heads"] == 40 and report.config["num_layers"] == 40
    text = format_report(report)
    assert "16,295,755,609" in text and "complete S2V checkpoint" in text


@needs_spec
def test_inspect_14b_shaped_file_with_a_key_missing(tmp_path):
    headers = _14b_headers(fp8=False)
    del headers["audio_injector.injector.11.norm_k.weight"]
    src = tmp_path / "cut.safetensors"
    _write_header_only(src, headers)
    report = inspect_checkpoint(src)
    assert not report.complete and report.missing_keys == ["audio_injector.injector.11.norm_k.weight"]


# --------------------------------------------------------------------------- CLI


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_inspect_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["inspect", *argv])
    return args.func(args)


def test_run_inspect_exit_codes(tiny_original_sd, tmp_path, capsys):
    good = _write_original(tmp_path / "good" / "m.safetensors", tiny_original_sd)
    assert _run_cli(str(good)) == 0
    assert "complete S2V checkpoint" in capsys.readouterr().out
    bare = _write_original(tmp_path / "bare" / "m.safetensors", tiny_original_sd, with_config=False)
    assert _run_cli(str(bare)) == 1
    config = tmp_path / "tiny_config.json"
    config.write_text(json.dumps(_tiny_original_config()))
    assert _run_cli(str(bare), "--config", str(config)) == 0
    t2v = _write_original(tmp_path / "t2v" / "m.safetensors", _t2v_sd(tiny_original_sd))
    assert _run_cli(str(t2v)) == 1
    assert "T2V" in capsys.readouterr().out
    assert _run_cli(str(tmp_path / "missing.safetensors")) == 2
    assert "error" in capsys.readouterr().err
    assert _run_cli(str(good), "--json") == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True


def _subprocess_inspect(module_args: list[str], path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *module_args, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_subprocess_exit_codes(tiny_original_sd, tmp_path):
    good = _write_original(tmp_path / "good" / "m.safetensors", tiny_original_sd)
    lora = tmp_path / "lora.safetensors"
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64)}, str(lora))
    commands = [["trainer.cli_inspect"]]
    if (REPO / "trainer" / "__main__.py").is_file():
        commands.append(["trainer", "inspect"])
    for command in commands:
        assert _subprocess_inspect(command, good).returncode == 0
        result = _subprocess_inspect(command, lora)
        assert result.returncode == 1 and "LoRA" in result.stdout
        assert _subprocess_inspect(command, tmp_path / "absent").returncode == 2
