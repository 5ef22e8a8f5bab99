"""FP8 attention (`trainer.model.fp8_attention`): the scaling logic against float references,
the ops through their float32 emulation of cuDNN's kernels (autograd, delayed scales,
checkpointing), and the settings that turn it on, refused where cuDNN's FP8 kernels cannot
run (any CPU). The kernels themselves need a Hopper GPU: `bench/bench_attention_fp8.py`
checks the op against bf16 attention there."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from trainer.memory import MemoryConfig
from trainer.memory.config import MemoryConfigError
from trainer.model import TINY_TRANSFORMER_CONFIG
from trainer.model import fp8_attention as fa
from trainer.model.checkpointing import _ATTENTION_OPS


def _logit_grad_ratio(q, k, v, dout) -> float:
    """amax(dP) / amax(dO) in float64, dP the gradient of the scaled attention logits."""
    logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).requires_grad_()
    out = logits.softmax(-1) @ v
    (grad,) = torch.autograd.grad(out, logits, dout)
    return (grad.abs().amax() / dout.abs().amax()).item()


@pytest.mark.parametrize("peaked", [False, True])
def test_the_dp_scale_bound_holds_for_any_attention(peaked):
    gen = torch.Generator().manual_seed(0)
    heads, seq, dim = 2, 64, 128
    q, k, v, dout = (torch.randn(heads, seq, dim, generator=gen, dtype=torch.float64) for _ in range(4))
    if peaked:  # one key dominates each query's softmax: the largest logit gradients
        q = q * 6
        v[:, 0] *= 20
    ratio = _logit_grad_ratio(q, k, v, dout)
    v_amax = v.abs().amax().float()
    scale = fa.dp_scale(torch.tensor(0.0), torch.tensor(1.0), v_amax, dim)
    assert scale.shape == (1, 1, 1, 1)
    # the bound's scale keeps the largest dP inside e4m3's range...
    assert ratio * scale.item() <= fa.E4M3_MAX
    # ...and is not absurdly loose for these inputs (within 2^12 of the true amax)
    assert ratio * scale.item() > fa.E4M3_MAX / 2**12


def test_the_delayed_dp_scale_follows_the_observed_ratio_under_the_bound():
    v_amax, dout_amax = torch.tensor(3.0), torch.tensor(0.01)
    bound_ratio = 2 * math.sqrt(128) * 3.0
    observed = torch.tensor(0.5)  # far below the bound: the delayed ratio decides
    scale = fa.dp_scale(observed, dout_amax, v_amax, 128).item()
    assert scale == pytest.approx(fa.E4M3_MAX / (0.5 * fa.GRADIENT_MARGIN * 0.01), rel=1e-6)
    # a loss ten times larger moves the scale at once (the ratio is relative to amax(dO))
    assert fa.dp_scale(observed, dout_amax * 10, v_amax, 128).item() == pytest.approx(scale / 10, rel=1e-6)
    # never above what the bound allows, whatever the history says
    stale = torch.tensor(1e4)
    assert fa.dp_scale(stale, dout_amax, v_amax, 128).item() == pytest.approx(
        fa.E4M3_MAX / (bound_ratio * 0.01), rel=1e-6)


def test_gradient_scales_give_each_gradient_its_headroom():
    ratios = torch.tensor([0.5, 2.0, 4.0, 8.0])
    scales = fa.gradient_scales(ratios, torch.tensor(0.01), torch.tensor(3.0), 128)
    expected = [fa.E4M3_MAX / (r * fa.GRADIENT_MARGIN * 0.01) for r in (0.5, 2.0, 4.0, 8.0)]
    assert scales.tolist() == pytest.approx(expected, rel=1e-6)


def test_per_tensor_quantization_round_trips_within_e4m3_precision():
    x = torch.randn(2, 33, 4, 128, generator=torch.Generator().manual_seed(1)).bfloat16() * 7
    x8, descale = fa.quantize_per_tensor(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert descale.item() == pytest.approx(x.float().abs().max().item() / 448, rel=1e-6)
    back = x8.float() * descale
    assert back.abs().max() <= x.float().abs().max() * (1 + 1e-6)
    normal = x.float().abs() / descale >= 2**-6  # e4m3's normal range: 3 mantissa bits
    rel = ((back - x.float()).abs() / x.float().abs())[normal]
    assert rel.max() <= 2**-4 + 1e-6  # half an e4m3 step


def test_the_self_attention_checkpoint_policies_keep_the_fp8_op():
    assert _ATTENTION_OPS[fa.FORWARD_OP] == 1  # [B, S, H, D]


def test_fp8_attention_is_refused_on_a_cpu_with_the_reason():
    reason = fa.refusal("cpu")
    assert "Hopper" in reason and "fp8_attention off" in reason
    with pytest.raises(MemoryConfigError, match="Hopper"):
        MemoryConfig.from_dict({"device": "cpu", "fp8_attention": True})
    model = torch.nn.Module()
    with pytest.raises(ValueError, match="Hopper"):
        fa.enable_fp8_attention(model, "cpu")


def test_turning_fp8_attention_on_keeps_the_automatic_plan():
    config = MemoryConfig.from_dict({"fp8_attention": False}, auto_by_default=True)
    assert config.auto


def test_fp8_attention_during_restores_each_layer(monkeypatch):
    from trainer.model import WanS2VTransformer3DModel

    monkeypatch.setattr(fa, "refusal", lambda device: None)  # a CPU stands in for the GPU here
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    layers = fa.self_attention_layers(model)
    kept = fa.new_state("cpu")
    layers[0].fp8_attention_state = kept
    with fa.fp8_attention_during(model, "cpu"):
        assert layers[0].fp8_attention_state is kept
        assert layers[1].fp8_attention_state is not None
        assert all(b.attn2.fp8_attention_state is None for b in model.blocks)  # cross-attention stays bf16
    assert layers[0].fp8_attention_state is kept and layers[1].fp8_attention_state is None


def test_the_automatic_plan_keeps_fp8_attention_and_the_training_setup_turns_it_on(monkeypatch):
    from trainer.memory.apply import apply_memory_config
    from trainer.model import WanS2VTransformer3DModel

    monkeypatch.setattr(fa, "refusal", lambda device: None)  # a CPU stands in for the GPU here
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    setup = apply_memory_config(model, {"auto": True, "fp8_attention": True}, "cpu")
    assert setup.config.fp8_attention and "fp8 attention" in setup.describe()
    assert all(layer.fp8_attention_state is not None for layer in fa.self_attention_layers(model))


# ----------------------------------------------------------------- the ops, through the float32 emulation


def _reference(q, k, v, dout):
    """float32 attention of [B, S, H, D] tensors and its gradients."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout.float())]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def qkv():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 96, 2, 32, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    dout = (torch.randn(1, 96, 2, 32, generator=gen) * 1e-3).bfloat16()
    return q, k, v, dout


def test_the_fp8_op_matches_float_attention_within_fp8_error(qkv):
    q, k, v, dout = qkv
    state = fa.new_state("cpu")
    out = fa.fp8_attention(q, k, v, state)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    reference = _reference(q, k, v, dout)
    errors = [_rel(a, b) for a, b in zip([out, *grads], reference)]
    # e4m3 keeps 3 mantissa bits: a few percent, as cuDNN's kernels measure at 14B (0.06-0.07);
    # a scale applied twice or not at all is off by orders of magnitude
    assert max(errors) < 0.12, errors
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)


def test_the_first_backward_measures_the_scales_and_later_ones_reuse_them(qkv):
    q, k, v, dout = qkv
    state = fa.new_state("cpu")
    first = torch.autograd.grad(fa.fp8_attention(q, k, v, state), (q, k, v), dout)
    ratios = state.clone()
    assert (ratios > 0).all()
    reference = _reference(q, k, v, dout)
    for i, grad in enumerate(reference[1:]):  # dQ, dK, dV ratios to amax(dO)
        assert ratios[i + 1].item() == pytest.approx((grad.abs().max() / dout.float().abs().max()).item(), rel=0.1)
    # a loss 100 times larger: the delayed scales follow dO's amax (scales kept from the last
    # loss would saturate every gradient), so the error stays that of e4m3 rounding
    louder = dout * 100
    second = torch.autograd.grad(fa.fp8_attention(q, k, v, state), (q, k, v), louder)
    reference = _reference(q, k, v, louder)
    assert max(_rel(a, b) for a, b in zip(second, reference[1:])) < 0.12
    assert max(_rel(a, b) for a, b in zip(first, _reference(q, k, v, dout)[1:])) < 0.12
    assert torch.allclose(state, ratios, rtol=0.05)


def test_self_attention_checkpointing_keeps_the_fp8_output(monkeypatch):
    """Under the "attention" policy the backward reuses the FP8 forward's outputs (no second
    FP8 forward per block), and the gradients stay close to bf16 attention's."""
    from trainer.model import WanS2VTransformer3DModel

    monkeypatch.setattr(fa, "refusal", lambda device: None)
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).bfloat16()
    model.configure_gradient_checkpointing("attention")
    cfg, (t, h, w) = TINY_TRANSFORMER_CONFIG, (3, 8, 16)
    kwargs = {"hidden_states": torch.randn(1, 16, t, h, w), "timestep": torch.tensor([700.0]),
              "encoder_hidden_states": torch.randn(1, 7, cfg["text_dim"]),
              "audio_embeds": torch.randn(1, 25, cfg["audio_dim"], 4 * t),
              "reference_latents": torch.randn(1, 16, 1, h, w)}
    kwargs = {k: v.bfloat16() if v.is_floating_point() and k != "timestep" else v for k, v in kwargs.items()}
    params = [p for n, p in model.named_parameters() if "blocks.1." in n]

    def grads():
        out = model(**kwargs).sample.float()
        return torch.cat([g.flatten().float() for g in torch.autograd.grad(out.square().mean(), params)])

    expected = grads()
    calls = []
    forward = fa.emulated_forward_kernel
    monkeypatch.setattr(fa, "emulated_forward_kernel", lambda *a: calls.append(1) or forward(*a))
    fa.enable_fp8_attention(model, "cpu")
    got = grads()
    assert len(calls) == len(model.blocks)  # one per block: the recompute reused the saved outputs
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0).item() > 0.98


def test_compiled_regions_run_the_fp8_kernel_once_per_block_and_match_eager(monkeypatch):
    """In compiled checkpoint regions the quantization around the kernels is compiled with the
    block (fused with RoPE and the projections); the "attention" policy still keeps the
    kernel's outputs, so the backward runs no second FP8 forward, and the gradients are eager
    FP8 attention's up to the compiler's bf16 fusions."""
    from torch._dynamo.utils import counters

    from trainer.model import WanS2VTransformer3DModel

    monkeypatch.setattr(fa, "refusal", lambda device: None)
    torch.manual_seed(0)
    base = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).bfloat16()
    cfg, (t, h, w) = TINY_TRANSFORMER_CONFIG, (3, 8, 16)
    gen = torch.Generator().manual_seed(1)
    kwargs = {"hidden_states": torch.randn(1, 16, t, h, w, generator=gen).bfloat16(),
              "timestep": torch.tensor([700.0]),
              "encoder_hidden_states": torch.randn(1, 7, cfg["text_dim"], generator=gen).bfloat16(),
              "audio_embeds": torch.randn(1, 25, cfg["audio_dim"], 4 * t, generator=gen).bfloat16(),
              "reference_latents": torch.randn(1, 16, 1, h, w, generator=gen).bfloat16()}

    def grads(compile_regions: bool) -> tuple[torch.Tensor, int]:
        model = copy.deepcopy(base)
        model.configure_gradient_checkpointing("attention", compile_regions=compile_regions)
        fa.enable_fp8_attention(model, "cpu")
        params = [p for n, p in model.named_parameters() if "blocks.1." in n]
        calls.clear()
        out = model(**kwargs).sample.float()
        flat = torch.cat([g.flatten().float() for g in torch.autograd.grad(out.square().mean(), params)])
        return flat, len(calls)

    calls = []
    forward = fa.emulated_forward_kernel
    monkeypatch.setattr(fa, "emulated_forward_kernel", lambda *a: calls.append(1) or forward(*a))
    expected, eager_calls = grads(compile_regions=False)
    torch._dynamo.reset()
    counters.clear()
    got, compiled_calls = grads(compile_regions=True)
    assert eager_calls == compiled_calls == len(base.blocks)
    assert not counters["graph_break"]  # the quantization compiles with the region
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0).item() > 0.99
