"""Nothing outside the allowed folders is read or written, and NaN / inf settings are refused
naming the input: `trainer.paths.confine`, the dataset scan (links to files elsewhere
skipped, the manifest clean), the cache, demo media, run folders (checkpoints, logs), the
video folders, model files in ComfyUI, and every numeric input of the nodes and configs.
Real folders with real symlinks; the nodes run as without ComfyUI (the adapter's fallbacks)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pack_helpers import import_pack

from trainer.data import CacheStore, DatasetConfig, scan_folder
from trainer.data import synthetic as S
from trainer.media import probe_video
from trainer.paths import OutsideAllowedFoldersError, confine, is_inside, resolve_roots
from trainer.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

PACK = "comfyui_wan_s2v_trainer_paths"
REPO = Path(__file__).resolve().parents[1]
NAN = float("nan")


def _pack(module: str):
    if PACK not in sys.modules:
        import_pack(PACK)
    return importlib.import_module(f"{PACK}.nodes.{module}")


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry below `folder`: file bytes, or where a link points."""
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """ComfyUI's folders as the adapter sees them without ComfyUI, and a folder outside them."""
    found = {name: tmp_path / name for name in ("input", "output", "models", "loras", "outside")}
    for folder in found.values():
        folder.mkdir()
    monkeypatch.setenv("WAN_S2V_INPUT_DIR", str(found["input"]))
    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(found["output"]))
    monkeypatch.setenv("WAN_S2V_MODELS_DIR", str(found["models"]))
    monkeypatch.setenv("WAN_S2V_LORAS_DIR", str(found["loras"]))
    monkeypatch.delenv("WAN_S2V_TRAINER_ROOTS", raising=False)
    return found


# --------------------------------------------------------------------------- the helper


def test_confine_follows_links_and_refuses_what_resolves_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "inside.txt").write_text("inside")
    (root / "link_in.txt").symlink_to(root / "inside.txt")
    (root / "link_out.txt").symlink_to(outside / "secret.txt")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)

    assert confine(root / "link_in.txt", [root]) == (root / "inside.txt").resolve()  # a link inside is fine
    assert confine("sub/new.txt", [root], base=root) == (root / "sub" / "new.txt").resolve()  # need not exist
    assert is_inside(root / "link_in.txt", [root]) and not is_inside(root / "link_out.txt", [root])
    for bad in (root / "link_out.txt", root / "dir_out" / "new.txt", "../outside/secret.txt", outside):
        with pytest.raises(OutsideAllowedFoldersError) as error:
            confine(bad, [root], base=root, what="LoRA file")
        message = str(error.value)
        assert message.startswith(f"LoRA file '{bad}'") and f"outside the allowed folders ({root.resolve()})" in message
    assert "resolves to " + str((outside / "secret.txt").resolve()) in str(
        pytest.raises(OutsideAllowedFoldersError, confine, root / "link_out.txt", [root]).value)
    with pytest.raises(OutsideAllowedFoldersError, match="none configured"):
        confine(root / "inside.txt", [])
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="dataset folder is empty"):
            confine(empty, [root], what="dataset folder")
    assert resolve_roots([root / "sub", root, "", None, root]) == (root.resolve(),)  # nested and empty dropped


# --------------------------------------------------------------------------- dataset


DATASET_ARGS = dict(caption_strategy="textfile", instance_prompt="", num_frames=9, window_stride=0,
                    max_windows_per_video=0, resolution=56, resolution_type="pixel_area", crop=True,
                    allow_zero_audio=False)


def _dataset_node():
    module = _pack("dataset_nodes")
    return module, dict(vae=module.TINY, text_encoder=module.TINY, audio_encoder=module.TINY, **DATASET_ARGS)


def test_dataset_node_refuses_an_empty_folder_instead_of_the_working_directory(dirs, tmp_path, monkeypatch):
    S.write_video(tmp_path / "cwd" / "not_a_dataset.mp4", fps=25, duration=1.0)
    (tmp_path / "cwd" / "not_a_dataset.txt").write_text("a person talks")
    monkeypatch.chdir(tmp_path / "cwd")
    module, args = _dataset_node()
    with pytest.raises(ValueError, match="dataset folder is empty"):
        module.WanS2VDataset().build("", recursive=True, **args)
    assert not (dirs["output"] / "wan_s2v_cache").exists()
    with pytest.raises(ValueError, match="folder is empty"):  # the engine as well (CLI, library)
        scan_folder(DatasetConfig(folder="", recursive=True))


def test_dataset_node_skips_links_outside_and_records_only_confined_paths(dirs):
    talk, outside = dirs["input"] / "talk", dirs["outside"]
    S.write_video(talk / "real.mp4", fps=25, duration=0.7)
    (talk / "real.txt").write_text("a person talks")
    S.write_video(dirs["input"] / "other" / "kept.mp4", fps=25, duration=0.7)  # elsewhere in input/: allowed
    (talk / "inner.mp4").symlink_to(dirs["input"] / "other" / "kept.mp4")
    (talk / "inner.txt").write_text("a person speaks")
    S.write_video(outside / "stolen.mp4", fps=25, duration=0.7)
    (talk / "link.mp4").symlink_to(outside / "stolen.mp4")
    (talk / "link.txt").write_text("a person whispers")
    S.write_video(talk / "capt.mp4", fps=25, duration=0.7)
    (outside / "secret.txt").write_text("the server's secret")
    (talk / "capt.txt").symlink_to(outside / "secret.txt")
    before = tree(outside)

    module, args = _dataset_node()
    dataset, report, _ = module.WanS2VDataset().build("talk", recursive=True, **args)

    sources = {Path(dataset[i]["source"]) for i in range(len(dataset))}
    assert sources == {(talk / "real.mp4").resolve(), (dirs["input"] / "other" / "kept.mp4").resolve()}
    assert {dataset[i]["caption"] for i in range(len(dataset))} == {"a person talks", "a person speaks"}
    assert f"link.mp4: video link.mp4 resolves to {(outside / 'stolen.mp4').resolve()}, outside the allowed " \
           "folders" in report
    assert f"capt.mp4: caption file capt.txt resolves to {(outside / 'secret.txt').resolve()}" in report
    (manifest,) = (dirs["output"] / "wan_s2v_cache").glob("*/manifest.json")
    recorded = json.loads(manifest.read_text())["hashes"]
    assert recorded and all(is_inside(path, [dirs["input"]]) for path in recorded)
    assert str(outside.resolve()) not in manifest.read_text()
    assert tree(outside) == before


def test_scan_on_the_command_line_allows_only_the_folders_it_was_given(tmp_path):
    """Without allowed_roots (CLI, library) the roots are the configured folders themselves:
    a sidecar audio file or reference image linking elsewhere skips its clip."""
    videos, voices, outside = tmp_path / "videos", tmp_path / "voices", tmp_path / "outside"
    for stem in ("a", "b"):
        S.write_video(videos / f"{stem}.mp4", fps=25, duration=0.7, audio=False)
        (videos / f"{stem}.txt").write_text(f"{stem} talks")
    S.write_audio(voices / "a.wav", duration=1.0)
    S.write_audio(outside / "b.wav", duration=1.0)
    (voices / "b.wav").symlink_to(outside / "b.wav")
    config = DatasetConfig(folder=str(videos), audio_source="folder", audio_folder=str(voices), num_frames=9,
                           resolution=56)
    assert config.roots() == (videos.resolve(), voices.resolve())
    scan = scan_folder(config)
    assert [c.video.name for c in scan.clips] == ["a.mp4"] and scan.clips[0].audio == (voices / "a.wav").resolve()
    assert [(s.path.name, s.reason.split(",")[0]) for s in scan.skips] == [
        ("b.mp4", f"audio file b.wav resolves to {(outside / 'b.wav').resolve()}")]
    # the same link is fine when its target lies inside an allowed root
    scan = scan_folder(DatasetConfig(**{**config.to_dict(), "allowed_roots": [str(tmp_path)]}))
    assert [c.video.name for c in scan.clips] == ["a.mp4", "b.mp4"]


def test_cache_reads_and_writes_only_inside_its_folder(tmp_path):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    store = CacheStore(cache)
    store.put("latents-a", {"x": torch.ones(2)})
    store.flush()
    manifest = json.loads((cache / "manifest.json").read_text())
    # a manifest entry that leads out of the cache is dropped, not read
    (outside / "x.safetensors").write_bytes((cache / "latents" / "latents-a.safetensors").read_bytes())
    manifest["entries"]["latents-b"] = {**manifest["entries"]["latents-a"], "file": "../outside/x.safetensors"}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    reopened = CacheStore(cache)
    assert reopened.has("latents-a") and not reopened.has("latents-b")
    assert "dropped incomplete shard ../outside/x.safetensors" in reopened.repaired
    # a kind folder that links elsewhere is refused, nothing is written through it
    (cache / "text").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideAllowedFoldersError, match="cache file"):
        reopened.put("text-a", {"y": torch.zeros(1)})
    assert sorted(p.name for p in outside.iterdir()) == ["x.safetensors"]


# --------------------------------------------------------------------------- demo media


def test_demo_media_replaces_links_and_rewrites_nothing_that_is_right(dirs):
    module = _pack("dataset_nodes")
    folder, outside = dirs["input"] / module.DEMO_MEDIA_FOLDER, dirs["outside"]
    folder.mkdir()
    (outside / "victim.txt").write_text("keep me")
    S.write_video(outside / "victim.mp4", fps=25, duration=0.5)
    (folder / "demo_talk_0.txt").symlink_to(outside / "victim.txt")
    (folder / "demo_talk_1.mp4").symlink_to(outside / "victim.mp4")
    before = tree(outside)

    assert module._demo_media(dirs["input"]) == str(folder.resolve())
    assert tree(outside) == before  # nothing written through the links
    assert not any(p.is_symlink() for p in folder.iterdir())
    assert (folder / "demo_talk_0.txt").read_text() == "a person talks calmly"
    assert probe_video(folder / "demo_talk_1.mp4").duration == pytest.approx(2.0, abs=0.1)  # the demo clip
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    module._demo_media(dirs["input"])
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == written

    # the demo folder itself linking elsewhere is refused through the node
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    folder.symlink_to(outside, target_is_directory=True)
    _, args = _dataset_node()
    with pytest.raises(PermissionError, match="demo media folder .* outside the allowed folders"):
        module.WanS2VDataset().build(module.DEMO_MEDIA, **args)
    assert tree(outside) == before


# --------------------------------------------------------------------------- run folders


def _train(output_name: str, **changes):
    from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
    from trainer.train.synthetic import SyntheticTalkingDataset

    nodes = _pack("train_nodes")
    node = nodes.WanS2VTrainLora()
    settings = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
                if k not in ("transformer", "dataset", "output_name", "save_to", "resume_from_checkpoint")}
    settings.update(max_train_steps=2, checkpoint_step_interval=1, checkpoints_total_limit=1, mixed_precision="no",
                    gradient_checkpointing=False, **changes)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        return node.train(model, SyntheticTalkingDataset(text_len=64), output_name, save_to="output",
                          resume_from_checkpoint="latest", **settings)


def test_run_folders_that_link_elsewhere_are_never_written_through(dirs):
    base, outside = dirs["output"] / "wan_s2v_training", dirs["outside"]
    for step in (1, 2, 3):
        (outside / "ckpts" / f"checkpoint-{step}").mkdir(parents=True)
        (outside / "ckpts" / f"checkpoint-{step}" / "state.json").write_text(json.dumps({"step": step}))
    (outside / "logs").mkdir()
    (outside / "logs" / "train_log.jsonl").write_text("precious\n")
    (outside / "empty").mkdir()
    before = tree(outside)

    # Links to folders with content look like another run: the run goes to a fresh folder.
    for name, link, target in (("a", "checkpoints", "ckpts"), ("b", "logs", "logs")):
        (base / name).mkdir(parents=True)
        (base / name / link).symlink_to(outside / target, target_is_directory=True)
        _train(name)
        assert (base / f"{name}_2" / "run.json").is_file() and tree(outside) == before

    # A link to an empty folder too: it is never listed, so whatever it holds, it is not this run's.
    (base / "c").mkdir()
    (base / "c" / "checkpoints").symlink_to(outside / "empty", target_is_directory=True)
    _train("c")
    assert (base / "c_2" / "run.json").is_file() and tree(outside) == before
    (base / "d").symlink_to(outside / "empty", target_is_directory=True)  # the run folder itself
    with pytest.raises(PermissionError, match="is outside the allowed folders"):
        _train("d")
    assert tree(outside) == before


def test_checkpoints_behind_links_are_never_read(dirs):
    """A complete checkpoint that fits this run, reached through a link that leads outside (the
    checkpoints folder, a numbered run folder, the files of a checkpoint folder, run.json):
    resume "latest" opens nothing behind the link and trains afresh in a free folder."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from comfyui_probe import untouched  # inotify: fails on any open, listing or change
    finally:
        sys.path.pop(0)
    base, outside = dirs["output"] / "wan_s2v_training", dirs["outside"]
    _train("src")
    os.rename(base / "src", outside / "src")
    src = outside / "src"
    (base / "a").mkdir()
    (base / "a" / "checkpoints").symlink_to(src / "checkpoints", target_is_directory=True)
    (base / "b_2").symlink_to(src, target_is_directory=True)  # its run.json names "src", as "b"'s would
    (base / "c" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    for file in (src / "checkpoints" / "checkpoint-2").iterdir():
        (base / "c" / "checkpoints" / "checkpoint-2" / file.name).symlink_to(file)
    (base / "c" / "run.json").symlink_to(src / "run.json")
    (base / "src_2").symlink_to(src, target_is_directory=True)

    with untouched(outside):
        trained = {name: Path(_train(name)[1]).parent.name for name in ("a", "b", "c", "src")}
    assert trained == {"a": "a_2", "b": "b", "c": "c_2", "src": "src"}
    for folder in trained.values():
        assert json.loads((base / folder / "run.json").read_text())["resumed_from"] is None


def test_checkpoint_links_are_never_listed_resumed_or_deleted(tmp_path):
    root, outside = tmp_path / "run" / "checkpoints", tmp_path / "outside"
    root.mkdir(parents=True)
    (outside / "checkpoint-9").mkdir(parents=True)
    (outside / "checkpoint-9" / "state.json").write_text(json.dumps({"step": 9}))
    (root / "checkpoint-9").symlink_to(outside / "checkpoint-9", target_is_directory=True)
    (root / ".checkpoint-4.tmp-0123abcd").symlink_to(outside / "checkpoint-9", target_is_directory=True)
    before = tree(outside)
    for step in (5, 6):
        save_checkpoint(root, step, {"w": torch.full((2,), float(step))}, {}, {}, total_limit=1)
    assert [step for step, _ in list_checkpoints(root)] == [6] and latest_checkpoint(root) == root / "checkpoint-6"
    assert (root / "checkpoint-9").is_symlink() and tree(outside) == before


def test_video_folders_that_link_elsewhere_are_refused(dirs):
    module = _pack("sample_nodes")
    (dirs["output"] / "wan_s2v_videos").symlink_to(dirs["outside"], target_is_directory=True)
    with pytest.raises(PermissionError, match="video folder"):
        module.WanS2VSaveVideo().save(torch.zeros(2, 16, 16, 3), "clip", 16)
    assert list(dirs["outside"].iterdir()) == []


# --------------------------------------------------------------------------- model files in ComfyUI

MODEL_FILE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    comfy_root, repo, tmp = sys.argv[1:4]
    sys.path.insert(0, comfy_root)
    import folder_paths
    for kind in ("input", "output", "temp"):
        getattr(folder_paths, f"set_{kind}_directory")(f"{tmp}/{kind}")
    folder_paths.add_model_folder_path("loras", f"{tmp}/loras", is_default=True)
    spec = importlib.util.spec_from_file_location("wan_s2v_pack", repo + "/__init__.py",
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    from wan_s2v_pack.nodes import comfy_adapter
    report = {"roots": [str(p) for p in comfy_adapter.allowed_roots()],
              "inside": str(comfy_adapter.model_file_path("loras", "inside.safetensors"))}
    try:
        comfy_adapter.model_file_path("loras", "link_out.safetensors")
    except PermissionError as error:
        report["refused"] = str(error)
    folder_paths.add_model_folder_path("loras", f"{tmp}/outside")  # extra_model_paths.yaml does this
    report["allowed"] = str(comfy_adapter.model_file_path("loras", "link_out.safetensors"))
    print(json.dumps(report))
    """
)


@pytest.mark.comfyui
def test_model_files_chosen_in_comfyui_resolve_inside_its_folders(tmp_path):
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI folder_paths to resolve model files with")
    for name in ("input", "output", "temp", "loras", "outside"):
        (tmp_path / name).mkdir()
    (tmp_path / "loras" / "inside.safetensors").write_bytes(b"{}")
    (tmp_path / "outside" / "stolen.safetensors").write_bytes(b"{}")
    (tmp_path / "loras" / "link_out.safetensors").symlink_to(tmp_path / "outside" / "stolen.safetensors")
    result = subprocess.run([sys.executable, "-c", MODEL_FILE_SCRIPT, comfyui, str(REPO), str(tmp_path)],
                            capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    roots = set(report["roots"])
    assert {str(tmp_path / n) for n in ("input", "output", "temp", "loras")} <= roots
    assert str(Path(comfyui).resolve() / "models") in roots and str(tmp_path / "outside") not in roots
    assert report["inside"] == str(tmp_path / "loras" / "inside.safetensors")
    assert f"resolves to {tmp_path / 'outside' / 'stolen.safetensors'}" in report["refused"]
    assert "extra_model_paths.yaml" in report["refused"]
    assert report["allowed"] == str(tmp_path / "outside" / "stolen.safetensors")


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
def test_nan_and_inf_inputs_of_the_nodes_are_refused_naming_the_input(dirs, bad):
    train_nodes, sample_nodes, train_runner = _pack("train_nodes"), _pack("sample_nodes"), _pack("train_runner")
    dataset_module, dataset_args = _dataset_node()
    (dirs["input"] / "talk").mkdir()
    calls = {
        "resolution": lambda: dataset_module.WanS2VDataset().build("talk", **{**dataset_args, "resolution": bad}),
        "minimum_image_size": lambda: dataset_module.WanS2VDataset().build("talk", minimum_image_size=bad,
                                                                           **dataset_args),
        "lora_alpha": lambda: train_nodes.WanS2VLoraSettings().build(4, bad, 0.0, "to_q"),
        "lora_dropout": lambda: train_nodes.WanS2VLoraSettings().build(4, 4.0, bad, "to_q"),
        "learning_rate": lambda: train_nodes.WanS2VOptimizerSettings().build("adamw", bad, 0.0, "norm", 1.0, 1.0),
        "weight_decay": lambda: train_nodes.WanS2VOptimizerSettings().build("adamw", 1e-4, bad, "norm", 1.0, 1.0),
        "max_grad_norm": lambda: train_nodes.WanS2VOptimizerSettings().build("adamw", 1e-4, 0.0, "norm", bad, 1.0),
        "max_grad_value": lambda: train_nodes.WanS2VOptimizerSettings().build("adamw", 1e-4, 0.0, "value", 1.0, bad),
        "lr_num_cycles": lambda: train_nodes.WanS2VScheduleSettings().build("cosine", 0, bad, 1.0),
        "lr_power": lambda: train_nodes.WanS2VScheduleSettings().build("polynomial", 0, 0.5, bad),
        "selection_ratio": lambda: train_nodes.WanS2VTreadSettings().build(bad, 2, -2),
        "crepa_lambda": lambda: train_nodes.WanS2VCrepaSettings().build(bad, 8, 1, 1.0, 0, 0, train_nodes.TINY_TEACHER,
                                                                        ""),
        "crepa_adjacent_tau": lambda: train_nodes.WanS2VCrepaSettings().build(0.5, 8, 1, bad, 0, 0,
                                                                              train_nodes.TINY_TEACHER, ""),
        "vram_budget_gib": lambda: train_nodes.WanS2VMemorySettings().build(
            "full", base_model_precision="no_change", device="cpu", offload="none", checkpoint_interval=1,
            attention_blocks=-1, offload_activations=False, enable_chunked_feed_forward=False,
            feed_forward_chunk_size=0, auto=True, vram_budget_gib=bad),
        "validation_guidance": lambda: train_nodes.WanS2VValidationSettings().build(
            torch.zeros(1, 16, 16, 3), {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}, "p", "", 10, 2,
            bad, 64, 64, 9, 0),
        "validation_shift": lambda: train_nodes.WanS2VValidationSettings().build(
            torch.zeros(1, 16, 16, 3), {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}, "p", "", 10, 4,
            1.0, 64, 64, 9, 0, scheduler="euler", shift=bad),
        "shift": lambda: sample_nodes.WanS2VSampler().sample(None, None, None, "p", "", 64, 64, 8, 1, 2, 4.5, bad, 0,
                                                              "unipc", "batch"),
        "guidance": lambda: sample_nodes.WanS2VSampler().sample(None, None, None, "p", "", 64, 64, 8, 1, 2, bad, 0.0,
                                                                 0, "unipc", "batch"),
        "strength": lambda: sample_nodes.WanS2VApplyLoRA().apply(train_runner.TrainedLora({}, {}, None, 0), bad),
        "strength of LoRA 'style.safetensors'": lambda: sample_nodes.WanS2VLoadLoRA().load("style.safetensors", bad),
    }
    node = train_nodes.WanS2VTrainLora()
    defaults = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
                if k not in ("transformer", "dataset", "output_name", "save_to", "resume_from_checkpoint")}
    for name in ("flow_schedule_shift", "caption_dropout_probability", "audio_dropout_probability",
                 "motion_context_probability", "ema_decay"):
        calls[name] = lambda name=name: node.train(None, None, "nan_run", **{**defaults, name: bad})
    shown = {NAN: "nan", math.inf: "inf", -math.inf: "-inf"}[bad]
    for name, call in calls.items():
        with pytest.raises(ValueError) as error:
            call()
        assert f"{name} " in str(error.value) and str(error.value).endswith(f"got {shown}"), (name, error.value)
        assert "must be a finite number" in str(error.value) or name == "selection_ratio", (name, error.value)
    assert not (dirs["output"] / "wan_s2v_training" / "nan_run").exists()


def test_config_numbers_from_files_are_checked(tmp_path):
    """JSON and TOML parse NaN and inf: the CLI's configs refuse them naming the setting."""
    from trainer.memory.config import MemoryConfig, MemoryConfigError
    from trainer.sample.config import SamplerConfig, SamplerConfigError
    from trainer.sample.lora import LoraSpec
    from trainer.train.config import load_config

    path = tmp_path / "run.json"
    for key in ("lora_alpha", "max_grad_norm", "lr_power", "flow_logit_std", "crepa_adjacent_tau",
                "validation_guidance", "validation_shift", "adam_beta2", "lr_end"):
        path.write_text(json.dumps({key: NAN}))
        with pytest.raises(ValueError, match=rf"^{key} must be a finite number .*, got nan$"):
            load_config(path)
    path.write_text(json.dumps({"max_train_steps": 10.5}))
    with pytest.raises(ValueError, match="max_train_steps must be an integer >= 1, got 10.5"):
        load_config(path)
    with pytest.raises(SamplerConfigError, match="shift must be a finite number >= 0 .*, got nan"):
        SamplerConfig(shift=NAN).validate()
    with pytest.raises(SamplerConfigError, match="strength of LoRA 'style' must be a finite number, got nan"):
        LoraSpec("loras/style.safetensors", NAN)
    with pytest.raises(MemoryConfigError, match="vram_budget_gib must be a finite number > 0"):
        MemoryConfig(auto=True, vram_budget_gib=math.inf).validate()
    assert LoraSpec("x.safetensors", -0.5).strength == -0.5  # negative strengths stay allowed


def test_train_config_keeps_named_paths_inside_its_allowed_roots(tmp_path):
    from trainer.train.config import TrainConfig

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    config = TrainConfig.from_dict({"output_dir": str(root / "run"), "dataset": str(root / "data"),
                                    "allowed_roots": [str(root)]})
    assert config.roots() == (root.resolve(),)
    (root / "data_link").symlink_to(outside, target_is_directory=True)
    for key, value in (("output_dir", str(outside / "run")), ("dataset", str(root / "data_link")),
                       ("vae_path", str(outside / "vae.safetensors"))):
        with pytest.raises(OutsideAllowedFoldersError, match=f"^{key} '"):
            TrainConfig.from_dict({"output_dir": str(root / "run"), "allowed_roots": [str(root)], key: value})
    # without allowed_roots (the CLI) the roots are what the config names, output_dir's parent
    # for output_dir (a run may write to `run_2` beside it)
    cli = TrainConfig.from_dict({"output_dir": str(root / "runs" / "run"), "dataset": str(root / "data_link"),
                                 "model_path": "tiny", "vae_path": "tiny"})
    assert cli.roots() == ((root / "runs").resolve(), outside.resolve())
