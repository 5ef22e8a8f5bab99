"""FP8 compute for the frozen base Linears vs bf16, on the real 14B shapes (random weights).

Parts (each optional, one process, results in one table per part):

- ``--micro``: one base Linear at 34,320 tokens (5120->5120, 5120->13824, 13824->5120),
  forward + input-gradient backward (frozen weight): bf16 ``F.linear``, this pack's
  `Fp8Matmul` (eager and compiled), and torchao's float8 training Linear (row-wise recipe,
  compiled) when torchao imports; relative L2 error of the output vs float32.
- ``--accuracy``: the 14B model (or ``--blocks``) with bf16 vs FP8-compute base Linears from
  the same weights and the same LoRA init: a forward's relative L2 error and the cosine of
  the LoRA gradients at step 1.
- ``--steps``: LoRA r16 step time and peak memory, bf16 then FP8 compute, at ``--variant``
  (parts as in bench_tread_crepa.py: regions, host, merged, linearsN, tread), side by side.
- ``--loss-steps N``: N training steps bf16 vs FP8 compute from the same seed on the
  synthetic talking clips (``--loss-blocks`` blocks of the 14B width, ``--loss-size``).

    python bench/bench_fp8_compute.py --micro --accuracy --steps --compile
    python bench/bench_fp8_compute.py --loss-steps 200 --loss-blocks 8
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
import torch.nn.functional as F
from common import (
    TREAD_ROUTES,
    add_bench_lora,
    build_on_device,
    environment,
    objective_step,
    print_table,
    save_json,
    time_cuda,
    time_step,
)

TOKENS = 34_320


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def cuda_ms(fn, repeats: int = 10) -> float:
    """Median milliseconds of `fn` after 3 warm-up calls."""
    return 1e3 * time_cuda(fn, warmup=3, repeats=repeats)[0]


def micro(rows_out: list[dict]) -> None:
    """One frozen Linear, forward + input-gradient backward."""
    from trainer.memory.fp8_compute import Fp8ComputeLinear, scaled_mm_kind

    kind = scaled_mm_kind("cuda")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        torchao_ok = True
    except Exception as exc:  # noqa: BLE001 - report why, measure the rest
        torchao_ok, torchao_error = False, f"{type(exc).__name__}: {str(exc)[:80]}"
    for k, n in ((5120, 5120), (5120, 13824), (13824, 5120)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        linear = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        torch.nn.init.normal_(linear.weight, 0, 0.02, generator=gen)
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
        dy = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = x.detach().float() @ linear.weight.float().t() + linear.bias.float()
        fp8 = Fp8ComputeLinear.from_linear(linear, kind=kind)
        layers = {"bf16 F.linear": linear, "fp8 eager": fp8, "fp8 compiled": torch.compile(fp8)}
        if torchao_ok:
            ao = convert_to_float8_training(torch.nn.Sequential(copy.deepcopy(linear)),
                                            config=Float8LinearConfig.from_recipe_name("rowwise"))
            layers["torchao rowwise compiled"] = torch.compile(ao)
        flops = 2 * 2 * TOKENS * k * n  # forward + input gradient
        base_ms = None
        for name, layer in layers.items():
            def step(layer=layer, x=x, dy=dy):
                x.grad = None
                layer(x).backward(dy)
            try:
                ms = cuda_ms(step)
                with torch.no_grad():
                    err = rel_err(layer(x), ref)
                base_ms = base_ms or ms
                row = {"layer": f"{k}->{n}", "impl": name, "fwd+dgrad ms": f"{ms:.2f}",
                       "TFLOP/s": f"{flops / ms / 1e9:.0f}", "vs bf16": f"{base_ms / ms:.2f}x",
                       "rel err": f"{err:.4f}"}
            except Exception as exc:  # noqa: BLE001
                row = {"layer": f"{k}->{n}", "impl": name, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            print(row, flush=True)
            rows_out.append(row)
        if not torchao_ok:
            rows_out.append({"layer": f"{k}->{n}", "impl": "torchao", "error": torchao_error})
        del layers, fp8, x, dy, ref
        gc.collect()
        torch.cuda.empty_cache()


def set_fp8_attention(model, name: str) -> None:
    """FP8 attention on for the "+attn" rows, off for the others (the rows share models)."""
    from trainer.model.fp8_attention import disable_fp8_attention, enable_fp8_attention

    if name.endswith("+attn"):
        enable_fp8_attention(model, "cuda")
    else:
        disable_fp8_attention(model)


def compared(base, fp8, params, fp8_attention: bool) -> tuple[dict, dict]:
    """The rows to compare: bf16, FP8 compute, and with `fp8_attention` FP8 compute plus FP8
    attention (the FP8 model again); (models, LoRA parameters) by row name."""
    models, lora = {"bf16": base, "fp8": fp8}, {"bf16": params[0], "fp8": params[1]}
    if fp8_attention:
        models["fp8+attn"], lora["fp8+attn"] = fp8, params[1]
    return models, lora


def build_pair(blocks: int | None):
    """(bf16 model, FP8-compute model) with the same random weights, each with the same r16
    LoRA (fp32, seeded), on the GPU."""
    from trainer.memory.fp8_compute import enable_fp8_compute
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel

    kwargs = {} if blocks is None else {"num_layers": blocks,
                                         "audio_inject_layers": [i for i in range(0, blocks, 4)]}
    base = build_on_device(lambda: WanS2VTransformer3DModel(**kwargs), "cuda", torch.bfloat16)
    fp8 = copy.deepcopy(base)
    converted = enable_fp8_compute(fp8, "cuda")
    gc.collect()
    torch.cuda.empty_cache()
    params = []
    for model in (base, fp8):
        torch.manual_seed(7)
        params.append(add_bench_lora(model))
        model.train()
    return base, fp8, params, converted


def model_inputs(frames: int, height: int, width: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    from bench_forward import s2v_inputs

    data = s2v_inputs(frames, height, width, False, "cuda")
    inputs = {"latents": data["hidden_states"].float(), "encoder_hidden_states": data["encoder_hidden_states"],
              "audio_embeds": data["audio_embeds"], "reference_latents": data["reference_latents"],
              "motion_latents": None}
    return inputs, torch.full((1,), 0.6, device="cuda"), torch.randn_like(inputs["latents"])


def accuracy(models: dict, params: dict, inputs, sigmas, noise, rows_out: list[dict]) -> None:
    """Forward relative error and step-1 LoRA-gradient cosine of each row vs bf16, eager,
    full checkpointing."""
    from trainer.memory import MemoryConfig
    from trainer.memory.apply import configure_checkpointing
    from trainer.model.conditioning import transformer_inputs
    from trainer.train.config import TrainConfig
    from trainer.train.flow import add_noise, timesteps_from_sigmas
    from trainer.train.objective import compute_losses

    config = TrainConfig.from_dict({"mixed_precision": "bf16"})
    kwargs = transformer_inputs(add_noise(inputs["latents"], noise, sigmas), timesteps_from_sigmas(sigmas),
                                inputs["encoder_hidden_states"], inputs["audio_embeds"], inputs["reference_latents"],
                                numerics=config.numerics)
    outs, grads, losses = [], [], []
    for name, model in models.items():
        lora = params[name]
        model.cuda()
        set_fp8_attention(model, name)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(model(**kwargs).sample.float())
        configure_checkpointing(model, MemoryConfig(gradient_checkpointing="full"))
        loss, _ = compute_losses(model, inputs, sigmas, noise, config, torch.device("cuda"))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in lora]))
        losses.append(loss.item())
        for p in lora:
            p.grad = None
        model.cpu()
        torch.cuda.empty_cache()
    for i, name in enumerate(models):
        if i == 0:
            continue
        cosine = F.cosine_similarity(grads[0], grads[i], dim=0).item()
        row = {"vs bf16": name, "forward rel L2 err": f"{rel_err(outs[i], outs[0]):.4f}",
               "LoRA grad cosine (step 1)": f"{cosine:.5f}", "LoRA grad rel err": f"{rel_err(grads[i], grads[0]):.4f}",
               "loss bf16": f"{losses[0]:.5f}", "loss": f"{losses[i]:.5f}"}
        print(row, flush=True)
        rows_out.append(row)


def steps(models: dict, params: dict, inputs, sigmas, noise, args, rows_out: list[dict]) -> None:
    from trainer.lora.merged_linear import use_merged_lora
    from trainer.memory import MemoryConfig
    from trainer.memory.apply import configure_checkpointing
    from trainer.model.checkpointing import compiled_checkpoint
    from trainer.train.config import TrainConfig

    torch._dynamo.config.recompile_limit = 64
    parts = set(args.variant.split("+"))
    linears = next((int(p[len("linears"):]) for p in parts if p.startswith("linears")), 0)
    config = TrainConfig.from_dict({"mixed_precision": "bf16"})
    for model in models.values():  # one model on the GPU at a time: its peak alone
        model.cpu()
    for name, model in models.items():
        # each model compiles its own regions from scratch (no shared graphs or recompile limit)
        torch._dynamo.reset()
        compiled_checkpoint.cache_clear()
        model.cuda()
        set_fp8_attention(model, name)
        memory = MemoryConfig(gradient_checkpointing=args.policy, offload_activations="host" in parts,
                              linear_blocks=linears)
        configure_checkpointing(model, memory, compile_regions="regions" in parts)
        use_merged_lora(model, "merged" in parts)
        model.set_token_routes(TREAD_ROUTES if "tread" in parts else None)
        optimizer = torch.optim.AdamW(params[name], lr=1e-4)
        step = objective_step(model, optimizer, inputs, sigmas, noise, config)
        resident = torch.cuda.memory_allocated() / 2**30
        try:
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            row = {"base compute": name, "variant": args.variant, **time_step(step, args.warmup, args.repeats),
                   "first_step_s": f"{first:.0f}", "resident_gib": f"{resident:.1f}"}
        except Exception as exc:  # noqa: BLE001 - a failure in one variant should not hide the other
            row = {"base compute": name, "variant": args.variant, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        print(row, flush=True)
        rows_out.append(row)
        del optimizer, step
        model.cpu()
    base = next((float(r["median_s"]) for r in rows_out if r.get("base compute") == "bf16" and "median_s" in r), None)
    for row in rows_out:
        if base and "median_s" in row:
            row["vs bf16"] = f"{float(row['median_s']) / base:.2f}x"


def loss_curves(args, rows_out: list[dict]) -> None:
    """`--loss-steps` steps bf16 vs FP8 compute (and FP8 attention with `--fp8-attention`)
    from one seed and one LoRA init on the synthetic talking clips."""
    from common import talking_dataset

    from trainer.memory import MemoryConfig
    from trainer.memory.apply import configure_checkpointing
    from trainer.train.config import TrainConfig
    from trainer.train.objective import compute_losses, prepare_inputs

    h = w = args.loss_size
    data = talking_dataset(args.loss_frames, h, w)
    base, fp8, params, _ = build_pair(args.loss_blocks)
    config = TrainConfig.from_dict({"mixed_precision": "bf16"})
    curves = {}
    models, loras = compared(base, fp8, params, args.fp8_attention)
    initial = [p.detach().clone() for p in params[1]]
    for name, model in models.items():
        lora = loras[name]
        with torch.no_grad():  # the rows that share the FP8 model start from the same LoRA
            for p, p0 in zip(params[1], initial):
                p.copy_(p0)
        model.cuda()
        set_fp8_attention(model, name)
        configure_checkpointing(model, MemoryConfig(gradient_checkpointing="full"))
        optimizer = torch.optim.AdamW(lora, lr=args.loss_lr)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for i in range(args.loss_steps):
            item = data[i % len(data)]
            batch = {k: v.unsqueeze(0) for k, v in item.items() if isinstance(v, torch.Tensor)}
            inputs = prepare_inputs(batch, config, generator, torch.device("cuda"))
            sigmas = (0.05 + 0.9 * torch.rand(1, generator=generator)).cuda()
            noise = torch.randn(inputs["latents"].shape, generator=generator)
            loss, _ = compute_losses(model, inputs, sigmas, noise, config, torch.device("cuda"))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[name] = losses
        model.cpu()
    last = min(50, args.loss_steps)
    means = {name: statistics.fmean(c[-last:]) for name, c in curves.items()}
    for name in curves:
        row = {"row": name, "steps": args.loss_steps, "blocks": args.loss_blocks,
               "size": f"{w}x{h}x{args.loss_frames}", "lr": args.loss_lr,
               f"mean loss, last {last}": f"{means[name]:.5f}",
               "vs bf16": f"{(means[name] - means['bf16']) / means['bf16']:+.3%}", "first loss": f"{curves[name][0]:.4f}"}
        print(row, flush=True)
        rows_out.append(row)
    save_json("bench_fp8_loss_curves.json", curves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--steps", action="store_true")
    parser.add_argument("--rows", default=None, help="comma-separated rows to run (default: all of them)")
    parser.add_argument("--fp8-attention", action="store_true",
                        help="add a row with FP8 attention on top of FP8 compute (needs nvidia-cudnn-frontend)")
    parser.add_argument("--variant", default="regions+host+merged+linears5")
    parser.add_argument("--policy", default="attention")
    parser.add_argument("--blocks", type=int, default=None, help="blocks of the 14B model (default: all 40)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (as the loop does)")
    parser.add_argument("--loss-steps", type=int, default=0)
    parser.add_argument("--loss-blocks", type=int, default=8)
    parser.add_argument("--loss-size", type=int, default=256)
    parser.add_argument("--loss-frames", type=int, default=21)
    parser.add_argument("--loss-lr", type=float, default=5e-4)
    args = parser.parse_args()
    env = environment()
    head = f"{env['device']}, torch {env['torch']}, attention {env['attention']}, {env['date']}, commit {env['commit']}"
    results: dict = {"env": env}
    if args.micro:
        rows: list[dict] = []
        micro(rows)
        results["micro"] = print_table(f"One frozen Linear at {TOKENS} tokens, forward + input gradient - {head}", rows,
                                       ["layer", "impl", "fwd+dgrad ms", "TFLOP/s", "vs bf16", "rel err", "error"])
        save_json("bench_fp8_compute.json", results)
    if args.accuracy or args.steps:
        base, fp8, params, converted = build_pair(args.blocks)
        print(f"fp8 compute Linears: {converted}", flush=True)
        inputs, sigmas, noise = model_inputs(args.frames, args.height, args.width)
        shape = f"{args.width}x{args.height}x{args.frames}, {args.blocks or 40} blocks"
        if args.accuracy:
            rows = []
            accuracy(*compared(base, fp8, params, args.fp8_attention), inputs, sigmas, noise, rows)
            results["accuracy"] = print_table(f"bf16 vs FP8 compute, {shape} - {head}", rows, list(rows[0]))
            save_json("bench_fp8_compute.json", results)
        if args.steps:
            if args.compile:
                base.compile_blocks()
                fp8.compile_blocks()
            rows = []
            models, loras = compared(base, fp8, params, args.fp8_attention)
            chosen = args.rows.split(",") if args.rows else list(models)
            for model in (base, fp8):  # a row left out must not hold device memory either
                model.cpu()
            steps({n: models[n] for n in chosen}, {n: loras[n] for n in chosen}, inputs, sigmas, noise, args, rows)
            results["steps"] = print_table(
                f"S2V LoRA r16 step, bf16 vs FP8 compute base Linears, {shape}, {args.policy}"
                f"{', compiled' if args.compile else ''} - {head}", rows,
                ["base compute", "variant", "median_s", "min_s", "vs bf16", "peak_gib", "resident_gib",
                 "first_step_s", "error"])
            save_json("bench_fp8_compute.json", results)
        del base, fp8, params
        gc.collect()
        torch.cuda.empty_cache()
    if args.loss_steps:
        rows = []
        loss_curves(args, rows)
        results["loss"] = print_table(f"Loss, bf16 vs FP8 compute, same seed - {head}", rows, list(rows[0]))
        save_json("bench_fp8_compute.json", results)


if __name__ == "__main__":
    main()
