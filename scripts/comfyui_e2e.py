"""End-to-end checks of this pack against a real ComfyUI server.

    python scripts/comfyui_e2e.py --comfyui /tmp/ComfyUI      # or set COMFYUI_PATH

Starts ComfyUI with the pack linked in (see `comfyui_server.py`), runs every check in
`CHECKS`, prints one line per check and exits non-zero if any failed.

A check is a function `check(ctx: E2EContext) -> str` that raises `CheckFailed` (or any
exception) on failure and returns a one-line summary on success. To add one (e.g. queue an
example workflow and inspect its outputs), write the function and append it to `CHECKS`;
`tests/test_comfyui_e2e.py` runs each entry as its own pytest test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# scripts/ is not a package: comfyui_server is imported from this folder.
from comfyui_server import (
    PACK_LINK_NAME,
    REPO_ROOT,
    ComfyUIError,
    ComfyUIServer,
    import_failure_excerpt,
)

CATEGORY_PREFIX = "Wan S2V Trainer"
PACK_MODULE = f"custom_nodes.{PACK_LINK_NAME}"
EXAMPLE_WORKFLOWS = REPO_ROOT / "example_workflows"
# Node types the front end provides itself; they never appear in /object_info.
FRONTEND_ONLY_NODE_TYPES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})


class CheckFailed(AssertionError):
    """A check found the pack misbehaving in ComfyUI."""


class CheckSkipped(Exception):
    """A check cannot run here (e.g. no Chromium); reported, not a failure."""


@dataclass
class E2EContext:
    """What every check gets: the running server and what the pack itself declares."""

    server: ComfyUIServer
    node_class_mappings: dict[str, type]
    node_display_names: dict[str, str]
    web_directory: Path | None
    _object_info: dict[str, Any] | None = field(default=None, repr=False)

    def object_info(self) -> dict[str, Any]:
        """`/object_info`, fetched once per context."""
        if self._object_info is None:
            self._object_info = self.server.object_info()
        return self._object_info


Check = Callable[[E2EContext], str]


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


# --------------------------------------------------------------------------------------
# What the pack declares
# --------------------------------------------------------------------------------------


def load_pack(pack_root: Path = REPO_ROOT) -> ModuleType:
    """Import the pack's `__init__.py` as a package, outside ComfyUI.

    Importing it is cheap by design (no torch, no model code), and the node classes do not
    need ComfyUI to be importable; this gives the list of nodes the server must show.
    """
    name = "_wan_s2v_pack_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, pack_root / "__init__.py", submodule_search_locations=[str(pack_root)]
    )
    if spec is None or spec.loader is None:
        raise CheckFailed(f"cannot import the pack at {pack_root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def make_context(server: ComfyUIServer, pack_root: Path = REPO_ROOT) -> E2EContext:
    pack = load_pack(pack_root)
    web = getattr(pack, "WEB_DIRECTORY", None)
    return E2EContext(
        server=server,
        node_class_mappings=dict(pack.NODE_CLASS_MAPPINGS),
        node_display_names=dict(getattr(pack, "NODE_DISPLAY_NAME_MAPPINGS", {}) or {}),
        web_directory=(pack_root / web).resolve() if web else None,
    )


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def check_pack_imported(ctx: E2EContext) -> str:
    """ComfyUI loaded the pack: no IMPORT FAILED for it, and it is in the import table."""
    log = ctx.server.log_text()
    excerpt = import_failure_excerpt(log, ctx.server.pack_link)
    if excerpt is not None:
        raise CheckFailed(f"ComfyUI failed to import the pack:\n{excerpt}")
    link = str(ctx.server.pack_link)
    timing = [line for line in log.splitlines() if line.rstrip().endswith(link) and "seconds" in line]
    if not timing:
        raise CheckFailed(f"the pack ({link}) is missing from ComfyUI's custom-node import list")
    return timing[-1].strip()


def check_nodes_registered(ctx: E2EContext) -> str:
    """Every NODE_CLASS_MAPPINGS key is in /object_info, from our module, in our category."""
    info = ctx.object_info()
    problems: list[str] = []
    for key in ctx.node_class_mappings:
        entry = info.get(key)
        if entry is None:
            problems.append(f"{key}: missing from /object_info")
            continue
        if entry.get("python_module") != PACK_MODULE:
            problems.append(f"{key}: registered by {entry.get('python_module')!r}, not {PACK_MODULE!r}")
        category = str(entry.get("category", ""))
        if not category.startswith(CATEGORY_PREFIX):
            problems.append(f"{key}: category {category!r} does not start with {CATEGORY_PREFIX!r}")
        expected_name = ctx.node_display_names.get(key)
        if expected_name is not None and entry.get("display_name") != expected_name:
            problems.append(f"{key}: display name {entry.get('display_name')!r} != {expected_name!r}")
    extra = sorted(
        key
        for key, entry in info.items()
        if entry.get("python_module") == PACK_MODULE and key not in ctx.node_class_mappings
    )
    if extra:
        problems.append(f"nodes from the pack that NODE_CLASS_MAPPINGS does not list: {extra}")
    if not ctx.node_class_mappings:
        problems.append("the pack declares no nodes")
    if problems:
        raise CheckFailed("\n".join(problems))
    return f"{len(ctx.node_class_mappings)} node(s): {', '.join(sorted(ctx.node_class_mappings))}"


def _workflow_node_types(workflow: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(node types used, subgraph ids defined) in a UI-format workflow, subgraphs included."""
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    defined = {str(sg.get("id")) for sg in subgraphs}
    used: set[str] = set()
    for graph in [workflow, *subgraphs]:
        for node in graph.get("nodes") or []:
            used.add(str(node.get("type")))
    return used, defined


def check_workflow_templates(ctx: E2EContext) -> str:
    """`/api/workflow_templates` lists exactly our example_workflows/*.json, each is served,
    is a UI-format workflow, and uses only node types the server knows."""
    expected = sorted(p.stem for p in EXAMPLE_WORKFLOWS.glob("*.json"))
    listed = ctx.server.get("/api/workflow_templates")
    ours = sorted(listed.get(PACK_LINK_NAME, []))
    if not expected:
        if ours:
            raise CheckFailed(f"server lists templates {ours} but example_workflows/ has no .json")
        return "no example workflows yet (example_workflows/ is empty)"
    if ours != expected:
        raise CheckFailed(f"server lists {ours}, example_workflows/ has {expected}")
    known = set(ctx.object_info()) | FRONTEND_ONLY_NODE_TYPES
    problems: list[str] = []
    for name in expected:
        served = ctx.server.get(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json")
        on_disk = json.loads((EXAMPLE_WORKFLOWS / f"{name}.json").read_text())
        if served != on_disk:
            problems.append(f"{name}: served content differs from the file")
        if not isinstance(on_disk.get("nodes"), list) or "links" not in on_disk:
            problems.append(f"{name}: not a UI-format workflow (needs 'nodes' and 'links')")
            continue
        used, subgraph_ids = _workflow_node_types(on_disk)
        unknown = sorted(used - known - subgraph_ids)
        if unknown:
            problems.append(f"{name}: node types unknown to the server: {unknown}")
    if problems:
        raise CheckFailed("\n".join(problems))
    return f"{len(expected)} template(s): {', '.join(expected)}"


def check_web_extensions(ctx: E2EContext) -> str:
    """Every .js file under WEB_DIRECTORY is listed at /extensions and served."""
    if ctx.web_directory is None or not ctx.web_directory.is_dir():
        return "no WEB_DIRECTORY folder"
    files = sorted(p.relative_to(ctx.web_directory).as_posix() for p in ctx.web_directory.rglob("*.js"))
    if not files:
        return "WEB_DIRECTORY has no .js files yet"
    listed = set(ctx.server.get("/extensions"))
    problems: list[str] = []
    for rel in files:
        url = f"/extensions/{PACK_LINK_NAME}/{rel}"
        if url not in listed:
            problems.append(f"{url} not listed by /extensions")
            continue
        served = ctx.server.get(url)
        if served != (ctx.web_directory / rel).read_text():
            problems.append(f"{url} served content differs from the file")
    if problems:
        raise CheckFailed("\n".join(problems))
    return f"{len(files)} script(s): {', '.join(files)}"


def check_dataset_node_runs(ctx: E2EContext) -> str:
    """Queue WanS2VDataset (tiny test encoders) -> PreviewImage on generated talking videos in
    the server's input folder: the prompt succeeds, the preview image is saved."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from trainer.data import synthetic
    finally:
        sys.path.pop(0)
    folder = ctx.server.input_dir / "e2e_s2v_dataset"
    synthetic.write_video(folder / "talk_one.mp4", fps=25, duration=1.3)
    synthetic.write_video(folder / "talk_two.mp4", fps=30, duration=1.3, size=(48, 64))
    (folder / "broken.mp4").write_bytes(b"not a video")
    tiny = "(tiny random test model)"
    graph = {
        "1": {"class_type": "WanS2VDataset", "inputs": {
            "folder": "e2e_s2v_dataset", "vae": tiny, "text_encoder": tiny, "audio_encoder": tiny,
            "caption_strategy": "filename", "instance_prompt": "", "num_frames": 9, "window_stride": 0,
            "max_windows_per_video": 0, "resolution": 56.0, "resolution_type": "pixel_area", "crop": True,
            "allow_zero_audio": False}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
    }
    result = ctx.server.wait_for(ctx.server.queue_prompt(graph), timeout=300)
    images = result.outputs.get("2", {}).get("images", [])
    if not images:
        raise CheckFailed(f"no preview image from the dataset node: {result.outputs}")
    return f"dataset node ran (2 clips, 4 windows, 1 skip), {len(images)} preview image(s)"


TINY_DEMO = EXAMPLE_WORKFLOWS / "wan_s2v_tiny_demo.json"
TRAIN_EVENT = "wan_s2v.train"


def _repo_import(module: str) -> Any:
    sys.path.insert(0, str(REPO_ROOT))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.pop(0)


def tiny_demo_api(ctx: E2EContext) -> dict[str, Any]:
    """The tiny demo workflow in API format, converted with the server's /object_info."""
    from workflow_api import ui_to_api

    return ui_to_api(json.loads(TINY_DEMO.read_text()), ctx.object_info())


def check_tiny_demo_workflow(ctx: E2EContext) -> str:
    """Convert example_workflows/wan_s2v_tiny_demo.json to API format, queue it and follow the
    websocket: the LoRA file is written and loads, the mp4 has video and an audio stream,
    and one `wan_s2v.train` loss event per step reached the websocket, tagged with the
    training node's id (eval losses included)."""
    import time

    if not ctx.server.hears_events:
        raise CheckFailed("the loss events arrive over the websocket, and this Python has no websocket-client: "
                          "pip install websocket-client (requirements-test.txt has it)")
    api = tiny_demo_api(ctx)
    train_id = next(k for k, v in api.items() if v["class_type"] == "WanS2VTrainLora")
    train_inputs = api[train_id]["inputs"]
    steps = int(train_inputs["max_train_steps"])
    lora_file = ctx.server.models_dir / "loras" / f"{train_inputs['output_name']}.safetensors"
    if lora_file.exists():
        lora_file.unlink()  # left by an earlier run: must be written again
    started = time.monotonic()
    result = ctx.server.wait_for(ctx.server.queue_prompt(api), timeout=900)
    elapsed = time.monotonic() - started

    if not lora_file.is_file():
        raise CheckFailed(f"the trained LoRA {lora_file} was not written")
    lora = _repo_import("trainer.lora.io").read_lora_file(lora_file)
    n_tensors = len(getattr(lora, "tensors", None) or getattr(lora, "state", None) or {})

    save_id = next(k for k, v in api.items() if v["class_type"] == "WanS2VSaveVideo")
    shown = result.outputs.get(save_id, {}).get("images", [])
    if not shown:
        raise CheckFailed(f"Save Wan S2V Video showed no file: {result.outputs}")
    video = ctx.server.output_dir / shown[0].get("subfolder", "") / shown[0]["filename"]
    info = _repo_import("trainer.sample.media").probe_mp4(video)
    if not info["video_frames"] or not info["has_audio"] or info["audio_seconds"] <= 0:
        raise CheckFailed(f"{video}: expected video frames and an audio stream, got {info}")

    events = result.events_of_type(TRAIN_EVENT)
    mine = [e for e in events if str(e.get("node")) == train_id]
    if len(mine) != steps or [e["step"] for e in mine] != list(range(1, steps + 1)):
        raise CheckFailed(f"expected {steps} {TRAIN_EVENT} events for node {train_id}, got "
                          f"{[(e.get('node'), e.get('step')) for e in events]}")
    bad = [e for e in mine if not (isinstance(e.get("loss"), float) and isinstance(e.get("lr"), float))]
    if bad:
        raise CheckFailed(f"loss events without float loss/lr: {bad[:3]}")
    evals = [e for e in mine if "eval_loss" in e]
    interval = int(train_inputs.get("eval_step_interval", 0) or 0)
    if interval and not evals:
        raise CheckFailed("eval_step_interval is set but no event carried an eval_loss")
    return (f"tiny demo ran in {elapsed:.0f} s: LoRA {lora_file.name} ({n_tensors} tensors), "
            f"{video.name} ({info['video_frames']} frames {info['width']}x{info['height']}, "
            f"audio {info['audio_seconds']:.2f} s), {len(mine)} loss events "
            f"(loss {mine[0]['loss']:.3f} -> {mine[-1]['loss']:.3f}), {len(evals)} eval losses")


TINY = "(tiny random test model)"


def _sampler_inputs(model: list[Any], image: list[Any], audio: list[Any], seed: int, save_mp4: bool) -> dict[str, Any]:
    return {"model": model, "image": image, "audio": audio, "prompt": "a person talks", "negative_prompt": "",
            "width": 64, "height": 64, "frames_per_chunk": 8, "max_chunks": 1, "steps": 2, "guidance": 4.5,
            "shift": 0.0, "seed": seed, "scheduler": "unipc", "cfg_mode": "batch", "save_mp4": save_mp4}


def _saved_videos(ctx: E2EContext, outputs: dict[str, Any], node_id: str) -> list[Path]:
    shown = outputs.get(node_id, {}).get("images", [])
    return [ctx.server.output_dir / item.get("subfolder", "") / item["filename"] for item in shown]


def check_sampler_video_into_native_save_video(ctx: E2EContext) -> str:
    """The sampler's VIDEO output goes into ComfyUI's own Save Video: with save_mp4 on (the
    mp4 as VideoFromFile, streams copied) and off (VideoFromComponents, encoded by ComfyUI);
    both files have the sampler's 5 frames and an audio stream. Our own Save Wan S2V Video
    also outputs a VIDEO that Save Video takes."""
    info = ctx.object_info()
    for node, slot in (("WanS2VSampler", 2), ("WanS2VSaveVideo", 0)):
        if info[node]["output"][slot] != "VIDEO":
            raise CheckFailed(f"{node} output {slot} is {info[node]['output'][slot]!r}, not VIDEO")
    tiny = {"vae": TINY, "text_encoder": TINY, "audio_encoder": TINY}
    graph = {
        "1": {"class_type": "WanS2VLoadModelBundle", "inputs": {"transformer": TINY, **tiny, "dtype": "float32",
                                                                  "numerics": "official", "device": "cpu"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x808080}},
        "3": {"class_type": "EmptyAudio", "inputs": {"duration": 1.0, "sample_rate": 16000, "channels": 1}},
        "4": {"class_type": "WanS2VSampler", "inputs": _sampler_inputs(["1", 0], ["2", 0], ["3", 0], 1, True)},
        "5": {"class_type": "WanS2VSampler", "inputs": _sampler_inputs(["1", 0], ["2", 0], ["3", 0], 2, False)},
        "6": {"class_type": "SaveVideo", "inputs": {"video": ["4", 2], "filename_prefix": "e2e_video/from_file",
                                                   "format": "auto", "codec": "auto"}},
        "7": {"class_type": "SaveVideo", "inputs": {"video": ["5", 2], "filename_prefix": "e2e_video/components",
                                                   "format": "mp4", "codec": "h264"}},
        "8": {"class_type": "WanS2VSaveVideo", "inputs": {"frames": ["5", 0], "filename_prefix": "e2e_ours", "fps": 16,
                                                         "audio": ["5", 1]}},
        "9": {"class_type": "SaveVideo", "inputs": {"video": ["8", 0], "filename_prefix": "e2e_video/ours",
                                                   "format": "auto", "codec": "auto"}},
    }
    result = ctx.server.wait_for(ctx.server.queue_prompt(graph), timeout=600)
    probe = _repo_import("trainer.sample.media").probe_mp4
    details = []
    for node_id, label in (("6", "from file"), ("7", "from components"), ("9", "from Save Wan S2V Video")):
        files = _saved_videos(ctx, result.outputs, node_id)
        if len(files) != 1 or not files[0].is_file():
            raise CheckFailed(f"Save Video ({label}) wrote no file: {result.outputs.get(node_id)}")
        media = probe(files[0])
        if media["video_frames"] != 5 or not media["has_audio"]:
            raise CheckFailed(f"{files[0]} ({label}): expected 5 frames and audio, got {media}")
        details.append(f"{label}: {files[0].name} {media['video_frames']} frames {media['width']}x{media['height']} "
                       f"+ audio {media['audio_seconds']:.2f} s")
    return "; ".join(details)


# A transformer big enough that keeping one per run would show in the server's memory:
# the tiny model's text/audio widths (it runs with the tiny encoders), 45.6 M parameters,
# 182 MB in float32.
RELEASE_MODEL_CONFIG = {"num_attention_heads": 8, "attention_head_dim": 64, "ffn_dim": 2048, "num_layers": 8,
                        "audio_inject_layers": [0, 2, 4, 6]}
RELEASE_MODEL_FILE = "e2e_release_s2v_45M.safetensors"
RELEASE_RUNS = 4
#: Runs that set the baseline: one per numerics path, so first-use allocations (imports, caches) are in it.
RELEASE_WARMUP_RUNS = 2
RELEASE_TOLERANCE_MB = 64.0


def _rss_mb(pid: int) -> float:
    """Resident set size of a process, MiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise CheckFailed(f"no VmRSS for process {pid}")


def _free_and_settle(ctx: E2EContext, pid: int, timeout: float = 30.0) -> float:
    """POST /free (unload models, drop every cached node output; ComfyUI then runs gc.collect)
    and return the RSS once it stops moving (3 readings 0.5 s apart within 1 MiB)."""
    import time

    ctx.server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    readings: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        readings.append(_rss_mb(pid))
        last = readings[-3:]
        if len(readings) >= 4 and max(last) - min(last) < 1.0:
            break
    return readings[-1]


def _release_graph(numerics: str, seed: int) -> dict[str, Any]:
    tiny = {"vae": TINY, "text_encoder": TINY, "audio_encoder": TINY}
    return {
        "1": {"class_type": "WanS2VLoadTransformer", "inputs": {"transformer": RELEASE_MODEL_FILE, "dtype": "float32",
                                                                  "numerics": numerics}},
        "2": {"class_type": "WanS2VLoadModelBundle", "inputs": {"transformer": TINY, **tiny, "dtype": "float32",
                                                                  "numerics": numerics, "device": "cpu",
                                                                  "transformer_model": ["1", 0]}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "4": {"class_type": "EmptyAudio", "inputs": {"duration": 1.0, "sample_rate": 16000, "channels": 1}},
        "5": {"class_type": "WanS2VSampler", "inputs": _sampler_inputs(["2", 0], ["3", 0], ["4", 0], seed, False)},
        "6": {"class_type": "SaveVideo", "inputs": {"video": ["5", 2], "filename_prefix": "e2e_release/run",
                                                   "format": "auto", "codec": "auto"}},
    }


def check_memory_returns_to_baseline(ctx: E2EContext) -> str:
    """Load a 182 MB transformer file through Load Wan S2V Transformer and sample with it
    (-> native Save Video) RELEASE_RUNS times, each run with other loader and sampler inputs
    (so ComfyUI loads and samples again), freeing with POST /free after each: the server's
    RSS after each run past the first RELEASE_WARMUP_RUNS (one per numerics path) stays within
    RELEASE_TOLERANCE_MB of their high-water mark. A model or bundle kept alive by the pack
    would add ~182 MB per run."""
    import torch

    server_proc = getattr(ctx.server, "_proc", None)
    if server_proc is None:
        raise CheckFailed("no server process to measure")
    pid = server_proc.pid
    model_file = ctx.server.models_dir / "diffusion_models" / RELEASE_MODEL_FILE
    model_file.parent.mkdir(parents=True, exist_ok=True)
    s2v = _repo_import("trainer.model.transformer_s2v")
    io = _repo_import("trainer.model.transformer_io")
    torch.manual_seed(0)
    model = s2v.WanS2VTransformer3DModel(**{**s2v.TINY_TRANSFORMER_CONFIG, **RELEASE_MODEL_CONFIG})
    io.save_transformer(model, model_file, layout="comfyui")
    file_mb = model_file.stat().st_size / 2**20
    del model
    try:
        idle = _free_and_settle(ctx, pid)
        loaded, freed = [], []
        for run in range(RELEASE_RUNS):
            graph = _release_graph(("official", "comfyui")[run % 2], seed=100 + run)
            result = ctx.server.wait_for(ctx.server.queue_prompt(graph), timeout=600)
            if not _saved_videos(ctx, result.outputs, "6"):
                raise CheckFailed(f"run {run + 1}: Save Video wrote nothing: {result.outputs}")
            loaded.append(_rss_mb(pid))  # the outputs are still cached here
            freed.append(_free_and_settle(ctx, pid))
    finally:
        model_file.unlink(missing_ok=True)
    # The warm-up runs' high-water mark: whether glibc hands freed pages back to the OS after
    # /free is not ours to decide (one run measured 917 -> 760 MiB, the next ones stayed at
    # 928), but a model kept per run pushes every later run past it by the model's size.
    warmup = RELEASE_WARMUP_RUNS
    baseline = max(loaded[:warmup] + freed[:warmup])
    growth = [mb - baseline for mb in freed[warmup:]]
    numbers = (f"model file {file_mb:.0f} MiB; RSS idle {idle:.0f} MiB; after each run (outputs cached) "
               f"{', '.join(f'{mb:.0f}' for mb in loaded)} MiB; after /free {', '.join(f'{mb:.0f}' for mb in freed)} "
               f"MiB; growth over the peak of runs 1-{warmup}: {', '.join(f'{g:+.1f}' for g in growth)} MiB "
               f"(tolerance {RELEASE_TOLERANCE_MB:.0f})")
    if any(g > RELEASE_TOLERANCE_MB for g in growth):
        raise CheckFailed(f"memory did not return to the baseline after run {warmup}: " + numbers)
    return numbers


ISOLATION_MEMORY = {"base_model_precision": "no_change", "device": "cpu", "offload": "none",
                    "checkpointing_policy": "full", "checkpoint_interval": 1, "attention_blocks": -1,
                    "offload_activations": False, "enable_chunked_feed_forward": False,
                    "feed_forward_chunk_size": 0}


def tiny_train_graph(ctx: E2EContext, output_name: str, *, lora: dict[str, Any] | None = None,
                     memory: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    """The tiny demo's transformer and dataset into a plain training node (no TREAD, CREPA, eval
    or validation; 3 steps, resume "none", the LoRA into models/loras) with LoRA Settings (the
    demo's, updated with `lora`) and Memory Settings (ISOLATION_MEMORY updated with `memory`);
    `train` updates the training node's inputs. Node ids: "lora", "memory", "train"."""
    demo = tiny_demo_api(ctx)
    ids = {v["class_type"]: k for k, v in demo.items()}
    base = {ids[kind]: demo[ids[kind]] for kind in ("WanS2VLoadTransformer", "WanS2VDataset")}
    train_inputs = {k: v for k, v in demo[ids["WanS2VTrainLora"]]["inputs"].items()
                    if not isinstance(v, list) or k in ("transformer", "dataset")}
    return {
        **base,
        "lora": {"class_type": "WanS2VLoraSettings",
                 "inputs": {**demo[ids["WanS2VLoraSettings"]]["inputs"], **(lora or {})}},
        "memory": {"class_type": "WanS2VMemorySettings", "inputs": {**ISOLATION_MEMORY, **(memory or {})}},
        "train": {"class_type": "WanS2VTrainLora", "inputs": {
            **train_inputs, "output_name": output_name, "max_train_steps": 3, "save_to": "loras",
            "resume_from_checkpoint": "none", "eval_step_interval": 0, "lora_settings": ["lora", 0],
            "memory_settings": ["memory", 0], **train}},
    }


def check_failed_runs_change_nothing(ctx: E2EContext) -> str:
    """ComfyUI hands every prompt the same cached Load Wan S2V Transformer output. On it, in
    one server: a normal run (the reference), a run with an unknown lora_target_modules
    (fails), block offload in RAM and on disk, an int8-quanto run, each followed by a normal
    run; every normal run writes a LoRA file bit-identical to the reference's."""
    import torch

    loras = ctx.server.models_dir / "loras"
    read_lora_file = _repo_import("trainer.lora.io").read_lora_file

    def run(name: str, targets: str = "to_q,to_v", **memory: Any):
        graph = tiny_train_graph(ctx, f"e2e_isolation_{name}", lora={"lora_target_modules": targets}, memory=memory)
        return ctx.server.wait_for(ctx.server.queue_prompt(graph), timeout=600, raise_on_error=False)

    def lora(name: str) -> dict[str, Any]:
        path = loras / f"e2e_isolation_{name}.safetensors"
        if not path.is_file():
            raise CheckFailed(f"run {name} wrote no LoRA at {path}")
        return read_lora_file(path).state

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for old in loras.glob("e2e_isolation_*.safetensors"):
        old.unlink()
    spill = ctx.server.output_dir / "e2e_isolation_spill"
    steps = [("typo", {"targets": "to_qq"}), ("after_typo", {}),
             ("blocks", {"offload": "blocks"}), ("after_blocks", {}),
             ("disk", {"offload": "blocks", "offload_blocks_to_disk": str(spill)}), ("after_disk", {}),
             ("int8", {"base_model_precision": "int8-quanto"}), ("after_int8", {})]
    results = {"reference": run("reference")}
    for name, changes in steps:
        results[name] = run(name, **changes)
    errors = {name: (r.error or {}).get("exception_message", "").strip() for name, r in results.items()}
    # optimum-quanto is optional: without it in ComfyUI's environment the int8 run fails, clearly.
    no_quanto = "optimum-quanto" in errors["int8"]
    must_fail = {"typo", "int8"} if no_quanto else {"typo"}
    failed = [name for name, r in results.items() if (r.status != "success") != (name in must_fail)]
    if failed:
        raise CheckFailed("unexpected outcome of " + "; ".join(
            f"{name}: {results[name].status} {errors[name]}" for name in failed))
    reference = lora("reference")
    differ = [name for name in ("after_typo", "after_blocks", "after_disk", "after_int8")
              if not same(lora(name), reference)]
    if differ:
        raise CheckFailed(f"normal runs after {differ} trained another LoRA than the first normal run")
    if not no_quanto and same(lora("int8"), reference):
        raise CheckFailed("the int8-quanto run trained the same LoRA as no_change: it did not quantize")
    int8 = "an int8 run that failed (no optimum-quanto in ComfyUI's environment)" if no_quanto else "int8"
    return (f"{len(results)} prompts on one cached transformer; the unknown-target run failed "
            f"({errors['typo'].splitlines()[0]}); the normal runs after it, after block offload (RAM, disk) "
            f"and after {int8} match the reference LoRA bit for bit")


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = REPO_ROOT / "docs" / "screenshot_loss_chart.png"
OUR_JS = ("comfyui-wan-s2v-trainer", "loss_chart", "wan_s2v")

_WAIT_FOR_APP = "() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph)"
_LOAD_WORKFLOW = """async (wf) => {
  await window.app.loadGraphData(structuredClone(wf));
  const nodes = window.app.graph._nodes || window.app.graph.nodes;
  const unknown = nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type);
  return {count: nodes.length, unknown};
}"""
_TRAIN_NODE = """() => {
  const nodes = window.app.graph._nodes || window.app.graph.nodes;
  const node = nodes.find((n) => n.type === "WanS2VTrainLora");
  const h = node && node.properties && node.properties.wan_s2v_loss;
  return node ? {id: node.id, steps: h ? h.step.length : 0, evals: h ? h.eval.length : 0,
                 draws: node.__wanS2VChartDraws || 0, pos: node.pos, size: node.size} : null;
}"""
_QUEUE = """async () => {
  window.__wanS2VDone = null;
  window.__wanS2VEvents = 0;
  const api = window.app.api;
  api.addEventListener("execution_success", () => { window.__wanS2VDone = "success"; });
  api.addEventListener("execution_error", (e) => { window.__wanS2VDone = "error: " + JSON.stringify(e.detail); });
  api.addEventListener("wan_s2v.train", () => { window.__wanS2VEvents += 1; });
  await window.app.queuePrompt(0, 1);
}"""
_FOCUS = """([x, y, w, h]) => {
  const canvas = window.app.canvas;
  const el = canvas.canvas;
  const scale = Math.min(el.width / (w + 900), el.height / (h + 80), 1.2);
  canvas.ds.scale = scale;
  canvas.ds.offset = [-(x - 420) , -(y - 30)];
  canvas.setDirty(true, true);
  canvas.draw(true, true);
}"""


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise CheckSkipped(f"playwright is not installed ({err}); pip install playwright") from None
    if not CHROMIUM.exists():
        raise CheckSkipped(f"{CHROMIUM} not found; apt-get install -y chromium")
    return sync_playwright


def check_browser_workflows_and_loss_chart(ctx: E2EContext) -> str:
    """Headless Chromium on the real page: our extension registers, every example workflow
    loads with all its node types known and no error from our JS; then the tiny demo is queued
    from the page (the front end's own graph-to-prompt) and the loss chart fills and is drawn on
    the training node, and survives a serialize/reload of the workflow. Screenshot to docs/."""
    import time

    sync_playwright = _playwright()
    errors: list[str] = []
    details: list[str] = []
    if ctx.server.run_dir is not None:  # skip the first-run template browser in the isolated user folder
        settings = ctx.server.run_dir / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        current = json.loads(settings.read_text()) if settings.is_file() else {}
        settings.write_text(json.dumps({**current, "Comfy.TutorialCompleted": True}))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
            page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}")
                    if msg.type in ("error", "warning") else None)
            page.goto(ctx.server.base_url, wait_until="domcontentloaded")
            page.wait_for_function(_WAIT_FOR_APP, timeout=120_000)
            page.wait_for_timeout(1500)
            registered = page.evaluate(
                "() => (window.app.extensions || []).map((e) => e.name)"
            )
            if "wan_s2v_trainer.loss_chart" not in registered:
                raise CheckFailed(f"loss_chart extension not registered; extensions: {registered}")
            for path in sorted(EXAMPLE_WORKFLOWS.glob("*.json")):
                workflow = json.loads(path.read_text())
                loaded = page.evaluate(_LOAD_WORKFLOW, workflow)
                page.wait_for_timeout(300)
                if loaded["unknown"] or loaded["count"] != len(workflow["nodes"]):
                    raise CheckFailed(f"{path.name}: loaded {loaded} of {len(workflow['nodes'])} nodes")
                details.append(f"{path.stem}: {loaded['count']} nodes")

            workflow = json.loads(TINY_DEMO.read_text())
            page.evaluate(_LOAD_WORKFLOW, workflow)
            # An earlier check may have run the same graph: drop ComfyUI's node cache so that
            # training really runs (and sends its loss events) again.
            ctx.server.request("POST", "/free", {"free_memory": True})
            page.wait_for_timeout(1500)
            page.evaluate(_QUEUE)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                done = page.evaluate("() => window.__wanS2VDone")
                if done:
                    break
                page.wait_for_timeout(1000)
            else:
                raise CheckFailed("the tiny demo queued from the page did not finish in 900 s")
            if done != "success":
                raise CheckFailed(f"the tiny demo queued from the page failed: {done}")
            node = page.evaluate(_TRAIN_NODE)
            steps = next(v for v in workflow["nodes"] if v["type"] == "WanS2VTrainLora")["widgets_values"][1]
            if not node or node["steps"] != steps:
                raise CheckFailed(f"loss history on the node: {node}, expected {steps} steps")
            before = node["draws"]
            page.keyboard.press("Escape")
            page.evaluate(_FOCUS, [*node["pos"], *node["size"]])
            page.wait_for_timeout(800)
            node = page.evaluate(_TRAIN_NODE)
            if node["draws"] <= before:
                raise CheckFailed(f"the loss chart was not drawn: {node}")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            # Save/reload: the history is in the node's properties.
            saved = page.evaluate("() => window.app.graph.serialize()")
            page.evaluate(_LOAD_WORKFLOW, workflow)  # a fresh graph without history
            page.evaluate(_LOAD_WORKFLOW, saved)
            page.wait_for_timeout(500)
            reloaded = page.evaluate(_TRAIN_NODE)
            if reloaded["steps"] != steps or reloaded["evals"] != node["evals"]:
                raise CheckFailed(f"loss history lost on reload: {reloaded} vs {node}")
        finally:
            browser.close()
    ours = [e for e in errors if any(tag in e for tag in OUR_JS)]
    if ours:
        raise CheckFailed("errors from our JS:\n" + "\n".join(ours[:20]))
    return (f"{'; '.join(details)}; tiny demo from the page: {node['steps']} loss points, "
            f"{node['evals']} eval points drawn, kept on reload; screenshot {SCREENSHOT.relative_to(REPO_ROOT)}")


CHECKS: list[tuple[str, Check]] = [
    ("pack imported", check_pack_imported),
    ("nodes registered", check_nodes_registered),
    ("workflow templates", check_workflow_templates),
    ("web extensions", check_web_extensions),
    ("dataset node runs", check_dataset_node_runs),
    ("tiny demo workflow", check_tiny_demo_workflow),
    ("sampler VIDEO into native Save Video", check_sampler_video_into_native_save_video),
    ("memory returns to baseline", check_memory_returns_to_baseline),
    ("failed runs change nothing", check_failed_runs_change_nothing),
    ("browser: workflows and loss chart", check_browser_workflows_and_loss_chart),
]


# --------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------


def run_checks(ctx: E2EContext, checks: list[tuple[str, Check]] = CHECKS) -> list[CheckResult]:
    """Run every check, collecting failures instead of stopping at the first."""
    results: list[CheckResult] = []
    for name, check in checks:
        try:
            detail = check(ctx)
            results.append(CheckResult(name, True, detail))
        except CheckSkipped as err:
            results.append(CheckResult(name, True, f"skipped: {err}"))
        except CheckFailed as err:
            results.append(CheckResult(name, False, str(err)))
        except Exception:  # noqa: BLE001 - report any crash of a check as its failure
            results.append(CheckResult(name, False, traceback.format_exc()))
    return results


def format_report(results: list[CheckResult], title: str = "comfyui e2e") -> str:
    lines = []
    for result in results:
        head, *rest = (result.detail or "").splitlines() or [""]
        lines.append(f"{'PASS' if result.ok else 'FAIL'}  {result.name}: {head}")
        lines.extend(f"      {line}" for line in rest)
    passed = sum(r.ok for r in results)
    lines.append(f"{title}: {passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None, checks: list[tuple[str, Check]] = CHECKS, *,
         description: str | None = __doc__, title: str = "comfyui e2e") -> int:
    """Start ComfyUI, run `checks` (all, or those --only names), print the report; 1 if any failed."""
    parser = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    parser.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: env COMFYUI_PATH)")
    parser.add_argument(
        "--python", default=None, help="interpreter for the server (default: see comfyui_server)"
    )
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--cuda-stub", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--timeout", type=float, default=180.0, help="start-up deadline, seconds")
    parser.add_argument("--show-log", action="store_true", help="print the server log at the end")
    parser.add_argument("--only", action="append", default=None,
                        help="run only the checks whose name contains this (repeatable)")
    args = parser.parse_args(argv)
    checks = [c for c in checks if not args.only or any(o in c[0] for o in args.only)]

    try:
        server = ComfyUIServer(
            args.comfyui,
            python=args.python,
            port=args.port,
            cuda_stub=args.cuda_stub,
            startup_timeout=args.timeout,
        )
        print(f"starting ComfyUI from {server.comfyui} with {server.python} ...", flush=True)
        with server:
            stub = " ".join(map(str, server.preload)) or "none"
            print(f"ComfyUI up at {server.base_url}; CUDA stub preloaded: {stub}", flush=True)
            results = run_checks(make_context(server), checks)
            log = server.log_text()
    except ComfyUIError as err:
        print(f"FAIL  server: {err}", file=sys.stderr)
        return 1
    if args.show_log:
        print(log)
    print(format_report(results, title))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
