"""Models loaded by our nodes live exactly as long as the node outputs that hold them.

ComfyUI keeps a node's outputs in its cache and drops them when the graph changes or on
POST /free; then nothing of ours may keep the model: no module-level cache, no reference
cycle through a callback (a cycle would keep it until the next garbage collection). Each
scenario runs twice: the first run imports modules (an import that fails inside a node
function can leave a cycle through its frame), the second must free the models by reference
counting alone, with the garbage collector off. `scripts/comfyui_e2e.py` ("memory returns to
baseline") measures the same in a real server.
"""

from __future__ import annotations

import gc
import importlib.util
import weakref
from contextlib import contextmanager

import torch
from pack_helpers import import_pack
from sample_helpers import lora_file, reference_image, speech


def _nodes():
    import_pack("comfyui_wan_s2v_trainer_release")
    from comfyui_wan_s2v_trainer_release.nodes import comfy_adapter, model_nodes, sample_nodes

    # Import the model code here, in no frame that holds a model: on first import bitsandbytes
    # logs a caught exception, and pytest's log capture keeps that record, its traceback and,
    # through the frames' f_back chain, the locals of whichever node function imported it.
    importlib.import_module("comfyui_wan_s2v_trainer_release.trainer.model.tiny")
    importlib.import_module("comfyui_wan_s2v_trainer_release.trainer.model.transformer_io")
    return comfy_adapter, model_nodes, sample_nodes


@contextmanager
def gc_off():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _check_released(scenario) -> None:
    """`scenario()` returns weak references to the models it loaded, after dropping every
    strong one it held; they must be dead."""
    first = scenario()
    gc.collect()
    assert all(ref() is None for ref in first)  # (at the latest) after a garbage collection
    with gc_off():
        second = scenario()
        alive = [type(ref()).__name__ for ref in second if ref() is not None]
    assert not alive, f"kept alive without a garbage collection: {alive}"


def test_loaded_transformer_is_freed_with_the_node_output():
    _, model_nodes, _ = _nodes()

    def scenario():
        outputs = model_nodes.WanS2VLoadTransformer().load(model_nodes.TINY, "float32", "official")
        refs = [weakref.ref(outputs[0])]
        assert refs[0]() is not None
        del outputs
        return refs

    _check_released(scenario)


def test_bundle_sampled_with_a_lora_is_freed_with_the_node_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(tmp_path))
    _, _, sn = _nodes()
    audio = {"waveform": torch.from_numpy(speech(0.5, rate=16_000))[None], "sample_rate": 16_000}

    def scenario():
        (bundle,) = sn.WanS2VLoadModelBundle().load(sn.TINY, sn.TINY, sn.TINY, sn.TINY, "float32", "official", "cpu")
        refs = [weakref.ref(getattr(bundle, k)) for k in ("transformer", "vae", "text_encoder", "audio_encoder")]
        path = lora_file(bundle.transformer, tmp_path / "lora.safetensors")
        read_lora_file = importlib.import_module("comfyui_wan_s2v_trainer_release.trainer.lora.io").read_lora_file

        class Trained:  # what the training node outputs (duck-typed)
            def to_lora_file(self):
                return read_lora_file(path)

        (loras,) = sn.WanS2VApplyLoRA().apply(Trained(), 0.5)
        outputs = sn.WanS2VSampler().sample(bundle, reference_image(), audio, "a man talks", "", 64, 64, 8, 1, 1,
                                            4.5, 0.0, 0, "unipc", "batch", loras=loras)
        assert outputs[0].shape[0] == 5
        del bundle, loras, outputs
        return refs

    _check_released(scenario)


def test_transformer_trained_in_process_is_freed(tmp_path):
    _, model_nodes, _ = _nodes()
    from trainer.train.config import TrainConfig
    from trainer.train.loop import train
    from trainer.train.synthetic import SyntheticTalkingDataset

    runs = iter(range(2))

    def scenario():
        (model,) = model_nodes.WanS2VLoadTransformer().load(model_nodes.TINY, "float32", "official")
        refs = [weakref.ref(model)]
        config = TrainConfig.from_dict({"output_dir": str(tmp_path / f"run{next(runs)}"), "max_train_steps": 2,
                                        "lora_rank": 4, "tensorboard": False, "device": "cpu",
                                        "checkpoint_step_interval": 0, "gradient_checkpointing": True})
        steps = []
        result = train(model, SyntheticTalkingDataset(text_len=64), config, keep_adapter=False,
                       progress=lambda step, *_: steps.append(step), should_stop=lambda: False)
        assert steps == [1, 2] and result.lora_path.is_file()
        del model, result
        return refs

    _check_released(scenario)


def test_unloading_comfyui_models_is_a_no_op_without_comfyui():
    comfy_adapter, _, _ = _nodes()
    assert comfy_adapter.free_comfyui_models() is False
