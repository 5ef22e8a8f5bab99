"""The example workflows match the node definitions (no ComfyUI needed).

Each `example_workflows/*.json` is a UI-format workflow whose node types are this pack's nodes
or whitelisted ComfyUI core nodes (`workflow_api.CORE_OBJECT_INFO`), whose links join an
existing output to an existing input of the same type, whose widget values match the nodes'
widgets (count, combo choices, numeric ranges), and which converts to the API format. The files
are what `scripts/make_workflows.py` generates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import make_workflows
import workflow_api

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
# Combo inputs listing files of the user's folders: the value need not be in the list here.
FILE_LIST_INPUTS = {
    ("WanS2VLoadTransformer", "transformer"), ("WanS2VLoadModelBundle", "transformer"),
    ("WanS2VLoadModelBundle", "vae"), ("WanS2VLoadModelBundle", "text_encoder"),
    ("WanS2VLoadModelBundle", "audio_encoder"), ("WanS2VDataset", "vae"), ("WanS2VDataset", "text_encoder"),
    ("WanS2VDataset", "audio_encoder"), ("WanS2VLoadLoRA", "lora_name"), ("LoadImage", "image"),
    ("LoadAudio", "audio"),
}


@pytest.fixture(scope="module")
def info() -> dict:
    return workflow_api.pack_object_info()


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_three_workflows_exist():
    names = {p.stem for p in WORKFLOWS}
    assert {"wan_s2v_tiny_demo", "wan_s2v_lora_train_and_validate", "wan_s2v_sample_with_lora"} <= names


def test_files_are_what_make_workflows_generates(info):
    rendered = make_workflows.render_all(info)
    assert sorted(rendered) == sorted(p.name for p in WORKFLOWS)
    for path in WORKFLOWS:
        assert path.read_text() == rendered[path.name], f"{path.name} is stale: run scripts/make_workflows.py"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_nodes_links_and_widgets_match_the_definitions(path, info):
    wf = _load(path)
    assert wf.get("version") == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for node in wf["nodes"]:
        if node["type"] in workflow_api.FRONTEND_ONLY:
            continue
        assert node["type"] in info, f"unknown node type {node['type']}"
        definition = info[node["type"]]
        # Socket inputs in definition order, each pointing at a link that targets it.
        sockets = workflow_api.socket_inputs(definition)
        assert [i["name"] for i in node["inputs"]] == [s[0] for s in sockets], node["type"]
        for slot, (entry, (_, kind, _)) in enumerate(zip(node["inputs"], sockets)):
            assert entry["type"] == kind
            if entry["link"] is not None:
                link = next(lk for lk in wf["links"] if lk[0] == entry["link"])
                assert (link[3], link[4]) == (node["id"], slot)
        # Outputs as RETURN_TYPES.
        assert [o["type"] for o in node["outputs"]] == list(definition["output"]), node["type"]
        # Widgets: one value per widget (+ seed control), valid for its input.
        slots = workflow_api.widget_slots(definition)
        assert len(node["widgets_values"]) == len(slots), f"{node['type']}: widget count"
        for value, (name, spec) in zip(node["widgets_values"], slots):
            if name is None:
                if spec == "control":
                    assert value in workflow_api.CONTROL_VALUES
                continue
            kind, opts = spec
            choices = workflow_api._combo_options(kind, opts)
            if choices is not None:
                if (node["type"], name) not in FILE_LIST_INPUTS or choices == [make_workflows.TINY]:
                    assert value in choices or (node["type"], name) in FILE_LIST_INPUTS, (node["type"], name, value)
                assert isinstance(value, str)
            elif kind == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), (node["type"], name)
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (node["type"], name)
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), (node["type"], name)
            elif kind == "STRING":
                assert isinstance(value, str), (node["type"], name)
            if kind in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), (node["type"], name, value)
    # Every link joins an existing output to an existing input of the same type.
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == kind and inp["type"] in (kind, "*"), (link_id, out, inp)
        assert link_id in (out["links"] or []) and inp["link"] == link_id


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_converts_to_api_format(path, info):
    api = workflow_api.ui_to_api(_load(path), info)
    assert api
    for node_id, entry in api.items():
        definition = info[entry["class_type"]]
        required = definition["input"].get("required", {})
        missing = set(required) - set(entry["inputs"])
        assert not missing, f"{path.stem} node {node_id} ({entry['class_type']}) misses {missing}"
        for value in entry["inputs"].values():
            if isinstance(value, list):
                assert value[0] in api, f"link to a node that is not in the prompt: {value}"


def test_tiny_demo_uses_only_builtin_models(info):
    api = workflow_api.ui_to_api(_load(REPO / "example_workflows" / "wan_s2v_tiny_demo.json"), info)
    by_type = {v["class_type"]: v["inputs"] for v in api.values()}
    assert by_type["WanS2VLoadTransformer"]["transformer"] == make_workflows.TINY
    assert by_type["WanS2VDataset"]["folder"] == make_workflows.DEMO_MEDIA
    assert by_type["WanS2VTrainLora"]["max_train_steps"] <= 50
    assert {"WanS2VApplyLoRA", "WanS2VSampler", "WanS2VSaveVideo"} <= set(by_type)
    assert "LoadAudio" not in by_type and "LoadImage" not in by_type  # runs without any input file


def test_converter_handles_seed_control_upload_and_converted_widgets(info):
    seed_node = {"id": 1, "type": "WanS2VSampler", "inputs": [], "outputs": [],
                 "widgets_values": ["p", "", 64, 64, 16, 1, 4, 4.5, 0.0, 123, "randomize", "euler", "batch",
                                    False, True]}
    mapped = workflow_api.map_widget_values(seed_node, info["WanS2VSampler"])
    assert mapped["seed"] == 123 and mapped["scheduler"] == "euler" and mapped["save_mp4"] is True
    # An older save without the control value still maps.
    old = dict(seed_node, widgets_values=seed_node["widgets_values"][:10] + seed_node["widgets_values"][11:])
    assert workflow_api.map_widget_values(old, info["WanS2VSampler"])["scheduler"] == "euler"
    load = {"id": 2, "type": "LoadAudio", "inputs": [], "outputs": [], "widgets_values": ["a.wav", None, None]}
    assert workflow_api.map_widget_values(load, info["LoadAudio"]) == {"audio": "a.wav"}
    with pytest.raises(workflow_api.WorkflowError):
        workflow_api.map_widget_values(dict(load, widgets_values=["a", 1, 2, 3]), info["LoadAudio"])
    # A converted widget fed by a link, through a reroute; notes are dropped.
    wf = {
        "nodes": [
            {"id": 1, "type": "EmptyAudio", "mode": 0, "inputs": [], "outputs": [],
             "widgets_values": [1.0, 16000, 1]},
            {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}], "outputs": []},
            {"id": 3, "type": "WanS2VSaveVideo", "mode": 0,
             "inputs": [{"name": "frames", "type": "IMAGE", "link": None},
                        {"name": "audio", "type": "AUDIO", "link": 2, "shape": 7}],
             "outputs": [], "widgets_values": ["x", 16]},
            {"id": 4, "type": "MarkdownNote", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["hi"]},
        ],
        "links": [[1, 1, 0, 2, 0, "AUDIO"], [2, 2, 0, 3, 1, "AUDIO"]],
    }
    api = workflow_api.ui_to_api(wf, info)
    assert set(api) == {"1", "3"} and api["3"]["inputs"]["audio"] == ["1", 0]
    assert api["3"]["inputs"]["fps"] == 16 and api["1"]["inputs"]["sample_rate"] == 16000


def test_training_node_sends_its_id_with_the_loss_events(info):
    assert info["WanS2VTrainLora"]["input"]["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert "addEventListener" in (REPO / "web" / "js" / "loss_chart.js").read_text()
    assert '"wan_s2v.train"' in (REPO / "web" / "js" / "loss_chart.js").read_text()


def test_training_node_emits_one_loss_event_per_step(tmp_path, monkeypatch):
    """What web/js/loss_chart.js listens to: one `wan_s2v.train` event per step, tagged with the
    node's unique_id, eval loss on the eval steps (here without ComfyUI: send_event patched)."""
    import importlib

    import torch

    from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
    from trainer.train.synthetic import SyntheticTalkingDataset

    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("WAN_S2V_LORAS_DIR", str(tmp_path / "loras"))
    workflow_api.pack_object_info()  # imports the pack as ComfyUI does
    nodes = importlib.import_module("_wan_s2v_pack_for_workflows.nodes.train_nodes")
    adapter = importlib.import_module("_wan_s2v_pack_for_workflows.nodes.comfy_adapter")
    sent = []
    monkeypatch.setattr(adapter, "send_event", lambda event, data: sent.append((event, dict(data))))
    node = nodes.WanS2VTrainLora()
    settings = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
                if k not in ("transformer", "dataset", "output_name", "save_to", "resume_from_checkpoint")}
    settings.update(max_train_steps=4, checkpoint_step_interval=0, mixed_precision="no", gradient_checkpointing=False)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        data = SyntheticTalkingDataset(text_len=64)
        node.train(model, data, "event_lora", eval_dataset=data, eval_step_interval=2, save_to="output",
                   resume_from_checkpoint="none", unique_id="7", **settings)
    events = [d for e, d in sent if e == nodes.TRAIN_EVENT]
    assert [d["step"] for d in events] == [1, 2, 3, 4]
    assert all(d["node"] == "7" and d["total"] == 4 and isinstance(d["loss"], float) for d in events)
    assert [d["step"] for d in events if "eval_loss" in d] == [2, 4]


def _api_by_type(name: str, info) -> tuple[dict, dict]:
    api = workflow_api.ui_to_api(_load(REPO / "example_workflows" / f"{name}.json"), info)
    return api, {v["class_type"]: (k, v["inputs"]) for k, v in api.items()}


def test_train_and_validate_uses_tread_crepa_at_the_seed_settings_and_validates(info):
    api, by_type = _api_by_type("wan_s2v_lora_train_and_validate", info)
    _, train = by_type["WanS2VTrainLora"]
    tread_id, tread = by_type["WanS2VTreadSettings"]
    crepa_id, crepa = by_type["WanS2VCrepaSettings"]
    assert train["tread_settings"] == [tread_id, 0] and train["crepa_settings"] == [crepa_id, 0]
    assert (tread["selection_ratio"], tread["start_layer_idx"], tread["end_layer_idx"]) == (0.5, 2, -2)
    assert (crepa["crepa_lambda"], crepa["crepa_block_index"], crepa["crepa_adjacent_distance"],
            crepa["crepa_adjacent_tau"], crepa["teacher"]) == (0.5, 8, 1, 1.0, "dinov2_vitg14")
    _, dataset = by_type["WanS2VDataset"]
    assert dataset["teacher_frames"] is True  # CREPA needs the cached teacher frames
    validation_id, validation = by_type["WanS2VValidationSettings"]
    bundle_id, bundle = by_type["WanS2VLoadModelBundle"]
    assert train["validation_settings"] == [validation_id, 0] and train["validation_model"] == [bundle_id, 0]
    assert api[validation["image"][0]]["class_type"] == "LoadImage"
    assert api[validation["audio"][0]]["class_type"] == "LoadAudio"
    assert bundle["transformer_model"] == [by_type["WanS2VLoadTransformer"][0], 0]
    assert train["gpus"] == 1


def test_train_and_validate_offers_few_step_validation_switched_off(info):
    """A step-distill LoRA node feeds the validation's extra_loras, bypassed: as shipped the renders
    keep the current settings and no extra LoRA; un-bypassed its stack reaches the node."""
    workflow = _load(REPO / "example_workflows" / "wan_s2v_lora_train_and_validate.json")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    (distill,) = [n for n in workflow["nodes"] if n["type"] == "WanS2VLoadLoRA"]
    assert distill["mode"] == make_workflows.BYPASSED and distill["widgets_values"][0] == make_workflows.LIGHTX2V_4STEP
    (link,) = [lk for lk in workflow["links"] if lk[1] == distill["id"]]
    target = nodes[link[3]]
    assert target["type"] == "WanS2VValidationSettings" and target["inputs"][link[4]]["name"] == "extra_loras"
    _, by_type = _api_by_type("wan_s2v_lora_train_and_validate", info)
    _, validation = by_type["WanS2VValidationSettings"]
    assert "WanS2VLoadLoRA" not in by_type and "extra_loras" not in validation
    assert (validation["num_inference_steps"], validation["guidance"], validation["scheduler"],
            validation["shift"]) == (40, 4.5, "unipc", 0.0)
    distill["mode"] = 0  # what Ctrl+B in the front end does
    api = workflow_api.ui_to_api(workflow, info)
    (validation,) = [v["inputs"] for v in api.values() if v["class_type"] == "WanS2VValidationSettings"]
    assert validation["extra_loras"] == [str(distill["id"]), 0]


def test_tiny_demo_trains_with_tread_crepa_and_validation_previews(info):
    api, by_type = _api_by_type("wan_s2v_tiny_demo", info)
    _, train = by_type["WanS2VTrainLora"]
    _, crepa = by_type["WanS2VCrepaSettings"]
    assert crepa["teacher"] == make_workflows.TINY_TEACHER  # no model file needed
    assert crepa["crepa_block_index"] < 4  # the tiny transformer has 4 blocks
    validation_id, validation = by_type["WanS2VValidationSettings"]
    assert train["validation_settings"] == [validation_id, 0]
    assert api[train["validation_model"][0]]["class_type"] == "WanS2VLoadModelBundle"
    assert 0 < validation["validation_step_interval"] <= train["max_train_steps"]


def test_validation_preview_listens_to_the_validation_event():
    js = (REPO / "web" / "js" / "validation_preview.js").read_text()
    assert '"wan_s2v.validation"' in js and "addEventListener" in js and "/view?" in js
    assert "wan_s2v_validation" in (REPO / "web" / "js" / "loss_chart.js").read_text()  # kept in the properties
