"""Kernel-level breakdown of one compiled 14B S2V forward, or of one LoRA training step
(where the time goes).

    python bench/profile_forward.py [--eager] [--train [--policy full|attention] [--regions]
                                    [--merged] [--linear-blocks N] [--host]] [--fp8-compute]

`--host` offloads the checkpointed tensors to page-locked host memory as the loop does
(needed with `--linear-blocks 5`, which alone exceeds 80 GiB). `--fp8-compute` runs the base
Linears of the blocks and audio injectors on FP8 tensor cores (`MemoryConfig.fp8_compute`);
their scaled products get a class of their own (the quantization is fused into the triton
kernels beside them).

It prints the kernel time by class next to an unprofiled warm run's wall time (their
difference is time the compute stream sat idle), where that stream waited, the matmuls by
shape, which ops launch the device copies, fills and beta-add matmuls, and the dearest
kernels (`--top`).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_forward import s2v_inputs
from common import add_bench_lora, build_on_device, lora_train_step
from torch.profiler import ProfilerActivity, profile

#: Classes of `classify` that are no work of the compute stream: a compiled graph's event spans
#: its kernels, and the host copies of saved tensors run on a side stream beside them.
NOT_COMPUTE_STREAM = ("compiled graph (spans its kernels)", "host copies (side stream)")


def classify(name: str) -> str:
    if name.startswith("## Call CompiledFxGraph"):
        return NOT_COMPUTE_STREAM[0]
    if name.startswith(("Memcpy HtoD", "Memcpy DtoH")):
        return NOT_COMPUTE_STREAM[1]
    if name.startswith("Memcpy DtoD"):
        return "device copies"
    lowered = name.lower()
    # cuBLASLt names its FP8 products "e4m3" (xmma) or "qq" operands (nvjet, e.g. nvjet_sm90_qqtst_...)
    if "e4m3" in lowered or "fp8" in lowered or lowered.startswith("nvjet") and "_qq" in lowered:
        return "fp8 matmul"
    if "attention" in lowered or "fmha" in lowered or "flash" in lowered or "cudnn" in lowered and "conv" not in lowered:
        return "attention"
    if "gemm" in lowered or "sm90_xmma" in lowered or "cutlass" in lowered or "nvjet" in lowered:
        return "matmul"
    if "triton" in lowered:
        return "fused elementwise (triton)"
    return "other"


def matmul_flops(op: str, shapes: list[list[int]]) -> float:
    """FLOPs of one aten matmul call from its recorded input shapes (0 when unknown)."""
    # addmm's first input is the bias (1-D or 2-D); the two matrices come next
    mats = shapes[1:] if op in ("aten::addmm", "aten::_addmm_activation") else shapes
    if len(mats) < 2:
        return 0.0
    a, b = mats[0], mats[1]
    batch = a[0] if op == "aten::bmm" else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def print_matmul_shapes(prof) -> None:
    """GPU time and rate of the matmul ops by input shapes: LoRA-sized ones (a dimension
    <= 64) apart from the base linears. Under compiled graphs the op-level device times can
    take in neighbouring kernels (~0.4 s a 14B step); the kernel list is exact."""
    per_shape: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    lora = base = 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key not in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation", "aten::_scaled_mm"):
            continue
        secs = evt.device_time_total / 1e6
        shapes = [s for s in evt.input_shapes if s]
        if evt.key == "aten::_scaled_mm":  # then the scales [M, 1] / [1, N]: not LoRA-sized
            shapes = shapes[:2]
        small = any(0 < d <= 64 for shape in shapes for d in shape)
        lora, base = lora + secs * small, base + secs * (not small)
        entry = per_shape[f"{evt.key} {shapes} x{evt.count}"]
        entry[0] += secs
        entry[1] += matmul_flops(evt.key, shapes) * evt.count
    print(f"matmul ops: base {base:.3f} s, LoRA-sized {lora:.3f} s")
    for name, (secs, flops) in sorted(per_shape.items(), key=lambda kv: -kv[1][0])[:32]:
        rate = flops / secs / 1e12 if secs else 0.0
        print(f"  {secs:7.3f} s  {rate:6.0f} TFLOP/s  {name[:220]}")


def print_kernel_sources(prof, pattern: str, limit: int = 20) -> None:
    """Which CPU ops (with their input shapes and enclosing ops) launched the kernels whose
    name contains `pattern`, by GPU time: finds the source of copies and other small kernels."""
    per_source: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        kernels = [k for k in getattr(evt, "kernels", []) if pattern in k.name]
        if not kernels:
            continue
        chain, parent = [], evt.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name)
            parent = parent.cpu_parent
        key = f"{evt.name} {[s for s in evt.input_shapes if s]} <- {' <- '.join(chain)}"
        per_source[key][0] += sum(k.duration for k in kernels) / 1e6
        per_source[key][1] += 1
    print(f"sources of '{pattern}' kernels:")
    for key, (secs, count) in sorted(per_source.items(), key=lambda kv: -kv[1][0])[:limit]:
        print(f"  {secs:7.3f} s  x{count:<4d} {key[:260]}")


def print_idle_gaps(prof, limit: int = 15, min_us: float = 20.0) -> None:
    """Where the compute stream waits: each gap of over `min_us` between its kernels, charged
    to the op that launched the kernel after it. "launched late" means the host issued that
    kernel only after the stream ran dry (the host is the bottleneck); "queued" means it was
    issued in time and waited on something else (another stream's event, a host sync)."""
    device, host = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    origin = prof.profiler.kineto_results.trace_start_ns()
    # a kernel and its runtime call (cudaLaunchKernel, ...) share one id; ops have ids of their own
    launched_at, ops = {}, {}
    for evt in prof.events():
        if evt.device_type == host:
            (launched_at if evt.name.startswith("cu") else ops)[evt.id] = evt
    kernels = [evt for evt in prof.profiler.kineto_results.events()
               if evt.device_type() == device and classify(evt.name()) not in NOT_COMPUTE_STREAM]
    busy: dict[int, int] = defaultdict(int)
    for evt in kernels:
        busy[evt.device_resource_id()] += evt.duration_ns()
    stream = max(busy, key=busy.get)
    kernels = sorted((k for k in kernels if k.device_resource_id() == stream), key=lambda k: k.start_ns())
    per_cause: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    totals: dict[str, float] = defaultdict(float)
    last_end = (kernels[0].end_ns() - origin) / 1e3  # us, the clock of `prof.events()`
    for evt in kernels[1:]:
        start = (evt.start_ns() - origin) / 1e3
        gap = start - last_end
        if gap > min_us:
            launch = launched_at.get(evt.correlation_id())
            kind = "launched late" if launch is not None and launch.time_range.start > last_end else "queued"
            op, chain = ops.get(evt.linked_correlation_id()), []
            parent = op.cpu_parent if op is not None else None
            while parent is not None and len(chain) < 3:
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = f"{kind}: {op.name if op else '?'} <- {' <- '.join(chain)} | next kernel {evt.name()[:60]}"
            per_cause[key][0] += gap / 1e6
            per_cause[key][1] += 1
            totals[kind] += gap / 1e6
        last_end = max(last_end, (evt.end_ns() - origin) / 1e3)
    span = last_end / 1e6 - (kernels[0].start_ns() - origin) / 1e9
    print(f"compute stream {stream}: first to last kernel {span:.3f} s, gaps over {min_us:.0f} us: "
          + ", ".join(f"{kind} {secs:.3f} s" for kind, secs in totals.items()))
    for key, (secs, count) in sorted(per_cause.items(), key=lambda kv: -kv[1][0])[:limit]:
        print(f"  {secs:7.3f} s  x{count:<4d} {key[:260]}")


def _train_step(model, inputs, policy: str, regions: bool, merged: bool, linear_blocks: int, host: bool):
    from trainer.lora.merged_linear import use_merged_lora
    from trainer.memory import MemoryConfig
    from trainer.memory.apply import configure_checkpointing

    params = add_bench_lora(model)
    memory = MemoryConfig(gradient_checkpointing=policy, offload_activations=host, linear_blocks=linear_blocks)
    configure_checkpointing(model, memory, compile_regions=regions)
    use_merged_lora(model, merged)
    model.train()
    return lora_train_step(model, params, inputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--train", action="store_true", help="profile a LoRA r16 training step")
    parser.add_argument("--policy", default="attention")
    parser.add_argument("--regions", action="store_true", help="compiled checkpoint regions (with --train)")
    parser.add_argument("--merged", action="store_true", help="merged-weight LoRA layers (with --train)")
    parser.add_argument("--linear-blocks", type=int, default=0, help="blocks keeping their linear outputs")
    parser.add_argument("--host", action="store_true", help="checkpointed tensors to host memory (with --train)")
    parser.add_argument("--fp8-compute", action="store_true", help="base Linears on FP8 tensor cores")
    parser.add_argument("--top", type=int, default=60, help="how many of the dearest kernels to list")
    args = parser.parse_args()
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel

    model = build_on_device(lambda: WanS2VTransformer3DModel(), "cuda", torch.bfloat16)
    if args.fp8_compute:
        from trainer.memory.fp8_compute import enable_fp8_compute

        print(f"fp8 compute: {enable_fp8_compute(model, 'cuda')} base Linears")
        torch.cuda.empty_cache()
    inputs = s2v_inputs(81, 480, 832, False, "cuda")
    if args.train:
        run = _train_step(model, inputs, args.policy, args.regions, args.merged, args.linear_blocks, args.host)
    else:
        def run():
            with torch.no_grad():
                model(**inputs)
    if not args.eager:
        model.compile_blocks()
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start  # the second, warm run, without the profiler
    print(f"warm run: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        run()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    per_class: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.device_time / 1e6
            calls[evt.name] += 1
            per_class[classify(evt.name)] += evt.device_time / 1e6
    busy = sum(secs for name, secs in per_class.items() if name not in NOT_COMPUTE_STREAM)
    print(f"kernels on the compute stream {busy:.3f} s; unprofiled warm run {wall:.3f} s "
          f"(the compute stream idle: {wall - busy:.3f} s)")
    for name, secs in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"  {name:32s} {secs:7.3f} s")
    print_idle_gaps(prof)
    print_matmul_shapes(prof)
    for pattern in ("Memcpy DtoD", "Memset", "badd"):
        print_kernel_sources(prof, pattern)
    print("top kernels:")
    for name, secs in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {secs:7.3f} s  x{calls[name]:<4d} {name[:220]}")


if __name__ == "__main__":
    main()
