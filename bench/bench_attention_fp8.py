"""FP8 attention (cuDNN's `sdpa_fp8` / `sdpa_fp8_backward`, through the cudnn-frontend Python
API) against bf16 cuDNN SDPA at the 14B S2V shape (B=1, H=40, S=34,320, D=128, [B, S, H, D]).

Times the forward and the backward of each, and states each FP8 variant's relative L2 error
(o, dq, dk, dv) against the bf16 result. Q, K, V and dO are quantized to e4m3 with one scale
per tensor (amax / 448); P uses a fixed scale, dP the amax cuDNN reported on a first pass.
Variants differ in which outputs stay bf16 (cuDNN 9.19 with frontend 1.14.1 refuses all but
FP8 outputs; the table says so). The last rows are the pack's op
(`trainer.model.fp8_attention`) as the transformer calls it, with its own delayed scales,
eager and compiled.

    python bench/bench_attention_fp8.py              # needs nvidia-cudnn-frontend
    python bench/bench_attention_fp8.py --pack-only  # bf16 and the pack's op
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from common import environment, print_table, save_json, time_cuda
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.model.fp8_attention import E4M3_MAX
from trainer.model.fp8_attention import quantize_per_tensor as quantize

HEADS, SEQ, DIM = 40, 34_320, 128


def bhsd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def scalar(value: float) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), value, device="cuda", dtype=torch.float32)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Fp8Graphs:
    """Forward and backward cuDNN graphs for one shape and one choice of output types."""

    def __init__(self, cudnn, handle, q8: torch.Tensor, out_bf16: bool, grads_bf16: bool, o_in_bf16: bool):
        self.cudnn, self.handle = cudnn, handle
        dt = cudnn.data_type
        fp8 = dt.FP8_E4M3
        b, h, s, d = bhsd(q8).shape
        stride = bhsd(q8).stride()
        self.shape, self.stride = (b, h, s, d), stride
        self.out_bf16, self.grads_bf16, self.o_in_bf16 = out_bf16, grads_bf16, o_in_bf16

        def tensor(g, data_type=fp8):
            return g.tensor(dim=self.shape, stride=stride, data_type=data_type)

        def scalar_t(g):
            return g.tensor(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT)

        attn_scale = 1.0 / math.sqrt(d)
        f = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT, handle=handle)
        self.f_in = {n: tensor(f) for n in ("q", "k", "v")}
        self.f_sc = {n: scalar_t(f) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        try:
            outs = f.sdpa_fp8(q=self.f_in["q"], k=self.f_in["k"], v=self.f_in["v"], **self.f_sc, is_inference=False,
                              attn_scale=attn_scale, use_causal_mask=False)
        except TypeError:
            outs = f.sdpa_fp8(q=self.f_in["q"], k=self.f_in["k"], v=self.f_in["v"], **self.f_sc, generate_stats=True,
                              attn_scale=attn_scale, use_causal_mask=False)
        o, stats, amax_s, amax_o = outs
        o.set_output(True).set_dim(self.shape).set_stride(stride).set_data_type(dt.BFLOAT16 if out_bf16 else fp8)
        stats.set_output(True).set_dim((b, h, s, 1)).set_stride((h * s, s, 1, 1)).set_data_type(dt.FLOAT)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
        self.f_out = {"o": o, "stats": stats, "amax_s": amax_s, "amax_o": amax_o}
        self._build(f)
        self.forward_graph = f

        g = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT, handle=handle)
        self.b_in = {n: tensor(g) for n in ("q", "k", "v", "dO")}
        self.b_in["o"] = tensor(g, dt.BFLOAT16 if o_in_bf16 else fp8)
        self.b_in["stats"] = g.tensor(dim=(b, h, s, 1), stride=(h * s, s, 1, 1), data_type=dt.FLOAT)
        names = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
                 "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")
        self.b_sc = {n: scalar_t(g) for n in names}
        dq, dk, dv, *amaxes = g.sdpa_fp8_backward(q=self.b_in["q"], k=self.b_in["k"], v=self.b_in["v"], o=self.b_in["o"],
                                                  dO=self.b_in["dO"], stats=self.b_in["stats"], **self.b_sc,
                                                  attn_scale=attn_scale, use_causal_mask=False)
        for t in (dq, dk, dv):
            t.set_output(True).set_dim(self.shape).set_stride(stride).set_data_type(dt.BFLOAT16 if grads_bf16 else fp8)
        for t in amaxes:
            t.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
        self.b_out = {"dq": dq, "dk": dk, "dv": dv, **dict(zip(("amax_dq", "amax_dk", "amax_dv", "amax_dp"), amaxes))}
        self._build(g)
        self.backward_graph = g
        size = max(f.get_workspace_size(), g.get_workspace_size())
        self.workspace = torch.empty(size, device="cuda", dtype=torch.uint8)

    def _build(self, graph) -> None:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([self.cudnn.heur_mode.A, self.cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()

    def forward(self, q8, k8, v8, descales, scale_o):
        out_dtype = torch.bfloat16 if self.out_bf16 else torch.float8_e4m3fn
        b, s, h, d = q8.shape
        o = torch.empty(b, s, h, d, device="cuda", dtype=out_dtype)
        stats = torch.empty(b, h, s, 1, device="cuda", dtype=torch.float32)
        amax_s, amax_o = scalar(0.0), scalar(0.0)
        scales = {"descale_q": descales[0], "descale_k": descales[1], "descale_v": descales[2],
                  "descale_s": scalar(1.0 / E4M3_MAX), "scale_s": scalar(E4M3_MAX), "scale_o": scale_o}
        pack = {self.f_in["q"]: q8, self.f_in["k"]: k8, self.f_in["v"]: v8,
                **{self.f_sc[n]: scales[n] for n in self.f_sc},
                self.f_out["o"]: o, self.f_out["stats"]: stats, self.f_out["amax_s"]: amax_s,
                self.f_out["amax_o"]: amax_o}
        self.forward_graph.execute(pack, self.workspace, handle=self.handle)
        return o, stats, amax_o

    def backward(self, q8, k8, v8, o, do8, stats, descales, descale_o, descale_do, scale_dp, grad_scales,
                 scale_s: float = E4M3_MAX):
        out_dtype = torch.bfloat16 if self.grads_bf16 else torch.float8_e4m3fn
        grads = [torch.empty(q8.shape, device="cuda", dtype=out_dtype) for _ in range(3)]
        amaxes = [scalar(0.0) for _ in range(4)]
        scales = {"descale_q": descales[0], "descale_k": descales[1], "descale_v": descales[2],
                  "descale_o": descale_o, "descale_dO": descale_do, "descale_s": scalar(1.0 / scale_s),
                  "descale_dP": 1.0 / scale_dp, "scale_s": scalar(scale_s), "scale_dQ": grad_scales[0],
                  "scale_dK": grad_scales[1], "scale_dV": grad_scales[2], "scale_dP": scale_dp}
        tensors = {"q": q8, "k": k8, "v": v8, "o": o, "dO": do8, "stats": stats}
        pack = {**{self.b_in[n]: bhsd(t) if t.dim() == 4 and n != "stats" else t for n, t in tensors.items()},
                **{self.b_sc[n]: scales[n] for n in self.b_sc},
                **{self.b_out[n]: t for n, t in zip(("dq", "dk", "dv"), grads)},
                **{self.b_out[n]: t for n, t in zip(("amax_dq", "amax_dk", "amax_dv", "amax_dp"), amaxes)}}
        self.backward_graph.execute(pack, self.workspace, handle=self.handle)
        return grads, amaxes


def scan_scales(graphs: Fp8Graphs, reference: list[torch.Tensor], inputs: tuple, scale_dp: torch.Tensor) -> None:
    """Gradient errors for other backward scales of P (scale_s) and dP (scale_dP): in the
    backward P is normalised (~1/S for flat attention), so the forward's scale may underflow."""
    for m_s in (1.0, 16.0, 256.0, 4096.0):
        for m_dp in (1.0, 16.0, 256.0):
            grads, amaxes = graphs.backward(*inputs, scale_dp * m_dp, [scalar(1.0)] * 3, scale_s=E4M3_MAX * m_s)
            errors = " ".join(f"{rel_l2(a, b):.3f}" for a, b in zip(grads, reference[1:]))
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            print(f"  scale_s x{m_s:g} scale_dP x{m_dp:g}: rel_l2 dq dk dv {errors} finite {finite} "
                  f"amax_dp {amaxes[3].item():.3e}", flush=True)


def measure(graphs: Fp8Graphs, name: str, reference: list[torch.Tensor], fp8_qkv: tuple, descales: tuple,
            fp8_grad_out: tuple, flops: float, scan: bool) -> dict:
    """Errors and times of one FP8 variant (the dP scale from a first backward pass's amax)."""
    q8, k8, v8 = fp8_qkv
    do8, ddo = fp8_grad_out
    out_bf16, grads_bf16, o_in_bf16 = graphs.out_bf16, graphs.grads_bf16, graphs.o_in_bf16
    scale_o = scalar(1.0) if out_bf16 else 1.0 / (reference[0].abs().amax().float().reshape(1, 1, 1, 1) / E4M3_MAX)
    o, stats, _ = graphs.forward(q8, k8, v8, descales, scale_o)
    o_deq = o.float() if out_bf16 else o.float() / scale_o.reshape(())
    if o_in_bf16:
        o_back, descale_o = (o if out_bf16 else o_deq.bfloat16()), scalar(1.0)
    else:
        o_back, descale_o = (o, 1.0 / scale_o) if not out_bf16 else quantize(o)
    ones = [scalar(1.0)] * 3
    grad_scales = ones if grads_bf16 else [E4M3_MAX / r.abs().amax().float().reshape(1, 1, 1, 1) for r in reference[1:]]
    _, amaxes = graphs.backward(q8, k8, v8, o_back, do8, stats, descales, descale_o, ddo, scalar(1.0), grad_scales)
    scale_dp = E4M3_MAX / amaxes[3].clamp(min=1e-12)
    grads, _ = graphs.backward(q8, k8, v8, o_back, do8, stats, descales, descale_o, ddo, scale_dp, grad_scales)
    grads_deq = [gr.float() / s.reshape(()) for gr, s in zip(grads, grad_scales)]
    errors = [rel_l2(o_deq, reference[0])] + [rel_l2(a, b) for a, b in zip(grads_deq, reference[1:])]
    f_s, _ = time_cuda(lambda: graphs.forward(q8, k8, v8, descales, scale_o), 3, 10)
    b_s, _ = time_cuda(lambda: graphs.backward(q8, k8, v8, o_back, do8, stats, descales, descale_o, ddo, scale_dp,
                                               grad_scales), 2, 8)
    row = {"kernel": name, "forward_ms": f"{f_s * 1e3:.1f}", "forward_tflops": f"{flops / f_s / 1e12:.0f}",
           "backward_ms": f"{b_s * 1e3:.1f}", "backward_tflops": f"{2.5 * flops / b_s / 1e12:.0f}",
           "rel_l2 (o, dq, dk, dv)": " ".join(f"{e:.3f}" for e in errors)}
    print(row, flush=True)
    print(f"  amax dP first pass {amaxes[3].item():.3e}", flush=True)
    if scan:
        scan_scales(graphs, reference, (q8, k8, v8, o_back, do8, stats, descales, descale_o, ddo), scale_dp)
    return row


def pack_op_row(q, k, v, grad_out, reference: list[torch.Tensor], flops: float, compiled: bool) -> dict:
    """The pack's op (`trainer.model.fp8_attention`, as the transformer calls it): errors
    over three backwards (the first uses the bound for dP's scale, later ones the delayed
    scale) and times including the on-the-fly quantization, eager or `compiled` (as in the
    compiled regions, where the quantization is compiled into fused kernels)."""
    from trainer.model.fp8_attention import fp8_attention, new_state

    name = f"pack op, {'compiled' if compiled else 'eager'} (quantize + cuDNN fp8 + dequantize)"
    op = torch.compile(fp8_attention) if compiled else fp8_attention
    try:
        state = new_state("cuda")
        errors = []
        for _ in range(3):
            out = op(q, k, v, state)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            errors.append(" ".join(f"{rel_l2(a, b):.3f}" for a, b in zip([out.detach(), *grads], reference)))
        print(f"  {name}: errors per backward {errors}, state {state.tolist()}", flush=True)
        with torch.no_grad():
            op(q, k, v, state)  # the no-grad graph compiles outside the timing
            f_s, _ = time_cuda(lambda: op(q, k, v, state), 3, 10)
        both, _ = time_cuda(lambda: torch.autograd.grad(op(q, k, v, state), (q, k, v), grad_out), 2, 6)
        return {"kernel": name, "forward_ms": f"{f_s * 1e3:.1f}", "forward_tflops": f"{flops / f_s / 1e12:.0f}",
                "backward_ms": f"{(both - f_s) * 1e3:.1f}",
                "backward_tflops": f"{2.5 * flops / (both - f_s) / 1e12:.0f}", "rel_l2 (o, dq, dk, dv)": errors[-1]}
    except Exception as error:  # noqa: BLE001 - reported as a row
        return {"kernel": name, "rel_l2 (o, dq, dk, dv)": f"failed: {type(error).__name__}: {str(error)[:200]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--pack-only", action="store_true", help="only bf16 and the pack's op")
    parser.add_argument("--logit-std", type=float, default=1.0,
                        help="standard deviation of the attention logits (larger: more peaked attention)")
    args = parser.parse_args()
    import cudnn

    seq = args.seq
    flops = 4 * HEADS * seq * seq * DIM
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    q = (q * args.logit_std).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    grad_out = torch.randn(1, seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen) * 1e-2

    def attend(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return bhsd(F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v)))

    out = attend(q, k, v)
    reference = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]
    with torch.no_grad():
        forward, _ = time_cuda(lambda: attend(q, k, v), 3, 10)
    both, _ = time_cuda(lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out), 2, 6)
    rows = [{"kernel": "cuDNN bf16 (SDPA)", "forward_ms": f"{forward * 1e3:.1f}",
             "forward_tflops": f"{flops / forward / 1e12:.0f}", "backward_ms": f"{(both - forward) * 1e3:.1f}",
             "backward_tflops": f"{2.5 * flops / (both - forward) / 1e12:.0f}", "rel_l2 (o, dq, dk, dv)": "reference"}]

    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    (q8, dq_), (k8, dk_), (v8, dv_) = (quantize(t.detach()) for t in (q, k, v))
    do8, ddo = quantize(grad_out)
    quant_s, _ = time_cuda(lambda: [quantize(t.detach()) for t in (q, k, v)], 2, 10)
    print(f"quantize q, k, v (eager): {quant_s * 1e3:.2f} ms", flush=True)
    scanned = False
    variants = () if args.pack_only else ((True, True, True), (False, True, False), (False, False, False),
                                          (True, True, False))
    for out_bf16, grads_bf16, o_in_bf16 in variants:
        name = (f"cuDNN fp8, o {'bf16' if out_bf16 else 'fp8'}, grads {'bf16' if grads_bf16 else 'fp8'}, "
                f"o into backward {'bf16' if o_in_bf16 else 'fp8'}")
        try:
            graphs = Fp8Graphs(cudnn, handle, q8, out_bf16, grads_bf16, o_in_bf16)
            rows.append(measure(graphs, name, reference, (q8, k8, v8), (dq_, dk_, dv_), (do8, ddo), flops,
                                scan=grads_bf16 and not scanned))
        except Exception as error:  # noqa: BLE001 - a refused combination is a table row
            rows.append({"kernel": name, "rel_l2 (o, dq, dk, dv)": f"refused: {str(error).splitlines()[0][:160]}"})
            print(rows[-1], flush=True)
            continue
        scanned = scanned or grads_bf16
    rows += [pack_op_row(q, k, v, grad_out, reference, flops, compiled) for compiled in (False, True)]
    env = environment()
    print_table(f"Attention fp8 vs bf16, B=1 H={HEADS} S={seq} D={DIM} - {env['device']}, torch {env['torch']}, "
                f"cuDNN {torch.backends.cudnn.version()}, frontend {cudnn.__version__}", rows, list(rows[0]))
    save_json("bench_attention_fp8", {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
