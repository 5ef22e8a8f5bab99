"""Generate `example_workflows/*.json` (UI format, as the ComfyUI 1.27 front end saves them)
from the short descriptions below, so that they stay consistent with the node definitions.

    python scripts/make_workflows.py            # (re)write example_workflows/
    python scripts/make_workflows.py --check    # exit 1 if a file is out of date

Widget values are taken from each description, else from the input's default (INPUT_TYPES
of this pack's nodes, `workflow_api.CORE_OBJECT_INFO` for core nodes); links are made by
output and input name, and their types checked.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workflow_api import (
    NOTE_TYPES,
    _combo_options,
    pack_object_info,
    socket_inputs,
    widget_slots,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "example_workflows"
TINY = "(tiny random test model)"
DEMO_MEDIA = "(demo media)"
TINY_TEACHER = "(tiny random test teacher)"
FRONTEND_VERSION = "1.27.10"

# The Wan 2.2 S2V files as ComfyUI's own S2V template names them.
S2V_14B = "wan2.2_s2v_14B_bf16.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAV2VEC2 = "wav2vec2_large_english_fp16.safetensors"
# lightx2v's 4-step distill LoRA for Wan 2.2 as Comfy-Org's repackaged Wan 2.2 files name it.
LIGHTX2V_4STEP = "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors"
BYPASSED = 4  # the front end's node mode "bypass": the node passes its input through


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None
    text: str | None = None  # notes
    mode: int = 0  # 0: runs, BYPASSED: passes its input of the output's type through


@dataclass
class Workflow:
    name: str
    info: dict[str, dict[str, Any]]
    nodes: list[Node] = field(default_factory=list)
    links: list[tuple[int, int, str, int, str]] = field(default_factory=list)  # id, from, output, to, input

    def add(self, type_: str, pos: tuple[int, int], title: str | None = None, size=None, mode: int = 0,
            **widgets: Any) -> Node:
        if type_ not in self.info and type_ not in NOTE_TYPES:
            raise KeyError(f"unknown node type {type_}")
        node = Node(len(self.nodes) + 1, type_, pos, widgets, title, size, mode=mode)
        self.nodes.append(node)
        return node

    def note(self, pos: tuple[int, int], text: str, size=(420, 260)) -> Node:
        node = Node(len(self.nodes) + 1, "MarkdownNote", pos, {}, None, size, text)
        self.nodes.append(node)
        return node

    def link(self, src: Node, output: str, dst: Node, input_: str) -> None:
        self.links.append((len(self.links) + 1, src.id, output, dst.id, input_))

    # -- serialisation -------------------------------------------------------------------

    def _output_index(self, node: Node, output: str) -> int:
        info = self.info[node.type]
        names = info.get("output_name") or info["output"]
        if output not in names:
            raise KeyError(f"{node.type} has no output {output!r} (has {names})")
        return list(names).index(output)

    def _order(self) -> dict[int, int]:
        deps = {n.id: {src for _, src, _, dst, _ in self.links if dst == n.id} for n in self.nodes}
        order: dict[int, int] = {}
        while len(order) < len(self.nodes):
            ready = sorted(i for i, d in deps.items() if i not in order and d <= set(order))
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            for i in ready:
                order[i] = len(order)
        return order

    def _widget_values(self, node: Node) -> list[Any]:
        info = self.info[node.type]
        unknown = set(node.widgets) - {n for n, _ in widget_slots(info) if n}
        if unknown:
            raise KeyError(f"{self.name}: {node.type} has no widget(s) {sorted(unknown)}")
        values: list[Any] = []
        for name, spec in widget_slots(info):
            if name is None:
                values.append("fixed" if spec == "control" else None)
                continue
            kind, opts = spec
            if name in node.widgets:
                value = node.widgets[name]
            elif "default" in opts:
                value = opts["default"]
            else:
                choices = _combo_options(kind, opts)
                if choices:
                    value = choices[0]
                elif kind == "STRING":
                    value = ""
                else:
                    raise KeyError(f"{self.name}: {node.type}.{name} needs a value (no default)")
            values.append(value)
        return values

    def _size(self, node: Node, n_sockets: int, n_outputs: int, n_widgets: int) -> list[int]:
        if node.size:
            return list(node.size)
        return [320, 46 + 22 * max(n_sockets, n_outputs) + 26 * n_widgets]

    def to_ui(self) -> dict[str, Any]:
        order = self._order()
        ui_nodes = []
        by_id = {n.id: n for n in self.nodes}
        link_rows = []
        for link_id, src, output, dst, input_ in self.links:
            src_node, dst_node = by_id[src], by_id[dst]
            out_index = self._output_index(src_node, output)
            out_type = self.info[src_node.type]["output"][out_index]
            sockets = socket_inputs(self.info[dst_node.type])
            names = [n for n, _, _ in sockets]
            if input_ not in names:
                raise KeyError(f"{self.name}: {dst_node.type} has no socket input {input_!r}")
            in_type = sockets[names.index(input_)][1]
            if in_type not in ("*", out_type):
                raise TypeError(f"{self.name}: {src_node.type}.{output} ({out_type}) -> "
                                f"{dst_node.type}.{input_} ({in_type})")
            link_rows.append([link_id, src, out_index, dst, names.index(input_), out_type])
        for node in self.nodes:
            if node.type in NOTE_TYPES:
                ui_nodes.append({
                    "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size or (400, 200)),
                    "flags": {}, "order": order[node.id], "mode": 0, "inputs": [], "outputs": [],
                    "title": node.title or "Read me", "properties": {}, "widgets_values": [node.text or ""],
                    "color": "#432", "bgcolor": "#653",
                })
                continue
            info = self.info[node.type]
            sockets = socket_inputs(info)
            inputs = []
            for index, (name, kind, optional) in enumerate(sockets):
                link = next((row[0] for row in link_rows if row[3] == node.id and row[4] == index), None)
                entry: dict[str, Any] = {"name": name, "type": kind, "link": link}
                if optional:
                    entry["shape"] = 7
                inputs.append(entry)
            outputs = []
            for index, (name, kind) in enumerate(zip(info.get("output_name") or info["output"], info["output"])):
                targets = [row[0] for row in link_rows if row[1] == node.id and row[2] == index]
                outputs.append({"name": name, "type": kind, "links": targets or None, "slot_index": index})
            values = self._widget_values(node)
            ui = {
                "id": node.id, "type": node.type, "pos": list(node.pos),
                "size": self._size(node, len(inputs), len(outputs), len(values)),
                "flags": {}, "order": order[node.id], "mode": node.mode, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": node.type}, "widgets_values": values,
            }
            if node.title:
                ui["title"] = node.title
            ui_nodes.append(ui)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-wan-s2v-trainer/{self.name}")),
            "revision": 0,
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": len(self.links),
            "nodes": ui_nodes,
            "links": link_rows,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }


# --------------------------------------------------------------------------------------
# The workflows
# --------------------------------------------------------------------------------------

TINY_NOTE = """## Wan 2.2 S2V LoRA trainer: tiny demo (CPU, a minute or two)

Runs the whole job with the **built-in tiny random model** (no model files needed):

1. **Dataset** with folder `(demo media)`: writes two synthetic talking clips (moving pattern +
   chirp, with captions) to `input/wan_s2v_demo_media/` and caches them with the tiny encoders,
   with the CREPA teacher frames.
2. **Train** a rank-8 LoRA for 30 steps with **TREAD** (half of the video tokens skip the middle
   blocks) and **CREPA** (here against a tiny random DINOv2). The loss (and the eval loss on the
   same clips) is drawn live on the training node, and every 15 steps a **validation** clip
   (dataset's first frame, silence) is rendered with the LoRA in training and shown under the chart.
3. **Apply** the trained LoRA and **sample** a short clip from the dataset's first frame, then
   **save** it as mp4 with its audio (silence from *Empty Audio*; load your own with *Load Audio*).

The video is noise-like: the model is random. Swap in the real files with the
*train and validate* template."""

TRAIN_NOTE = """## Train a Wan 2.2 S2V LoRA and validate it

Files (ComfyUI folders, as the official S2V template):
- `diffusion_models/wan2.2_s2v_14B_bf16.safetensors`
- `vae/wan_2.1_vae.safetensors`
- `text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors`
- `audio_encoders/wav2vec2_large_english_fp16.safetensors`
- CREPA teacher: `dinov2/dinov2_vitg14/` (a transformers Dinov2Model folder: `config.json` +
  `model.safetensors`, e.g. facebook/dinov2-giant saved locally)

Put talking-head videos (with a same-name `.txt` caption each) in `input/s2v_dataset/`.
81-frame windows at 16 fps, ~832x480 buckets, CREPA teacher frames cached. Training uses
**TREAD** (ratio 0.5 on blocks 2..-2) and **CREPA** (lambda 0.5 on block 8) at SimpleTuner's Wan S2V defaults.
The loss is drawn live on the training node; every 250 steps the reference image + speech
below are rendered with the LoRA in training and shown on the node (videos under
`output/wan_s2v_training/wan_s2v_lora/validation/`). Cancel writes a checkpoint and a new run
resumes from it. `gpus` on the training node trains data-parallel on several GPUs.

**Few-step validation** (about a tenth of the time): un-bypass (Ctrl+B) *Step-distill LoRA
for validation* with one of lightx2v's step-distill LoRAs in `loras/` (e.g.
`wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors`) and set the validation node to
`num_inference_steps` 4, `guidance` 1 (no unconditional pass), `scheduler` euler, `shift` 5.
The LoRA is applied for the renders only; the trained LoRA is the same bit for bit.

After training, the sampler renders the whole speech clip with the trained LoRA applied for
that run only, on the already loaded transformer (`transformer_model`)."""

SAMPLE_NOTE = """## Sample with a trained Wan 2.2 S2V LoRA

Pick the LoRA in **Load Wan S2V LoRA** (from `models/loras`: an S2V LoRA, or a Wan T2V / I2V or
step-distill LoRA, in ComfyUI, kohya / musubi-tuner, Diffusers or DiffSynth-Studio keys; its
`report` output says what applies to S2V), a reference image and a speech clip. Chain more
*Load Wan S2V LoRA* nodes to stack LoRAs."""


def tiny_demo(info) -> Workflow:
    w = Workflow("wan_s2v_tiny_demo", info)
    w.note((-420, 0), TINY_NOTE, size=(400, 520))
    transformer = w.add("WanS2VLoadTransformer", (0, 0), transformer=TINY, dtype="float32")
    dataset = w.add(
        "WanS2VDataset", (0, 180), folder=DEMO_MEDIA, vae=TINY, text_encoder=TINY, audio_encoder=TINY,
        caption_strategy="textfile", num_frames=9, resolution=64.0, preview_count=1, teacher_frames=True,
        teacher_short_side=224,
    )
    lora = w.add("WanS2VLoraSettings", (380, 0), lora_rank=8, lora_alpha=8.0)
    optim = w.add("WanS2VOptimizerSettings", (380, 190), learning_rate=0.002)
    tread = w.add("WanS2VTreadSettings", (380, 450))
    crepa = w.add("WanS2VCrepaSettings", (380, 600), crepa_block_index=1, teacher=TINY_TEACHER)
    preview = w.add("PreviewImage", (0, 860), size=(300, 260))
    bundle = w.add("WanS2VLoadModelBundle", (380, 900), transformer=TINY, vae=TINY, text_encoder=TINY,
                   audio_encoder=TINY, dtype="float32", device="cpu")
    audio = w.add("EmptyAudio", (0, 1160), duration=1.0, sample_rate=16000, channels=1)
    validation = w.add(
        "WanS2VValidationSettings", (380, 1160), prompt="a person talks calmly", validation_step_interval=15,
        num_inference_steps=4, guidance=4.5, width=64, height=64, num_video_frames=13, validation_seed=0,
    )
    train = w.add(
        "WanS2VTrainLora", (760, 0), size=(380, 1180), output_name="wan_s2v_tiny_demo", max_train_steps=30,
        seed=0, mixed_precision="no", gradient_checkpointing=False, caption_dropout_probability=0.0,
        audio_dropout_probability=0.0, checkpoint_step_interval=0, resume_from_checkpoint="none",
        eval_step_interval=5,
    )
    apply = w.add("WanS2VApplyLoRA", (1180, 0))
    sampler = w.add(
        "WanS2VSampler", (1540, 0), prompt="a person talks calmly", width=64, height=64, frames_per_chunk=16,
        max_chunks=1, steps=4, seed=0, save_mp4=False,
    )
    save = w.add("WanS2VSaveVideo", (1920, 0), size=(320, 300), filename_prefix="wan_s2v_tiny_demo")
    w.link(transformer, "transformer", train, "transformer")
    w.link(dataset, "dataset", train, "dataset")
    w.link(dataset, "dataset", train, "eval_dataset")
    w.link(lora, "lora_settings", train, "lora_settings")
    w.link(optim, "optimizer_settings", train, "optimizer_settings")
    w.link(tread, "tread_settings", train, "tread_settings")
    w.link(crepa, "crepa_settings", train, "crepa_settings")
    w.link(dataset, "preview", preview, "images")
    w.link(dataset, "preview", validation, "image")
    w.link(audio, "AUDIO", validation, "audio")
    w.link(validation, "validation_settings", train, "validation_settings")
    w.link(bundle, "model", train, "validation_model")
    w.link(train, "lora", apply, "lora")
    w.link(bundle, "model", sampler, "model")
    w.link(dataset, "preview", sampler, "image")
    w.link(audio, "AUDIO", sampler, "audio")
    w.link(apply, "loras", sampler, "loras")
    w.link(sampler, "frames", save, "frames")
    w.link(sampler, "audio", save, "audio")
    return w


def train_and_validate(info) -> Workflow:
    w = Workflow("wan_s2v_lora_train_and_validate", info)
    w.note((-460, 0), TRAIN_NOTE, size=(440, 780))
    transformer = w.add("WanS2VLoadTransformer", (0, 0), transformer=S2V_14B, dtype="bfloat16")
    dataset = w.add(
        "WanS2VDataset", (0, 180), folder="s2v_dataset", vae=WAN_VAE, text_encoder=UMT5, audio_encoder=WAV2VEC2,
        caption_strategy="textfile", num_frames=81, resolution=624.0, teacher_frames=True, teacher_short_side=518,
    )
    lora = w.add("WanS2VLoraSettings", (380, 0), lora_rank=16, lora_alpha=16.0)
    optim = w.add("WanS2VOptimizerSettings", (380, 190), optimizer="adamw", learning_rate=1e-4)
    sched = w.add("WanS2VScheduleSettings", (380, 450), lr_scheduler="constant_with_warmup", lr_warmup_steps=50)
    # TREAD and CREPA at SimpleTuner's Wan S2V defaults.
    tread = w.add("WanS2VTreadSettings", (380, 620), selection_ratio=0.5, start_layer_idx=2, end_layer_idx=-2)
    crepa = w.add("WanS2VCrepaSettings", (380, 780), crepa_lambda=0.5, crepa_block_index=8,
                  crepa_adjacent_distance=1, crepa_adjacent_tau=1.0, teacher="dinov2_vitg14")
    # the automatic plan for the detected GPU (fp8 compute where it has FP8 tensor cores)
    memory = w.add("WanS2VMemorySettings", (380, 1060), auto=True, vram_budget_gib=0.0)
    preview = w.add("PreviewImage", (0, 860), size=(300, 260))
    bundle = w.add("WanS2VLoadModelBundle", (0, 1160), transformer=S2V_14B, vae=WAN_VAE, text_encoder=UMT5,
                   audio_encoder=WAV2VEC2, dtype="bfloat16", device="auto")
    image = w.add("LoadImage", (-460, 820), size=(320, 320), image="s2v_reference.png")
    audio = w.add("LoadAudio", (-460, 1160), size=(320, 140), audio="s2v_speech.wav")
    validation = w.add(
        "WanS2VValidationSettings", (380, 1380), prompt="a person talks to the camera", validation_step_interval=250,
        num_inference_steps=40, guidance=4.5, width=832, height=480, num_video_frames=81, validation_seed=42,
    )
    # Offered, off: with it on, the renders take 4 steps at guidance 1 (see the note).
    distill = w.add("WanS2VLoadLoRA", (0, 1480), title="Step-distill LoRA for validation", mode=BYPASSED,
                    lora_name=LIGHTX2V_4STEP, strength=1.0)
    train = w.add(
        "WanS2VTrainLora", (760, 0), size=(380, 1280), output_name="wan_s2v_lora", max_train_steps=1000, seed=42,
        mixed_precision="bf16", gradient_checkpointing=True, flow_weighting_scheme="logit_normal",
        flow_schedule_shift=3.0, checkpoint_step_interval=250, resume_from_checkpoint="latest", save_to="loras",
    )
    apply = w.add("WanS2VApplyLoRA", (1180, 0))
    sampler = w.add("WanS2VSampler", (1540, 0), prompt="a person talks to the camera", width=832, height=480,
                    frames_per_chunk=80, max_chunks=0, steps=40, guidance=4.5, seed=0, save_mp4=False)
    save = w.add("WanS2VSaveVideo", (1920, 0), size=(360, 340), filename_prefix="wan_s2v_lora_validation")
    w.link(transformer, "transformer", train, "transformer")
    w.link(dataset, "dataset", train, "dataset")
    w.link(lora, "lora_settings", train, "lora_settings")
    w.link(optim, "optimizer_settings", train, "optimizer_settings")
    w.link(sched, "schedule_settings", train, "schedule_settings")
    w.link(tread, "tread_settings", train, "tread_settings")
    w.link(crepa, "crepa_settings", train, "crepa_settings")
    w.link(memory, "memory_settings", train, "memory_settings")
    w.link(dataset, "preview", preview, "images")
    w.link(transformer, "transformer", bundle, "transformer_model")
    w.link(image, "IMAGE", validation, "image")
    w.link(audio, "AUDIO", validation, "audio")
    w.link(validation, "validation_settings", train, "validation_settings")
    w.link(distill, "loras", validation, "extra_loras")
    w.link(bundle, "model", train, "validation_model")
    w.link(train, "lora", apply, "lora")
    w.link(bundle, "model", sampler, "model")
    w.link(image, "IMAGE", sampler, "image")
    w.link(audio, "AUDIO", sampler, "audio")
    w.link(apply, "loras", sampler, "loras")
    w.link(sampler, "frames", save, "frames")
    w.link(sampler, "audio", save, "audio")
    return w


def sample_with_lora(info) -> Workflow:
    w = Workflow("wan_s2v_sample_with_lora", info)
    w.note((-460, 0), SAMPLE_NOTE, size=(440, 220))
    bundle = w.add("WanS2VLoadModelBundle", (0, 0), transformer=S2V_14B, vae=WAN_VAE, text_encoder=UMT5,
                   audio_encoder=WAV2VEC2, dtype="bfloat16", device="auto")
    lora = w.add("WanS2VLoadLoRA", (0, 270), lora_name="wan_s2v_lora.safetensors", strength=1.0)
    image = w.add("LoadImage", (0, 400), size=(320, 320), image="s2v_reference.png")
    audio = w.add("LoadAudio", (0, 760), size=(320, 140), audio="s2v_speech.wav")
    sampler = w.add("WanS2VSampler", (380, 0), prompt="a person talks to the camera", width=832, height=480,
                    frames_per_chunk=80, max_chunks=0, steps=40, guidance=4.5, seed=0, save_mp4=False)
    save = w.add("WanS2VSaveVideo", (760, 0), size=(360, 340), filename_prefix="wan_s2v_lora_sample")
    w.link(bundle, "model", sampler, "model")
    w.link(lora, "loras", sampler, "loras")
    w.link(image, "IMAGE", sampler, "image")
    w.link(audio, "AUDIO", sampler, "audio")
    w.link(sampler, "frames", save, "frames")
    w.link(sampler, "audio", save, "audio")
    return w


WORKFLOWS = (tiny_demo, train_and_validate, sample_with_lora)


def render_all(info: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """{file name: JSON text} of every example workflow."""
    info = info or pack_object_info()
    out = {}
    for make in WORKFLOWS:
        workflow = make(info)
        out[f"{workflow.name}.json"] = json.dumps(workflow.to_ui(), indent=2) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = OUT_DIR / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
            continue
        OUT_DIR.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    if stale:
        print(f"out of date (run scripts/make_workflows.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
