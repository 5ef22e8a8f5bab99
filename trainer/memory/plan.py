"""Automatic memory plan: given a VRAM budget, pick the cheapest settings that fit.

A small calibrated model of peak memory and step time for LoRA training of the S2V
transformer. Calibration (H100, torch 2.11, 14B, 832x480x81 = 34,320 tokens, LoRA r16,
docs/benchmarks.md): bf16 weights 30.4 GiB; full per-block checkpointing 12.95 s / 55.5 GiB;
keeping every block's attention output 11.29 s / 68.5 GiB (+0.327 GiB = one [S, 5120] bf16
tensor per block). Everything that depends on the video size scales with the token count.
The factors for precision and offload come from `bench/bench_memory.py` and
`bench/bench_tread_crepa.py` (same machine, 2026-11-25).

    peak = resident weights + LoRA (+grads, AdamW states) + checkpointed block inputs
           + kept attention outputs + transient of one block's recompute/backward
           + "linears" blocks + margin

The estimates predate compiled checkpoint regions, which keep less (attention outputs on
the host: 40.5 GiB measured against 56 estimated), so on CUDA the plans are conservative.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import MemoryConfig, normalize_precision

GIB = 2**30
REFERENCE_TOKENS = 34_320  # 832x480, 81 frames, + reference frame
#: Step seconds at REFERENCE_TOKENS (H100): full checkpointing / every attention output kept.
STEP_FULL_S = 12.95
STEP_ATTENTION_S = 11.29
#: Transient of one block's recompute + backward at REFERENCE_TOKENS: 55.5 - 30.4 (weights)
#: - 13.1 (40 block inputs) - 0.9 (LoRA + AdamW) GiB.
TRANSIENT_GIB = 11.1
#: Saved by the chunked feed-forward at REFERENCE_TOKENS (measured, int8 + full
#: checkpointing: 41.6 -> 41.0 GiB; the block's other transients dominate at this size).
FFN_CHUNK_SAVING_GIB = 0.6
#: Relative step-time factors, measured: int8 full 13.00 s and fp8 full 12.87 s vs bf16 12.95 s;
#: int8 keeping attention 11.31 s vs bf16 11.20 s.
PRECISION_TIME = {"no_change": 1.0, "fp8": 1.0, "int8-quanto": 1.01}
PRECISION_QUALITY_RANK = {"no_change": 0, "int8-quanto": 1, "fp8": 2}
#: FP8 compute for the base Linears (`MemoryConfig.fp8_compute`), measured on one H200 with
#: compiled blocks (docs/benchmarks.md): 9.34 s vs bf16 10.37 s with compiled regions and
#: attention outputs to host; 11.25 vs 12.44 s with block offload under a 24 GiB cap; 4.09 vs
#: 4.67 s with TREAD routes; and 1-byte base weights. Its "linears" blocks were measured slower
#: than without (9.61 s), so the plan gives FP8 compute none. Quality: step-1 LoRA-gradient
#: cosine 0.998 and the loss within 0.2% over 200 steps, so it ranks with bf16 compute and is
#: taken whenever it is faster.
FP8_COMPUTE_TIME = 0.90
#: What FP8 compute adds to a block's transient (e4m3 copies of its activations and output
#: gradients): measured 20.6 GiB with block offload + attention:16 + inputs to host under a
#: 24 GiB cap where bf16 compute took 20.4 GiB with 1.3 GiB more of weights swapped in.
FP8_COMPUTE_TRANSIENT_GIB = 0.8
FP8_COMPUTE_PRECISIONS = ("no_change", "fp8")
#: How much slower (relative) a higher base precision may be and still be preferred.
PRECISION_TIME_TOLERANCE = 1.15
BLOCK_OFFLOAD_TIME = 1.03  # measured 12.75 s (attention:16, inputs to host) vs 12.34 s on the device
ACTIVATION_OFFLOAD_TIME = 1.005  # measured 11.20 s vs 11.14 s: the side-stream copies hide
FFN_CHUNK_TIME = 1.07  # measured 13.88 s vs 13.00 s (int8, full checkpointing)
#: A "linears" block (`MemoryConfig.linear_blocks`) at REFERENCE_TOKENS, measured with
#: compiled regions + host offload: 5 blocks 57.7 vs 40.5 GiB and 10.72 vs 10.84 s.
LINEAR_BLOCK_GIB = 3.3
LINEAR_BLOCK_S = 0.024
LINEAR_BLOCK_DIALS = (0, 1, 2, 3, 5, 8)
#: Allocator slack: a fixed part plus a fraction of the budget.
MARGIN_GIB = 1.0
MARGIN_FRACTION = 0.05

DEFAULT_14B = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40,
               "audio_inject_layers": list(range(12)), "text_dim": 4096, "audio_dim": 1024}


@dataclass
class MemoryEstimate:
    peak_gib: float
    time_factor: float  # relative to bf16 with full checkpointing, no offload
    parts: dict[str, float]


@dataclass
class MemoryPlan:
    config: MemoryConfig
    estimate: MemoryEstimate
    sentence: str
    fits: bool


def tokens_for(height: int, width: int, frames: int, reference: bool = True) -> int:
    latent_frames = (frames - 1) // 4 + 1
    per_frame = (height // 16) * (width // 16)
    return per_frame * (latent_frames + int(reference))


def _weights(cfg: dict[str, Any]) -> dict[str, float]:
    """Parameter counts: swappable linears of a block, of an injector, AdaIN, the rest."""
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn = cfg["ffn_dim"]
    block_linear = 8 * (dim * dim + dim) + 2 * dim * ffn + ffn + dim
    block_other = 6 * dim + 2 * dim + 4 * dim  # modulation table, cross-attn norm, q/k norms
    injector_linear = 4 * (dim * dim + dim)
    adain = dim * 2 * dim + 2 * dim
    rest = (6 * dim * dim + dim * 256 + cfg.get("text_dim", 4096) * dim + dim * dim + 16 * 4 * dim + 64 * dim
            + cfg.get("audio_dim", 1024) * dim + 3 * dim * 4 + 16 * 4 * dim)
    return {"layers": cfg["num_layers"], "injectors": len(cfg.get("audio_inject_layers", [])),
            "block_linear": block_linear, "block_other": block_other, "injector_linear": injector_linear,
            "adain": adain, "rest": rest, "dim": dim}


def estimate_memory(config: MemoryConfig, *, height: int = 480, width: int = 832, frames: int = 81,
                    lora_rank: int = 16, model_config: dict[str, Any] | None = None,
                    lora_params: int | None = None) -> MemoryEstimate:
    """Peak GiB and relative step time of LoRA training with `config`."""
    cfg = {**DEFAULT_14B, **(model_config or {})}
    w = _weights(cfg)
    layers, injectors, dim = w["layers"], w["injectors"], w["dim"]
    precision = normalize_precision(config.base_model_precision)
    qbytes = 2 if precision == "no_change" and not config.fp8_compute else 1
    block_bytes = w["block_linear"] * qbytes + w["block_other"] * 2
    injector_bytes = w["injector_linear"] * qbytes + w["adain"] * 2
    swappable = layers * block_bytes + injectors * injector_bytes
    rest = w["rest"] * 2
    if config.offload == "blocks":
        region = block_bytes + injector_bytes
        weights = rest + (2 + config.prefetch) * region
    elif config.offload == "model":
        weights = rest + swappable  # during the step the whole model is on the device
    else:
        weights = rest + swappable
    if lora_params is None:  # q/k/v/o of attn1, attn2 and the injectors: 2 * r * dim each
        lora_params = (layers * 8 + injectors * 4) * 2 * lora_rank * dim
    lora = lora_params * 16  # fp32 weight + grad + two AdamW states

    scale = tokens_for(height, width, frames) / REFERENCE_TOKENS
    width_scale = dim / 5120
    per_block = REFERENCE_TOKENS * 5120 * 2 * scale * width_scale  # one [S, dim] bf16 tensor
    policy = config.gradient_checkpointing
    kept_attention = 0
    if policy == "none":
        checkpointed, uncheckpointed = 0, layers
    elif policy == "interval":
        checkpointed = len(range(0, layers, config.checkpoint_interval))
        uncheckpointed = layers - checkpointed
    else:
        checkpointed, uncheckpointed = layers, 0
        if policy == "attention":
            kept_attention = layers if config.attention_blocks is None else min(layers, config.attention_blocks)
    inputs = checkpointed * per_block
    if config.offload_activations:
        inputs = min(inputs, 2 * per_block)
    transient = (TRANSIENT_GIB + FP8_COMPUTE_TRANSIENT_GIB * config.fp8_compute) * GIB * scale * width_scale
    chunk = config.resolved_feed_forward_chunk_size()
    if chunk:
        transient -= FFN_CHUNK_SAVING_GIB * GIB * scale * width_scale
    # a block that is not checkpointed keeps all its activations (~ the transient, roughly)
    full_activations = uncheckpointed * (transient * 0.8 + per_block)
    parts = {
        "weights": weights / GIB, "lora_and_optimizer": lora / GIB, "block_inputs": inputs / GIB,
        "attention_outputs": kept_attention * per_block / GIB, "unckeckpointed_blocks": full_activations / GIB,
        "transient": transient / GIB,
        "linear_blocks": config.linear_blocks * LINEAR_BLOCK_GIB * scale * width_scale,
    }
    peak = sum(parts.values())

    if policy == "none":
        time = STEP_ATTENTION_S / STEP_FULL_S * 0.93
    elif policy == "interval":
        time = (checkpointed + uncheckpointed * 0.8) / layers
    else:
        time = 1.0 - (1.0 - STEP_ATTENTION_S / STEP_FULL_S) * kept_attention / max(layers, 1)
    time -= config.linear_blocks * LINEAR_BLOCK_S / STEP_FULL_S
    time *= FP8_COMPUTE_TIME if config.fp8_compute else PRECISION_TIME[precision]
    if config.offload == "blocks":
        time *= BLOCK_OFFLOAD_TIME * (1.5 if config.offload_blocks_to_disk else 1.0)
    if config.offload_activations:
        time *= ACTIVATION_OFFLOAD_TIME
    if chunk:
        time *= FFN_CHUNK_TIME
    return MemoryEstimate(peak, time, parts)


def _candidates(precisions: list[str], layers: int, fp8_compute: bool = False):
    dials = sorted({layers, 3 * layers // 4, layers // 2, 2 * layers // 5, layers // 4, layers // 8, 0}, reverse=True)
    computes = [(p, False) for p in precisions]
    if fp8_compute:
        computes += [(p, True) for p in precisions if p in FP8_COMPUTE_PRECISIONS]
    for precision, fp8 in computes:
        for offload in ("none", "blocks"):
            for kept in dials:
                for activations in (False, True):
                    for chunk in (False, True):
                        policy = "attention" if kept else "full"
                        # linears blocks only where every block keeps its attention (the fast end)
                        fast_end = kept == layers and offload == "none" and not fp8
                        linear_dials = LINEAR_BLOCK_DIALS if fast_end else (0,)
                        for linears in linear_dials:
                            yield MemoryConfig(
                                base_model_precision=precision, offload=offload, gradient_checkpointing=policy,
                                attention_blocks=None if kept == layers else (kept or None),
                                offload_activations=activations, enable_chunked_feed_forward=chunk,
                                linear_blocks=min(linears, layers), fp8_compute=fp8,
                            )


def plan_memory(vram_budget_gib: float, *, height: int = 480, width: int = 832, frames: int = 81,
                lora_rank: int = 16, model_config: dict[str, Any] | None = None,
                precision: str | None = None, fp8_compute: bool = False) -> MemoryPlan:
    """The cheapest settings whose estimated peak fits `vram_budget_gib` minus a margin:
    the base precision closest to bf16 among those within `PRECISION_TIME_TOLERANCE` of the
    fastest fitting step time, then the fastest, then the smallest. With `precision`,
    only that base precision is considered. With `fp8_compute` (the GPU has FP8 tensor
    cores), settings with FP8 compute for the base Linears are candidates too; they rank with
    bf16 compute in quality. If nothing fits, the smallest setting is returned with
    `fits=False` and a sentence that says so."""
    if vram_budget_gib is None or vram_budget_gib <= 0:
        raise ValueError("vram_budget_gib must be positive")
    cfg = {**DEFAULT_14B, **(model_config or {})}
    precisions = [normalize_precision(precision)] if precision else ["no_change", "int8-quanto", "fp8"]
    usable = vram_budget_gib - MARGIN_GIB - MARGIN_FRACTION * vram_budget_gib
    shape = {"height": height, "width": width, "frames": frames, "lora_rank": lora_rank, "model_config": cfg}
    scored = []
    for candidate in _candidates(precisions, cfg["num_layers"], fp8_compute):
        est = estimate_memory(candidate, **shape)
        rank = 0 if candidate.fp8_compute else PRECISION_QUALITY_RANK[candidate.base_model_precision]
        key = (round(est.time_factor, 4), rank, est.peak_gib)
        scored.append((key, candidate, est))
    fitting = [item for item in scored if item[2].peak_gib <= usable]
    best_unconstrained = min(scored, key=lambda item: item[0])
    fits = bool(fitting)
    if fits:
        # A lower base precision changes the model; take it only when the best-quality
        # precision that fits is more than PRECISION_TIME_TOLERANCE slower.
        fastest = min(item[0][0] for item in fitting)
        affordable = [item for item in fitting if item[0][0] <= fastest * PRECISION_TIME_TOLERANCE]
        _, chosen, est = min(affordable, key=lambda item: (item[0][1], item[0][0], item[0][2]))
    else:
        _, chosen, est = min(scored, key=lambda item: item[2].peak_gib)
    chosen.auto, chosen.vram_budget_gib = False, vram_budget_gib
    if not chosen.fp8_compute:  # the FP8 device check belongs to the run's device, done when applied
        chosen.validate()
    ratio = est.time_factor / best_unconstrained[2].time_factor
    verdict = "fits" if fits else "does NOT fit (smallest setting shown)"
    sentence = (
        f"VRAM budget {vram_budget_gib:g} GiB at {width}x{height}, {frames} frames: picked {chosen.describe()} - "
        f"estimated peak {est.peak_gib:.1f} GiB ({verdict}; {usable:.1f} GiB usable after the margin), "
        f"step time ~{ratio:.2f}x the fastest setting without a budget"
    )
    return MemoryPlan(chosen, est, sentence, fits)


def plan_table(budgets=(80, 48, 40, 32, 24, 16, 12), **shape) -> list[str]:
    return [plan_memory(b, **shape).sentence for b in budgets]


__all__ = ["MemoryEstimate", "MemoryPlan", "estimate_memory", "plan_memory", "plan_table", "tokens_for"]

if __name__ == "__main__":  # pragma: no cover
    print("\n".join(plan_table()))
    for mode in (MemoryConfig(), MemoryConfig(base_model_precision="int8-quanto"),
                 MemoryConfig(gradient_checkpointing="attention")):
        e = estimate_memory(mode)
        print(mode.describe(), f"{e.peak_gib:.1f} GiB", {k: round(v, 2) for k, v in e.parts.items()})
    _ = dataclasses
