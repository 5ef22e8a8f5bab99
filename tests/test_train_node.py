"""The training node's work without ComfyUI: runs under inference mode as ComfyUI's executor
does, confines paths, writes the LoRA into the loras folder, outputs a LOSS_MAP; TREAD / CREPA /
memory / validation settings nodes; validation events with /view URLs; N processes."""

import importlib
import importlib.util
import shutil
import sys
import urllib.parse
from pathlib import Path

import pytest
import torch
from pack_helpers import import_pack

from trainer.lora.io import load_lora, read_lora_file
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.train.checkpoint import latest_checkpoint, load_checkpoint
from trainer.train.synthetic import SyntheticTalkingDataset

PACK = "comfyui_wan_s2v_trainer"
TINY = "(tiny random test model)"


def _pack(module: str = "train_nodes"):
    if PACK not in sys.modules:
        import_pack(PACK)
    return importlib.import_module(f"{PACK}.nodes.{module}")


@pytest.fixture
def comfy_dirs(tmp_path, monkeypatch):
    """ComfyUI's folders as the adapter sees them without ComfyUI."""
    dirs = {name: tmp_path / name for name in ("output", "loras", "input", "models")}
    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(dirs["output"]))
    monkeypatch.setenv("WAN_S2V_LORAS_DIR", str(dirs["loras"]))
    monkeypatch.setenv("WAN_S2V_INPUT_DIR", str(dirs["input"]))
    monkeypatch.setenv("WAN_S2V_MODELS_DIR", str(dirs["models"]))
    monkeypatch.delenv("WAN_S2V_TRAINER_ROOTS", raising=False)
    return dirs


@pytest.fixture
def sent(monkeypatch):
    """Front-end events the nodes send (ComfyUI's PromptServer is absent here)."""
    adapter = _pack("comfy_adapter")
    events: list[tuple[str, dict]] = []
    monkeypatch.setattr(adapter, "send_event", lambda event, data: events.append((event, dict(data))))
    return events


def _defaults(node, **changes):
    settings = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
                if k not in ("transformer", "dataset", "output_name", "save_to", "resume_from_checkpoint")}
    settings.update(changes)
    return settings


def test_training_node_under_inference_mode(comfy_dirs):
    nodes = _pack()
    assert {"WanS2VTrainLora", "WanS2VLoraSettings"} <= set(nodes.NODE_CLASS_MAPPINGS)
    with torch.inference_mode():  # as ComfyUI runs every node
        torch.manual_seed(0)
        model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        data = SyntheticTalkingDataset(text_len=64)
        (lora_settings,) = nodes.WanS2VLoraSettings().build(4, 4.0, 0.0, "to_q,to_v")
        (opt,) = nodes.WanS2VOptimizerSettings().build("adamw", 1e-3, 0.0, "norm", 1.0, 1.0)
        (sched,) = nodes.WanS2VScheduleSettings().build("cosine", 1, 0.5, 1.0)
        node = nodes.WanS2VTrainLora()
        settings = _defaults(node, max_train_steps=3, checkpoint_step_interval=2, mixed_precision="no",
                             gradient_checkpointing=True)
        lora, path, losses = node.train(model, data, "node_lora", lora_settings=lora_settings,
                                        optimizer_settings=opt, schedule_settings=sched, eval_dataset=data,
                                        eval_step_interval=3, **settings)
    tmp = comfy_dirs["output"].parent
    assert Path(path) == (tmp / "loras" / "node_lora.safetensors").resolve() and Path(path).is_file()
    assert len(losses["loss"]) == 3 and lora.steps == 3
    assert (tmp / "output" / "wan_s2v_training" / "node_lora" / "checkpoints" / "checkpoint-2").is_dir()
    assert "lora_A" not in " ".join(n for n, _ in model.named_parameters())  # adapter removed from the shared model
    file_state = read_lora_file(path).state
    assert set(file_state) == set(lora.state) and all(torch.equal(file_state[k], lora.state[k]) for k in lora.state)
    assert all(".to_q." in k or ".to_v." in k for k in file_state)
    fresh = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    load_lora(fresh, lora.to_lora_file())


def test_tread_crepa_and_memory_settings_train_through_the_node(comfy_dirs, tiny_dinov2_dir, monkeypatch):
    nodes = _pack()
    # The teacher as a user puts it: ComfyUI/models/dinov2/<teacher name>/ (config.json + safetensors).
    shutil.copytree(tiny_dinov2_dir, comfy_dirs["models"] / "dinov2" / "dinov2_vits14")
    (tread,) = nodes.WanS2VTreadSettings().build(0.5, 2, -2)
    assert tread == {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}
    (crepa,) = nodes.WanS2VCrepaSettings().build(0.5, 1, 1, 1.0, 0, 0, "dinov2_vits14", "")
    assert crepa.crepa_enabled and crepa.crepa_cutoff_step is None
    assert Path(crepa.crepa_teacher_path) == (comfy_dirs["models"] / "dinov2" / "dinov2_vits14").resolve()
    (memory,) = nodes.WanS2VMemorySettings().build("full", base_model_precision="no_change", device="cpu",
                                                   offload="none", checkpoint_interval=1, attention_blocks=-1,
                                                   offload_activations=False, enable_chunked_feed_forward=True,
                                                   feed_forward_chunk_size=16)
    assert memory.gradient_checkpointing == "full" and memory.resolved_feed_forward_chunk_size() == 16

    # TREAD really routes: the model sees the node's routes while it trains.
    seen = []
    original = WanS2VTransformer3DModel.set_token_routes
    monkeypatch.setattr(WanS2VTransformer3DModel, "set_token_routes",
                        lambda self, routes: (seen.append(routes), original(self, routes))[1])
    with torch.inference_mode():
        torch.manual_seed(0)
        model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        data = SyntheticTalkingDataset(text_len=64, teacher_frames=True)
        node = nodes.WanS2VTrainLora()
        settings = _defaults(node, max_train_steps=2, checkpoint_step_interval=2, mixed_precision="no",
                             gradient_checkpointing=False)
        _, path, losses = node.train(model, data, "tread_crepa", tread_settings=tread, crepa_settings=crepa,
                                     memory_settings=memory, save_to="output", resume_from_checkpoint="none",
                                     **settings)
    assert seen[0] == tread and model.token_routes == []  # on for training, off afterwards
    assert len(losses["loss"]) == 2 and all(torch.isfinite(torch.tensor(losses["loss"])))
    run = comfy_dirs["output"] / "wan_s2v_training" / "tread_crepa"
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert "crepa_projector" in state["training_state"]  # CREPA trained its projector
    saved = state["summary"]["config"]  # the run's config, as the checkpoint records it
    assert saved["memory"]["feed_forward_chunk_size"] == 16 and saved["tread_config"] == tread
    assert saved["crepa"]["crepa_teacher_path"] == crepa.crepa_teacher_path
    assert Path(path).parent == run and all(".lora_" in k for k in read_lora_file(path).state)


def test_crepa_teacher_folder_is_confined_and_must_exist(comfy_dirs, tmp_path):
    nodes = _pack()
    with pytest.raises(PermissionError, match="outside the allowed folders"):
        nodes.WanS2VCrepaSettings().build(0.5, 8, 1, 1.0, 0, 0, "dinov2_vitg14", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="models/dinov2/dinov2_vitg14"):
        nodes.WanS2VCrepaSettings().build(0.5, 8, 1, 1.0, 0, 0, "dinov2_vitg14", "")
    with pytest.raises(ValueError, match="fraction of video tokens dropped"):
        nodes.WanS2VTreadSettings().build(1.0, 2, -2)
    (first,) = nodes.WanS2VTreadSettings().build(0.25, 0, 0)
    (both,) = nodes.WanS2VTreadSettings().build(0.5, 2, -2, tread_settings=first)
    assert [r["start_layer_idx"] for r in both["routes"]] == [0, 2]  # chained routes keep their order


def test_validation_renders_send_events_with_view_urls(comfy_dirs, sent):
    nodes = _pack()
    sample_nodes = _pack("sample_nodes")
    from trainer.media import probe_mp4

    with torch.inference_mode():
        torch.manual_seed(0)
        model = _pack("model_nodes").WanS2VLoadTransformer().load(TINY, "float32", "official")[0]
        # The bundle's own transformer is not used: the renders run the model in training.
        (bundle,) = sample_nodes.WanS2VLoadModelBundle().load(TINY, TINY, TINY, TINY, "float32", "official", "cpu")
        image = torch.rand(1, 48, 64, 3)
        audio = {"waveform": 0.1 * torch.randn(1, 1, 16000), "sample_rate": 16000}
        (first,) = nodes.WanS2VValidationSettings().build(image, audio, "a person talks", "", 2, 2, 3.0, 64, 48, 5, 7)
        (validation,) = nodes.WanS2VValidationSettings().build(image.flip(2), audio, "a person speaks fast", "blur",
                                                               2, 2, 3.0, 64, 48, 5, 7, validation_settings=first)
        assert len(validation.cases) == 2
        node = nodes.WanS2VTrainLora()
        settings = _defaults(node, max_train_steps=3, checkpoint_step_interval=0, mixed_precision="no",
                             gradient_checkpointing=False)
        node.train(model, SyntheticTalkingDataset(text_len=64, height=6, width=8), "with_validation",
                   validation_settings=validation, validation_model=bundle, save_to="output",
                   resume_from_checkpoint="none", unique_id="12", **settings)
    run = comfy_dirs["output"] / "wan_s2v_training" / "with_validation"
    saved_inputs = sorted(p.name for p in (run / "validation_inputs").iterdir())
    assert saved_inputs == ["case0_reference.png", "case0_speech.wav", "case1_reference.png", "case1_speech.wav"]
    events = [d for e, d in sent if e == nodes.VALIDATION_EVENT]
    assert [d["step"] for d in events] == [2, 3]  # every 2 steps and after the last one
    for event in events:
        assert event["node"] == "12" and event["output_name"] == "with_validation" and len(event["videos"]) == 2
        for video in event["videos"]:
            url = urllib.parse.urlparse(video["url"])
            query = dict(urllib.parse.parse_qsl(url.query))
            assert url.path == "/view" and query == {k: video[k] for k in ("filename", "subfolder", "type")}
            assert query["type"] == "output" and query["subfolder"].startswith("wan_s2v_training/with_validation/")
            file = comfy_dirs["output"] / query["subfolder"] / query["filename"]
            info = probe_mp4(file)
            assert file.suffix == ".mp4" and info["video_frames"] == 5 and info["has_audio"], info
            assert (info["width"], info["height"]) == (64, 48)
    # the loss events still come, one per step
    assert [d["step"] for e, d in sent if e == nodes.TRAIN_EVENT] == [1, 2, 3]


def test_validation_settings_need_a_validation_model(comfy_dirs):
    nodes = _pack()
    audio = {"waveform": torch.zeros(1, 1, 1600), "sample_rate": 16000}
    (validation,) = nodes.WanS2VValidationSettings().build(torch.rand(1, 16, 16, 3), audio, "p", "", 1, 1, 1.0,
                                                           16, 16, 5, 0)
    node = nodes.WanS2VTrainLora()
    with pytest.raises(ValueError, match="validation_model"):
        node.train(None, SyntheticTalkingDataset(text_len=64), "no_model", validation_settings=validation,
                   **_defaults(node, max_train_steps=1))


def test_two_processes_on_cpu_relay_events_cancel_and_load_the_lora_from_the_file(comfy_dirs, sent, monkeypatch):
    """gpus=2 without CUDA: two gloo processes started by trainer.train.launcher. The node relays
    the loss and validation events as in-process, Cancel stops the processes after a checkpoint,
    and the LoRA output is the file the processes wrote."""
    nodes = _pack()
    adapter = _pack("comfy_adapter")
    # The user presses Cancel once step 3 is on the chart.
    monkeypatch.setattr(adapter, "interrupt_requested",
                        lambda: any(e == nodes.TRAIN_EVENT and d["step"] >= 3 for e, d in sent))
    with torch.inference_mode():
        (model,) = _pack("model_nodes").WanS2VLoadTransformer().load(TINY, "float32", "official")
        dataset = _pack("dataset_nodes").WanS2VDataset().build(
            "(demo media)", TINY, TINY, TINY, "textfile", "", 9, 0, 0, 64.0, "pixel_area", True, False)[0]
        audio = {"waveform": 0.1 * torch.randn(1, 1, 16000), "sample_rate": 16000}
        (validation,) = nodes.WanS2VValidationSettings().build(torch.rand(1, 32, 32, 3), audio, "talk", "", 2, 2,
                                                               3.0, 32, 32, 5, 0)
        (bundle,) = _pack("sample_nodes").WanS2VLoadModelBundle().load(TINY, TINY, TINY, TINY, "float32", "official",
                                                                      "cpu")
        node = nodes.WanS2VTrainLora()
        settings = _defaults(node, max_train_steps=40, checkpoint_step_interval=0, mixed_precision="no",
                             gradient_checkpointing=False)
        lora, path, losses = node.train(model, dataset, "two_procs", save_to="loras", resume_from_checkpoint="none",
                                        unique_id="3", gpus=2, validation_settings=validation,
                                        validation_model=bundle, **settings)
    run = comfy_dirs["output"] / "wan_s2v_training" / "two_procs"
    assert (run / "launch.json").is_file()  # it really went through the launcher
    steps = [d["step"] for e, d in sent if e == nodes.TRAIN_EVENT]
    assert steps == list(range(1, lora.steps + 1)) and 3 <= lora.steps < 40  # stopped soon after the Cancel
    assert all(d["node"] == "3" for e, d in sent if e == nodes.TRAIN_EVENT)
    assert (run / "checkpoints" / f"checkpoint-{lora.steps}").is_dir()  # written before stopping
    # a cancelled run's LoRA stays in its run folder under a name of its own, never in models/loras
    assert Path(path).resolve() == (run / f"two_procs_partial_step{lora.steps}.safetensors").resolve()
    assert not comfy_dirs["loras"].exists() or not list(comfy_dirs["loras"].iterdir())
    file_state = read_lora_file(path).state
    assert set(file_state) == set(lora.state) and all(torch.equal(file_state[k], lora.state[k]) for k in file_state)
    assert losses["loss"] == [d["loss"] for e, d in sent if e == nodes.TRAIN_EVENT]
    renders = [d for e, d in sent if e == nodes.VALIDATION_EVENT]
    assert renders and renders[0]["step"] == 2 and renders[0]["node"] == "3"
    video = renders[0]["videos"][0]
    assert (comfy_dirs["output"] / video["subfolder"] / video["filename"]).is_file()


def test_more_processes_than_visible_gpus_is_a_clear_error(monkeypatch):
    runner = _pack("train_runner")
    runner.check_gpu_count(3)  # no CUDA here: CPU processes (gloo), any count
    # What a 1-GPU machine reports (this one has none to ask).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    runner.check_gpu_count(1)
    with pytest.raises(ValueError, match="gpus=2 but only 1 GPU"):
        runner.check_gpu_count(2)


def test_more_processes_need_a_transformer_from_a_file(comfy_dirs):
    nodes = _pack()
    node = nodes.WanS2VTrainLora()
    with torch.inference_mode():
        model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)  # built in memory: no source file
        with pytest.raises(ValueError, match="Load Wan S2V Transformer"):
            node.train(model, SyntheticTalkingDataset(text_len=64), "no_source", gpus=2,
                       **_defaults(node, max_train_steps=1))


def test_validation_settings_take_an_extra_lora_stack_and_few_step_settings(comfy_dirs, monkeypatch):
    """Load Wan S2V LoRA's stack becomes {path, strength} entries of the validation config (the
    run reads the files itself); steps, guidance, scheduler and shift reach the renders."""
    from trainer.lora.io import save_lora

    nodes, sample_nodes = _pack(), _pack("sample_nodes")
    # ComfyUI's folder_paths lists the loras folder; without ComfyUI, name the file there directly
    monkeypatch.setattr(sample_nodes.comfy_adapter, "model_file_path", lambda kind, name: comfy_dirs[kind] / name)
    comfy_dirs["loras"].mkdir(parents=True)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    layer = model.get_submodule("blocks.0.attn1.to_q")
    save_lora({"blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, layer.in_features),
               "blocks.0.attn1.to_q.lora_B.weight": torch.randn(layer.out_features, 2)},
              comfy_dirs["loras"] / "step_distill.safetensors", alphas={"*": 2.0})
    stack, _ = sample_nodes.WanS2VLoadLoRA().load("step_distill.safetensors", 0.75)
    image, audio = torch.rand(1, 16, 16, 3), {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}
    node = nodes.WanS2VValidationSettings()
    assert list(node.INPUT_TYPES()["optional"])[-3:] == ["extra_loras", "scheduler", "shift"]  # appended last
    (settings,) = node.build(image, audio, "p", "", 10, 4, 1.0, 64, 64, 9, 0, extra_loras=stack,
                             scheduler="euler", shift=5.0)
    config = settings.config
    assert config.validation_extra_loras == (
        {"path": str((comfy_dirs["loras"] / "step_distill.safetensors").resolve()), "strength": 0.75},)
    sampler, _ = config.sampler_config(seed=0)
    assert (sampler.steps, sampler.guidance, sampler.scheduler, sampler.shift) == (4, 1.0, "euler", 5.0)
    (plain,) = node.build(image, audio, "p", "", 10, 20, 4.5, 64, 64, 9, 0)  # a workflow saved before
    assert (plain.config.validation_extra_loras, plain.config.validation_scheduler,
            plain.config.validation_shift) == ((), "unipc", 0.0)

    in_memory = sample_nodes.WanS2VApplyLoRA().apply(nodes.TrainedLora({}, {}, None, 0), 1.0)[0]
    with pytest.raises(ValueError, match="extra_loras: LoRA 'trained LoRA' is not a file"):
        node.build(image, audio, "p", "", 10, 4, 1.0, 64, 64, 9, 0, extra_loras=in_memory)
    outside = comfy_dirs["output"].parent / "elsewhere.safetensors"
    shutil.copyfile(comfy_dirs["loras"] / "step_distill.safetensors", outside)
    from trainer.sample.lora import LoraSpec

    with pytest.raises(PermissionError, match="validation extra LoRA.*elsewhere.safetensors"):
        node.build(image, audio, "p", "", 10, 4, 1.0, 64, 64, 9, 0, extra_loras=[LoraSpec(str(outside), 1.0)])
