"""FP8 compute for sampling on the tiny model (CPU, the scaled product emulated in float32):
a converted copy shares everything but the FP8 weights and leaves the given transformer as it
was, renders close to the unconverted model with a LoRA applied and removed, and a device
without FP8 tensor cores is refused before any file is read."""

from __future__ import annotations

import pytest
import torch
from pack_helpers import import_pack
from sample_helpers import SIZE, lora_file, reference_image, speech

from trainer.memory.fp8_compute import Fp8ComputeLinear
from trainer.sample import LoraSpec, SamplerConfig, build_tiny_bundle, sample_s2v
from trainer.sample.bundle import load_model_bundle, with_fp8_compute


def _config() -> SamplerConfig:
    return SamplerConfig(prompt="a man talks", width=SIZE, height=SIZE, frames_per_chunk=8, max_chunks=1,
                         steps=2, guidance=4.5, seed=3)


def _render(bundle, loras=None) -> torch.Tensor:
    return sample_s2v(bundle, reference_image(), speech(1.0), _config(), sample_rate=16_000, loras=loras).frames


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_copy_converts_the_linears_and_shares_every_other_tensor():
    bundle = build_tiny_bundle(seed=0)
    before = _state(bundle.transformer)
    converted = with_fp8_compute(bundle, copy=True, kind="emulated")
    fp8 = {n for n, m in converted.transformer.named_modules() if isinstance(m, Fp8ComputeLinear)}
    assert fp8 and all(n.startswith(("blocks.", "audio_injector.")) for n in fp8)
    assert not any(isinstance(m, Fp8ComputeLinear) for m in bundle.transformer.modules())
    original = dict(bundle.transformer.named_parameters())
    for name, parameter in converted.transformer.named_parameters():
        if name.rpartition(".")[0] not in fp8:
            assert parameter is original[name], name  # shared, not copied
    after = bundle.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_renders_close_to_the_unconverted_model_and_leaves_it_untouched(tmp_path):
    bundle = build_tiny_bundle(seed=0)
    lora = [LoraSpec(lora_file(bundle.transformer, tmp_path / "l.safetensors"), 1.0)]
    reference = _render(bundle, lora)
    plain = _render(bundle)
    converted = with_fp8_compute(bundle, copy=True, kind="emulated")
    frames = _render(converted, lora)
    error = (frames - reference).norm() / reference.norm()
    lora_effect = (reference - plain).norm() / reference.norm()
    assert 0 < error < 0.05, error
    assert error < lora_effect / 2, (error, lora_effect)  # the LoRA still shows through the fp8 base
    assert not any("lora" in n for n, _ in converted.transformer.named_modules())  # removed after the run
    assert torch.equal(_render(bundle, lora), reference)  # the given transformer is as it was


def test_devices_without_fp8_tensor_cores_are_refused_before_reading_files(tmp_path):
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(ValueError, match="FP8 tensor cores.*'cpu'"):
        load_model_bundle(missing, missing, missing, missing, device="cpu", fp8_compute=True)
    pack = import_pack("comfyui_wan_s2v_trainer_fp8s")
    from comfyui_wan_s2v_trainer_fp8s.nodes import sample_nodes as sn

    with pytest.raises(ValueError, match="FP8 tensor cores"):
        sn.WanS2VLoadModelBundle().load("missing.safetensors", "missing.safetensors", "missing.safetensors",
                                        "missing.safetensors", "bfloat16", "official", "cpu", fp8_compute=True)
    assert "fp8_compute" in pack.NODE_CLASS_MAPPINGS["WanS2VLoadModelBundle"].INPUT_TYPES()["optional"]
