"""Convert a UI-format ComfyUI workflow (what the editor saves, what `example_workflows/` holds)
into the API format that `POST /prompt` takes.

    python scripts/workflow_api.py example_workflows/wan_s2v_tiny_demo.json --server http://127.0.0.1:8188
    python scripts/workflow_api.py example_workflows/wan_s2v_tiny_demo.json      # offline: pack + core specs

The mapping needs each node type's input definitions, as `/object_info` lists them
(`{"input": {"required": {...}, "optional": {...}}, "output": [...], ...}`). Offline,
`pack_object_info()` builds the same from this pack's NODE_CLASS_MAPPINGS, plus
`CORE_OBJECT_INFO` for the few ComfyUI core nodes our workflows use.

Rules (as the ComfyUI front end 1.27 serialises a graph):
- `widgets_values` holds one value per widget input, in INPUT_TYPES order (required, then
  optional); sockets (custom types, IMAGE, AUDIO, ...) have no widget.
- an INT input named `seed` / `noise_seed` (or with `control_after_generate` in its options)
  is followed by the value of its "control after generate" widget (fixed / increment /
  decrement / randomize), which is not an input;
- `image_upload` adds one extra widget value after its combo, `audio_upload` / `video_upload` two;
- a widget input that is linked (a "converted widget") takes the link; the stored widget value
  is still in `widgets_values` and is skipped;
- `Note`, `MarkdownNote`, `PrimitiveNode` and `Reroute` exist only in the front end: notes are
  dropped, links through reroutes are followed, a primitive's value is already stored in the
  target's widget values;
- muted (mode 2) nodes are dropped; bypassed (mode 4) nodes pass their first input of the
  output's type through.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = frozenset({"seed", "noise_seed"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
# Extra front-end widgets that follow an input with this option (upload button, player).
UPLOAD_EXTRA_WIDGETS = {"image_upload": 1, "audio_upload": 2, "video_upload": 1, "animated_image_upload": 1}

# The ComfyUI core nodes (0.3.64) our example workflows use, as /object_info lists them
# (file lists are empty here: they depend on the server's folders).
CORE_OBJECT_INFO: dict[str, dict[str, Any]] = {
    "LoadImage": {
        "input": {"required": {"image": [[], {"image_upload": True}]}},
        "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"], "display_name": "Load Image",
    },
    "LoadAudio": {
        "input": {"required": {"audio": [[], {"audio_upload": True}]}},
        "output": ["AUDIO"], "output_name": ["AUDIO"], "display_name": "Load Audio",
    },
    "EmptyAudio": {
        "input": {"required": {
            "duration": ["FLOAT", {"default": 60.0, "min": 0.0, "step": 0.01}],
            "sample_rate": ["INT", {"default": 44100}],
            "channels": ["INT", {"default": 2, "min": 1, "max": 2}],
        }},
        "output": ["AUDIO"], "output_name": ["AUDIO"], "display_name": "Empty Audio",
    },
    "PreviewImage": {
        "input": {"required": {"images": ["IMAGE", {}]}},
        "output": [], "output_name": [], "display_name": "Preview Image",
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "output": [], "output_name": [], "display_name": "Save Image",
    },
}


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node type, bad link, widget count mismatch)."""


# --------------------------------------------------------------------------------------
# Input definitions
# --------------------------------------------------------------------------------------


def _spec_to_json(spec: Any) -> list[Any]:
    if isinstance(spec, str):
        return [spec, {}]
    kind = spec[0]
    opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    opts.pop("tooltip", None)
    return [list(kind) if isinstance(kind, (list, tuple)) else kind, opts]


def pack_object_info(pack_root: Path = REPO_ROOT, include_core: bool = True) -> dict[str, dict[str, Any]]:
    """/object_info-like definitions of this pack's nodes (imported as ComfyUI imports them)
    and, with `include_core`, of CORE_OBJECT_INFO."""
    import importlib.util

    name = "_wan_s2v_pack_for_workflows"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            name, pack_root / "__init__.py", submodule_search_locations=[str(pack_root)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    info: dict[str, dict[str, Any]] = dict(CORE_OBJECT_INFO) if include_core else {}
    for key, cls in module.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        info[key] = {
            "input": {section: {n: (s if section == "hidden" else _spec_to_json(s))
                                for n, s in (inputs.get(section) or {}).items()}
                      for section in ("required", "optional", "hidden") if inputs.get(section)},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
            "display_name": module.NODE_DISPLAY_NAME_MAPPINGS.get(key, key),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    return info


def fetch_object_info(base_url: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(base_url.rstrip("/") + "/object_info", timeout=60) as response:
        return json.loads(response.read())


def _combo_options(kind: Any, opts: dict[str, Any]) -> list[Any] | None:
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(opts.get("options") or [])
    return None


def is_widget(spec: list[Any]) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_slots(node_info: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """The node's widget values in order: (input name, spec) for an input's widget, (None,
    "control") / (None, "upload") for a front-end-only widget (seed control, upload button)."""
    slots: list[tuple[str | None, Any]] = []
    for section in ("required", "optional"):
        for name, spec in (node_info.get("input", {}).get(section) or {}).items():
            spec = _spec_to_json(spec)
            if not is_widget(spec):
                continue
            slots.append((name, spec))
            opts = spec[1]
            if spec[0] == "INT" and (name in SEED_NAMES or opts.get("control_after_generate")):
                slots.append((None, "control"))
            for option, extra in UPLOAD_EXTRA_WIDGETS.items():
                if opts.get(option):
                    slots.extend([(None, "upload")] * extra)
    return slots


def socket_inputs(node_info: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of every input that is a socket (no widget), in order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in (node_info.get("input", {}).get(section) or {}).items():
            spec = _spec_to_json(spec)
            if not is_widget(spec):
                out.append((name, spec[0], section == "optional"))
    return out


def all_inputs(node_info: dict[str, Any]) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {}
    for section in ("required", "optional"):
        for name, spec in (node_info.get("input", {}).get(section) or {}).items():
            merged[name] = _spec_to_json(spec)
    return merged


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------


def map_widget_values(node: dict[str, Any], node_info: dict[str, Any]) -> dict[str, Any]:
    """{input name: value} from a UI node's widgets_values; errors on a count mismatch."""
    values = node.get("widgets_values")
    if isinstance(values, dict):  # some nodes (e.g. VHS) save a name -> value dict
        return dict(values)
    values = list(values or [])
    slots = widget_slots(node_info)
    required_slots = len(slots)
    # Trailing front-end-only widgets may be missing; optional seed controls absent in old saves.
    if len(values) > required_slots:
        raise WorkflowError(f"node {node.get('id')} ({node.get('type')}): {len(values)} widget values, "
                            f"the node has {required_slots} widgets")
    mapped: dict[str, Any] = {}
    i = 0
    for name, spec in slots:
        if i >= len(values):
            break
        if name is None:
            # A seed's control value is skipped only when present (older saves lack it).
            if spec == "upload" or values[i] in CONTROL_VALUES:
                i += 1
            continue
        mapped[name] = values[i]
        i += 1
    missing = [n for n, _ in slots if n is not None and n not in mapped]
    if missing:
        raise WorkflowError(f"node {node.get('id')} ({node.get('type')}): no widget value for {missing}")
    return mapped


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The API-format prompt {node id: {"class_type", "inputs", "_meta"}} of a UI workflow."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = {int(n["id"]): n for n in workflow.get("nodes") or []}
    links: dict[int, tuple[int, int, int, int, str]] = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):  # newer serialisation
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        links[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]), link[5])

    def source_of(link_id: int) -> tuple[int, int] | None:
        """(node id, output slot) feeding this link, through reroutes and bypassed nodes."""
        seen = set()
        while True:
            if link_id in seen:
                raise WorkflowError(f"link cycle through {link_id}")
            seen.add(link_id)
            if link_id not in links:
                raise WorkflowError(f"link {link_id} is not in the links list")
            origin, slot, _, _, link_type = links[link_id]
            node = nodes.get(origin)
            if node is None:
                raise WorkflowError(f"link {link_id} comes from missing node {origin}")
            if node["type"] == "Reroute" or node.get("mode") == 4:
                candidates = [inp for inp in node.get("inputs") or [] if inp.get("link") is not None and (
                    node["type"] == "Reroute" or inp.get("type") == link_type)]
                if not candidates:
                    return None
                link_id = int(candidates[0]["link"])
                continue
            if node["type"] == "PrimitiveNode" or node.get("mode") == 2:
                return None
            return origin, slot

    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in sorted(nodes.items()):
        node_type = node["type"]
        if node_type in FRONTEND_ONLY or node.get("mode") in (2, 4):
            continue
        info = object_info.get(node_type)
        if info is None:
            raise WorkflowError(f"node {node_id}: type {node_type!r} is unknown (not in object_info)")
        inputs: dict[str, Any] = map_widget_values(node, info)
        known = all_inputs(info)
        for slot in node.get("inputs") or []:
            link_id = slot.get("link")
            if link_id is None:
                continue
            name = slot.get("name")
            if isinstance(slot.get("widget"), dict):
                name = slot["widget"].get("name", name)
            if name not in known:
                raise WorkflowError(f"node {node_id} ({node_type}): linked input {name!r} is not an input")
            source = source_of(int(link_id))
            if source is None:
                continue
            inputs[name] = [str(source[0]), source[1]]
        title = node.get("title") or info.get("display_name") or node_type
        prompt[str(node_id)] = {"class_type": node_type, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path)
    parser.add_argument("--server", default=None, help="take /object_info from this ComfyUI (default: offline)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    info = fetch_object_info(args.server) if args.server else pack_object_info()
    api = ui_to_api(json.loads(args.workflow.read_text()), info)
    text = json.dumps(api, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
