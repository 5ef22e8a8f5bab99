"""Base-weight precision for LoRA training: int8 (optimum-quanto) and fp8 (e4m3 + scale).

Only the Linear layers of the transformer blocks and of the audio injectors' attention are
converted (they hold ~94% of the 14B weights). Norms, embeddings, the modulation tables, the
audio injectors' AdaIN projections, the condition embedders and the output head stay in
their dtype (bf16). Both converted layer types are `torch.nn.Linear` subclasses, so peft
wraps them with its ordinary `lora.Linear` and the LoRA trains on top in full precision.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..dependencies import import_optional
from .config import normalize_precision

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448

#: Module names whose Linear layers are converted.
QUANTIZED_MODULES = re.compile(r"^(blocks\.\d+\.|audio_injector\.injector\.\d+\.)")


def quantizable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every Linear that a precision mode converts."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and QUANTIZED_MODULES.match(name) and "lora_" not in name:
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _placed(layer: nn.Module, device: torch.device | None) -> nn.Module:
    """A converted `layer` moved to `device` (None: left where it was converted) right away,
    so that host memory never holds more than one converted layer beside the weights the
    layers came from (which may be a cached model's). The conversion itself still runs where
    the weights are: the same numbers as converting the whole model there first."""
    return layer if device is None else layer.to(device)


def replace_each(model: nn.Module, names: list[str], convert: Callable[[str, nn.Module], nn.Module | None],
                 device: torch.device | None = None) -> None:
    """Replace each named layer of `model` by `convert(name, layer)`, moved to `device` (see
    `_placed`); None leaves the layer as it is. Only the names are held, so a layer's old
    weights are released as soon as its replacement is in place: converting a model that
    lives on the GPU never holds both precisions of every layer at once."""
    for name in names:
        new = convert(name, model.get_submodule(name))
        if new is not None:
            _replace(model, name, _placed(new, device))


def _refuse_adapters(model: nn.Module) -> None:
    if getattr(model, "peft_config", None):
        raise RuntimeError("convert the base weights before adding a LoRA adapter")


class Fp8Linear(nn.Linear):
    """Linear layer with float8_e4m3fn weights and a per-tensor float32 scale.

    The forward dequantizes the weight to the compute dtype (the autocast dtype, else the
    input's) right before the matmul, one layer at a time, so only one layer's bf16 weight
    exists at once. `compute_dtype` also tells peft which dtype to give a LoRA on top.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
        """From ComfyUI's scaled-fp8 tensors (weight e4m3, `scale_weight`) kept as they are."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, device=weight.device, compute_dtype=compute_dtype)
        layer.weight.data = weight.to(FP8_DTYPE)
        layer.weight_scale.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(()))
        if bias is not None:
            layer.bias.data = bias.to(compute_dtype)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> Fp8Linear:
        """Quantize a floating Linear with a per-tensor scale amax / 448 (ComfyUI's scheme)."""
        compute_dtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.bfloat16)
        w = linear.weight.detach().float()
        scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_fp8(q, scale, bias, compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def to_linear(self) -> nn.Linear:
        """A plain frozen Linear in `compute_dtype`, w = fp8 * scale computed in float32."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        weight = (self.weight.to(torch.float32) * self.weight_scale).to(self.compute_dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(self.compute_dtype), requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = x.dtype if x.dtype.is_floating_point else self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized_weight(dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3fn, scale"


def quantize_fp8(model: nn.Module, compute_dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> int:
    """Replace the blocks' and audio injectors' Linears with `Fp8Linear` (moved to `device`,
    see `_placed`). Returns the count.

    Layers that already are `Fp8Linear` (loaded with ``load_transformer(..., keep_fp8=True)``
    from a scaled-fp8 file, or converted before) are left exactly as they are.
    """
    _refuse_adapters(model)
    names = [name for name, _ in quantizable_linears(model)]

    def convert(name: str, linear: nn.Module) -> nn.Module | None:
        return None if isinstance(linear, Fp8Linear) else Fp8Linear.from_linear(linear, compute_dtype)

    replace_each(model, names, convert, device)
    return len(names)


def quantize_int8_quanto(model: nn.Module, device: torch.device | None = None) -> int:
    """optimum-quanto qint8 weights (per output channel scales) on the same Linears, frozen
    (the float weights are dropped), moved to `device` (see `_placed`). An `Fp8Linear` (a
    kept scaled-fp8 weight) is dequantized to its compute dtype first, one layer at a time.
    Returns the count."""
    _refuse_adapters(model)
    quanto = import_optional("optimum.quanto", 'base_model_precision "int8-quanto"')
    QLinear, qint8 = quanto.QLinear, quanto.qint8
    names = [name for name, _ in quantizable_linears(model)]

    def convert(name: str, linear: nn.Module) -> nn.Module | None:
        if isinstance(linear, QLinear):
            return None
        if isinstance(linear, Fp8Linear):
            linear = linear.to_linear()
        qlinear = QLinear.from_module(linear, weights=qint8)
        qlinear.freeze()
        return qlinear.requires_grad_(False)

    replace_each(model, names, convert, device)
    return len(names)


def dequantize_fp8(model: nn.Module, device: torch.device | None = None) -> int:
    """Replace every `Fp8Linear` by a plain Linear in its compute dtype (w = fp8 * scale, the
    values a dequantizing load gives), one layer at a time, moved to `device` (see
    `_placed`). Returns the count."""
    names = [name for name, m in model.named_modules() if isinstance(m, Fp8Linear)]
    if names:  # nothing to do is fine with an adapter in place
        _refuse_adapters(model)
    replace_each(model, names, lambda name, layer: layer.to_linear(), device)
    return len(names)


def apply_precision(model: nn.Module, precision: str, device: torch.device | None = None) -> int:
    """Convert the base weights for `precision` ("no_change", "int8-quanto", "fp8"; NF4/int4 are
    refused), each converted layer moved to `device` (None: left where it is). Returns how many
    Linear layers were converted. "no_change" trains on the weights in their compute dtype:
    layers kept in fp8 by the loader (``keep_fp8``) are dequantized, as a load without it
    would have given them."""
    precision = normalize_precision(precision)
    if precision == "no_change":
        return dequantize_fp8(model, device)
    if precision == "fp8":
        return quantize_fp8(model, device=device)
    return quantize_int8_quanto(model, device)


def keeps_fp8_on_load(config) -> bool:
    """True when `config` (a `MemoryConfig`, dict or None) trains on fp8 base weights for sure,
    so a scaled-fp8 file's e4m3 weights can be loaded as shipped (``keep_fp8=True``). Not with
    an automatic plan free to choose the precision: it decides only after loading."""
    if config is None:
        return False
    get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    if get("auto", False) and not get("auto_keep_precision", False):
        return False
    if get("fp8_compute", False) and not get("auto", False):
        return True  # FP8 compute takes the file's e4m3 bytes as they are
    return normalize_precision(get("base_model_precision", "no_change")) == "fp8"


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized tensors by their storage)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        for leaf in _leaves(tensor):
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset()) if leaf.device.type != "meta" else (id(leaf), 0)
            if key in seen and leaf.device.type != "meta":
                continue
            seen.add(key)
            total += leaf.numel() * leaf.element_size()
    return total


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    data = t.data if isinstance(t, nn.Parameter) else t
    flatten = getattr(type(data), "__tensor_flatten__", None)
    if flatten is None or type(data) is torch.Tensor:
        return [data]
    names, _ = data.__tensor_flatten__()
    out = []
    for name in names:
        out.extend(_leaves(getattr(data, name)))
    return out


__all__ = [
    "FP8_DTYPE",
    "Fp8Linear",
    "apply_precision",
    "dequantize_fp8",
    "keeps_fp8_on_load",
    "quantizable_linears",
    "quantize_fp8",
    "quantize_int8_quanto",
    "replace_each",
    "weight_bytes",
]
