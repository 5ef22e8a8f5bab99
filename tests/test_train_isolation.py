"""Training never changes the transformer ComfyUI caches.

ComfyUI caches node outputs: the model of "Load Wan S2V Transformer" is the same object for
every queued prompt (and for the sampler beside the training node). The tests drive the
training node's own code (`WanS2VTrainLora.train` -> `run_training_node`) on one such model
(the tiny one, CPU), let a run fail or use another memory mode first, and then require a
normal run on that model to train exactly (bit for bit) the LoRA that a normal run on a
freshly loaded model trains, the sampler to render what it renders on a fresh model, and
the model's weights, modules, hooks and attributes to be exactly as loaded.
"""

from __future__ import annotations

import collections
import importlib
import sys

import pytest
import torch
from pack_helpers import import_pack
from sample_helpers import reference_image, speech

from trainer.train.synthetic import SyntheticTalkingDataset

PACK = "comfyui_wan_s2v_trainer_iso"


def _pack(module: str):
    if PACK not in sys.modules:
        import_pack(PACK)
    return importlib.import_module(f"{PACK}.nodes.{module}")


@pytest.fixture
def comfy_dirs(tmp_path, monkeypatch):
    """ComfyUI's folders as the adapter sees them without ComfyUI."""
    dirs = {name: tmp_path / name for name in ("output", "loras", "input", "models")}
    for name, path in dirs.items():
        monkeypatch.setenv(f"WAN_S2V_{name.upper()}_DIR", str(path))
    monkeypatch.delenv("WAN_S2V_TRAINER_ROOTS", raising=False)
    return dirs


def _load():
    """The tiny transformer as ComfyUI gets it: the loader node run under inference mode."""
    nodes = _pack("model_nodes")
    with torch.inference_mode():
        (model,) = nodes.WanS2VLoadTransformer().load(nodes.TINY, "float32", "official")
    return model


def _defaults(node_class, **changes):
    values = {k: v[1]["default"] for k, v in node_class.INPUT_TYPES()["required"].items() if "default" in v[1]}
    values.update(changes)
    return values


def _memory(**changes):
    nodes = _pack("train_nodes")
    fields = _defaults(nodes.WanS2VMemorySettings, device="cpu", **changes)
    return nodes.WanS2VMemorySettings().build(fields.pop("checkpointing_policy", "full"), **fields)[0]


class BreaksAfter:
    """A dataset whose storage fails after `reads` items (e.g. a cache shard on a disk that
    went away): training stops with an error in the middle of a run, after the LoRA, the
    quantization and the offload were all set up."""

    def __init__(self, dataset, reads: int):
        self.dataset, self.reads = dataset, reads

    def __len__(self) -> int:
        return len(self.dataset)

    def bucket_of(self, index: int):
        return self.dataset.bucket_of(index)

    def __getitem__(self, index: int):
        if self.reads == 0:
            raise OSError("the dataset cache could not be read")
        self.reads -= 1
        return self.dataset[index]


def _train(model, name: str, *, targets: str = "to_q,to_v", memory=None, dataset=None, steps: int = 2):
    """One run of the training node (as ComfyUI runs it: under inference mode); its LoRA."""
    nodes = _pack("train_nodes")
    settings = _defaults(nodes.WanS2VTrainLora, max_train_steps=steps, checkpoint_step_interval=0,
                         mixed_precision="no", gradient_checkpointing=True)
    for key in ("output_name", "save_to", "resume_from_checkpoint"):
        settings.pop(key)
    with torch.inference_mode():
        (lora_settings,) = nodes.WanS2VLoraSettings().build(4, 4.0, 0.0, targets)
        lora, _, _ = nodes.WanS2VTrainLora().train(
            model, dataset or SyntheticTalkingDataset(text_len=64), name, save_to="output",
            resume_from_checkpoint="none", lora_settings=lora_settings, memory_settings=memory, **settings)
    return lora


def _assert_same_lora(lora, reference) -> None:
    assert set(lora.state) == set(reference.state) and lora.alphas == reference.alphas
    different = [k for k in reference.state if not torch.equal(lora.state[k], reference.state[k])]
    assert not different, f"{len(different)} LoRA tensors differ from a fresh model's, e.g. {different[0]}"


@pytest.fixture(scope="module")
def fresh_lora(tmp_path_factory):
    """The LoRA of a normal run on a freshly loaded model (what every other run must match)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("fresh")
    for name in ("output", "loras", "input", "models"):
        mp.setenv(f"WAN_S2V_{name.upper()}_DIR", str(root / name))
    try:
        return _train(_load(), "fresh")
    finally:
        mp.undo()


def test_unknown_target_modules_then_a_normal_run(comfy_dirs, fresh_lora):
    model = _load()
    with pytest.raises(ValueError, match="not_a_layer"):
        _train(model, "typo", targets="not_a_layer")
    _assert_same_lora(_train(model, "after_typo"), fresh_lora)


def test_block_offload_runs_then_a_normal_run(comfy_dirs, fresh_lora):
    model = _load()
    in_ram = _train(model, "blocks_ram", memory=_memory(offload="blocks"))
    spill = comfy_dirs["output"] / "spill"
    on_disk = _train(model, "blocks_disk",
                     memory=_memory(offload="blocks", offload_blocks_to_disk=str(spill)))
    # the offload runs themselves train the same LoRA as without offload
    _assert_same_lora(in_ram, fresh_lora)
    _assert_same_lora(on_disk, fresh_lora)
    assert not any(spill.iterdir())  # the spill file went with its run
    _assert_same_lora(_train(model, "after_blocks"), fresh_lora)


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8"])
def test_quantized_run_then_a_no_change_run(comfy_dirs, fresh_lora, precision):
    model = _load()
    quantized = _train(model, "quantized", memory=_memory(base_model_precision=precision))
    assert any(not torch.equal(quantized.state[k], fresh_lora.state[k]) for k in fresh_lora.state)
    after = _train(model, "no_change", memory=_memory(base_model_precision="no_change"))
    _assert_same_lora(after, fresh_lora)


# --------------------------------------------------------------------------- the model itself


def _attributes(module: torch.nn.Module) -> dict:
    """A module's own attributes (hooks, flags, checkpoint functions, compiled wrapper, ...),
    its containers copied, its parameter/buffer/submodule tables as {name: object id}."""
    out = {}
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers", "_modules"):
            value = {name: id(item) for name, item in value.items()}
        elif type(value) in (dict, list, set, collections.OrderedDict):
            value = type(value)(value)
        out[key] = value
    return out


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "values": {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()},
        "tensors": {name: (t, t.dtype, t.device, t.requires_grad, t.is_inference())
                    for name, t in model.state_dict(keep_vars=True).items()},
        "modules": {name: (type(m), _attributes(m)) for name, m in model.named_modules()},
    }


def _assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"].keys() == before["modules"].keys()
    for name, (kind, attributes) in before["modules"].items():
        now_kind, now = after["modules"][name]
        assert now_kind is kind, f"{name} is now a {now_kind.__name__}"
        assert now.keys() == attributes.keys(), f"{name} gained/lost {set(now) ^ set(attributes)}"
        changed = [key for key, value in attributes.items() if not (now[key] is value or now[key] == value)]
        assert not changed, f"{name}: {changed} changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, *properties) in before["tensors"].items():
        now, *now_properties = after["tensors"][name]
        assert now is tensor and now_properties == properties, name
        assert torch.equal(now, before["values"][name]), name


FAILING_SETUPS = {
    "no_change": {},
    "int8_blocks": {"base_model_precision": "int8-quanto", "offload": "blocks",
                    "checkpointing_policy": "attention"},
    "chunked_interval": {"checkpointing_policy": "interval", "checkpoint_interval": 2,
                         "enable_chunked_feed_forward": True, "feed_forward_chunk_size": 16},
    "fp8_disk": {"base_model_precision": "fp8", "offload": "blocks", "offload_activations": True},
}


@pytest.mark.parametrize("setup", sorted(FAILING_SETUPS))
def test_the_model_is_as_loaded_after_a_failing_and_a_successful_run(comfy_dirs, setup):
    model = _load()
    before = _snapshot(model)
    changes = dict(FAILING_SETUPS[setup])
    if setup == "fp8_disk":
        changes["offload_blocks_to_disk"] = str(comfy_dirs["output"] / "spill")
    memory = _memory(**changes)
    breaks = BreaksAfter(SyntheticTalkingDataset(text_len=64), 2)
    with pytest.raises(OSError, match="dataset cache could not be read"):
        _train(model, "broken", memory=memory, dataset=breaks, steps=3)
    _assert_unchanged(model, before)
    _train(model, "works", memory=memory)
    _assert_unchanged(model, before)


def test_the_sampler_after_training_sees_the_base_weights_and_its_loras(comfy_dirs, fresh_lora):
    """The sampler node on the cached transformer after a failed int8 + offload run and a
    successful run renders exactly what it renders on a freshly loaded transformer with the
    same LoRA list (and the same without LoRAs)."""
    samplers = _pack("sample_nodes")
    model = _load()
    with pytest.raises(OSError):
        _train(model, "broken", memory=_memory(base_model_precision="int8-quanto", offload="blocks"),
               dataset=BreaksAfter(SyntheticTalkingDataset(text_len=64), 1))
    trained = _train(model, "works")
    _assert_same_lora(trained, fresh_lora)

    wave = torch.from_numpy(speech(0.5, rate=16_000, channels=1))
    audio = {"waveform": wave[None], "sample_rate": 16_000}

    def render(transformer, lora):
        tiny = samplers.TINY
        with torch.inference_mode():
            (bundle,) = samplers.WanS2VLoadModelBundle().load(
                tiny, tiny, tiny, tiny, "float32", "official", "cpu", transformer_model=transformer)
            loras = samplers.WanS2VApplyLoRA().apply(lora, 1.0)[0] if lora is not None else None
            frames, _, _ = samplers.WanS2VSampler().sample(
                bundle, reference_image(), audio, "a man talks", "", 64, 64, 8, 1, 2, 4.5, 0.0, 5, "unipc",
                "batch", loras=loras, save_mp4=False)
        return frames

    fresh = _load()
    with_lora = render(model, trained)
    assert torch.equal(with_lora, render(fresh, fresh_lora))
    without = render(model, None)
    assert torch.equal(without, render(fresh, None))
    assert not torch.equal(with_lora, without)


def test_the_run_copy_shares_the_weights_and_nothing_else():
    """What a run may do to its copy (compile, hooks, train mode, routes, checkpointing,
    chunking, casts, int8, LoRA, block offload) never reaches the model; the copy computes
    what the model computes, over the same storage, with normal (not inference) tensors."""
    from trainer.memory import MemoryConfig, apply_memory_config
    from trainer.train.adapter import add_lora
    from trainer.train.config import TrainConfig
    from trainer.train.isolation import release, shared_weight_copy

    model = _load()
    before = _snapshot(model)
    copy = shared_weight_copy(model)
    pairs = list(zip(model.state_dict(keep_vars=True).items(), copy.state_dict(keep_vars=True).items(),
                     strict=True))
    assert all(a == b and x is not y and x.data_ptr() == y.data_ptr() and not y.is_inference()
               for (a, x), (b, y) in pairs)
    batch = SyntheticTalkingDataset(text_len=64)[0]
    names = {"hidden_states": "latents", "encoder_hidden_states": "text_embeds",
             "audio_embeds": "audio_embeds", "reference_latents": "reference_latents"}
    inputs = {name: batch[key][None] for name, key in names.items()} | {"timestep": torch.tensor([500.0])}
    with torch.no_grad():
        assert torch.equal(copy(**inputs).sample, model(**inputs).sample)

    copy.compile_blocks()
    copy.register_forward_hook(lambda *args: None)
    copy.blocks[0].register_forward_pre_hook(lambda *args: None)
    copy.set_token_routes({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -1}]})
    copy.condition_embedder.to(torch.float64)
    config = TrainConfig.from_dict({"output_dir": "unused", "mixed_precision": "no"})
    memory = MemoryConfig(device="cpu", base_model_precision="int8-quanto", offload="blocks",
                          gradient_checkpointing="attention", attention_blocks=1)
    setup = apply_memory_config(copy, memory, "cpu")
    add_lora(copy, config)
    setup.after_lora()
    copy.train()
    assert copy._block_offloader is not None
    _assert_unchanged(model, before)
    release(copy)
    _assert_unchanged(model, before)
    assert not list(copy.parameters()) and "_block_and_audio" not in copy.__dict__
