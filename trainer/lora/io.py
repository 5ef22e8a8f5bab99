"""LoRA files: ComfyUI's native Wan format, the Diffusers format, and loading either back.

ComfyUI format (what `LoraLoaderModelOnly` applies to the native S2V model; checked against
ComfyUI 0.3.64 `comfy/lora.py`, `comfy/weight_adapter/lora.py`): for every model weight
``diffusion_model.<original path>.weight``, `model_lora_keys_unet` maps the LoRA prefix
``diffusion_model.<original path>`` to it, and `LoRAAdapter.load` reads
``<prefix>.lora_B.weight`` (up, [out, r]), ``<prefix>.lora_A.weight`` (down, [r, in]) and
``<prefix>.alpha`` (a scalar); the weight delta is ``lora_B @ lora_A * alpha / r``, the same
as peft's ``scaling = lora_alpha / r``. Original paths are the Wan names
(``blocks.0.self_attn.q``, ``blocks.0.cross_attn.o``, ``audio_injector.injector.3.k`` ...).

Diffusers format: ``transformer.<our module path>.lora_A.weight`` / ``.lora_B.weight``
(what diffusers' `load_lora_adapter(prefix="transformer")` and Wan pipelines read), the
peft config in the ``lora_adapter_metadata`` entry, as diffusers writes it.

Both are written atomically (`trainer.io_utils.atomic_write`: temporary name in the same folder, then rename).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io_utils import atomic_write
from ..model.convert import diffusers_to_original_key, original_to_diffusers_key

COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
METADATA_ADAPTER_KEY = "lora_adapter_metadata"
METADATA_TRAINING_KEY = "wan_s2v_training_config"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "LoraFile",
    "adapter_state_dict",
    "from_comfyui",
    "load_lora",
    "read_lora_file",
    "save_lora",
    "to_comfyui",
    "to_diffusers",
]


class LoraFile:
    """A LoRA read from disk, normalised to peft keys of our model.

    `state`: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (Diffusers module
    names); `alphas`: module -> effective alpha (scaling x rank); `format`: "comfyui",
    "diffusers" or "peft"; `metadata`: the safetensors metadata.
    """

    def __init__(self, state: dict[str, torch.Tensor], alphas: dict[str, float], fmt: str, metadata: dict[str, str]):
        self.state = state
        self.alphas = alphas
        self.format = fmt
        self.metadata = metadata

    @property
    def modules(self) -> list[str]:
        return sorted({_LORA_KEY.match(k).group("module") for k in self.state})

    def rank(self, module: str) -> int:
        return int(self.state[f"{module}.lora_A.weight"].shape[0])


# --------------------------------------------------------------------------- from the model


def adapter_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors with peft keys (``blocks.0.attn1.to_q.lora_A.weight``), detached."""
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"the model has no LoRA adapter named '{adapter_name}'")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach() for k, v in state.items()}


def adapter_alphas(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Effective alpha (= scaling x rank, what ComfyUI's `.alpha` means) of every LoRA module."""
    alphas = {}
    for name, module in model.named_modules():
        r = getattr(module, "r", None)
        if isinstance(r, dict) and adapter_name in r and hasattr(module, "scaling"):
            alphas[name] = float(module.scaling[adapter_name]) * int(r[adapter_name])
    return alphas


# --------------------------------------------------------------------------- conversions


def _split(key: str) -> tuple[str, str]:
    match = _LORA_KEY.match(key)
    if match is None:
        raise ValueError(f"'{key}' is not a LoRA A/B weight key")
    return match.group("module"), match.group("kind")


def to_comfyui(state: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """peft keys -> ComfyUI's native Wan keys (+ one ``.alpha`` per module)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, kind = _split(key)
        original = diffusers_to_original_key(f"{module}.weight")[: -len(".weight")]
        out[f"{COMFY_PREFIX}{original}.{kind}.weight"] = tensor
        alpha_key = f"{COMFY_PREFIX}{original}.alpha"
        if alpha_key not in out:
            if module not in alphas:
                raise KeyError(f"no alpha for LoRA module '{module}'")
            out[alpha_key] = torch.tensor(float(alphas[module]), dtype=torch.float32)
    return out


def from_comfyui(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """ComfyUI keys (``diffusion_model.<original>.lora_A.weight``, ``.alpha``; also
    ``lora_up``/``lora_down``) -> peft keys and alphas."""
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, tensor in tensors.items():
        bare = key.removeprefix(COMFY_PREFIX)
        for suffix, kind in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                             (".lora_down.weight", "lora_A"), (".lora_up.weight", "lora_B"), (".alpha", None)):
            if bare.endswith(suffix):
                module = original_to_diffusers_key(bare[: -len(suffix)] + ".weight")[: -len(".weight")]
                if kind is None:
                    alphas[module] = float(tensor.item())
                else:
                    state[f"{module}.{kind}.weight"] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unsupported LoRA keys (not lora_A/lora_B/alpha): {unknown[:5]}")
    return state, alphas


def to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{DIFFUSERS_PREFIX}{k}": v for k, v in state.items()}


# --------------------------------------------------------------------------- files


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str],
                 overwrite: bool = True) -> Path:
    with atomic_write(path, replace=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def save_lora(
    source: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    fmt: str = "comfyui",
    alphas: Mapping[str, float] | None = None,
    adapter_name: str = "default",
    dtype: str | torch.dtype | None = None,
    training_config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a LoRA as one .safetensors file, atomically.

    `source`: a model holding the adapter, or a peft-key state dict (then `alphas` is
    required; a single float broadcast to every module is accepted as ``{"*": alpha}``).
    `fmt`: "comfyui" or "diffusers". `dtype`: None keeps the tensors' dtype (bit-exact),
    else "fp32"/"bf16"/"fp16" or a torch dtype. `training_config` goes into the metadata
    (``wan_s2v_training_config``, JSON) together with rank and alpha. `overwrite=False`: an
    existing `path` is never replaced (`FileExistsError`).
    """
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise ValueError(f"a LoRA file is a .safetensors file, got {path}")
    peft_meta: dict[str, Any] = {}
    if isinstance(source, torch.nn.Module):
        state = adapter_state_dict(source, adapter_name)
        alphas = adapter_alphas(source, adapter_name)
        peft_meta = source.peft_config[adapter_name].to_dict()
    else:
        state = dict(source)
        if alphas is None:
            raise ValueError("saving a LoRA state dict needs its alphas")
        if set(alphas) == {"*"}:
            alphas = {_split(k)[0]: alphas["*"] for k in state}
    alphas = dict(alphas)
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state = {k: v.detach().cpu() for k, v in state.items()}

    ranks = sorted({int(v.shape[0]) for k, v in state.items() if k.endswith("lora_A.weight")})
    meta = {
        "format": "pt",
        "modelspec.architecture": "wan2.2-s2v-14b/lora",
        "lora_rank": ",".join(map(str, ranks)),
        "lora_alpha": json.dumps(sorted(set(alphas.values()))),
    }
    if training_config is not None:
        meta[METADATA_TRAINING_KEY] = json.dumps(training_config, sort_keys=True, default=str)
    if metadata:
        meta.update(metadata)
    if fmt == "comfyui":
        tensors = to_comfyui(state, alphas)
    elif fmt == "diffusers":
        tensors = to_diffusers(state)
        if not peft_meta:
            peft_meta = _peft_meta_from(state, alphas)
        for key, value in list(peft_meta.items()):
            if isinstance(value, set):
                peft_meta[key] = sorted(value)
        meta[METADATA_ADAPTER_KEY] = json.dumps(peft_meta, indent=2, sort_keys=True, default=str)
    else:
        raise ValueError(f"fmt must be 'comfyui' or 'diffusers', got {fmt!r}")
    return _atomic_save(tensors, path, meta, overwrite)


def _peft_meta_from(state: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> dict[str, Any]:
    modules = sorted({_split(k)[0] for k in state})
    ranks = {m: int(state[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": modules,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: alphas[m] for m in modules if alphas[m] != alpha},
    }


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA in the ComfyUI, Diffusers (``transformer.`` prefix) or bare peft format."""
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return lora_from_tensors(tensors, metadata)


def lora_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> LoraFile:
    metadata = dict(metadata or {})
    keys = list(tensors)
    if not keys:
        raise ValueError("the LoRA holds no tensors")
    comfy_like = any(k.startswith(COMFY_PREFIX) or k.endswith((".alpha", ".lora_up.weight")) for k in keys)
    if comfy_like:
        state, alphas = from_comfyui(tensors)
        fmt = "comfyui"
    else:
        fmt = "diffusers" if all(k.startswith(DIFFUSERS_PREFIX) for k in keys) else "peft"
        state = {(k[len(DIFFUSERS_PREFIX):] if fmt == "diffusers" else k): v for k, v in tensors.items()}
        for key in state:
            _split(key)
        peft_meta = json.loads(metadata[METADATA_ADAPTER_KEY]) if METADATA_ADAPTER_KEY in metadata else {}
        alpha_default = peft_meta.get("lora_alpha")
        pattern = peft_meta.get("alpha_pattern") or {}
        alphas = {}
        for key in state:
            module = _split(key)[0]
            rank = int(state[f"{module}.lora_A.weight"].shape[0])
            alphas[module] = float(pattern.get(module, alpha_default if alpha_default is not None else rank))
    modules = {_split(k)[0] for k in state}
    for module in modules:
        if f"{module}.lora_A.weight" not in state or f"{module}.lora_B.weight" not in state:
            raise ValueError(f"LoRA module '{module}' lacks its lora_A or lora_B weight")
        if module not in alphas:
            alphas[module] = float(state[f"{module}.lora_A.weight"].shape[0])
    return LoraFile(state, alphas, fmt, metadata)


def load_lora(
    model: torch.nn.Module,
    source: str | os.PathLike | LoraFile,
    adapter_name: str = "default",
) -> LoraFile:
    """Attach a LoRA (file in either format, or a `LoraFile`) to `model` as adapter
    `adapter_name`, creating the adapter with the file's ranks, alphas and modules.
    Every tensor must land: a module the model lacks or a shape mismatch is an error."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import set_peft_model_state_dict

    is_lora = hasattr(source, "state") and hasattr(source, "alphas") and hasattr(source, "modules")
    lora = source if is_lora else read_lora_file(source)
    modules = lora.modules
    known = dict(model.named_modules())
    missing = [m for m in modules if m not in known]
    if missing:
        raise ValueError(f"the LoRA targets modules the model does not have: {missing[:5]}")
    ranks = {m: lora.rank(m) for m in modules}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(lora.alphas.values()), key=list(lora.alphas.values()).count)
    config = PeftLoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=modules,
        rank_pattern={f"^{re.escape(m)}$": v for m, v in ranks.items() if v != r},
        alpha_pattern={f"^{re.escape(m)}$": lora.alphas[m] for m in modules if lora.alphas[m] != alpha},
        init_lora_weights=False,
    )
    if adapter_name in getattr(model, "peft_config", {}):
        model.delete_adapters(adapter_name)
    model.add_adapter(config, adapter_name=adapter_name)
    dtype = next(p for n, p in model.named_parameters() if "lora_A" in n).dtype
    result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in lora.state.items()},
                                       adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ValueError(f"LoRA tensors that did not load: {unexpected[:5]}")
    loaded = adapter_state_dict(model, adapter_name)
    if set(loaded) != set(lora.state):
        raise ValueError(f"LoRA load mismatch: {sorted(set(loaded) ^ set(lora.state))[:5]}")
    known = dict(model.named_modules())
    for module, expected in lora.alphas.items():
        layer = known[module]
        actual = float(layer.scaling[adapter_name]) * int(layer.r[adapter_name])
        if abs(actual - expected) > 1e-6 * max(1.0, abs(expected)):
            raise ValueError(f"alpha of '{module}' is {actual}, the file says {expected}")
    if hasattr(model, "set_adapter"):
        model.set_adapter(adapter_name)
    return lora
