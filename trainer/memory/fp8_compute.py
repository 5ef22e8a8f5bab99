"""FP8 compute for the frozen base Linears: e4m3 matmuls on FP8 tensor cores.

LoRA training never changes the base weights, so each base Linear of the transformer
blocks and audio injectors can hold its weight in float8_e4m3fn once and run its two large
matmuls of a step on FP8 tensor cores (about twice the bf16 rate on Hopper and Blackwell):

- forward:           y [M, N]  = x [M, K] @ W^T,  x quantized per row (token) on the fly,
                                 W quantized once per output channel (row of W);
- input gradient:    dx [M, K] = dy [M, N] @ W,   dy quantized per row on the fly.

There is no weight gradient (the base is frozen); the LoRA path, norms, modulation and
attention keep their dtype. Scales are float32 and map each row's absolute maximum to the
e4m3 maximum (448): ``q = round_e4m3(v / s)``, ``s = amax / 448``. The matmul itself is
``torch._scaled_mm`` with row-wise scales (``scale_a`` [M, 1], ``scale_b`` [1, N]) where the
GPU has them (compute capability 9.0 and newer); on Ada (8.9) a per-tensor scaled product
with the per-channel weight scales applied to its output. On a device where the scaled
product does not run, `scaled_mm` emulates it in float32 with the same quantized operands,
so the numbers can be checked on a CPU.

Why the input-gradient matmul needs no second copy of the weight scales: the contraction
runs over the output channels, so a per-channel weight scale cannot leave the sum; it is
folded into the output gradient instead (``dx = (dy * s_w) @ W_q``) before that is quantized
per row. The weight is transposed on the fly (the scaled product wants its second operand
column-major): 26 MB per 5120x5120 layer, negligible beside the matmul.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
#: Smallest scale: an all-zero row quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12
#: FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x).
MIN_CAPABILITY = (8, 9)
#: Row-wise scaled products (one scale per row of each operand): Hopper and newer.
ROWWISE_CAPABILITY = (9, 0)
#: The scaled product needs its inner dimension and its output width in multiples of 16;
#: forward and input gradient swap the two, so both feature counts must be.
ALIGNMENT = 16
KINDS = ("rowwise", "tensorwise", "emulated")


def fp8_compute_refusal(device: torch.device | str) -> str | None:
    """Why FP8 compute cannot run on `device` (None: it can), naming the GPU."""
    device = torch.device(device)
    advice = "Turn fp8_compute off (the base weights then compute in bf16)."
    if device.type != "cuda":
        return (f"fp8_compute needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer: "
                f"Ada, Hopper, Blackwell); the model runs on '{device}'. {advice}")
    if not torch.cuda.is_available():
        return f"fp8_compute needs CUDA, which this PyTorch build or machine does not offer. {advice}"
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return (f"fp8_compute needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
                f"{name} has compute capability {major}.{minor}. {advice}")
    return None


def has_fp8_compute(device: torch.device | str) -> bool:
    """Whether `device` runs FP8 matmuls on tensor cores."""
    return fp8_compute_refusal(device) is None


# --------------------------------------------------------------------------- quantization


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 scales [M, 1] that map each row of x [M, K] onto the e4m3 range: amax / 448."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    return (amax / E4M3_MAX).clamp(min=MIN_SCALE)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 values of x / scale (float32 division, clamped to +-448 so nothing overflows)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~ q * scale per row."""
    scale = row_scales(x)
    return quantize(x, scale), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [M, K] e4m3 with scales [M, 1] (or a scalar) -> the values they stand for."""
    return (q.float() * scale.float()).to(dtype)


# --------------------------------------------------------------------------- the scaled product


@functools.cache
def _cpu_kind() -> str:
    try:  # PyTorch's CPU kernel (newer releases)
        one = torch.ones(16, 16).to(E4M3)
        torch._scaled_mm(one, one.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
        return "rowwise"
    except (RuntimeError, NotImplementedError, TypeError):
        return "emulated"


def scaled_mm_kind(device: torch.device | str) -> str:
    """How `scaled_mm` computes on `device`: "rowwise" (one scale per row of each operand),
    "tensorwise" (Ada: one scale per operand) or "emulated" (float32, where no kernel runs).
    Decided once per layer, outside compiled code (it asks the driver)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if capability >= ROWWISE_CAPABILITY:
            return "rowwise"
        return "tensorwise" if capability >= MIN_CAPABILITY else "emulated"
    return _cpu_kind() if device.type == "cpu" else "emulated"


def emulated_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The scaled product in float32: (a * a_scale) @ (b * b_scale)^T + bias, rounded once.

    a [M, K] e4m3, a_scale [M, 1]; b [N, K] e4m3, b_scale [N]; bias [N] or None -> [M, N]."""
    out = dequantize_rows(a, a_scale) @ dequantize_rows(b, b_scale.reshape(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None, fast_accum: bool = False,
              kind: str = "rowwise") -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale)^T + bias on FP8 tensor cores.

    Args:
        a: [M, K] e4m3, row-major; a_scale: [M, 1] float32 (one scale per row).
        b: [N, K] e4m3, row-major (so b^T is the column-major operand the kernel wants);
            b_scale: [N] float32 (one scale per row of b = per output column).
        out_dtype: dtype of the [M, N] result (bf16 in training).
        bias: [N] in `out_dtype`, added in the kernel's epilogue, or None.
        fast_accum: Hopper's faster, less exact fp8 accumulation (the forward uses it, the
            gradient does not, as torchao's float8 recipes do).
        kind: `scaled_mm_kind` of the device.
    """
    if kind == "emulated":
        return emulated_scaled_mm(a, a_scale, b, b_scale, out_dtype, bias)
    if kind == "rowwise":
        return torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.reshape(1, -1), bias=bias,
                                out_dtype=out_dtype, use_fast_accum=fast_accum)
    # Ada: one scale per operand. The row scales leave the sum as an outer product on the output.
    one = torch.ones((), device=a.device, dtype=torch.float32)
    out = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast_accum)
    out = out * a_scale * b_scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_input_grad(grad_rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   kind: str = "rowwise") -> torch.Tensor:
    """dx [M, K] = dy [M, N] @ (W_q * s_w) with dy quantized per row after folding in s_w.

    weight [N, K] e4m3, weight_scale [N] float32."""
    g8, g_scale = quantize_rows(grad_rows.float() * weight_scale.reshape(1, -1))
    ones = torch.ones(weight.shape[1], device=weight.device, dtype=torch.float32)
    return scaled_mm(g8, g_scale, weight.t().contiguous(), ones, grad_rows.dtype, kind=kind)


def fp8_forward_rows(x_rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, kind: str = "rowwise") -> torch.Tensor:
    """y [M, N] = x [M, K] @ (W_q * s_w)^T + bias with x quantized per row."""
    x8, x_scale = quantize_rows(x_rows)
    return scaled_mm(x8, x_scale, weight, weight_scale, x_rows.dtype,
                     None if bias is None else bias.to(x_rows.dtype), fast_accum=True, kind=kind)


class Fp8Matmul(torch.autograd.Function):
    """y = x W^T + b on FP8 tensor cores; the gradient flows to x only (W and b frozen).

    x [..., K] (bf16), weight [N, K] e4m3, weight_scale [N] float32, bias [N] or None,
    kind: `scaled_mm_kind`. Saves only the (already resident) weight and its scales for the
    backward: no activation.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, kind: str) -> torch.Tensor:
        ctx.save_for_backward(weight, weight_scale)
        ctx.kind = kind
        y = fp8_forward_rows(x.reshape(-1, x.shape[-1]), weight, weight_scale, bias, kind)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        weight, weight_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_input_grad(grad_out.reshape(-1, grad_out.shape[-1]), weight, weight_scale, ctx.kind)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], weight.shape[1])
        return grad_x, None, None, None, None


def compute_dtype_for(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The matmul dtype: the autocast dtype if autocast is on, else x's (when floating)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype if x.dtype.is_floating_point else default


# --------------------------------------------------------------------------- the layer


class Fp8ComputeLinear(nn.Linear):
    """A frozen Linear whose matmuls run in FP8: e4m3 weight [out, in] with one float32
    scale per output channel (`weight_scale` [out]), bias in `compute_dtype`.

    It is an `nn.Linear` (peft wraps it with its ordinary LoRA layer, whose LoRA trains in
    its own dtype; `compute_dtype` tells peft which). Shapes whose in or out features are not
    multiples of 16 are never converted (`convertible`). `kind` is how the matmul runs on the
    compute device (`scaled_mm_kind`), fixed when the layer is made so that compiled code
    sees a constant.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16, kind: str = "rowwise"):
        nn.Module.__init__(self)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.kind = kind
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @staticmethod
    def convertible(layer: nn.Linear) -> bool:
        return layer.in_features % ALIGNMENT == 0 and layer.out_features % ALIGNMENT == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None,
                    kind: str = "rowwise") -> Fp8ComputeLinear:
        """Quantize a floating Linear's weight once, one scale per output channel."""
        weight = linear.weight.detach()
        compute_dtype = compute_dtype or (weight.dtype if weight.dtype.is_floating_point else torch.bfloat16)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                    compute_dtype=compute_dtype, kind=kind)
        q, scale = quantize_rows(weight)
        return layer._filled(q, scale.reshape(-1), linear.bias)

    @classmethod
    def from_fp8(cls, layer: nn.Linear, kind: str = "rowwise") -> Fp8ComputeLinear:
        """From an `Fp8Linear` (a scaled-fp8 file's e4m3 weight and per-tensor scale): the
        weight's bytes are used as shipped, the scale repeated for every output channel."""
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta",
                  compute_dtype=layer.compute_dtype, kind=kind)
        scale = layer.weight_scale.detach().float().reshape(-1).expand(layer.out_features).contiguous()
        return new._filled(layer.weight.detach(), scale, layer.bias)

    def _filled(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Fp8ComputeLinear:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = scale.to(torch.float32)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] values the fp8 weight stands for."""
        return dequantize_rows(self.weight, self.weight_scale.reshape(-1, 1), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype_for(x, self.compute_dtype)
        return Fp8Matmul.apply(x.to(dtype), self.weight, self.weight_scale, self.bias, self.kind)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fp8_e4m3fn compute ({self.kind}), per-channel scales")


def enable_fp8_compute(model: nn.Module, compute_device: torch.device | str,
                       place: torch.device | None = None, kind: str | None = None) -> int:
    """Replace the blocks' and audio injectors' base Linears (bf16 `nn.Linear` or a kept
    scaled-fp8 `Fp8Linear`) by `Fp8ComputeLinear` for matmuls on `compute_device`, each
    moved to `place` at once (None: left where converted). Must run before the LoRA is
    added. `kind` overrides `scaled_mm_kind(compute_device)` ("emulated": the float32
    reference math, deterministic on any device). Returns the count converted.

    int8 (optimum-quanto) layers are refused: their weights would be requantized to fp8."""
    from .quantize import Fp8Linear, _refuse_adapters, quantizable_linears, replace_each

    _refuse_adapters(model)
    kind = kind or scaled_mm_kind(compute_device)

    def convert(name: str, linear: nn.Module) -> nn.Module | None:
        if isinstance(linear, Fp8ComputeLinear):
            return None
        if type(linear) is not nn.Linear and not isinstance(linear, Fp8Linear):
            raise ValueError(f"fp8_compute cannot convert {name} ({type(linear).__name__}): use it with "
                             "base_model_precision no_change or fp8")
        if not Fp8ComputeLinear.convertible(linear):
            return None
        if isinstance(linear, Fp8Linear):
            return Fp8ComputeLinear.from_fp8(linear, kind=kind)
        return Fp8ComputeLinear.from_linear(linear, kind=kind)

    names = [name for name, _ in quantizable_linears(model)]
    replace_each(model, names, convert, place)
    return sum(isinstance(model.get_submodule(name), Fp8ComputeLinear) for name in names)


def fp8_compute_copy(model: nn.Module, compute_device: torch.device | str, kind: str | None = None) -> nn.Module:
    """`model` with its base Linears computing in FP8 (`enable_fp8_compute`), leaving `model`
    as it is: every other parameter and buffer of the copy is `model`'s own tensor, shared,
    so the copy costs only the e4m3 weights (one byte a weight). For a model that others hold
    too (ComfyUI's cached loader output, the transformer a training node uses)."""
    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    converted = copy.deepcopy(model, shared)
    enable_fp8_compute(converted, compute_device, kind=kind)
    return converted


__all__ = [
    "E4M3",
    "E4M3_MAX",
    "KINDS",
    "Fp8ComputeLinear",
    "Fp8Matmul",
    "emulated_scaled_mm",
    "enable_fp8_compute",
    "fp8_compute_copy",
    "fp8_compute_refusal",
    "fp8_forward_rows",
    "fp8_input_grad",
    "has_fp8_compute",
    "quantize_rows",
    "row_scales",
    "scaled_mm",
    "scaled_mm_kind",
]
