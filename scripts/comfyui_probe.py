"""Probe the pack as an attacker and a careless user would, through a real ComfyUI's HTTP API.

    python scripts/comfyui_probe.py --comfyui /tmp/ComfyUI      # or set COMFYUI_PATH

Starts ComfyUI with the pack linked in, on a temporary base directory (`comfyui_server.py`),
and runs every case in `CHECKS` with the tiny models on the CPU: a pickle planted through
`POST /upload/image`, files and folders that link outside ComfyUI's folders, names and runs
that could overwrite finished work, a cancelled run, NaN inputs, broken LoRA files and the
disk offload's temporary file. Each case must end in a refusal or a clear error, with nothing
outside the allowed folders opened or changed (watched with inotify) and no finished file
lost. Prints one line per case and exits non-zero if any failed.

The checks follow `comfyui_e2e.py` (a function `check(ctx) -> str` that raises on failure);
`tests/test_comfyui_probe.py` runs each as a pytest test. The folder "outside" the allowed
ones is `<base directory>/outside`: beside ComfyUI's input/output/models, in none of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import re
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# scripts/ is not a package: the e2e module is imported from this folder.
import comfyui_e2e as e2e
from comfyui_e2e import (
    CheckFailed,
    E2EContext,
    _repo_import,
    _sampler_inputs,
    tiny_demo_api,
    tiny_train_graph,
)
from comfyui_server import PromptResult

RUNS = "wan_s2v_training"  # the run folders, under ComfyUI's output folder
NAN = float("nan")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def outside(ctx: E2EContext, name: str) -> Path:
    """A fresh folder outside every folder the pack may use: beside the server's input,
    output and models folders, inside none of them."""
    assert ctx.server.run_dir is not None
    folder = ctx.server.run_dir / "outside" / name
    folder.mkdir(parents=True)
    return folder


def run(ctx: E2EContext, graph: dict[str, Any], timeout: float = 600.0) -> PromptResult:
    """Queue `graph` and wait for it, without raising when it fails."""
    return ctx.server.wait_for(ctx.server.queue_prompt(graph), timeout=timeout, raise_on_error=False)


def message(result: PromptResult) -> str:
    """The exception message of a failed prompt ("" when it succeeded)."""
    return str((result.error or {}).get("exception_message", "")).strip()


def expect_error(result: PromptResult, *words: str) -> str:
    """The first line of the prompt's error, which must contain every one of `words`."""
    text = message(result)
    if result.status != "error" or not all(word in text for word in words):
        raise CheckFailed(f"expected an error naming {words}, got {result.status}: {text or result.outputs}")
    return text.splitlines()[0]


def expect_success(result: PromptResult, what: str) -> PromptResult:
    if result.status != "success":
        raise CheckFailed(f"{what} failed: {result.status}: {message(result)}")
    return result


def shown_text(result: PromptResult, node_id: str) -> str:
    """What a Preview Any node showed."""
    return "".join(result.outputs.get(node_id, {}).get("text", []))


def log_lines(ctx: E2EContext, *words: str) -> list[str]:
    """Lines of the server log that contain every one of `words`."""
    return [line.strip() for line in ctx.server.log_text().splitlines() if all(w in line for w in words)]


def run_folders(ctx: E2EContext, name: str) -> list[Path]:
    """output/wan_s2v_training/<name> and its numbered siblings, in order."""
    base = ctx.server.output_dir / RUNS
    found = [p for p in base.iterdir() if re.fullmatch(rf"{re.escape(name)}(_\d+)?", p.name)] if base.is_dir() else []
    return sorted(found, key=lambda p: (len(p.name), p.name))


def tree(folder: Path) -> dict[str, Any]:
    """Everything below `folder`: file bytes and mtimes, link targets, folders."""
    entries: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            entries[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif path.is_file():
            entries[str(path.relative_to(folder))] = (path.read_bytes(), path.stat().st_mtime_ns)
        else:
            entries[str(path.relative_to(folder))] = "dir"
    return entries


def write_video(path: Path, duration: float = 0.7) -> Path:
    return _repo_import("trainer.data.synthetic").write_video(path, fps=25, duration=duration, size=(64, 48))


# inotify(7): what counts as touching a file or folder.
_IN_ACCESS, _IN_MODIFY, _IN_ATTRIB, _IN_OPEN = 0x1, 0x2, 0x4, 0x20
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_ISDIR = 0x40000000
_WATCHED = (_IN_ACCESS | _IN_MODIFY | _IN_ATTRIB | _IN_OPEN | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
            | _IN_DELETE)
_EVENT_NAMES = {_IN_ACCESS: "read", _IN_MODIFY: "written", _IN_ATTRIB: "attributes changed", _IN_OPEN: "opened",
                _IN_MOVED_FROM: "moved away", _IN_MOVED_TO: "moved in", _IN_CREATE: "created",
                _IN_DELETE: "deleted"}


@contextlib.contextmanager
def untouched(folder: Path) -> Iterator[None]:
    """Fail unless nothing below `folder` is opened, listed, read or changed by anyone while
    the block runs: inotify watches every folder below it (the server is a local process),
    and the tree is compared afterwards."""
    before = tree(folder)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    events: list[str] = []
    try:
        watches = {}
        for path in [folder, *(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]:
            watches[libc.inotify_add_watch(fd, os.fsencode(path), _WATCHED)] = path
        yield
        while True:
            try:
                buffer = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(buffer):
                wd, mask, _cookie, size = struct.unpack_from("iIII", buffer, offset)
                name = buffer[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
                offset += 16 + size
                path = watches.get(wd, folder) / name if name else watches.get(wd, folder)
                kinds = [text for bit, text in _EVENT_NAMES.items() if mask & bit]
                if mask & _IN_ISDIR and mask & _IN_OPEN:
                    kinds = ["listed" if k == "opened" else k for k in kinds]
                events.append(f"{path.relative_to(folder.parent)}: {', '.join(kinds)}")
    finally:
        os.close(fd)
    after = tree(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if events or changed:
        raise CheckFailed(f"something outside the allowed folders was touched: {sorted(set(events))[:12]}"
                          + (f"; changed: {changed}" if changed else ""))


def dataset_graph(ctx: E2EContext, folder: str, **inputs: Any) -> dict[str, Any]:
    """The tiny demo's Dataset node on `folder` (updated with `inputs`), its report shown by
    Preview Any ("report") so that the prompt runs it."""
    demo = tiny_demo_api(ctx)
    node = next(v for v in demo.values() if v["class_type"] == "WanS2VDataset")
    return {"dataset": {"class_type": "WanS2VDataset", "inputs": {**node["inputs"], "folder": folder,
                                                                   "teacher_frames": False, **inputs}},
            "report": {"class_type": "PreviewAny", "inputs": {"source": ["dataset", 1]}}}


def load_lora_graph(lora_name: str, strength: float = 1.0) -> dict[str, Any]:
    """Load Wan S2V LoRA on `lora_name`, its report shown by Preview Any ("report")."""
    return {"load": {"class_type": "WanS2VLoadLoRA", "inputs": {"lora_name": lora_name, "strength": strength}},
            "report": {"class_type": "PreviewAny", "inputs": {"source": ["load", 1]}}}


def with_settings(graph: dict[str, Any], socket: str, class_type: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """`graph` (from `tiny_train_graph`) with a settings node on the training node's `socket`."""
    graph[socket] = {"class_type": class_type, "inputs": inputs}
    graph["train"]["inputs"][socket] = [socket, 0]
    return graph


def write_lora(path: Path, poison: bool = False) -> Path:
    """A small LoRA in ComfyUI's keys for the tiny model's first block (`poison`: one NaN)."""
    import torch
    from safetensors.torch import save_file

    down = torch.randn(4, 32)
    if poison:
        down[1, 3] = NAN
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(32, 4)}, str(path))
    return path


class _Payload:
    """A pickle that creates `marker` when it is loaded (what an attacker would make run a shell)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------------------
# Nothing let in
# --------------------------------------------------------------------------------------


def check_uploaded_pickle_never_runs(ctx: E2EContext) -> str:
    """Plant checkpoint-999999 (state.json, lora.safetensors and a training_state.pt pickle that
    would create a marker file) in a run folder through POST /upload/image, then train with
    resume "latest": the pickle is never loaded, the checkpoint is skipped with a reason and
    the run trains in a folder of its own."""
    name, marker = "probe_pickle", outside(ctx, "pickle") / "pickle_ran"
    subfolder = f"{RUNS}/{name}/checkpoints/checkpoint-999999"
    state = {"step": 999999, "saved_at": time.time() + 1e6, "run": {"run_id": "forged", "name": name}}
    for filename, data in (("training_state.pt", pickle.dumps(_Payload(marker))),
                           ("lora.safetensors", write_lora(ctx.server.run_dir / "planted.safetensors").read_bytes()),
                           ("state.json", json.dumps(state).encode())):
        ctx.server.upload(filename, data, subfolder=subfolder, kind="output", overwrite=True)
    planted = ctx.server.output_dir / subfolder
    if not (planted / "training_state.pt").is_file():
        raise CheckFailed(f"the upload did not land in {planted}: {sorted(p.name for p in planted.parent.rglob('*'))}")
    with untouched(marker.parent):
        expect_success(run(ctx, tiny_train_graph(ctx, name, max_train_steps=1, resume_from_checkpoint="latest")),
                       "training beside the planted checkpoint")
    skipped = log_lines(ctx, "skipped checkpoint", str(planted))
    if not skipped or "pickle" not in skipped[-1]:
        raise CheckFailed(f"no skip message naming {planted} and the pickle in the log: {skipped}")
    folders = [p.name for p in run_folders(ctx, name)]
    if folders != [name, f"{name}_2"] or not (planted / "training_state.pt").is_file():
        raise CheckFailed(f"expected the run in {name}_2 beside the planted folder, got {folders}")
    reason = skipped[-1].split(f"{planted}: ", 1)[1].split(", which")[0]
    return f"planted through POST /upload/image; never loaded (no marker); skipped: {reason}; trained in {name}_2"


def check_dataset_folder_empty(ctx: E2EContext) -> str:
    """Dataset folder "" (recursive) is an error, not the server's working directory."""
    return expect_error(run(ctx, dataset_graph(ctx, "", recursive=True)), "dataset folder", "empty")


def check_dataset_links_outside(ctx: E2EContext) -> str:
    """A clip and a caption file inside the input folder that link to files outside: the clip
    is skipped, its caption is refused (the report says why), the outside files are never
    opened, and the cache records no outside path."""
    secrets = outside(ctx, "dataset")
    write_video(secrets / "secret.mp4")
    (secrets / "secret.txt").write_text("the server's secret", encoding="utf-8")
    talk = ctx.server.input_dir / "probe_links"
    write_video(talk / "real.mp4")
    (talk / "real.txt").write_text("a person talks", encoding="utf-8")
    write_video(talk / "capt.mp4")
    (talk / "stolen.mp4").symlink_to(secrets / "secret.mp4")
    (talk / "capt.txt").symlink_to(secrets / "secret.txt")
    with untouched(secrets):
        result = expect_success(run(ctx, dataset_graph(ctx, "probe_links", caption_strategy="textfile")),
                                "the dataset beside the links")
    report = shown_text(result, "report")
    reasons = [line.strip() for line in report.splitlines() if "resolves to" in line]
    if not any("stolen.mp4" in r for r in reasons) or not any("capt.txt" in r for r in reasons):
        raise CheckFailed(f"the report does not say why the links were skipped:\n{report}")
    cache = [p for p in (ctx.server.output_dir / "wan_s2v_cache").glob("probe_links-*/**/*") if p.is_file()]
    leaked = [p.name for p in cache if str(secrets).encode() in p.read_bytes()]
    if not cache or leaked:
        raise CheckFailed(f"the cache records the outside path in {leaked}" if leaked else "nothing was cached")
    shown = "; ".join(r.split(" resolves to")[0] for r in reasons)
    return f"outside files never opened, no outside path cached; the report: {shown}, resolves outside"


def check_demo_media_links(ctx: E2EContext) -> str:
    """The demo media folder's caption and clip replaced by links to outside files: the
    Dataset node ("(demo media)") replaces the links with its own files, never writing
    through them."""
    victims = outside(ctx, "demo_media")
    (victims / "victim.txt").write_text("keep me", encoding="utf-8")
    write_video(victims / "victim.mp4")
    folder = ctx.server.input_dir / "wan_s2v_demo_media"
    folder.mkdir(parents=True, exist_ok=True)
    for link, target in (("demo_talk_0.txt", "victim.txt"), ("demo_talk_1.mp4", "victim.mp4")):
        (folder / link).unlink(missing_ok=True)
        (folder / link).symlink_to(victims / target)
    with untouched(victims):
        # preview_count differs from the other prompts' so that ComfyUI runs the node again
        expect_success(run(ctx, dataset_graph(ctx, "(demo media)", preview_count=3)), "the demo media dataset")
    links = [p.name for p in folder.iterdir() if p.is_symlink()]
    if links or (folder / "demo_talk_0.txt").read_text(encoding="utf-8") != "a person talks calmly":
        raise CheckFailed(f"the demo media folder still holds links {links} or a wrong caption")
    return "links to an outside caption and clip replaced by the demo's own files; the outside files untouched"


def check_run_folder_links(ctx: E2EContext) -> str:
    """Run folders whose checkpoints/ or logs/ link to folders outside (holding checkpoints and
    a log), one whose checkpoint's files link outside, and a run folder that is itself such a
    link: resume "latest" never lists, reads, prunes or writes through them."""
    far = outside(ctx, "run_folders")
    for step in (1, 2, 3):
        (far / "ckpts" / f"checkpoint-{step}").mkdir(parents=True)
        for file in ("state.json", "training_state.json"):
            (far / "ckpts" / f"checkpoint-{step}" / file).write_text(json.dumps({"step": step}))
    (far / "logs").mkdir()
    (far / "logs" / "train_log.jsonl").write_text("precious\n")
    (far / "empty").mkdir()
    base = ctx.server.output_dir / RUNS
    checkpoint = far / "ckpts" / "checkpoint-3"
    links = {base / "probe_link_ckpt" / "checkpoints": far / "ckpts", base / "probe_link_logs" / "logs": far / "logs",
             **{base / "probe_link_files" / "checkpoints" / checkpoint.name / f.name: f for f in checkpoint.iterdir()}}
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=target.is_dir())
    trained = []
    with untouched(far):
        for name in ("probe_link_ckpt", "probe_link_logs", "probe_link_files"):
            graph = tiny_train_graph(ctx, name, max_train_steps=2, checkpoint_step_interval=1,
                                     checkpoints_total_limit=1, resume_from_checkpoint="latest")
            expect_success(run(ctx, graph), f"training beside {name}'s links")
            if not (base / f"{name}_2" / "run.json").is_file():
                raise CheckFailed(f"the run beside {name}'s links did not train in a fresh {name}_2")
            trained.append(f"{name}_2")
        (base / "probe_link_run").symlink_to(far / "empty", target_is_directory=True)
        refused = expect_error(run(ctx, tiny_train_graph(ctx, "probe_link_run", max_train_steps=1)),
                               "outside the allowed folders")
    return f"links never followed, runs trained in {', '.join(trained)}; a linked run folder: {refused[:60]}..."


# --------------------------------------------------------------------------------------
# Nothing lost
# --------------------------------------------------------------------------------------


def _loras(ctx: E2EContext) -> Path:
    return ctx.server.models_dir / "loras"


def check_existing_lora_kept(ctx: E2EContext) -> str:
    """models/loras/<name>.safetensors exists: a run with overwrite off saves <name>_2 and says
    so (lora_path, log); only overwrite on replaces the file."""
    name, loras = "probe_kept", _loras(ctx)
    loras.mkdir(parents=True, exist_ok=True)
    mine = loras / f"{name}.safetensors"
    mine.write_bytes(b"a LoRA someone made")
    graph = tiny_train_graph(ctx, name, max_train_steps=1)
    graph["path"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 1]}}
    kept = shown_text(expect_success(run(ctx, graph), "training beside an existing LoRA"), "path")
    if mine.read_bytes() != b"a LoRA someone made" or Path(kept) != (loras / f"{name}_2.safetensors").resolve():
        raise CheckFailed(f"the existing LoRA was replaced, or the new one is not {name}_2: lora_path {kept}")
    warned = log_lines(ctx, f"{name}.safetensors exists", f"{name}_2.safetensors")
    if not warned:
        raise CheckFailed("the log does not say which name the new LoRA got")
    graph["train"]["inputs"].update(overwrite=True, seed=1)
    replaced = shown_text(expect_success(run(ctx, graph), "training with overwrite on"), "path")
    if Path(replaced) != mine.resolve() or mine.read_bytes() == b"a LoRA someone made":
        raise CheckFailed(f"overwrite on did not replace {mine.name}: lora_path {replaced}")
    return f"kept {mine.name}, saved {Path(kept).name} (lora_path and log say so); overwrite on replaced it"


def _wait_for_first_step(folders: list[Path], timeout: float = 300.0) -> Path:
    """The run folder among `folders`' future siblings whose log has its first step (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in folders[0].parent.glob(f"{folders[0].name}*/logs/train_log.jsonl"):
            if log.parents[1] not in folders and log.stat().st_size > 0:
                return log.parents[1]
        time.sleep(0.2)
    raise CheckFailed(f"no new run of {folders[0].name} logged a step within {timeout:.0f} s")


def check_cancel_keeps_finished_lora(ctx: E2EContext) -> str:
    """A finished LoRA, then a long run of the same name (overwrite on, block offload to disk)
    cancelled with POST /interrupt after its first step: the finished file is unchanged, the
    partial LoRA stays in the run folder, no offload file is left."""
    name, loras = "probe_cancel", _loras(ctx)
    expect_success(run(ctx, tiny_train_graph(ctx, name, max_train_steps=1)), "the finished run")
    finished = (loras / f"{name}.safetensors").read_bytes()
    before = sorted(p.name for p in loras.iterdir())
    graph = tiny_train_graph(ctx, name, max_train_steps=100000, seed=1, overwrite=True,
                             memory={"offload": "blocks", "offload_blocks_to_disk": "probe_cancel_spill"})
    prompt = ctx.server.queue_prompt(graph)
    folder = _wait_for_first_step(run_folders(ctx, name))
    ctx.server.interrupt()
    result = ctx.server.wait_for(prompt, timeout=300, raise_on_error=False)
    if result.status != "interrupted":
        raise CheckFailed(f"the cancelled run ended as {result.status}: {message(result)}")
    partial = sorted(folder.glob(f"{name}_partial_step*.safetensors"))
    after = sorted(p.name for p in loras.iterdir())
    if (loras / f"{name}.safetensors").read_bytes() != finished or after != before or not partial:
        raise CheckFailed(f"loras before {before}, after {after}; partial LoRA in {folder.name}: {partial}")
    spilled = list(ctx.server.output_dir.glob("probe_cancel_spill/**/block_offload*.safetensors"))
    if spilled:
        raise CheckFailed(f"the cancelled run left its offload file: {spilled}")
    return (f"{name}.safetensors unchanged, models/loras unchanged; partial LoRA {folder.name}/{partial[0].name}; "
            "no offload file left")


def check_same_name_runs_apart(ctx: E2EContext) -> str:
    """Runs with one output_name and resume "none": one after another, then two prompts queued
    back to back; each trains in a folder of its own and no run changes another's files."""
    name = "probe_twice"

    def graph(seed: int) -> dict[str, Any]:
        return tiny_train_graph(ctx, name, max_train_steps=2, checkpoint_step_interval=1, seed=seed)

    expect_success(run(ctx, graph(0)), "run A")
    first = run_folders(ctx, name)
    a = tree(first[0])
    expect_success(run(ctx, graph(1)), "run B")
    prompts = [ctx.server.queue_prompt(graph(seed)) for seed in (2, 3)]  # back to back
    for prompt in prompts:
        expect_success(ctx.server.wait_for(prompt, timeout=600, raise_on_error=False), "a queued run")
    folders = run_folders(ctx, name)
    ids = {json.loads((f / "run.json").read_text())["run_id"] for f in folders}
    if [f.name for f in folders] != [name, *(f"{name}_{n}" for n in (2, 3, 4))] or len(ids) != 4:
        raise CheckFailed(f"expected 4 run folders with 4 run ids, got {[f.name for f in folders]}, {ids}")
    if tree(first[0]) != a:
        raise CheckFailed(f"a later run changed run A's folder {first[0]}")
    loras = sorted(p.name for p in _loras(ctx).glob(f"{name}*.safetensors"))
    return f"4 runs in {', '.join(f.name for f in folders)} (4 run ids), run A untouched; LoRAs {', '.join(loras)}"


def check_bad_names_refused(ctx: E2EContext) -> str:
    """output_name of 240 characters and "~x": refused before training, nothing written."""
    lines = []
    for name in ("x" * 240, "~x"):
        result = run(ctx, tiny_train_graph(ctx, name, max_train_steps=1))
        error = expect_error(result, "output_name", "cannot be used as a file name")
        if (result.error or {}).get("node_type") != "WanS2VTrainLora" or run_folders(ctx, name):
            raise CheckFailed(f"{name[:10]}...: refused too late (a run folder exists) or by another node")
        why = error.split("file name: ")[1].split(";")[0]
        lines.append(f"{len(name)} characters ({why})" if len(name) > 10 else f"{name!r} ({why})")
    if any(p.name.startswith(("x" * 100, "~")) for p in _loras(ctx).glob("*")):
        raise CheckFailed("a LoRA file was written for a refused name")
    return "refused before training: " + "; ".join(lines)


def check_latest_with_other_rank(ctx: E2EContext) -> str:
    """A checkpoint of rank 8, then resume "latest" with rank 4: the checkpoint is skipped with
    the difference in words (no tensor size mismatch) and the run starts afresh beside it."""
    name = "probe_rank"
    expect_success(run(ctx, tiny_train_graph(ctx, name, max_train_steps=1, checkpoint_step_interval=1)), "rank 8")
    graph = tiny_train_graph(ctx, name, max_train_steps=1, lora={"lora_rank": 4},
                             resume_from_checkpoint="latest")
    expect_success(run(ctx, graph), "resume latest with rank 4")
    said = log_lines(ctx, "skipped checkpoint", f"{name}/checkpoints", "LoRA rank: checkpoint 8, this run 4")
    if not said or [f.name for f in run_folders(ctx, name)] != [name, f"{name}_2"]:
        raise CheckFailed(f"no skip message or no fresh folder: {said}, {run_folders(ctx, name)}")
    return f"skipped with the reason ({said[-1].split('(', 1)[1]}, no size mismatch; trained afresh in {name}_2"


# --------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------


def check_nan_inputs_named(ctx: E2EContext) -> str:
    """NaN (sent as JSON NaN, which ComfyUI's min/max checks let through) in resolution, the
    sampler's shift, lora_alpha, max_grad_norm, lr_power and a LoRA's strength: each prompt
    fails with an error that names the input, before any training or sampling."""
    write_lora(_loras(ctx) / "probe_strength.safetensors")
    demo = tiny_demo_api(ctx)
    optimizer = next(v for v in demo.values() if v["class_type"] == "WanS2VOptimizerSettings")["inputs"]
    tiny = e2e.TINY
    sampler = {
        "bundle": {"class_type": "WanS2VLoadModelBundle", "inputs": {
            "transformer": tiny, "vae": tiny, "text_encoder": tiny, "audio_encoder": tiny, "dtype": "float32",
            "numerics": "official", "device": "cpu"}},
        "image": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "audio": {"class_type": "EmptyAudio", "inputs": {"duration": 1.0, "sample_rate": 16000, "channels": 1}},
        "sample": {"class_type": "WanS2VSampler", "inputs": {
            **_sampler_inputs(["bundle", 0], ["image", 0], ["audio", 0], 5, False), "shift": NAN}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["sample", 0]}},
    }
    graphs = {
        "resolution": dataset_graph(ctx, "(demo media)", resolution=NAN),
        "shift": sampler,
        "lora_alpha": tiny_train_graph(ctx, "probe_nan", lora={"lora_alpha": NAN}),
        "max_grad_norm": with_settings(tiny_train_graph(ctx, "probe_nan"), "optimizer_settings",
                                       "WanS2VOptimizerSettings", {**optimizer, "max_grad_norm": NAN}),
        "lr_power": with_settings(tiny_train_graph(ctx, "probe_nan"), "schedule_settings", "WanS2VScheduleSettings",
                                  {"lr_scheduler": "polynomial", "lr_warmup_steps": 0, "lr_num_cycles": 0.5,
                                   "lr_power": NAN}),
        "strength": load_lora_graph("probe_strength.safetensors", NAN),
    }
    named = []
    for name, graph in graphs.items():
        result = run(ctx, graph)
        expect_error(result, f"{name} ", "finite", "got nan")
        named.append(f"{name} ({result.error.get('node_type')})")
    if run_folders(ctx, "probe_nan"):
        raise CheckFailed("a NaN setting reached training: a run folder was made")
    return "refused naming the input: " + ", ".join(named)


def check_bad_lora_files_named(ctx: E2EContext) -> str:
    """Load Wan S2V LoRA on a truncated, an empty, a non-safetensors and a NaN file: each is an
    error naming the file (a good file of the same kind loads)."""
    loras = _loras(ctx)
    good = write_lora(loras / "probe_good.safetensors").read_bytes()
    (loras / "probe_truncated.safetensors").write_bytes(good[: len(good) // 2])
    (loras / "probe_empty.safetensors").write_bytes(b"")
    (loras / "probe_not_safetensors.safetensors").write_text("this is not a LoRA", encoding="utf-8")
    write_lora(loras / "probe_nan.safetensors", poison=True)
    report = shown_text(expect_success(run(ctx, load_lora_graph("probe_good.safetensors")), "the good LoRA"), "report")
    errors = []
    for name in ("probe_truncated", "probe_empty", "probe_not_safetensors", "probe_nan"):
        errors.append(expect_error(run(ctx, load_lora_graph(f"{name}.safetensors")), f"{name}.safetensors"))
    reasons = [e.split(".safetensors", 1)[1].split(":")[0].split(" (")[0].strip() for e in errors]
    named = ", ".join(f"{n} {r}" for n, r in zip(("truncated", "empty", "text", "NaN"), reasons))
    return f"a good file loads ({len(report.splitlines())} report lines); errors name the file: {named}"


def check_disk_offload_leaves_nothing(ctx: E2EContext) -> str:
    """A run with block offload to disk leaves no block_offload*.safetensors anywhere under
    output/ (after this one and every earlier disk-offload run of this server)."""
    graph = tiny_train_graph(ctx, "probe_offload", max_train_steps=2,
                             memory={"offload": "blocks", "offload_blocks_to_disk": "probe_spill"})
    expect_success(run(ctx, graph), "the disk offload run")
    left = sorted(str(p.relative_to(ctx.server.output_dir))
                  for p in ctx.server.output_dir.rglob("block_offload*.safetensors"))
    if left:
        raise CheckFailed(f"offload files left behind: {left}")
    return "no block_offload*.safetensors under output/ after the disk offload runs"


CHECKS: list[tuple[str, e2e.Check]] = [
    ("uploaded pickle never runs", check_uploaded_pickle_never_runs),
    ("dataset folder ''", check_dataset_folder_empty),
    ("dataset links outside", check_dataset_links_outside),
    ("demo media links", check_demo_media_links),
    ("run folder links", check_run_folder_links),
    ("existing LoRA kept", check_existing_lora_kept),
    ("cancel keeps finished LoRA", check_cancel_keeps_finished_lora),
    ("same name, separate runs", check_same_name_runs_apart),
    ("bad output names", check_bad_names_refused),
    ("latest with another rank", check_latest_with_other_rank),
    ("poisoned cached model", e2e.check_failed_runs_change_nothing),
    ("NaN inputs named", check_nan_inputs_named),
    ("bad LoRA files named", check_bad_lora_files_named),
    ("disk offload leaves nothing", check_disk_offload_leaves_nothing),
]


if __name__ == "__main__":
    sys.exit(e2e.main(checks=CHECKS, description=__doc__, title="comfyui probe"))
