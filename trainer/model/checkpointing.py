"""Gradient checkpointing policies for the S2V transformer blocks.

- "full": a block keeps only its input; the whole block is recomputed in the backward pass.
- "attention": a block also keeps its self-attention output (the SDPA result), so the
  recompute skips the most expensive op (about 0.97 of the 1.84 PFLOP of a 14B forward at
  832x480x81) at the cost of one [B, S, dim] tensor per block. Cross-attention (512 text
  keys) and the audio injectors (5 keys per frame) are cheap and still recomputed.
  Inside a compiled region it also keeps the FFN output where the backward reads it (the
  blocks followed by an audio injector), see `_keep_attention_and_narrowing`.
- "linears" (one block's policy, chosen with `linear_blocks`): like "attention", and the
  block also keeps the outputs of its large linear layers (q/k/v/o, cross-attention q/o,
  the FFN's up projection), so its backward recomputes no large matmul: about 24 ms less
  per 14B block at 832x480x81 for about 3 GB more kept per block (measured with merged-weight
  LoRA, docs/benchmarks.md). Meant for the few blocks that spare device memory can hold (they
  stay on the device: moving 3 GB a block over PCIe twice costs what the skipped matmuls save).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import flash4, fp8_attention

CHECKPOINT_POLICIES = ("none", "full", "attention")
BLOCK_POLICIES = ("full", "attention", "linears")  # what one block's checkpoint keeps


def _attention_ops() -> dict:
    """Attention ops -> the dimension of their (query, key) arguments that counts tokens."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    sdpa = {getattr(aten, name).default: -2 for name in names if hasattr(aten, name)}  # [B, H, S, D]
    return {**sdpa, flash4.FORWARD_OP: 1, fp8_attention.FORWARD_OP: 1}  # [B, S, H, D]


def _keep_self_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    token_dim = _ATTENTION_OPS.get(op)
    if token_dim is not None and args[0].shape[token_dim] == args[1].shape[token_dim]:  # as many keys as queries
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_and_linears(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _ATTENTION_OPS:
        return _keep_self_attention(ctx, op, *args, **kwargs)
    dims = _matmul_dims(op, args)
    if dims is not None:
        inner, outer = dims
        # Redoing an output costs `inner` multiply-adds per element: LoRA's rank-r products
        # (and the merged LoRA weight, `trainer.lora.merged_linear`) are cheap to redo.
        return CheckpointPolicy.MUST_SAVE if 4 * inner >= outer else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_and_narrowing(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """"attention" inside a compiled region: also keep the outputs of matmuls that narrow
    their input (the FFN's down projection; LoRA's rank-r products, which are tiny). The
    compiled backward reads the FFN output only in a block followed by an audio injector,
    whose AdaIN backward needs the block's output; keeping it there spares the recompute the
    FFN's down matmul (~6 ms a 14B block at 832x480x81). Elsewhere the partitioner saves
    nothing for it (eager checkpointing would keep it in every block, so it does not use
    this policy)."""
    dims = _matmul_dims(op, args)
    if dims is not None and dims[0] > dims[1]:
        return CheckpointPolicy.MUST_SAVE
    return _keep_self_attention(ctx, op, *args, **kwargs)


def _matmul_dims(op, args) -> tuple[int, int] | None:
    """(inner, outer) sizes of a matmul op's operands (bf16 mm / addmm, or the FP8 scaled
    product of `trainer.memory.fp8_compute`); None for any other op."""
    if op in _MATMUL_OPS:
        return args[-2].shape[-1], args[-1].shape[-1]  # mm(a, b) / addmm(bias, a, b)
    if op in _SCALED_MM_OPS:
        return args[0].shape[-1], args[1].shape[-1]  # _scaled_mm(a, b, scale_a, scale_b, ...)
    return None


_ATTENTION_OPS = _attention_ops()
_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_SCALED_MM_OPS = {torch.ops.aten._scaled_mm.default}
_SELECTIVE_POLICIES = {"attention": _keep_self_attention, "linears": _keep_attention_and_linears}
_COMPILED_POLICIES = {**_SELECTIVE_POLICIES, "attention": _keep_attention_and_narrowing}


def checkpoint_function(policy: str, compiled: bool = False) -> Callable:
    """The `checkpoint(fn, *args)` callable for a block policy (one of `BLOCK_POLICIES`);
    `compiled` for a checkpoint inside a compiled region."""
    policies = _COMPILED_POLICIES if compiled else _SELECTIVE_POLICIES
    if policy == "full":
        return functools.partial(checkpoint, use_reentrant=False)
    if policy in policies:
        context = functools.partial(create_selective_checkpoint_contexts, policies[policy])
        return functools.partial(checkpoint, use_reentrant=False, context_fn=context)
    raise ValueError(f"unknown checkpoint policy '{policy}' (expected one of {BLOCK_POLICIES})")


@functools.cache
def compiled_checkpoint(policy: str, unit: Callable) -> Callable:
    """torch.compile of ``checkpoint(unit, *args)`` under `policy`: the compiler sees the
    checkpointed region whole and chooses (within the policy) what to save and what to
    recompute in the backward graph. One compiled function per (policy, unit), shared by
    every block (modules are arguments of `unit`)."""
    run = checkpoint_function(policy, compiled=True)
    return torch.compile(functools.partial(run, unit))

