"""fp8 base weights kept as shipped: a ComfyUI scaled-fp8 transformer file loads with
``keep_fp8=True`` into `Fp8Linear` layers that hold the file's e4m3 bytes and scales.

Files are written here the way ComfyUI's ``*_fp8_scaled.safetensors`` are laid out: original
Wan key names, 2-D Linear weights in float8_e4m3fn with a float32 scalar
``<layer>.scale_weight`` (absmax / 448), everything else bf16, and a ``scaled_fp8`` marker.

The loader node always keeps them (the training node's precision decides: fp8 uses them,
no_change and int8-quanto dequantize them); the training CLI and the launcher's processes
keep them when the memory config trains in fp8.

Tolerances: in float32 the kept layers compute w = fp8 * scale exactly as the dequantizing
loader does, so the forward agrees to float32 rounding; under bf16 autocast the scale is
rounded to bf16 in the forward (one extra rounding): within 1% relative L2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_transformer_s2v import inputs

from trainer.memory import MemoryConfig, apply_memory_config
from trainer.memory.quantize import Fp8Linear, keeps_fp8_on_load, quantizable_linears
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel, load_transformer
from trainer.model.convert import diffusers_to_original_key

REPO = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn
#: A block Linear the file leaves in bf16 (fp8 files need not quantize every layer).
BF16_IN_FILE = "blocks.1.ffn.net.2"
TINY_TARGETS = 48  # 4 blocks x 10 + 2 audio injectors x 4


def write_comfyui_fp8(path: Path, config: dict, seed: int = 0, keep_bf16: tuple[str, ...] = ()) -> Path:
    """A scaled-fp8 single file of a random `config` model (written tensor by tensor).

    `keep_bf16`: model module names whose weight stays bf16 in the file."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanS2VTransformer3DModel(**config).state_dict().items()}
    bf16_keys = {diffusers_to_original_key(m + ".weight") for m in keep_bf16}
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        name = diffusers_to_original_key(key)
        value = torch.randn(shape, generator=gen) * 0.05
        if len(shape) == 2 and name.endswith(".weight") and name not in bf16_keys:
            scale = (value.abs().amax() / 448.0).reshape(())
            out[name] = (value / scale).to(FP8)
            out[name.removesuffix("weight") + "scale_weight"] = scale
        else:
            out[name] = value.to(torch.bfloat16)
    out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    metadata = {"format": "pt", "wan_s2v_config": json.dumps(config)}
    save_file(out, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp8") / "wan2.2_s2v_tiny_fp8_scaled.safetensors"
    return write_comfyui_fp8(path, TINY_TRANSFORMER_CONFIG, keep_bf16=(BF16_IN_FILE,))


@pytest.fixture(scope="module")
def file_tensors(fp8_file) -> dict[str, torch.Tensor]:
    return load_file(str(fp8_file))


def fp8_layers(model) -> dict[str, Fp8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


def test_kept_layers_hold_the_files_bytes_and_scales(fp8_file, file_tensors):
    model = load_transformer(fp8_file, dtype=torch.bfloat16, keep_fp8=True)
    upcast = load_transformer(fp8_file, dtype=torch.bfloat16)
    layers = fp8_layers(model)
    targets = {name for name, _ in quantizable_linears(model)}
    assert set(layers) == targets - {BF16_IN_FILE} and len(layers) == TINY_TARGETS - 1
    for name, layer in layers.items():
        key = diffusers_to_original_key(name + ".weight")
        assert layer.weight.dtype == FP8 and not layer.weight.requires_grad
        assert torch.equal(layer.weight.view(torch.uint8), file_tensors[key].view(torch.uint8)), name
        scale = file_tensors[key.removesuffix("weight") + "scale_weight"]
        assert layer.weight_scale.dtype == torch.float32
        assert layer.weight_scale.view(torch.int32).item() == scale.view(torch.int32).item(), name
        bias = file_tensors[diffusers_to_original_key(name + ".bias")]
        assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, bias), name
    # everything else is what the dequantizing loader gives, in the compute dtype
    reference = upcast.state_dict()
    rest = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    assert rest.keys() == {k for k in reference if k.rpartition(".")[0] not in layers}
    for key, value in rest.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, reference[key]), key
    assert type(model.get_submodule(BF16_IN_FILE)) is torch.nn.Linear
    # fp8 weights outside the converted Linears (head, embedders) were dequantized
    assert file_tensors["head.head.weight"].dtype == FP8
    assert model.proj_out.weight.dtype == torch.bfloat16


def test_forward_equals_the_upcast_model(fp8_file):
    x = inputs(seed=1)
    with torch.no_grad():
        kept = load_transformer(fp8_file, dtype=torch.float32, keep_fp8=True)(**x).sample
        upcast = load_transformer(fp8_file, dtype=torch.float32)(**x).sample
    torch.testing.assert_close(kept, upcast)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept = load_transformer(fp8_file, dtype=torch.bfloat16, keep_fp8=True)(**x).sample.float()
        upcast = load_transformer(fp8_file, dtype=torch.bfloat16)(**x).sample.float()
    error = ((kept - upcast).norm() / upcast.norm()).item()
    assert error < 0.01, error


def test_fp8_precision_leaves_kept_layers_untouched(fp8_file):
    model = load_transformer(fp8_file, dtype=torch.bfloat16, keep_fp8=True)
    before = {name: (layer, layer.weight.data_ptr(), layer.weight_scale.clone()) for name, layer in
              fp8_layers(model).items()}
    setup = apply_memory_config(model, MemoryConfig(base_model_precision="fp8"), "cpu")
    assert setup.converted_linears == TINY_TARGETS
    after = fp8_layers(model)
    assert set(after) == set(before) | {BF16_IN_FILE}  # the bf16 layer of the file is quantized now
    for name, (layer, pointer, scale) in before.items():
        assert after[name] is layer and layer.weight.data_ptr() == pointer
        assert torch.equal(layer.weight_scale, scale)
    apply_memory_config(model, MemoryConfig(base_model_precision="fp8"), "cpu")  # idempotent
    assert fp8_layers(model) == after


def test_lora_trains_on_kept_fp8(fp8_file):
    from peft import LoraConfig

    model = load_transformer(fp8_file, dtype=torch.bfloat16, keep_fp8=True)
    apply_memory_config(model, MemoryConfig(base_model_precision="fp8", gradient_checkpointing="full"), "cpu")
    snapshot = {name: layer.weight.view(torch.uint8).clone() for name, layer in fp8_layers(model).items()}
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(3)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    for p in params.values():  # non-zero A and B: every LoRA matrix gets a gradient
        p.data = torch.randn(p.shape, generator=gen) * 0.05
    base_layer = model.blocks[0].attn1.to_q.base_layer
    assert isinstance(base_layer, Fp8Linear)
    model.train()
    x = inputs(seed=2)
    target = torch.randn(x["hidden_states"].shape, generator=gen)
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**x).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 1:
            for name, p in params.items():
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
            assert all(p.grad is None for n, p in model.named_parameters() if n not in params)
        optimizer.step()
    assert losses[1] < losses[0]
    after = {name.replace(".base_layer", ""): layer for name, layer in fp8_layers(model).items()}
    assert after.keys() == snapshot.keys()
    for name, layer in after.items():  # the base stayed frozen, byte for byte
        assert torch.equal(layer.weight.view(torch.uint8), snapshot[name]), name


def test_int8_and_no_change_from_the_fp8_file(fp8_file):
    from optimum.quanto import QLinear

    x = inputs(seed=1)
    upcast = load_transformer(fp8_file, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = upcast(**x).sample.float()
    setup = apply_memory_config(upcast, MemoryConfig(base_model_precision="no_change"), "cpu")
    assert setup.converted_linears == 0 and not fp8_layers(upcast)
    assert all(p.dtype == torch.bfloat16 for p in upcast.parameters())
    # no_change on kept fp8 layers (the loader node keeps them): upcast, exactly as the plain load
    kept = load_transformer(fp8_file, dtype=torch.bfloat16, keep_fp8=True)
    setup = apply_memory_config(kept, MemoryConfig(base_model_precision="no_change"), "cpu")
    assert setup.converted_linears == TINY_TARGETS - 1 and not fp8_layers(kept)
    assert all(type(m) is torch.nn.Linear for _, m in quantizable_linears(kept))
    expected = upcast.state_dict()
    for key, value in kept.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, expected[key]), key

    outputs = []
    for keep in (False, True):  # int8 from the dequantized file, and from kept fp8 layers (auto plan)
        model = load_transformer(fp8_file, dtype=torch.bfloat16, keep_fp8=keep)
        setup = apply_memory_config(model, MemoryConfig(base_model_precision="int8-quanto"), "cpu")
        assert setup.converted_linears == TINY_TARGETS
        assert all(isinstance(m, QLinear) for _, m in quantizable_linears(model)) and not fp8_layers(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(model(**x).sample.float())
    assert torch.equal(outputs[0], outputs[1])  # the same bf16 weights went into quanto
    error = ((outputs[0] - reference).norm() / reference.norm()).item()
    assert error < 0.02, error


def test_keeps_fp8_on_load():
    assert keeps_fp8_on_load(MemoryConfig(base_model_precision="fp8"))
    assert keeps_fp8_on_load({"base_model_precision": "fp8_scaled"})
    assert not keeps_fp8_on_load(MemoryConfig(base_model_precision="int8-quanto"))
    assert not keeps_fp8_on_load(MemoryConfig())
    assert not keeps_fp8_on_load(None)
    # an automatic plan chooses the precision after loading, unless told to keep it
    assert not keeps_fp8_on_load(MemoryConfig(base_model_precision="fp8", auto=True, vram_budget_gib=24))
    assert keeps_fp8_on_load(MemoryConfig(base_model_precision="fp8", auto=True, vram_budget_gib=24,
                                          auto_keep_precision=True))


def test_training_cli_and_launcher_keep_fp8(fp8_file, file_tensors):
    from trainer.train.cli import build_model
    from trainer.train.config import TrainConfig
    from trainer.train.launcher import ModelSource

    key = diffusers_to_original_key("blocks.0.attn1.to_q.weight")
    model = build_model(TrainConfig(model_path=str(fp8_file), memory=MemoryConfig(base_model_precision="fp8")))
    assert len(fp8_layers(model)) == TINY_TARGETS - 1
    assert torch.equal(model.blocks[0].attn1.to_q.weight.view(torch.uint8), file_tensors[key].view(torch.uint8))
    assert not fp8_layers(build_model(TrainConfig(model_path=str(fp8_file))))
    source = ModelSource(str(fp8_file), dtype="bfloat16")
    assert len(fp8_layers(source.load(keep_fp8=True))) == TINY_TARGETS - 1
    assert not fp8_layers(source.load())


# --------------------------------------------------------------------------- peak memory

# dim 512, ffn 4096, 8 blocks: 50 M of the 58 M parameters sit in converted Linears, so the
# file (fp8 there, bf16 elsewhere) is ~62 MB while a bf16 model of it is ~116 MB.
RSS_CONFIG = {"num_attention_heads": 4, "attention_head_dim": 128, "ffn_dim": 4096, "num_layers": 8,
              "text_dim": 512, "audio_dim": 256, "audio_inject_layers": [0, 4]}
# glibc's dynamic mmap threshold would serve these few-MB tensors from the heap and keep freed
# chunks resident; a fixed threshold maps them as the >32 MB tensors of the 14B model always
# are, so resident memory follows what the loader holds.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from trainer.memory.quantize import weight_bytes
    from trainer.model import load_transformer

    def rss_kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    def reset_peak():  # Linux: VmHWM := VmRSS, so the peak that follows is one load's alone
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return rss_kib("VmRSS")

    big, warm_up = sys.argv[1:3]
    load_transformer(warm_up, dtype=torch.bfloat16, keep_fp8=True)  # lazy imports out of the way
    before = reset_peak()
    model = load_transformer(big, dtype=torch.bfloat16, keep_fp8=True)
    kept = rss_kib("VmHWM") - before
    fp8 = sum(1 for m in model.modules() if type(m).__name__ == "Fp8Linear")
    held = weight_bytes(model) / 1024
    del model
    before = reset_peak()
    model = load_transformer(big, dtype=torch.bfloat16)  # the upcast, for contrast
    print(json.dumps({"kept_kib": kept, "upcast_kib": rss_kib("VmHWM") - before, "fp8_layers": fp8,
                      "weights_kib": held}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_loading_an_fp8_file_peaks_at_about_its_size(tmp_path, fp8_file):
    path = write_comfyui_fp8(tmp_path / "wan_s2v_fp8_scaled.safetensors", RSS_CONFIG)
    size_kib = path.stat().st_size / 1024
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(fp8_file)], check=False,
                            cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **MALLOC_ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fp8_layers"] == 8 * 10 + 2 * 4
    # the model is the file's size (+6%: the fp8 embedders and head of the file become bf16)
    assert report["weights_kib"] < 1.1 * size_kib, (report, size_kib)
    # measured: 1.24x (one transient: the dequantized fp8 weights outside the blocks)
    assert report["kept_kib"] < 1.35 * size_kib, (report, size_kib)
    # the dequantizing load of the same file holds a bf16 copy of the fp8 layers: measured 2.06x
    assert report["upcast_kib"] > 1.7 * size_kib, (report, size_kib)


# --------------------------------------------------------------------------- loader node

NODE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    comfy_root, repo, folder, name = sys.argv[1:5]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_root)
    import comfy.options; comfy.options.enable_args_parsing()
    import comfy.cli_args; comfy.cli_args.args.cpu = True
    import folder_paths
    folder_paths.add_model_folder_path("diffusion_models", folder, is_default=True)
    spec = importlib.util.spec_from_file_location("wan_s2v_pack", repo + "/__init__.py",
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    from wan_s2v_pack.nodes import model_nodes
    (model,) = model_nodes.WanS2VLoadTransformer().load(name, "bfloat16", "official")
    kept = sum(1 for x in model.modules() if type(x).__name__ == "Fp8Linear")
    print(json.dumps({"kept": kept, "source": model._wan_s2v_model_source.path}))
    """
)


@pytest.mark.comfyui
def test_loader_node_keeps_fp8(fp8_file):
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI folder_paths to resolve the model file")
    import comfyui_server  # scripts/

    result = subprocess.run(
        [comfyui_server.comfyui_python(comfyui), "-c", NODE_SCRIPT, comfyui, str(REPO), str(fp8_file.parent),
         fp8_file.name],
        check=False, cwd=fp8_file.parent, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"kept": TINY_TARGETS - 1, "source": str(fp8_file)}


def test_sampler_bundle_keeps_fp8_and_samples_with_a_lora(fp8_file, tmp_path):
    """Load Wan S2V Model Bundle's loader keeps an fp8 file in fp8; sampling with a LoRA on
    top runs and the LoRA changes the video."""
    from sample_helpers import lora_file, reference_image, speech

    from trainer.model.tiny import build_tiny_model_set
    from trainer.sample import LoraSpec, SamplerConfig, load_model_bundle, sample_s2v

    parts = build_tiny_model_set(tmp_path / "tiny")
    bundle = load_model_bundle(fp8_file, parts["vae_comfyui"], parts["text_encoder_comfyui"],
                               parts["audio_encoder_comfyui"], dtype=torch.float32)
    assert len(fp8_layers(bundle.transformer)) > 0
    lora = lora_file(bundle.transformer, tmp_path / "lora.safetensors")
    config = SamplerConfig(prompt="a man talks", width=64, height=64, frames_per_chunk=8, max_chunks=1, steps=2,
                           seed=3)
    plain = sample_s2v(bundle, reference_image(), speech(1.0), config, sample_rate=16_000)
    with_lora = sample_s2v(bundle, reference_image(), speech(1.0), config, sample_rate=16_000,
                           loras=[LoraSpec(lora, 1.0)])
    assert torch.isfinite(with_lora.frames).all() and with_lora.frames.shape == plain.frames.shape
    assert (with_lora.frames - plain.frames).abs().max() > 1e-3
    assert len(fp8_layers(bundle.transformer)) > 0  # still fp8 after the LoRA came and went
