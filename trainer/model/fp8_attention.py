"""FP8 self-attention: cuDNN's fused FP8 attention kernels (forward and backward) through
the optional `nvidia-cudnn-frontend` package. The kernels are torch custom ops; the
quantization around them is plain torch code (`fp8_attention`, an autograd function), which
a compiled region fuses into the RoPE, norm and projection kernels beside it.

Attention is two thirds of a 14B step at 832x480x81 once the base Linears run in FP8. On an
H200 cuDNN's FP8 kernels take 29 ms forward and 88 ms backward at that shape against 43 and
115 ms in bf16 (docs/benchmarks.md); the gradients come out noticeably less exact (relative
L2 error ~0.07 per tensor), so this is an opt-in. Scaling, as in Transformer Engine's FP8
attention:

- Q, K, V (and, in the backward, dO) are quantized to e4m3 with one float32 scale per
  tensor, from their absolute maximum on the fly (``q8 = round_e4m3(q * 448 / amax)``).
- The kernel quantizes the softmax probabilities with a fixed scale (they lie in [0, 1]).
- The output O is a convex combination of V's rows, so |O| <= amax(V): V's scale serves O.
- The backward kernel quantizes the gradient of the attention logits (cuDNN's "dP") and
  writes dQ, dK, dV in e4m3 (cuDNN 9.19 offers these kernels with FP8 outputs only), each
  before its amax is known. Their scales come from the layer's previous backward (delayed
  scaling), kept relative to dO's amax so a change in the loss's magnitude between steps
  moves them at once; dP's is also capped by a bound that cannot overflow (`dp_scale`). A
  layer's first backward measures them with one extra run of the kernel.

Only self-attention of the transformer blocks runs in FP8 (cross-attention over 512 text
tokens and the audio injectors are ~3% of the attention work). The ops are defined whether
or not the package is installed; `refusal` says when they may run. Off CUDA the ops run a
float32 emulation of the two kernels from the same e4m3 operands and scales, so the scaling,
autograd and checkpointing logic is tested on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..dependencies import importable
from .custom_ops import define_once

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
#: cuDNN's FP8 attention kernels: Hopper and newer, heads of 128.
MIN_CAPABILITY = (9, 0)
HEAD_DIM = 128
#: Headroom of the delayed gradient scales: dP, dQ, dK, dV may grow this much relative to
#: dO's amax from one step to the next before their largest values saturate.
GRADIENT_MARGIN = 4.0
#: A tiny amax (an all-zero tensor) quantizes to zeros instead of dividing by zero.
MIN_AMAX = 1e-12


def is_installed() -> bool:
    """Whether the cuDNN frontend (the `nvidia-cudnn-frontend` package) imports cleanly."""
    return importable("cudnn")


def refusal(device: torch.device | str) -> str | None:
    """Why FP8 attention cannot run on `device` (None: it can), naming the GPU."""
    device = torch.device(device)
    advice = "Turn fp8_attention off (attention then runs in bf16)."
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"fp8_attention needs an NVIDIA Hopper or newer GPU; the model runs on '{device}'. {advice}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return (f"fp8_attention needs cuDNN's FP8 attention kernels (compute capability 9.0 or newer: Hopper, "
                f"Blackwell); {torch.cuda.get_device_name(device)} has {major}.{minor}. {advice}")
    if not is_installed():
        return f"fp8_attention needs the nvidia-cudnn-frontend package: pip install nvidia-cudnn-frontend. {advice}"
    return None


def check_device(device: torch.device | str) -> None:
    """Raise `ValueError` with `refusal`'s reason where FP8 attention cannot run."""
    reason = refusal(device)
    if reason:
        raise ValueError(reason)


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether these [B, S, H, D] queries and keys go through FP8 attention (cuDNN's kernels
    take heads of 128; the float32 emulation off CUDA any)."""
    head_ok = q.shape[-1] == HEAD_DIM or q.device.type != "cuda"
    return q.dtype == torch.bfloat16 and head_ok and q.shape == k.shape


# --------------------------------------------------------------------------- scaling


def quantize_per_tensor(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 copy of `x` with one scale: (x8, descale), ``x ~= x8.float() * descale``;
    `descale` is a float32 [1, 1, 1, 1] tensor (amax / 448), as cuDNN takes it."""
    amax = x.detach().abs().amax().float() if amax is None else amax
    descale = (amax.clamp(min=MIN_AMAX) / E4M3_MAX).reshape(1, 1, 1, 1)
    # a 0-dim scale keeps a bf16 product in bf16: one pass less than a float32 copy
    return (x * (1.0 / descale).reshape(())).to(E4M3), descale


def dp_scale(ratio: torch.Tensor, dout_amax: torch.Tensor, v_amax: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Scale [1, 1, 1, 1] of the logits' gradient dP in the backward kernel.

    From the layer's last observed ratio amax(dP) / amax(dO) (0 before its first backward)
    times `GRADIENT_MARGIN`, and never above the bound that holds for any input: with
    ``dP_ij = P_ij (dO_i . V_j - dO_i . O_i) / sqrt(D)``, 0 <= P_ij <= 1 and |O| <= amax(V),
    ``|dP| <= 2 sqrt(D) amax(dO) amax(V)``.
    """
    bound = 2.0 * math.sqrt(head_dim) * v_amax
    expected_ratio = torch.where(ratio > 0, torch.minimum(ratio * GRADIENT_MARGIN, bound), bound)
    return (E4M3_MAX / (expected_ratio * dout_amax).clamp(min=MIN_AMAX)).reshape(1, 1, 1, 1)


def new_state(device: torch.device | str) -> torch.Tensor:
    """A layer's FP8 attention state: float32 [4], the ratios amax(X) / amax(dO) of its last
    backward for X = dP, dQ, dK, dV (zeros before the first)."""
    return torch.zeros(4, device=device, dtype=torch.float32)


def gradient_scales(ratios: torch.Tensor, dout_amax: torch.Tensor, v_amax: torch.Tensor,
                    head_dim: int) -> torch.Tensor:
    """Scales [4] of dP, dQ, dK, dV in the backward kernel from the layer's last `ratios`
    (`new_state`) with `GRADIENT_MARGIN` headroom; dP's is never above `dp_scale`'s bound."""
    grads = E4M3_MAX / (ratios[1:] * GRADIENT_MARGIN * dout_amax).clamp(min=MIN_AMAX)
    return torch.cat([dp_scale(ratios[0], dout_amax, v_amax, head_dim).reshape(1), grads])


# --------------------------------------------------------------------------- cuDNN graphs


@dataclass
class _Graphs:
    forward: object
    backward: object
    forward_tensors: dict
    backward_tensors: dict
    workspace_bytes: int


@functools.cache
def _handle(device_index: int):
    import cudnn

    with torch.cuda.device(device_index):
        return cudnn.create_handle()


def _build(graph, cudnn) -> None:
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()


@functools.cache
def _graphs(shape: tuple[int, ...], stride: tuple[int, ...], device_index: int) -> _Graphs:
    """Forward and backward graphs for [B, H, S, D] views of `shape` and `stride`."""
    import cudnn

    dt = cudnn.data_type
    handle = _handle(device_index)
    batch, heads, seq, dim = shape
    stats_dim, stats_stride = (batch, heads, seq, 1), (heads * seq, seq, 1, 1)
    attn_scale = 1.0 / math.sqrt(dim)

    def new_graph():
        return cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT,
                             compute_data_type=dt.FLOAT, handle=handle)

    def tensor(graph, data_type=dt.FP8_E4M3):
        return graph.tensor(dim=shape, stride=stride, data_type=data_type)

    def scalar(graph):
        return graph.tensor(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT)

    def output(t, dims, strides, data_type):
        t.set_output(True).set_dim(dims).set_stride(strides).set_data_type(data_type)

    fwd = new_graph()
    ft = {name: tensor(fwd) for name in ("q", "k", "v")}
    ft.update({name: scalar(fwd) for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s",
                                               "scale_o")})
    o, stats, amax_s, amax_o = fwd.sdpa_fp8(
        q=ft["q"], k=ft["k"], v=ft["v"], descale_q=ft["descale_q"], descale_k=ft["descale_k"],
        descale_v=ft["descale_v"], descale_s=ft["descale_s"], scale_s=ft["scale_s"], scale_o=ft["scale_o"],
        is_inference=False, attn_scale=attn_scale, use_causal_mask=False)
    output(o, shape, stride, dt.FP8_E4M3)
    output(stats, stats_dim, stats_stride, dt.FLOAT)
    for t in (amax_s, amax_o):
        output(t, (1, 1, 1, 1), (1, 1, 1, 1), dt.FLOAT)
    ft.update(o=o, stats=stats, amax_s=amax_s, amax_o=amax_o)
    _build(fwd, cudnn)

    bwd = new_graph()
    bt = {name: tensor(bwd) for name in ("q", "k", "v", "o", "dO")}
    bt["stats"] = bwd.tensor(dim=stats_dim, stride=stats_stride, data_type=dt.FLOAT)
    scales = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
              "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")
    bt.update({name: scalar(bwd) for name in scales})
    dq, dk, dv, *amaxes = bwd.sdpa_fp8_backward(**{n: bt[n] for n in ("q", "k", "v", "o", "dO", "stats", *scales)},
                                                attn_scale=attn_scale, use_causal_mask=False)
    for t in (dq, dk, dv):
        output(t, shape, stride, dt.FP8_E4M3)
    for t in amaxes:
        output(t, (1, 1, 1, 1), (1, 1, 1, 1), dt.FLOAT)
    bt.update(dq=dq, dk=dk, dv=dv, **dict(zip(("amax_dq", "amax_dk", "amax_dv", "amax_dp"), amaxes)))
    _build(bwd, cudnn)
    return _Graphs(fwd, bwd, ft, bt, max(fwd.get_workspace_size(), bwd.get_workspace_size()))


# --------------------------------------------------------------------------- the kernels


@functools.cache
def _constant(value: float, device: torch.device) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), value, device=device, dtype=torch.float32)


def _bhsd(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shape and stride of the [B, H, S, D] view of a [B, S, H, D] tensor, as cuDNN takes them."""
    view = x.transpose(1, 2)
    return tuple(view.shape), tuple(view.stride())


def _execute(graph, tensors: dict, pack: dict, workspace_bytes: int, device: torch.device) -> None:
    import cudnn

    handle = _handle(device.index)
    cudnn.set_stream(handle, torch.cuda.current_stream(device).cuda_stream)
    workspace = torch.empty(workspace_bytes, device=device, dtype=torch.uint8)
    graph.execute({tensors[name]: value for name, value in pack.items()}, workspace, handle=handle)


def _scalar(t: torch.Tensor, index: int) -> torch.Tensor:
    return t[index:index + 1].view(1, 1, 1, 1)


def _forward_kernel(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's FP8 forward: (o8 scaled by 1 / descale_v, stats [B, H, S, 1])."""
    device = q8.device
    shape, stride = _bhsd(q8)
    graphs = _graphs(shape, stride, device.index)
    o8 = torch.empty_like(q8)
    stats = torch.empty(shape[0], shape[1], shape[2], 1, device=device, dtype=torch.float32)
    amax_scratch = torch.empty(2, 1, 1, 1, device=device, dtype=torch.float32)
    _execute(graphs.forward, graphs.forward_tensors, {
        "q": q8, "k": k8, "v": v8, "descale_q": _scalar(descales, 0), "descale_k": _scalar(descales, 1),
        "descale_v": _scalar(descales, 2), "descale_s": _constant(1.0 / E4M3_MAX, device),
        "scale_s": _constant(E4M3_MAX, device), "scale_o": 1.0 / _scalar(descales, 2),
        "o": o8, "stats": stats, "amax_s": amax_scratch[0:1], "amax_o": amax_scratch[1:2],
    }, graphs.workspace_bytes, device)
    return o8, stats


def backward_kernels(do8: torch.Tensor, descale_do: torch.Tensor, dout_amax: torch.Tensor, o8: torch.Tensor,
                     stats: torch.Tensor, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FP8 backward of one attention call: (dq8, dk8, dv8 e4m3 [B, S, H, D], their
    descales [3] float32, ``dq ~= dq8.float() * descales[0]``).

    The kernel writes e4m3 gradients with scales from the layer's `state` (`new_state`),
    which this call then updates from the amaxes the kernel reports. A layer's first backward
    (no ratios yet; one host sync a call to know) runs the kernel once more to measure them.
    """
    v_amax = descales[2] * E4M3_MAX
    if state[0].item() == 0.0:  # unit gradient scales: the amaxes come out right whether or not cuDNN scales first
        calibration = gradient_scales(state, dout_amax, v_amax, q8.shape[-1])
        calibration[1:] = 1.0
        _backward_kernel(o8, stats, q8, k8, v8, do8, descales, descale_do, calibration, state, dout_amax)
    scales = gradient_scales(state, dout_amax, v_amax, q8.shape[-1])
    dq8, dk8, dv8 = _backward_kernel(o8, stats, q8, k8, v8, do8, descales, descale_do, scales, state, dout_amax)
    return dq8, dk8, dv8, 1.0 / scales[1:]


def _backward_kernel(o8, stats, q8, k8, v8, do8, descales, descale_do, scales: torch.Tensor, state: torch.Tensor,
                     dout_amax: torch.Tensor) -> list[torch.Tensor]:
    """One run of cuDNN's FP8 backward with gradient `scales` [4] (dP, dQ, dK, dV); returns
    the e4m3 dq, dk, dv and stores amax(X) / amax(dO) of each in `state`."""
    device = q8.device
    if device.type != "cuda":
        grads, amaxes = emulated_backward_kernel(o8, stats, q8, k8, v8, do8, descales, descale_do, scales)
        torch.div(amaxes, dout_amax.clamp(min=MIN_AMAX), out=state)
        return grads
    shape, stride = _bhsd(q8)
    graphs = _graphs(shape, stride, device.index)
    grads = [torch.empty_like(q8) for _ in range(3)]
    amaxes = torch.empty(4, 1, 1, 1, device=device, dtype=torch.float32)
    descale_v = _scalar(descales, 2)
    _execute(graphs.backward, graphs.backward_tensors, {
        "q": q8, "k": k8, "v": v8, "o": o8, "dO": do8, "stats": stats,
        "descale_q": _scalar(descales, 0), "descale_k": _scalar(descales, 1), "descale_v": descale_v,
        "descale_o": descale_v, "descale_dO": descale_do, "descale_s": _constant(1.0 / E4M3_MAX, device),
        "descale_dP": 1.0 / _scalar(scales, 0), "scale_s": _constant(E4M3_MAX, device),
        "scale_dQ": _scalar(scales, 1), "scale_dK": _scalar(scales, 2), "scale_dV": _scalar(scales, 3),
        "scale_dP": _scalar(scales, 0), "dq": grads[0], "dk": grads[1], "dv": grads[2],
        "amax_dp": amaxes[0:1], "amax_dq": amaxes[1:2], "amax_dk": amaxes[2:3], "amax_dv": amaxes[3:4],
    }, graphs.workspace_bytes, device)
    torch.div(amaxes.flatten(), dout_amax.clamp(min=MIN_AMAX), out=state)
    return grads


# --------------------------------------------------------------------------- float32 emulation


def _dequantized(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    return x8.float() * descale.reshape(())


def _probabilities(q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor | None = None):
    """Softmax probabilities [B, H, S, S] of [B, S, H, D] q, k and their log-sum-exp [B, H, S, 1]."""
    logits = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1])
    stats = logits.logsumexp(-1, keepdim=True) if stats is None else stats
    return (logits - stats).exp(), stats


def emulated_forward_kernel(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of `_forward_kernel` in float32 on any device, from the same e4m3
    operands and scales (the probabilities quantized with the kernel's fixed scale): for
    checking the scaling logic without a Hopper GPU."""
    q, k, v = (_dequantized(x, descales[i]) for i, x in enumerate((q8, k8, v8)))
    p, stats = _probabilities(q, k)
    p = (p * E4M3_MAX).to(E4M3).float() / E4M3_MAX
    out = torch.einsum("bhst,bthd->bshd", p, v)
    return (out / descales[2]).to(E4M3).contiguous(), stats


def emulated_backward_kernel(o8, stats, q8, k8, v8, do8, descales, descale_do, scales: torch.Tensor
                             ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The contract of cuDNN's FP8 backward in float32: e4m3 dq, dk, dv scaled by
    `scales` [1:] and the amaxes [4] of dP (quantized with `scales` [0]), dQ, dK, dV."""
    q, k, v = (_dequantized(x, descales[i]) for i, x in enumerate((q8, k8, v8)))
    out, dout = _dequantized(o8, descales[2]), _dequantized(do8, descale_do)
    p, _ = _probabilities(q, k, stats)
    p8 = (p * E4M3_MAX).to(E4M3).float() / E4M3_MAX
    dv = torch.einsum("bhst,bshd->bthd", p8, dout)
    delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, S, 1]
    dp = p * (torch.einsum("bshd,bthd->bhst", dout, v) - delta) / math.sqrt(q.shape[-1])
    dp8 = (dp * scales[0]).to(E4M3).float() / scales[0]
    dq = torch.einsum("bhst,bthd->bshd", dp8, k)
    dk = torch.einsum("bhst,bshd->bthd", dp8, q)
    amaxes = torch.stack([t.abs().amax() for t in (dp, dq, dk, dv)])
    grads = [(g * scales[i + 1]).to(E4M3).contiguous() for i, g in enumerate((dq, dk, dv))]
    return grads, amaxes


# --------------------------------------------------------------------------- custom ops


def _define_ops() -> tuple:
    @torch.library.custom_op("wan_s2v::fp8_attention", mutates_args=())
    def fp8_attention_kernel(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """cuDNN's FP8 forward (its float32 emulation off CUDA): (o8 e4m3 [B, S, H, D], scaled
        by 1 / descales[2]; stats [B, H, S, 1] float32)."""
        q8, k8, v8 = (t.contiguous() for t in (q8, k8, v8))
        kernel = _forward_kernel if q8.device.type == "cuda" else emulated_forward_kernel
        return kernel(q8, k8, v8, descales)

    @fp8_attention_kernel.register_fake
    def _(q8, k8, v8, descales):
        batch, seq, heads, _ = q8.shape
        return (torch.empty(q8.shape, dtype=E4M3, device=q8.device),
                q8.new_empty(batch, heads, seq, 1, dtype=torch.float32))

    # `state` is written in place (the delayed gradient scales) but declared unmutated: nothing
    # in a graph reads it except this op, and a declared mutation would make the compiler copy it.
    @torch.library.custom_op("wan_s2v::fp8_attention_backward", mutates_args=())
    def fp8_attention_backward_kernel(do8: torch.Tensor, descale_do: torch.Tensor, dout_amax: torch.Tensor,
                                      o8: torch.Tensor, stats: torch.Tensor, q8: torch.Tensor, k8: torch.Tensor,
                                      v8: torch.Tensor, descales: torch.Tensor, state: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`backward_kernels`."""
        do8, o8, q8, k8, v8 = (t.contiguous() for t in (do8, o8, q8, k8, v8))
        return backward_kernels(do8, descale_do, dout_amax, o8, stats, q8, k8, v8, descales, state)

    @fp8_attention_backward_kernel.register_fake
    def _(do8, descale_do, dout_amax, o8, stats, q8, k8, v8, descales, state):
        grads = tuple(torch.empty(q8.shape, dtype=E4M3, device=q8.device) for _ in range(3))
        return (*grads, descales.new_empty(3))

    return fp8_attention_kernel, fp8_attention_backward_kernel


fp8_attention_kernel, fp8_attention_backward_kernel = define_once(
    ("fp8_attention", "fp8_attention_backward"), _define_ops)

#: The forward kernel's op overload, as selective checkpointing policies see it: its outputs
#: are what an "attention" checkpoint keeps.
FORWARD_OP = torch.ops.wan_s2v.fp8_attention.default


class _FP8Attention(torch.autograd.Function):
    """Quantization and dequantization around the kernel ops in plain torch ops, so that a
    compiled region fuses them into the RoPE, norm and projection kernels beside them
    instead of running them as separate passes."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        (q8, descale_q), (k8, descale_k), (v8, descale_v) = (quantize_per_tensor(x) for x in (q, k, v))
        descales = torch.cat([descale_q, descale_k, descale_v]).flatten()
        o8, stats = fp8_attention_kernel(q8, k8, v8, descales)
        ctx.save_for_backward(o8, stats, q8, k8, v8, descales, state)
        return o8.to(q.dtype) * descales[2]  # a 0-dim scale keeps the product in bf16

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        o8, stats, q8, k8, v8, descales, state = ctx.saved_tensors
        dout_amax = grad_out.detach().abs().amax().float()
        do8, descale_do = quantize_per_tensor(grad_out, dout_amax)
        *grads8, grad_descales = fp8_attention_backward_kernel(do8, descale_do, dout_amax, o8, stats, q8, k8, v8,
                                                               descales, state)
        return (*(g.to(grad_out.dtype) * grad_descales[i] for i, g in enumerate(grads8)), None)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """FP8 attention of [B, S, H, D] bf16 queries, keys and values; returns bf16 [B, S, H, D].
    `state` (`new_state`) is the layer's: its delayed gradient scales travel to the backward."""
    return _FP8Attention.apply(q, k, v, state)


# --------------------------------------------------------------------------- the model


def self_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention layers of the transformer blocks (the ones FP8 attention serves)."""
    return [block.attn1 for block in getattr(model, "blocks", [])]


def enable_fp8_attention(model: torch.nn.Module, device: torch.device | str) -> int:
    """Run the self-attention of every block of `model` in FP8 on `device` (refused with the
    reason where it cannot run); returns the number of layers."""
    check_device(device)
    layers = self_attention_layers(model)
    for layer in layers:
        layer.fp8_attention_state = new_state(device)
    return len(layers)


def disable_fp8_attention(model: torch.nn.Module) -> None:
    """Back to bf16 self-attention."""
    for layer in self_attention_layers(model):
        layer.fp8_attention_state = None


@contextlib.contextmanager
def fp8_attention_during(model: torch.nn.Module, device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """FP8 self-attention on `device` inside the `with` block (for sampling a model that
    others hold too); each layer's previous setting comes back afterwards."""
    if not enabled:
        yield
        return
    check_device(device)
    layers = self_attention_layers(model)
    before = [layer.fp8_attention_state for layer in layers]
    for layer, state in zip(layers, before):
        layer.fp8_attention_state = new_state(device) if state is None else state
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.fp8_attention_state = state
