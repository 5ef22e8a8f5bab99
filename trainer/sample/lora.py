"""LoRAs for sampling: a list of (LoRA, strength) applied to the transformer for the duration
of a sampling run, then removed again.

Loading goes through `trainer.lora.io` (files in any layout it reads, or tensors already in
memory, e.g. the adapter the training node just trained). `plan_lora` matches each LoRA
against the model: its Linear pairs become a peft adapter of its own and `set_adapters`
weights them with their strengths (peft scales each adapter's `alpha / r` by the weight, i.e.
the delta B A is multiplied by the strength, as ComfyUI's strength_model does). What a peft
adapter cannot hold, full differences (``.diff``, ``.diff_b``), ``lora_B.bias`` and pairs on
convolutions, is added into the weights as ``strength * delta`` for the run and undone
bit-exactly after. Each LoRA says what went in and what did not fit (`LoraApplication`); a
LoRA of which nothing fits is an error. The model's own adapters (a LoRA being trained) are
switched off while the listed ones are applied, unless `keep_active=True`, and restored after;
layers that only the listed LoRAs wrapped are unwrapped again, so a model in training keeps
exactly its modules (validation renders with a step-distill LoRA on top of the trained one).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class LoraSpec:
    """One LoRA and its strength. `source`: a .safetensors path (any layout
    `trainer.lora.io.read_lora_file` reads), a `trainer.lora.io.LoraFile`, or a mapping
    {key: tensor} of LoRA weights (then `alphas` maps module -> alpha; default: the file's
    ``.alpha`` keys, else alpha = rank)."""

    source: Any  # path | LoraFile | {peft key: tensor} | object with .to_lora_file()
    strength: float = 1.0
    name: str = ""
    alphas: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        from .config import check_strength

        self.strength = check_strength(self.strength, f"strength of LoRA '{self.label}'")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.source, (str, os.PathLike)):
            return Path(self.source).stem
        return "in-memory LoRA"


def lora_from_model(model: torch.nn.Module, adapter_name: str = "default", strength: float = 1.0,
                    name: str = "trained LoRA") -> LoraSpec:
    """A detached copy of an adapter the model holds (e.g. the one being trained), as a LoraSpec."""
    from ..lora.io import LoraFile, adapter_alphas, adapter_state_dict

    state = {k: v.detach().clone() for k, v in adapter_state_dict(model, adapter_name).items()}
    return LoraSpec(LoraFile(state, adapter_alphas(model, adapter_name), "peft", {}), strength, name)


def read_lora(spec: LoraSpec):
    """The spec's LoRA as a `LoraFile` (files read from disk here)."""
    from ..lora.io import LoraFile, lora_from_tensors, read_lora_file

    source = spec.source
    if hasattr(source, "to_lora_file"):  # the training node's in-memory TrainedLora
        source = source.to_lora_file()
    if isinstance(source, LoraFile):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_lora_file(source)
    if isinstance(source, Mapping):
        lora = lora_from_tensors(dict(source))
        if spec.alphas:
            lora.alphas.update(spec.alphas)
        return lora
    raise TypeError(f"unsupported LoRA source {type(source).__name__}")


@dataclass
class LoraApplication:
    """What one LoRA did to the model in a sampling run.

    `pairs` / `differences`: module group -> LoRA pairs / full differences (``.diff``,
    ``.diff_b``, ``lora_B.bias``) that went in; `skipped`: (module or parameter, reason) for
    those that did not fit this model (a block it lacks, a shape of another model size, a
    weight kept quantized); `report`: the file's own `LoraReport` (None for in-memory LoRAs).
    """

    label: str
    strength: float
    pairs: Counter[str] = field(default_factory=Counter)
    differences: Counter[str] = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    report: Any = None

    @property
    def count(self) -> int:
        return sum(self.pairs.values()) + sum(self.differences.values())

    def text(self) -> str:
        from ..lora.keys import group_counts_text
        from ..lora.report import MADE_FOR_LABELS

        def counts(what: str, groups: Counter[str]) -> str:
            total = sum(groups.values())
            return f"{total} {what}{'' if total == 1 else 's'} ({group_counts_text(groups)})"

        parts = [counts(what, groups) for what, groups in (("LoRA pair", self.pairs),
                                                            ("full difference", self.differences)) if groups]
        line = f"LoRA {self.label} (strength {self.strength:g}): applied " + (" and ".join(parts) or "nothing")
        if self.report is not None and self.report.made_for != "wan-s2v":
            line += f"; made for {MADE_FOR_LABELS.get(self.report.made_for, self.report.made_for)}"
        if self.skipped:
            shown = "; ".join(f"{name}: {why}" for name, why in self.skipped[:5])
            line += f"; skipped {len(self.skipped)}: {shown}" + (" ..." if len(self.skipped) > 5 else "")
        return line


@dataclass
class _Plan:
    """How one LoRA goes onto the model: peft adapter modules (Linear pairs) and full
    differences at strength 1 (parameter name -> float32 delta)."""

    linear: list[str]
    deltas: dict[str, torch.Tensor]
    application: LoraApplication


def _group(name: str) -> str:
    from ..lora.keys import resolve_module

    candidates = resolve_module(name)
    if not candidates:  # a parameter name: look its module up
        candidates = resolve_module(name.rpartition(".")[0])
    return candidates[0].module.group if candidates else "other"


def _layer(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The module `name` of the model, the base layer if peft wraps it; None if absent."""
    try:
        module = model.get_submodule(name) if name else model
    except AttributeError:
        return None
    return getattr(module, "base_layer", module)


def _parameter(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """Parameter `name` (``blocks.0.norm2.bias``, ``scale_shift_table``), through peft wrappers."""
    module_name, _, attribute = name.rpartition(".")
    module = _layer(model, module_name)
    value = getattr(module, attribute, None) if module is not None else None
    return value if isinstance(value, torch.Tensor) else None


def _quantized(tensor: torch.Tensor) -> bool:
    """fp8 weights and quantized tensor subclasses (quanto int8) cannot take a difference exactly."""
    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or type(tensor.data) is not torch.Tensor


def plan_lora(model: torch.nn.Module, lora, label: str = "", strength: float = 1.0) -> _Plan:
    """Match a `LoraFile` against the model: Linear pairs become a peft adapter; pairs on
    other layers (patch embedding, pose and frame-packer convolutions) are merged into their
    weight as ``scale * B @ A``, like ComfyUI merges them; full differences and
    ``lora_B.bias`` are added into the parameter. What does not fit is skipped and said."""
    app = LoraApplication(label or lora.source or "in-memory LoRA", float(strength),
                          report=getattr(lora, "report", None))
    linear: list[str] = []
    deltas: dict[str, torch.Tensor] = {}
    applied_pairs = set()
    for module in lora.modules:
        down, up = lora.state[f"{module}.lora_A.weight"], lora.state[f"{module}.lora_B.weight"]
        layer = _layer(model, module)
        problem = _pair_misfit(layer, down, up)
        if problem:
            app.skipped.append((module, problem))
            continue
        if isinstance(layer, torch.nn.Linear):
            linear.append(module)
        else:
            merged = up.flatten(1).float() @ down.flatten(1).float() * lora.scale(module)
            deltas[f"{module}.weight"] = merged.reshape(layer.weight.shape)
        applied_pairs.add(module)
        app.pairs[_group(module)] += 1
    extra = {f"{m}.bias": b.float() * lora.scale(m) for m, b in getattr(lora, "biases", {}).items()
             if m in applied_pairs}
    extra.update({name: diff.float() for name, diff in getattr(lora, "diffs", {}).items()})
    for name, delta in extra.items():
        problem = _difference_misfit(_parameter(model, name), delta)
        if problem:
            app.skipped.append((name, problem))
            continue
        deltas[name] = deltas[name] + delta if name in deltas else delta
        app.differences[_group(name)] += 1
    return _Plan(linear, deltas, app)


def _pair_misfit(layer: torch.nn.Module | None, down: torch.Tensor, up: torch.Tensor) -> str:
    """Why a LoRA pair (down [r, in, ...], up [out, r, ...]) does not fit `layer`, or ""."""
    if layer is None:
        return "not in this model"
    shapes = f"LoRA {tuple(up.shape)} @ {tuple(down.shape)}"
    if down.dim() < 2 or up.dim() < 2 or up[0].numel() != down.shape[0]:
        return f"{shapes} is not a LoRA pair"
    if isinstance(layer, torch.nn.Linear):
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != layer.in_features \
                or up.shape[0] != layer.out_features:
            return (f"{shapes} does not fit the layer [{layer.out_features}, {layer.in_features}] "
                    "(made for another model size?)")
        return ""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "the layer has no weight"
    if _quantized(weight):
        return "the model keeps this weight quantized (fp8 / int8)"
    if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
        return f"{shapes} does not fit the weight {tuple(weight.shape)}"
    return ""


def _difference_misfit(parameter: torch.Tensor | None, delta: torch.Tensor) -> str:
    """Why a full difference does not fit `parameter`, or ""."""
    if parameter is None:
        return "not in this model"
    if _quantized(parameter):
        return "the model keeps this weight quantized (fp8 / int8)"
    if tuple(parameter.shape) != tuple(delta.shape):
        return f"difference {tuple(delta.shape)} does not fit {tuple(parameter.shape)} (made for another model size?)"
    return ""


class _WeightPatches:
    """Full differences added into the model's parameters for a sampling run, then undone.

    Every LoRA's delta of a parameter is summed in float32 and added once (one rounding to
    the parameter's dtype, as ComfyUI's patching); the original values wait on the CPU and
    are copied back bit-exactly afterwards.
    """

    def __init__(self) -> None:
        self.deltas: dict[str, torch.Tensor] = {}
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, delta: torch.Tensor) -> None:
        self.deltas[name] = self.deltas[name] + delta if name in self.deltas else delta

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        for name, delta in self.deltas.items():
            parameter = _parameter(model, name)
            self.saved.append((parameter, parameter.detach().to("cpu", copy=True)))
            parameter.copy_((parameter.float() + delta.to(parameter.device)).to(parameter.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        while self.saved:
            parameter, original = self.saved.pop()
            parameter.copy_(original)


def _set_adapters(model: torch.nn.Module, names: list[str], weights: list[float]) -> None:
    """Activate the peft adapters `names` with their strengths. diffusers' `set_adapters`
    does the same but, up to diffusers 0.36 at least, only for the model classes it lists."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    set_weights_and_activate_adapters(model, names, weights)


@contextlib.contextmanager
def applied_loras(model: torch.nn.Module, loras: Sequence[LoraSpec] | None, keep_active: bool = False,
                  log: Callable[[str], None] | None = None) -> Iterator[list[str]]:
    """Apply `loras` (with their strengths) inside the block; the model is as it was after.

    Strength 0 LoRAs are skipped (bit-exact with no LoRA). Yields the adapter names added.
    `keep_active=True` leaves the model's already active adapters on as well (weight 1).
    Each LoRA's `LoraApplication` (what went in, what was skipped) goes to `log`; a LoRA of
    which nothing fits the model is an error, never a silent no-op.
    """
    loras = [spec for spec in (loras or []) if float(spec.strength) != 0.0]
    existing = dict(getattr(model, "peft_config", {}) or {})
    if not loras and (keep_active or not existing):
        yield []
        return
    from ..lora.io import load_lora

    say = log or (lambda message: None)
    previous = list(model.active_adapters()) if existing else []
    was_disabled = bool(existing) and _adapters_disabled(model)
    wrapped = _tuner_layers(model)  # layers peft wraps already (the adapter in training)
    added: list[str] = []  # adapter names, including one whose loading failed half-way
    weights: list[float] = []
    patches = _WeightPatches()
    try:
        for index, spec in enumerate(loras):
            lora = read_lora(spec)
            plan = plan_lora(model, lora, spec.label, spec.strength)
            if plan.application.count == 0:
                raise ValueError(f"nothing of LoRA {plan.application.label} fits this model: "
                                 f"{plan.application.text()}")
            if plan.linear:
                # one name per position, the same at every run: blocks compiled for training see
                # the same module structure at every validation render
                added.append(f"s2v_sample_{index}")
                load_lora(model, lora.subset(plan.linear), adapter_name=added[-1])
                weights.append(float(spec.strength))
            for parameter, delta in plan.deltas.items():
                patches.add(parameter, delta * float(spec.strength))
            say(plan.application.text())
        names = added + (previous if keep_active and not was_disabled else [])
        weights += [1.0] * (len(names) - len(added))
        if names:
            model.enable_adapters()
            _set_adapters(model, names, weights)
        elif existing:
            model.disable_adapters()
        patches.apply(model)
        yield added
    finally:
        patches.restore()
        present = [name for name in added if name in (getattr(model, "peft_config", {}) or {})]
        if present:
            model.delete_adapters(present)
        if added and not existing and hasattr(model, "unload_lora"):
            model.unload_lora()  # no adapters before: remove the peft wrappers too
        elif added:
            _unwrap_new_layers(model, wrapped)
        if previous:
            _set_adapters(model, previous, [1.0] * len(previous))
            if was_disabled:
                model.disable_adapters()
            else:
                model.enable_adapters()


def _tuner_layers(model: torch.nn.Module) -> set[str]:
    """Names of the model's peft-wrapped layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def _unwrap_new_layers(model: torch.nn.Module, before: set[str]) -> None:
    """Put back the original layer wherever peft wrapped one that `before` did not list, so
    that a model in training (whose own adapter stays) has exactly its modules again (the
    same objects, the same state_dict keys) after a LoRA was applied for one run."""
    for name in sorted(_tuner_layers(model) - before, key=len, reverse=True):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).get_base_layer())


def _adapters_disabled(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return bool(module.disable_adapters)
    return False
