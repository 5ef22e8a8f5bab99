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

Reading takes LoRAs made elsewhere as well (`trainer.lora.keys` lists the layouts: kohya /
musubi-tuner, Diffusers with peft metadata, DiffSynth-Studio, bare original names) and full
differences (``.diff``, ``.diff_b``, ``lora_B.bias``) as step-distill releases ship them.
Every key is either used or reported (`LoraFile.report`, a `trainer.lora.report.LoraReport`);
a file in which nothing names an S2V module is an error, and so is a file that cannot be read,
is not safetensors, holds no tensors or holds NaN/inf values, each naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..io_utils import atomic_write
from ..model.convert import diffusers_to_original_key
from ..model.safetensors_reader import SafetensorsError, SafetensorsFile
from ..model.transformer_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from .keys import CROSS_ATTENTION, SELF_ATTENTION, ParsedKey, other_model_guess, other_wan_variant, parse_key
from .report import LoraReport, guess_made_for

COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
METADATA_ADAPTER_KEY = "lora_adapter_metadata"
METADATA_TRAINING_KEY = "wan_s2v_training_config"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "LoraFile",
    "LoraFileError",
    "adapter_state_dict",
    "from_comfyui",
    "load_lora",
    "lora_from_tensors",
    "read_lora_file",
    "save_lora",
    "to_comfyui",
    "to_diffusers",
]


class LoraFileError(ValueError):
    """A LoRA file that cannot be used: unreadable, not safetensors, empty, holding NaN/inf
    values, or with nothing in it that names a Wan 2.2 S2V module. The message names the file."""


class LoraFile:
    """A LoRA read from disk, normalised to peft keys of our model.

    `state`: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (Diffusers module
    names); `alphas`: module -> effective alpha (scaling x rank); `format`: the key layout
    ("comfyui", "diffusers", "peft", "kohya", "original", "diffsynth"); `metadata`: the
    safetensors metadata. From files made elsewhere also `biases`: module -> ``lora_B.bias``
    (scaled like the module's pair), `diffs`: our parameter name -> full difference (added as
    ``strength * diff``), and `report`: what the file holds (`LoraReport`; None for a LoRA
    built in memory). `source`: the file or a label.
    """

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        alphas: dict[str, float],
        fmt: str,
        metadata: dict[str, str],
        *,
        biases: dict[str, torch.Tensor] | None = None,
        diffs: dict[str, torch.Tensor] | None = None,
        report: LoraReport | None = None,
        source: str = "",
    ):
        self.state = state
        self.alphas = alphas
        self.format = fmt
        self.metadata = metadata
        self.biases = dict(biases or {})
        self.diffs = dict(diffs or {})
        self.report = report
        self.source = source

    @property
    def modules(self) -> list[str]:
        return sorted({_LORA_KEY.match(k).group("module") for k in self.state})

    def rank(self, module: str) -> int:
        return int(self.state[f"{module}.lora_A.weight"].shape[0])

    def scale(self, module: str) -> float:
        """alpha / rank: what ``B @ A`` is multiplied by (before the strength)."""
        return float(self.alphas[module]) / self.rank(module)

    def subset(self, modules: list[str]) -> LoraFile:
        """The LoRA pairs of `modules` only (no biases, differences or report)."""
        keep = set(modules)
        state = {k: v for k, v in self.state.items() if _split(k)[0] in keep}
        alphas = {m: a for m, a in self.alphas.items() if m in keep}
        return LoraFile(state, alphas, self.format, self.metadata, source=self.source)


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
    ``lora_up``/``lora_down``) -> peft keys and alphas. Anything but LoRA pairs is an error."""
    lora = lora_from_tensors(tensors)
    left = _not_pairs(lora)
    if left:
        raise ValueError(f"unsupported LoRA keys (not lora_A/lora_B/alpha): {left[:5]}")
    return lora.state, lora.alphas


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


# --------------------------------------------------------------------------- reading


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file in any layout `trainer.lora.keys` knows (ComfyUI, kohya / musubi-tuner,
    Diffusers, DiffSynth-Studio, peft; LoRA pairs, biases and full differences).

    Only safetensors files are read (a pickle file can run code when it is loaded). Raises
    `LoraFileError`, naming the file, when it is missing, not safetensors, truncated or
    unreadable, holds no tensors or NaN/inf values, or when nothing in it names an S2V module.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    return lora_from_tensors(tensors, metadata, source=str(path))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a LoRA file, through the validating reader (a truncated
    download fails on its header, with the file's name, not half-way through)."""
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise LoraFileError(f"{path} is a pickle file; LoRAs are loaded from .safetensors only (a pickle "
                            "file can run code when it is loaded). Convert it to .safetensors first.")
    if not name.endswith(SAFETENSORS_SUFFIXES):
        raise LoraFileError(f"{path} is not a .safetensors file; LoRAs are loaded from .safetensors only")
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}")
    try:
        reader = SafetensorsFile(path)
        with reader.open() as handle:
            tensors = {key: reader.get_tensor(key, handle) for key in reader.tensors}
    except SafetensorsError as exc:
        raise LoraFileError(f"cannot read the LoRA file: {exc}") from exc
    except OSError as exc:
        raise LoraFileError(f"cannot read the LoRA file {path}: {exc}") from exc
    return tensors, reader.metadata


def lora_from_tensors(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    source: str = "",
) -> LoraFile:
    """A `LoraFile` (with its report) from a LoRA's tensors in any known layout.

    LoRA pairs and full differences that name S2V modules are kept; keys for Wan modules S2V
    lacks and keys that name nothing are listed in the report. Alpha comes from the module's
    ``.alpha`` key, else from the peft config in the metadata, else it equals the rank (scale
    1, as ComfyUI, Diffusers and DiffSynth-Studio read such files). Raises `LoraFileError` for
    no tensors, NaN/inf values or nothing that names an S2V module.
    """
    metadata = dict(metadata or {})
    label = source or "the LoRA"
    if not tensors:
        raise LoraFileError(f"{label} holds no tensors (empty LoRA file)")
    _check_finite(tensors, label)
    parsed = [parse_key(key) for key in tensors]
    by_module, not_in_s2v, unmatched = _group_by_module(parsed)
    collected = _collect(by_module, tensors, _PeftAlphas(metadata), unmatched)
    report = _report(label, parsed, tensors, collected, not_in_s2v, unmatched,
                     metadata.get("modelspec.architecture", ""))
    if report.matched == 0:
        raise LoraFileError(f"nothing in {label} names a Wan 2.2 S2V module, so it would change nothing.\n"
                            + report.text())
    return LoraFile(collected.state, collected.alphas, report.format, metadata, biases=collected.biases,
                    diffs=collected.diffs, report=report, source=label)


def _check_finite(tensors: Mapping[str, torch.Tensor], label: str) -> None:
    """NaN or inf in a LoRA turns every frame it touches black: refuse it up front."""
    bad = [key for key, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all())]
    if bad:
        listed = ", ".join(bad[:5]) + (f" ... (+{len(bad) - 5})" if len(bad) > 5 else "")
        raise LoraFileError(f"{label} holds NaN or inf values in {len(bad)} of {len(tensors)} tensors ({listed}): "
                            "a diverged training run or a damaged file; it would render black frames")


def _group_by_module(
    parsed: list[ParsedKey],
) -> tuple[dict[str, dict[str, ParsedKey]], list[str], list[tuple[str, str]]]:
    """(our module name -> role -> key, keys of Wan modules S2V lacks, (key, reason) matching nothing)."""
    by_module: dict[str, dict[str, ParsedKey]] = {}
    not_in_s2v: list[str] = []
    unmatched: list[tuple[str, str]] = []
    # A DoRA module's pair without its magnitude would be a different weight: leave it all out.
    dora = {key.match.name for key in parsed if key.match is not None and key.key.endswith(".dora_scale")}
    for key in parsed:
        if key.match is None or key.role is None:
            unmatched.append((key.key, key.problem))
        elif key.match.name in dora:
            unmatched.append((key.key, "part of a DoRA module (not supported)"))
        elif not key.match.module.in_s2v:
            not_in_s2v.append(key.key)
        else:
            roles = by_module.setdefault(key.match.name, {})
            if key.role in roles:
                unmatched.append((key.key, f"a second key for {roles[key.role].key}"))
            else:
                roles[key.role] = key
    return by_module, not_in_s2v, unmatched


class _PeftAlphas:
    """Alphas from the peft config Diffusers stores in the header (``lora_adapter_metadata``,
    keys bare or, as a pipeline's `save_lora_weights` writes them, ``transformer.``-prefixed).
    `alpha_pattern` keys match a module name or its dotted tail, as peft matches them."""

    def __init__(self, metadata: Mapping[str, str]):
        try:
            config = json.loads(metadata.get(METADATA_ADAPTER_KEY) or "{}")
        except json.JSONDecodeError:
            config = {}
        config = config if isinstance(config, dict) else {}
        config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in config.items()}
        self.default = config.get("lora_alpha")
        pattern = config.get("alpha_pattern") or {}
        self.pattern = {str(k).removeprefix(DIFFUSERS_PREFIX): v for k, v in pattern.items()} \
            if isinstance(pattern, dict) else {}

    def alpha(self, module: str, rank: int) -> float:
        for key, value in self.pattern.items():
            if module == key or module.endswith("." + key) or _fullmatch(rf"(.*\.)?{key}", module):
                return float(value)
        return float(self.default) if self.default is not None else float(rank)


def _fullmatch(pattern: str, text: str) -> bool:
    try:
        return re.fullmatch(pattern, text) is not None
    except re.error:  # a plain module name with regex characters: compared literally above
        return False


class _Collected:
    """The usable parts of a file: LoRA pairs, alphas, lora_B biases and full differences,
    with (module group -> count) for the report."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.alphas: dict[str, float] = {}
        self.biases: dict[str, torch.Tensor] = {}
        self.diffs: dict[str, torch.Tensor] = {}
        self.pair_groups: Counter[str] = Counter()
        self.diff_groups: Counter[str] = Counter()


_PAIR_ROLES = ("A", "B", "alpha", "B_bias")


def _collect(
    by_module: Mapping[str, Mapping[str, ParsedKey]],
    tensors: Mapping[str, torch.Tensor],
    peft_alphas: _PeftAlphas,
    unmatched: list[tuple[str, str]],
) -> _Collected:
    out = _Collected()
    for name, roles in by_module.items():
        module = next(iter(roles.values())).match.module
        pair_keys = [roles[r].key for r in _PAIR_ROLES if r in roles]
        if "A" in roles and "B" in roles:
            down, up = tensors[roles["A"].key], tensors[roles["B"].key]
            problem = _pair_problem(module.kind, down, up)
            if "alpha" in roles and tensors[roles["alpha"].key].numel() != 1:
                problem = f"its alpha holds {tensors[roles['alpha'].key].numel()} values, not one"
            if problem:
                unmatched.extend((key, problem) for key in pair_keys)
            else:
                out.state[f"{name}.lora_A.weight"], out.state[f"{name}.lora_B.weight"] = down, up
                rank = int(down.shape[0])
                alpha = roles.get("alpha")
                out.alphas[name] = float(tensors[alpha.key].item()) if alpha else peft_alphas.alpha(name, rank)
                out.pair_groups[module.group] += 1
                if "B_bias" in roles:
                    out.biases[name] = tensors[roles["B_bias"].key]
                    out.diff_groups[module.group] += 1
        elif pair_keys:
            missing = "lora_B (up)" if "A" in roles else "lora_A (down)" if "B" in roles else "lora_A and lora_B"
            unmatched.extend((key, f"its {missing} weight is missing") for key in pair_keys)
        for role in ("diff", "diff_b"):
            if role in roles:
                out.diffs[roles[role].match.parameter(role)] = tensors[roles[role].key]
                out.diff_groups[module.group] += 1
    return out


def _pair_problem(kind: str, down: torch.Tensor, up: torch.Tensor) -> str:
    """Why a lora_A / lora_B pair cannot be applied, or "" when it can."""
    if kind in ("norm", "param"):
        return "a LoRA pair on a norm or a bare parameter (only full differences fit those)"
    if down.dim() < 2 or up.dim() < 2 or down.shape[0] != up.shape[1]:
        return f"lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not form a LoRA pair"
    return ""


def _report(
    label: str,
    parsed: list[ParsedKey],
    tensors: Mapping[str, torch.Tensor],
    collected: _Collected,
    not_in_s2v: list[str],
    unmatched: list[tuple[str, str]],
    architecture: str = "",
) -> LoraReport:
    wan_styles = Counter(key.style for key in parsed if key.match is not None)
    unmatched_paths = [key.path for key in parsed if key.match is None]
    groups = set(collected.pair_groups) | set(collected.diff_groups)
    made_for, detail = guess_made_for(groups, bool(not_in_s2v), other_wan_variant(unmatched_paths),
                                      other_model_guess([key for key, _ in unmatched]), architecture)
    return LoraReport(
        source=label,
        format=wan_styles.most_common(1)[0][0] if wan_styles else "unknown",
        made_for=made_for,
        made_for_detail=detail,
        num_keys=len(tensors),
        dim=_hidden_size(parsed, tensors),
        lora_modules=dict(collected.pair_groups),
        differences=dict(collected.diff_groups),
        not_in_s2v=not_in_s2v,
        unmatched=unmatched,
        scales=_scales_text(collected),
        architecture=architecture,
    )


def _hidden_size(parsed: list[ParsedKey], tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The model width the file was made for: the input width of an attention projection's
    lora_A (every Wan attention projection reads the hidden state, cross-attention k/v too)."""
    for key in parsed:
        if key.role == "A" and key.match.module.group in (SELF_ATTENTION, CROSS_ATTENTION) \
                and key.match.module.kind == "linear" and tensors[key.key].dim() == 2:
            return int(tensors[key.key].shape[1])
    return None


def _scales_text(collected: _Collected) -> str:
    if not collected.alphas:
        return ""
    ranks = sorted({int(collected.state[f"{m}.lora_A.weight"].shape[0]) for m in collected.alphas})
    alphas = sorted(set(collected.alphas.values()))
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    alpha_text = f"alpha {alphas[0]:g}" if len(alphas) == 1 else f"alphas {alphas[0]:g}-{alphas[-1]:g}"
    return f"{rank_text}, {alpha_text}"


def _not_pairs(lora: LoraFile) -> list[str]:
    """What a LoRA holds besides LoRA pairs on S2V modules (keys or parameter names)."""
    left = list(lora.diffs) + [f"{m}.lora_B.bias" for m in lora.biases]
    if lora.report is not None:
        left += lora.report.not_in_s2v + [key for key, _ in lora.report.unmatched]
    return left


def load_lora(
    model: torch.nn.Module,
    source: str | os.PathLike | LoraFile,
    adapter_name: str = "default",
) -> LoraFile:
    """Attach a LoRA (a file in any layout `read_lora_file` reads, or a `LoraFile`) to `model`
    as adapter `adapter_name`, creating the adapter with the file's ranks, alphas and modules.
    Every tensor must land: a module the model lacks, a shape mismatch, or anything besides
    Linear LoRA pairs (full differences, biases, keys for other models) is an error; the
    sampler's `trainer.sample.lora.applied_loras` applies those files."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import set_peft_model_state_dict

    is_lora = hasattr(source, "state") and hasattr(source, "alphas") and hasattr(source, "modules")
    lora = source if is_lora else read_lora_file(source)
    left = _not_pairs(lora) if isinstance(lora, LoraFile) else []
    if left:
        raise ValueError(f"{lora.source or 'the LoRA'} holds more than LoRA pairs on S2V modules, which a peft "
                         f"adapter cannot hold: {left[:5]} ({len(left)} in all). The sampler applies such files "
                         "(trainer.sample.lora.applied_loras).")
    modules = lora.modules
    known = dict(model.named_modules())
    missing = [m for m in modules if m not in known]
    if missing:
        raise ValueError(f"the LoRA targets modules the model does not have: {missing[:5]}")
    not_linear = [m for m in modules if not isinstance(getattr(known[m], "base_layer", known[m]), torch.nn.Linear)]
    if not_linear:
        raise ValueError(f"a peft adapter here holds Linear LoRAs only; these modules are not Linear: {not_linear[:5]} "
                         "(the sampler merges such pairs into the weights: trainer.sample.lora.applied_loras)")
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
