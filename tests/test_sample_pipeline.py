"""The S2V sampler on the tiny model (CPU): determinism, LoRA strength, motion carry-over
between chunks, the mp4, cancel, progress and validation renders."""

from __future__ import annotations

import pytest
import torch
from sample_helpers import SIZE, lora_file, reference_image, speech, write_png, write_wav

from trainer.constants import MOTION_FRAMES
from trainer.media import probe_mp4
from trainer.model.vae import encode_video
from trainer.sample import (
    LoraSpec,
    SamplerConfig,
    SamplingCancelled,
    build_tiny_bundle,
    render_validation,
    sample_s2v,
)
from trainer.sample import pipeline as pipeline_module

CHUNK = 8  # frames per chunk: 2 latent frames


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_bundle(seed=0)


@pytest.fixture(scope="module")
def image():
    return reference_image()


def config(**changes) -> SamplerConfig:
    base = {"prompt": "a man talks to the camera", "width": SIZE, "height": SIZE, "frames_per_chunk": CHUNK,
                "max_chunks": 1, "steps": 2, "guidance": 4.5, "seed": 3}
    base.update(changes)
    return SamplerConfig(**base)


def run(bundle, image, cfg, **kwargs):
    return sample_s2v(bundle, image, speech(1.0), cfg, sample_rate=16_000, **kwargs)


@pytest.fixture(scope="module")
def baseline(bundle, image):
    return run(bundle, image, config())


def test_output_shapes_and_audio(baseline):
    assert baseline.frames.shape == (CHUNK - 3, SIZE, SIZE, 3)  # first chunk drops 3 frames (official)
    assert baseline.frames.min() >= 0 and baseline.frames.max() <= 1
    assert baseline.audio.shape == (1, round((CHUNK - 3) / 16 * 16_000))
    comfy = baseline.comfy_audio()
    assert comfy["waveform"].shape == (1, 1, baseline.audio.shape[1]) and comfy["sample_rate"] == 16_000


def test_fixed_seed_is_deterministic(bundle, image, baseline):
    again = run(bundle, image, config())
    assert torch.equal(again.frames, baseline.frames)
    other = run(bundle, image, config(seed=4))
    assert not torch.equal(other.frames, baseline.frames)


def test_sequential_cfg_matches_batched(bundle, image, baseline):
    sequential = run(bundle, image, config(cfg_mode="sequential"))
    torch.testing.assert_close(sequential.frames, baseline.frames, atol=1e-4, rtol=0)


def test_lora_strength_zero_is_no_lora_and_lora_changes_output(bundle, image, baseline, tmp_path):
    path = lora_file(bundle.transformer, tmp_path / "style.safetensors")
    zero = run(bundle, image, config(), loras=[LoraSpec(path, 0.0)])
    assert torch.equal(zero.frames, baseline.frames)
    full = run(bundle, image, config(), loras=[LoraSpec(path, 1.0)])
    assert (full.frames - baseline.frames).abs().max() > 1e-3
    half = run(bundle, image, config(), loras=[LoraSpec(path, 0.5)])
    assert not torch.equal(half.frames, full.frames) and not torch.equal(half.frames, baseline.frames)
    # the adapters are gone afterwards: the model is exactly as before
    assert not getattr(bundle.transformer, "peft_config", {})
    assert torch.equal(run(bundle, image, config()).frames, baseline.frames)


def test_diffusers_format_lora_equals_comfyui_format(bundle, image, tmp_path):
    comfy = lora_file(bundle.transformer, tmp_path / "a.safetensors", fmt="comfyui")
    diffusers = lora_file(bundle.transformer, tmp_path / "b.safetensors", fmt="diffusers")
    a = run(bundle, image, config(steps=1), loras=[LoraSpec(comfy, 0.8)])
    b = run(bundle, image, config(steps=1), loras=[LoraSpec(diffusers, 0.8)])
    assert torch.equal(a.frames, b.frames)


def test_lora_with_full_differences_renders_and_says_what_went_in(bundle, image, baseline, tmp_path):
    """A step-distill style file (a LoRA pair next to full differences) goes through the
    sampler: the output changes, the log says what went in, the model is bit-identical after."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    path = tmp_path / "distill.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 64, generator=g) * 0.2,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 4, generator=g) * 0.2,
               "diffusion_model.blocks.1.norm3.diff": torch.randn(64, generator=g) * 0.2,
               "diffusion_model.head.modulation.diff": torch.randn(1, 2, 64, generator=g) * 0.2}, str(path))
    before = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    messages = []
    out = run(bundle, image, config(), loras=[LoraSpec(path, 1.0)], log=messages.append)
    assert (out.frames - baseline.frames).abs().max() > 1e-3
    expected = ("LoRA distill (strength 1): applied 1 LoRA pair (self-attention 1) and 2 full differences "
                "(block norms and modulation 1, embeddings and head 1); made for Wan 2.1/2.2 T2V")
    assert any(message.startswith(expected) for message in messages), messages
    after = bundle.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_two_chunks_carry_motion_and_mp4(bundle, image, tmp_path, monkeypatch):
    calls = []
    original = pipeline_module.denoise_chunk

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(pipeline_module, "denoise_chunk", recording)
    steps = []
    result = sample_s2v(bundle, image, speech(1.2, rate=44_100, channels=2), config(max_chunks=2), sample_rate=44_100,
                        out_path=tmp_path / "two.mp4", progress=lambda s, t, p: steps.append((s, t, p is not None)))
    assert result.chunk_frames == [CHUNK - 3, CHUNK]
    assert result.frames.shape[0] == 2 * CHUNK - 3
    assert steps == [(i, 4, True) for i in range(1, 5)]

    # chunk 0 has no motion; chunk 1's motion latents are the VAE re-encoding of the last
    # 73 frames (zeros in front of the 5 decoded frames of chunk 0)
    (args0, _, _), (args1, kwargs1, out1) = calls
    assert args0[5] is None and args1[5] is not None
    first = result.frames[: CHUNK - 3].movedim(-1, 0)[None] * 2 - 1
    last = torch.cat([torch.zeros(1, 3, MOTION_FRAMES - first.shape[2], SIZE, SIZE), first], dim=2)
    torch.testing.assert_close(args1[5], encode_video(bundle.vae, last), atol=2e-3, rtol=0)

    # the second chunk depends on the first: other motion latents give other latents
    with torch.no_grad():
        changed = original(*args1[:5], torch.zeros_like(args1[5]), *args1[6:], **kwargs1)
    assert (changed - out1).abs().max() > 1e-3

    info = probe_mp4(result.path)
    assert info["video_frames"] == 2 * CHUNK - 3
    assert info["has_audio"] and info["channels"] == 2 and info["sample_rate"] == 44_100
    assert abs(info["audio_seconds"] - (2 * CHUNK - 3) / 16) <= 1024 / 44_100 + 1e-3


def test_cancel_raises_and_restores_model(bundle, image, tmp_path):
    path = lora_file(bundle.transformer, tmp_path / "l.safetensors")
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(SamplingCancelled, match="step 2/2"):
        run(bundle, image, config(), loras=[LoraSpec(path, 1.0)], should_stop=should_stop)
    assert not getattr(bundle.transformer, "peft_config", {})
    assert not bundle.transformer.training


def test_training_adapter_kept_or_switched_off(image, tmp_path):
    from trainer.lora.io import load_lora

    fresh = build_tiny_bundle(seed=0)
    plain = run(fresh, image, config(steps=1))
    path = lora_file(fresh.transformer, tmp_path / "t.safetensors")
    load_lora(fresh.transformer, path, adapter_name="default")  # as a model in training holds it
    fresh.transformer.train()
    with_adapter = run(fresh, image, config(steps=1), keep_active_adapters=True)
    without = run(fresh, image, config(steps=1), keep_active_adapters=False)
    assert torch.equal(without.frames, plain.frames)
    assert not torch.equal(with_adapter.frames, plain.frames)
    assert fresh.transformer.training and fresh.transformer.active_adapters() == ["default"]


def test_inputs_from_files_and_render_validation(bundle, image, tmp_path):
    write_png(tmp_path / "ref.png", image)
    write_wav(tmp_path / "speech.wav", speech(0.6, rate=22_050, channels=2), 22_050)
    paths = render_validation(
        bundle,
        [{"image": tmp_path / "ref.png", "audio": tmp_path / "speech.wav", "prompt": "a woman sings", "name": "a b"}],
        config(steps=1, guidance=1.0),
        output_dir=tmp_path / "val", step=100,
    )
    assert [p.name for p in paths] == ["a_b_step000100.mp4"]
    info = probe_mp4(paths[0])
    assert info["video_frames"] == CHUNK - 3 and info["has_audio"]


def test_pose_video_changes_output(bundle, image, baseline):
    pose = torch.rand(CHUNK, 48, 48, 3)
    posed = run(bundle, image, config(), pose_video=pose)
    assert posed.frames.shape == baseline.frames.shape
    assert not torch.equal(posed.frames, baseline.frames)
