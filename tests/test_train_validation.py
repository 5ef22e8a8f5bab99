"""Validation renders during training (tiny model, CPU): the mp4s at the interval and the end,
the LoRA and optimizer unchanged by rendering (also with extra LoRAs in the renders), the model
restored, cancel, config errors, the CLI's JSON line."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_helpers import reference_image, speech, write_png, write_wav

from trainer.lora.io import save_lora
from trainer.media import probe_mp4, read_video_frames
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.paths import OutsideAllowedFoldersError
from trainer.sample import build_tiny_bundle
from trainer.train.adapter import add_lora
from trainer.train.checkpoint import load_checkpoint
from trainer.train.config import TrainConfig, load_config
from trainer.train.loop import train
from trainer.train.state import rng_state
from trainer.train.synthetic import SyntheticTalkingDataset
from trainer.train.validation import rendering_state, validation_extra_loras

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 5  # one sampler chunk of 8 frames (the first chunk drops 3)
TREAD = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("media")
    write_png(folder / "ref.png", reference_image())
    write_wav(folder / "speech.wav", speech(0.5), 16_000)
    return {"reference_image": str(folder / "ref.png"), "audio": str(folder / "speech.wav")}


def _settings(tmp_path, media, **kw) -> dict:
    base = dict(output_dir=str(tmp_path / "run"), max_train_steps=4, lora_rank=4, lora_alpha=4, learning_rate=1e-3,
                checkpoint_step_interval=0, tensorboard=False, validation_step_interval=2,
                validation_resolution=64, validation_num_video_frames=FRAMES, validation_num_inference_steps=1,
                validation_guidance=1.0,
                validation_cases=[{**media, "prompt": "a man talks", "name": "man"}])
    base.update(kw)
    return base


def _model():
    torch.manual_seed(0)
    return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)


@pytest.fixture(scope="module")
def extra_loras(tmp_path_factory) -> list[dict]:
    """A step-distill-like stack for the renders: LoRA pairs on the self-attention the trained
    LoRA also adapts and on the feed-forward it does not (written by `save_lora`), and a file
    of full differences (``.diff``, as some distill releases ship) on a norm and the head."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("extra_loras")
    model, g = _model(), torch.Generator().manual_seed(3)
    state = {}
    for name in ("blocks.0.attn1.to_q", "blocks.1.attn1.to_v", "blocks.0.ffn.net.0.proj", "blocks.2.ffn.net.2"):
        layer = model.get_submodule(name)
        state[f"{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g) * 0.3
        state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g) * 0.3
    pairs = save_lora(state, folder / "distill_pairs.safetensors", alphas={"*": 2.0})
    width = model.config.num_attention_heads * model.config.attention_head_dim
    diffs = folder / "distill_diffs.safetensors"
    save_file({"diffusion_model.blocks.1.norm3.diff": torch.randn(width, generator=g) * 0.2,
               "diffusion_model.head.modulation.diff": torch.randn(1, 2, width, generator=g) * 0.2}, str(diffs))
    return [{"path": str(pairs), "strength": 0.8}, {"path": str(diffs)}]


def _nested_equal(a, b) -> bool:
    """Bit-exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):  # NumPy's RNG state
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_renders_at_interval_and_end_and_leave_the_lora_bit_exact(tmp_path, media, extra_loras, caplog):
    """Dropout, EMA and TREAD on: everything that draws random numbers or changes with the mode.
    The renders take extra LoRAs (pairs and full differences) at 2 Euler steps, guidance 1: the
    trained LoRA, the optimizer state and the model are bit-identical to a run without renders."""
    settings = _settings(tmp_path, media, lora_dropout=0.2, use_ema=True, ema_decay=0.5, tread_config=TREAD,
                         checkpoint_step_interval=4, validation_extra_loras=extra_loras,
                         validation_num_inference_steps=2, validation_scheduler="euler", validation_shift=5.0)
    model = _model()
    seen = []

    def on_validation(step: int, paths: list[Path]) -> None:
        # called after the renders: the model is training again, with its routes, grad on
        seen.append((step, paths, model.training, len(model.token_routes), torch.is_grad_enabled()))

    with caplog.at_level(logging.INFO, logger="trainer.train.loop"):
        result = train(model, SyntheticTalkingDataset(text_len=64), TrainConfig.from_dict(settings),
                       validation_bundle=build_tiny_bundle(seed=0), on_validation=on_validation)
    # each render (steps 2 and 4) applied both extra LoRAs
    assert caplog.text.count("LoRA distill_pairs.safetensors (strength 0.8): applied 4 LoRA pairs") == 2 + 1
    assert caplog.text.count("LoRA distill_diffs.safetensors (strength 1): applied 2 full differences") == 2 + 1
    caplog.clear()
    run = tmp_path / "run"
    assert [s[0] for s in seen] == [2, 4]
    assert [s[1] for s in seen] == [[run / "validation" / "step_2" / "man.mp4"],
                                   [run / "validation" / "step_4" / "man.mp4"]]
    assert seen[0][2:] == (True, 1, True)  # step 2 renders mid-training
    assert [(s, p) for s, p, *_ in seen] == result.validation_history
    for _, paths, *_ in seen:
        info = probe_mp4(paths[0])
        assert info["video_frames"] == FRAMES and (info["width"], info["height"]) == (64, 64) and info["has_audio"]
    assert not [p for p in (run / "validation").rglob("*") if p.name.startswith(".")]  # no temporary leftovers

    # the same run without a bundle: a warning, no renders, the same LoRA bit for bit
    plain_model = _model()
    with caplog.at_level(logging.WARNING, logger="trainer.train.loop"):
        plain = train(plain_model, SyntheticTalkingDataset(text_len=64),
                      TrainConfig.from_dict({**settings, "output_dir": str(tmp_path / "plain")}))
    assert "no validation_bundle" in caplog.text
    assert not (tmp_path / "plain" / "validation").exists() and plain.validation_history == []
    assert result.lora_state.keys() == plain.lora_state.keys()
    assert all(torch.equal(result.lora_state[k], plain.lora_state[k]) for k in plain.lora_state)
    assert result.loss_history == plain.loss_history
    # the optimizer (Adam moments, step counts), scheduler, data order and RNG states of step 4
    assert result.checkpoint.name == plain.checkpoint.name == "checkpoint-4"
    rendered, not_rendered = load_checkpoint(result.checkpoint), load_checkpoint(plain.checkpoint)
    assert rendered["training_state"]["optimizer"]["state"]  # Adam holds moments to compare
    assert _nested_equal(rendered["training_state"], not_rendered["training_state"])
    assert _nested_equal(rendered["ema"], not_rendered["ema"])
    # the model itself: the same modules (no layer left wrapped by the extra LoRAs), the same
    # base weights (the full differences restored, not subtracted), one adapter
    trained, untouched = model.state_dict(), plain_model.state_dict()
    assert list(trained) == list(untouched)
    assert [k for k in trained if not torch.equal(trained[k], untouched[k])] == []
    assert list(model.peft_config) == ["default"]

    # the step-2 render without the extra LoRAs (same LoRA in training, same settings) differs
    bare = train(_model(), SyntheticTalkingDataset(text_len=64), TrainConfig.from_dict(
        {**settings, "output_dir": str(tmp_path / "bare"), "max_train_steps": 2, "validation_extra_loras": []}),
        validation_bundle=build_tiny_bundle(seed=0))
    with_extra = read_video_frames(run / "validation" / "step_2" / "man.mp4", FRAMES)
    without_extra = read_video_frames(bare.validation_history[0][1][0], FRAMES)
    assert with_extra.shape == without_extra.shape
    assert (with_extra - without_extra).abs().max() > 0.05


def test_rendering_state_swaps_the_ema_weights_and_restores_everything():
    model = _model()
    config = TrainConfig.from_dict({"lora_rank": 4, "lora_alpha": 4, "lora_dropout": 0.3})
    params = add_lora(model, config)
    model.train()
    model.set_token_routes(TREAD)
    before = {n: p.detach().clone() for n, p in params.items()}
    ema = {n: torch.randn_like(p) for n, p in params.items()}
    generator = torch.Generator().manual_seed(5)
    rng = rng_state(generator)
    with rendering_state(model, params, ema, TREAD, generator):
        assert not model.training and model.token_routes == [] and not torch.is_grad_enabled()
        assert all(torch.equal(p, ema[n]) for n, p in params.items())
        torch.rand(3), torch.rand(2, generator=generator)  # draws inside do not leak out
    assert model.training and len(model.token_routes) == 1
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in params.items())
    assert torch.equal(generator.get_state(), rng["generator"]) and torch.equal(torch.get_rng_state(), rng["torch"])


def test_should_stop_cancels_a_render_and_stops_training(tmp_path, media):
    steps = []
    result = train(_model(), SyntheticTalkingDataset(text_len=64),
                   TrainConfig.from_dict(_settings(tmp_path, media, max_train_steps=6)),
                   validation_bundle=build_tiny_bundle(seed=0), on_log=lambda record: steps.append(record["step"]),
                   on_validation=lambda step, paths: pytest.fail("a cancelled render reported paths"),
                   should_stop=lambda: steps[-1] >= 2)  # first polled inside the step-2 render
    assert result.stopped and result.global_step == 2 and result.validation_history == []
    assert not list((tmp_path / "run" / "validation").rglob("*.mp4"))
    assert result.checkpoint is not None and result.checkpoint.name == "checkpoint-2"


def test_config_sections_errors_and_sampler_settings(tmp_path, media):
    flat = TrainConfig.from_dict(_settings(tmp_path, media, validation_resolution="830x470", validation_seed=7,
                                           validation_num_video_frames=81))
    nested = TrainConfig.from_dict({"validation": {k: v for k, v in flat.to_flat_dict().items()
                                                   if k.startswith("validation_")}})
    assert nested.validation == flat.validation and flat.validation.enabled
    assert TrainConfig.from_dict(flat.to_flat_dict()) == flat
    sampler, notes = flat.validation.sampler_config(seed=42, numerics="official")
    assert (sampler.width, sampler.height) == (832, 464) and "snapped" in notes[0]
    assert sampler.frames_per_chunk == 84 and sampler.max_chunks == 1 and sampler.seed == 7  # 84 - 3 = 81 frames
    assert flat.validation.cases()[0] == {"image": media["reference_image"], "audio": media["audio"],
                                          "prompt": "a man talks", "name": "man"}
    assert not TrainConfig.from_dict({"validation_step_interval": 10}).validation.enabled  # no cases

    missing = str(tmp_path / "nowhere.wav")
    with pytest.raises(ValueError, match=r"validation_cases\[0\] \('man'\): audio file not found: .*nowhere\.wav"):
        TrainConfig.from_dict(_settings(tmp_path, media, validation_cases=[{**media, "audio": missing, "name": "man"}]))
    with pytest.raises(ValueError, match="'reference_image' is required"):
        TrainConfig.from_dict(_settings(tmp_path, media, validation_cases=[{"audio": media["audio"]}]))
    with pytest.raises(ValueError, match="unknown fields image"):
        TrainConfig.from_dict(_settings(tmp_path, media, validation_cases=[{**media, "image": "x.png"}]))
    with pytest.raises(ValueError, match="validation_resolution"):
        TrainConfig.from_dict(_settings(tmp_path, media, validation_resolution="wide"))
    with pytest.raises(ValueError, match="unknown training settings: validation_fps"):
        TrainConfig.from_dict(_settings(tmp_path, media, validation_fps=16))

    toml = tmp_path / "c.toml"
    toml.write_text(f'validation_step_interval = 5\n[[validation_cases]]\nreference_image = "{media["reference_image"]}"\n'
                    f'audio = "{media["audio"]}"\nprompt = "hi"\nseed = 3\n')
    assert load_config(toml).validation.cases()[0]["seed"] == 3


def test_cli_reports_validation_paths_in_the_json_stream(tmp_path, media):
    config = tmp_path / "train.json"
    config.write_text(json.dumps(_settings(tmp_path, media, max_train_steps=2)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WAN_S2V_TRAIN_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", str(config), "--json-progress"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
              if line.startswith("WAN_S2V_TRAIN ")]
    assert [e["event"] for e in events] == ["step", "step", "validation", "done"]
    expected = tmp_path / "run" / "validation" / "step_2" / "man.mp4"
    assert events[2] == {"event": "validation", "step": 2, "paths": [str(expected)]}
    assert probe_mp4(expected)["video_frames"] == FRAMES


def test_few_step_settings_reach_the_sampler_and_default_to_the_current_renders(tmp_path, media, extra_loras):
    from trainer.sample.config import SCHEDULERS
    from trainer.train.config import VALIDATION_SCHEDULERS

    assert VALIDATION_SCHEDULERS == SCHEDULERS
    default, _ = TrainConfig.from_dict(_settings(tmp_path, media)).validation.sampler_config(seed=0)
    assert (default.scheduler, default.shift) == ("unipc", 0.0)  # 0: 3 at 480p, 5 at 720p, as before
    assert TrainConfig().validation.validation_extra_loras == ()
    config = TrainConfig.from_dict(_settings(tmp_path, media, validation_extra_loras=extra_loras,
                                             validation_num_inference_steps=4, validation_scheduler="euler",
                                             validation_shift=5.0))
    sampler, _ = config.validation.sampler_config(seed=0)
    assert (sampler.steps, sampler.guidance, sampler.scheduler, sampler.shift) == (4, 1.0, "euler", 5.0)
    assert TrainConfig.from_dict(config.to_flat_dict()) == config  # the launch spec's JSON round trip
    assert config.named_paths()["validation_extra_loras[1].path"] == extra_loras[1]["path"]
    specs = config.validation.extra_loras()
    assert [(s.label, s.strength) for s in specs] == [("distill_pairs.safetensors", 0.8),
                                                      ("distill_diffs.safetensors", 1.0)]


def test_extra_lora_and_sampler_errors_name_the_setting(tmp_path, media, extra_loras):
    good = extra_loras[0]["path"]
    bad = {
        r"validation_extra_loras\[0\]: LoRA file not found: .*nowhere\.safetensors":
            [{"path": str(tmp_path / "nowhere.safetensors")}],
        r"validation_extra_loras\[1\]: 'path' \(a LoRA .safetensors file\) is required": [{"path": good}, {}],
        r"validation_extra_loras\[0\]: unknown fields weight \(known: path, strength\)":
            [{"path": good, "weight": 1.0}],
        r"validation_extra_loras\[0\] strength must be a finite number .*, got nan": [{"path": good,
                                                                                      "strength": math.nan}],
        r"validation_extra_loras\[0\] must be a table of path, strength": [good],
    }
    for message, loras in bad.items():
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(_settings(tmp_path, media, validation_extra_loras=loras))
    with pytest.raises(ValueError, match=r"validation_scheduler must be one of \('unipc', 'euler'\), got 'ddim'"):
        TrainConfig.from_dict(_settings(tmp_path, media, validation_scheduler="ddim"))
    with pytest.raises(ValueError, match=r"validation_shift must be a finite number >= 0 .*, got inf"):
        TrainConfig.from_dict(_settings(tmp_path, media, validation_shift=math.inf))
    # confined like every other file of the run
    inside = tmp_path / "inside"
    with pytest.raises(OutsideAllowedFoldersError, match=r"validation_extra_loras\[0\]\.path"):
        TrainConfig.from_dict(_settings(tmp_path, media, allowed_roots=[str(inside), str(Path(media["audio"]).parent)],
                                        output_dir=str(inside / "run"), validation_extra_loras=extra_loras))


def test_an_extra_lora_that_cannot_serve_stops_the_run_before_the_first_step(tmp_path, media):
    """Checked once against the model before training, not at every render."""
    not_lora = tmp_path / "notes.safetensors"
    not_lora.write_bytes(b"not a safetensors file")
    elsewhere = save_lora({"blocks.9.attn1.to_q.lora_A.weight": torch.ones(2, 64),  # the tiny model has 4 blocks
                           "blocks.9.attn1.to_q.lora_B.weight": torch.ones(64, 2)},
                          tmp_path / "other_size.safetensors", alphas={"*": 2.0})
    for loras, message in (([{"path": str(not_lora)}], r"validation_extra_loras\[0\]: .*notes\.safetensors"),
                           ([{"path": str(elsewhere), "strength": 0.5}],
                            r"validation_extra_loras\[0\]: nothing of LoRA other_size\.safetensors fits this model")):
        steps = []
        with pytest.raises(ValueError, match=message):
            train(_model(), SyntheticTalkingDataset(text_len=64),
                  TrainConfig.from_dict(_settings(tmp_path, media, validation_extra_loras=loras)),
                  validation_bundle=build_tiny_bundle(seed=0), on_log=steps.append)
        assert steps == []
    model = _model()
    config = TrainConfig.from_dict(_settings(tmp_path, media, validation_extra_loras=[{"path": str(elsewhere)}]))
    add_lora(model, config)
    with pytest.raises(ValueError, match="blocks.9.attn1.to_q: not in this model"):
        validation_extra_loras(model, config.validation)
