"""Which third-party package each import comes from, and what to say when one is missing.

`requirements.txt` and `pyproject.toml` declare the required packages; optional features
live in the pyproject's extras (`quant`, `prodigy`, `flash`). A missing package is reported
in one line naming it and the install command, for someone who installs the pack with pip
and for a ComfyUI user who installs packages into ComfyUI's Python.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

PACK_DISTRIBUTION = "comfyui-wan-s2v-trainer"


@dataclass(frozen=True)
class Package:
    """A third-party distribution: its pip name and, for an optional one, its extra."""

    pip_name: str
    extra: str | None = None


#: Top-level import name -> distribution. Required packages have no extra.
PACKAGES: dict[str, Package] = {
    "torch": Package("torch"),
    "diffusers": Package("diffusers"),
    "transformers": Package("transformers"),
    "accelerate": Package("accelerate"),
    "peft": Package("peft"),
    "safetensors": Package("safetensors"),
    "av": Package("av"),
    "tokenizers": Package("tokenizers"),
    "sentencepiece": Package("sentencepiece"),
    "numpy": Package("numpy"),
    "PIL": Package("pillow"),
    "ftfy": Package("ftfy"),
    "tqdm": Package("tqdm"),
    "tomli": Package("tomli"),  # Python 3.10 only; 3.11 has tomllib
    "optimum": Package("optimum-quanto", extra="quant"),
    "bitsandbytes": Package("bitsandbytes", extra="quant"),
    "prodigyopt": Package("prodigyopt", extra="prodigy"),
    "flash_attn": Package("flash-attn-4", extra="flash"),
    "cudnn": Package("nvidia-cudnn-frontend", extra="fp8-attention"),
}

#: Modules that exist only inside a running ComfyUI (used by `nodes/comfy_adapter.py`).
COMFYUI_MODULES = frozenset({"comfy", "comfy_api", "folder_paths", "server"})


class MissingPackageError(ImportError):
    """A package the requested feature needs is not installed."""


def install_hint(module: str) -> str:
    """How to install the distribution behind top-level import `module`."""
    package = PACKAGES.get(module.split(".")[0])
    if package is None:
        return f"pip install {module.split('.')[0]}"
    if package.extra is None:
        return (f"pip install -r requirements.txt in the pack's folder (in ComfyUI's Python: "
                f"pip install -r custom_nodes/{PACK_DISTRIBUTION}/requirements.txt)")
    return (f'pip install ".[{package.extra}]" in the pack\'s folder, or in ComfyUI\'s Python: '
            f"pip install {package.pip_name}")


def missing_package_message(module: str, feature: str | None = None) -> str:
    """One line: which package is missing, for what, and how to install it."""
    top = module.split(".")[0]
    pip_name = PACKAGES[top].pip_name if top in PACKAGES else top
    needs = f"{feature} needs" if feature else "the Wan S2V trainer needs"
    return f"{needs} the Python package '{pip_name}', which is not installed: {install_hint(top)}"


@functools.cache
def importable(module: str) -> bool:
    """Whether `module` imports cleanly; an optional kernel package whose import breaks (a
    CUDA or cuDNN library it loads is missing) counts as absent. Asked once per process."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import means the feature cannot run
        return False
    return True


def import_optional(module: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise `MissingPackageError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingPackageError(missing_package_message(module, feature)) from exc
