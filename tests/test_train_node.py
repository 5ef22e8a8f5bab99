"""The training node's work without ComfyUI: runs under inference mode as ComfyUI's executor
does, confines paths, writes the LoRA into the loras folder, outputs a LOSS_MAP."""

import importlib.util
import sys
from pathlib import Path

import torch

from trainer.lora.io import load_lora, read_lora_file
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.train.synthetic import SyntheticTalkingDataset

REPO = Path(__file__).resolve().parents[1]


def _pack():
    name = "comfyui_wan_s2v_trainer"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.train_nodes")


def test_training_node_under_inference_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("WAN_S2V_LORAS_DIR", str(tmp_path / "loras"))
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
        settings = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
                    if k not in ("transformer", "dataset", "output_name", "save_to", "resume_from_checkpoint")}
        settings.update(max_train_steps=3, checkpoint_step_interval=2, mixed_precision="no",
                        gradient_checkpointing=True)
        lora, path, losses = node.train(model, data, "node_lora", lora_settings=lora_settings,
                                        optimizer_settings=opt, schedule_settings=sched, eval_dataset=data,
                                        eval_step_interval=3, **settings)
    assert Path(path) == (tmp_path / "loras" / "node_lora.safetensors").resolve() and Path(path).is_file()
    assert len(losses["loss"]) == 3 and lora.steps == 3
    assert (tmp_path / "output" / "wan_s2v_training" / "node_lora" / "checkpoints" / "checkpoint-2").is_dir()
    assert "lora_A" not in " ".join(n for n, _ in model.named_parameters())  # adapter removed from the shared model
    file_state = read_lora_file(path).state
    assert set(file_state) == set(lora.state) and all(torch.equal(file_state[k], lora.state[k]) for k in lora.state)
    assert all(".to_q." in k or ".to_v." in k for k in file_state)
    fresh = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    load_lora(fresh, lora.to_lora_file())
