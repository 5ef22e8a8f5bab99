"""The one place that talks to ComfyUI.

Every ComfyUI-specific call the nodes make (model folders, progress bar, cancel, server
messages) goes through here, and each has a fallback so that the nodes also run in tests
and from the command line where ComfyUI is absent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _folder_paths():
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        return None
    return folder_paths


def list_model_files(kind: str) -> list[str]:
    """Files ComfyUI knows in a model folder kind ("diffusion_models", "vae", ...)."""
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(kind))
    except KeyError:
        return []


def model_file_path(kind: str, name: str) -> Path:
    """Resolved path of a file listed by `list_model_files`; errors if it is not there or
    resolves (a symlink) outside `allowed_roots`."""
    from ..trainer.paths import OutsideAllowedFoldersError, confine

    fp = _folder_paths()
    if fp is None:
        raise FileNotFoundError(f"ComfyUI is not available to resolve {kind}/{name}")
    path = fp.get_full_path(kind, name)
    if path is None:
        raise FileNotFoundError(f"'{name}' is not in ComfyUI's {kind} folders")
    try:
        return confine(path, allowed_roots(), what=f"{kind} file")
    except OutsideAllowedFoldersError as error:
        raise OutsideAllowedFoldersError(f"{error}; to use a file there, add its folder to ComfyUI's "
                                         "extra_model_paths.yaml or to WAN_S2V_TRAINER_ROOTS") from None


def extra_model_roots() -> list[Path]:
    """Additional roots a user allows for model folders (os.pathsep-separated env var)."""
    value = os.environ.get("WAN_S2V_TRAINER_ROOTS", "")
    return [Path(p).resolve() for p in value.split(os.pathsep) if p]


def models_directory() -> Path:
    fp = _folder_paths()
    if fp is None:
        return Path(os.environ.get("WAN_S2V_MODELS_DIR", "models")).resolve()
    return Path(fp.models_dir).resolve()


def allowed_roots() -> list[Path]:
    """Every folder the pack may read or write (symlinks resolved): ComfyUI's input, output,
    temp and models folders, every model folder it is configured with (extra_model_paths.yaml
    included), and the roots of WAN_S2V_TRAINER_ROOTS. Without ComfyUI: the WAN_S2V_INPUT_DIR,
    WAN_S2V_OUTPUT_DIR, WAN_S2V_MODELS_DIR and WAN_S2V_LORAS_DIR folders (default input/,
    output/, models/, models/loras) and WAN_S2V_TRAINER_ROOTS."""
    from ..trainer.paths import resolve_roots

    fp = _folder_paths()
    roots: list[str | Path] = [input_directory(), output_directory(), models_directory()]
    if fp is None:
        roots.append(os.environ.get("WAN_S2V_LORAS_DIR", "models/loras"))
    else:
        roots.append(fp.get_temp_directory())
        for kind, (paths, _extensions) in fp.folder_names_and_paths.items():
            if kind != "custom_nodes":  # code, not data
                roots += paths
    return list(resolve_roots([*roots, *extra_model_roots()]))


def input_directory() -> Path:
    fp = _folder_paths()
    if fp is None:
        return Path(os.environ.get("WAN_S2V_INPUT_DIR", "input")).resolve()
    return Path(fp.get_input_directory()).resolve()


def output_directory() -> Path:
    fp = _folder_paths()
    if fp is None:
        return Path(os.environ.get("WAN_S2V_OUTPUT_DIR", "output")).resolve()
    return Path(fp.get_output_directory()).resolve()


def model_folder_roots(kind: str) -> list[Path]:
    """Every folder ComfyUI searches for a model kind."""
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        return [Path(p).resolve() for p in fp.get_folder_paths(kind)]
    except KeyError:
        return []


def confine_path(user_path: str | os.PathLike, roots: list[Path], what: str = "") -> Path:
    """`user_path` resolved (symlinks followed) when it lies inside one of `roots`, else
    `PermissionError` naming it and the roots (`trainer.paths.confine`); a relative path is
    taken relative to the first root, an empty one is a `ValueError`."""
    from ..trainer.paths import confine

    return confine(user_path, roots, base=roots[0] if roots else None, what=what)


class Progress:
    """Progress reporting that drives ComfyUI's bar when it is there, and nothing otherwise."""

    def __init__(self, total: int, node_id: str | None = None):
        self.total = total
        self._bar = None
        try:
            import comfy.utils  # type: ignore[import-not-found]

            self._bar = comfy.utils.ProgressBar(total, node_id=node_id)
        except ImportError:
            pass

    def update(self, value: int, preview: Any = None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(value, self.total, preview)


def interrupt_requested() -> bool:
    """True when the user pressed Cancel; reads ComfyUI's flag without clearing it."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return False
    return bool(mm.processing_interrupted())


def raise_if_interrupted() -> None:
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def send_event(event: str, data: dict[str, Any]) -> None:
    """Send a custom event to the front end (our web/js extensions listen for it)."""
    try:
        from server import PromptServer  # type: ignore[import-not-found]
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data)


def free_comfyui_models() -> bool:
    """Ask ComfyUI to unload the models it keeps loaded (its own checkpoints, VAEs, text
    encoders: they stay in (V)RAM between runs) before we load a 14B model; then collect
    garbage and return the freed blocks of the CUDA cache. True when ComfyUI was there."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return False
    import gc

    mm.unload_all_models()
    gc.collect()  # objects of the unloaded models that only a reference cycle still held
    mm.soft_empty_cache()
    return True


def video_output(frames: Any, audio: dict[str, Any] | None, fps: float, path: str | os.PathLike | None = None):
    """What a node returns on a VIDEO socket.

    In ComfyUI: a native VIDEO object (`comfy_api.input_impl`), so that it connects to Save
    Video / Get Video Components: `VideoFromFile(path)` when an mp4 was written (SaveVideo
    then copies its streams without re-encoding), else `VideoFromComponents` of `frames`
    ([F, H, W, 3] float in 0..1), `audio` (ComfyUI AUDIO dict or None) and `fps`.
    Without ComfyUI: the mp4's path as a string ("" when none was written).
    """
    try:
        from comfy_api.input_impl import VideoFromComponents, VideoFromFile  # type: ignore[import-not-found]
        from comfy_api.util import VideoComponents  # type: ignore[import-not-found]
    except ImportError:
        return str(path) if path else ""
    if path:
        return VideoFromFile(str(path))
    from fractions import Fraction

    return VideoFromComponents(VideoComponents(images=frames, audio=audio, frame_rate=Fraction(fps).limit_denominator(1001)))
