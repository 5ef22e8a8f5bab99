"""Behaviour of the S2V transformer beyond the golden cases: the official numerics, dtype
safety of RoPE, checkpointing, compile and LoRA adapters, on the tiny configuration."""

from __future__ import annotations

import pytest
import torch

from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.model.rope import framepack_positions

T, H, W = 3, 8, 16


@pytest.fixture(scope="module")
def model() -> WanS2VTransformer3DModel:
    torch.manual_seed(0)
    return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()


def inputs(motion: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cfg = TINY_TRANSFORMER_CONFIG
    out = {
        "hidden_states": torch.randn(1, 16, T, H, W, generator=gen),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 7, cfg["text_dim"], generator=gen),
        "audio_embeds": torch.randn(1, 25, cfg["audio_dim"], 4 * T, generator=gen),
        "reference_latents": torch.randn(1, 16, 1, H, W, generator=gen),
    }
    if motion:
        out["motion_latents"] = torch.randn(1, 16, 6, H, W, generator=gen)
    return out


def changed_latent_frames(model, numerics: str, audio_frame: int) -> list[int]:
    """Which latent frames' audio tokens change when one video frame's audio changes."""
    audio = inputs()["audio_embeds"]
    base = model._encode_audio(audio, T, numerics)[1]
    poked = audio.clone()
    poked[..., audio_frame] += 1.0
    after = model._encode_audio(poked, T, numerics)[1]
    diff = (after - base).abs().flatten(2).amax(-1)[0]
    return [k for k in range(T) if diff[k] > 1e-6]


@pytest.mark.parametrize("frame", range(4 * T))
def test_audio_alignment_official_sees_up_to_4k_plus_3(model, frame):
    # Official: 73 prepended copies of frame 0, 19 outputs dropped -> latent k sees <= 4k + 3,
    # so the first latent a change reaches is the first k with 4k + 3 >= frame.
    changed = changed_latent_frames(model, "official", frame)
    assert changed and min(changed) == max(0, -(-(frame - 3) // 4))


@pytest.mark.parametrize("frame", range(4 * T))
def test_audio_alignment_comfyui_sees_up_to_4k(model, frame):
    changed = changed_latent_frames(model, "comfyui", frame)
    if frame > 4 * (T - 1):  # beyond the newest frame any latent sees
        assert changed == []
    else:
        assert changed and min(changed) == -(-frame // 4)


def test_audio_needs_four_frames_per_latent(model):
    args = inputs()
    args["audio_embeds"] = args["audio_embeds"][..., : 4 * T - 1]
    with pytest.raises(ValueError, match="4 per latent frame"):
        model(**args)


def test_framepack_rope_times_per_numerics():
    grids = [(1, 4, 8), (1, 2, 4), (4, 1, 2)]  # latent 8 x 16
    official = framepack_positions(8, 16, grids, "official")
    comfy = framepack_positions(8, 16, grids, "comfyui")
    assert sorted(set(official[:, 0].tolist())) == [-19, -14, -9, -4, -3, -1]
    assert sorted(set(comfy[:, 0].tolist())) == [-19, -18, -17, -16, -3, -1]
    # 2x bucket spatial positions: integer-truncated vs evenly spread.
    two_x = slice(32, 40)
    assert official[two_x, 1].tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    assert comfy[two_x, 2].tolist()[:4] == pytest.approx([0, 7 / 3, 14 / 3, 7])
    assert official[two_x, 2].tolist()[:4] == [0, 2, 4, 7]


def test_numerics_differ_only_where_documented(model):
    with torch.no_grad():
        no_audio = {k: v for k, v in inputs().items() if k != "audio_embeds"}
        same = [model(**no_audio, numerics=n).sample for n in ("official", "comfyui")]
        # Reference at time 30 = max(30, T + 9) here, no motion, no audio: identical.
        torch.testing.assert_close(same[0], same[1], rtol=1e-5, atol=1e-5)
        with_audio = [model(**inputs(), numerics=n).sample for n in ("official", "comfyui")]
        assert (with_audio[0] - with_audio[1]).abs().max() > 1e-4


def test_no_complex_buffers_and_bf16_cast_keeps_rope(model):
    assert not any(b.is_complex() for b in model.buffers())
    args = inputs(motion=True)
    with torch.no_grad():
        reference = model(**args).sample
        half = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        half.load_state_dict(model.state_dict())
        half = half.to(torch.bfloat16).eval()
        out = half(**args).sample.float()
    error = ((out - reference).norm() / reference.norm()).item()
    assert error < 0.03, f"bf16 relative error {error:.3e}"


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    ckpt = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.enable_gradient_checkpointing()
    grads = []
    for m in (plain, ckpt):
        m(**inputs(motion=True)).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    m = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
    args = inputs(motion=True)
    with torch.no_grad():
        eager = m(**args).sample
        m.compile_blocks()
        compiled = m(**args).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_lora_adapter_trains_and_changes_output():
    from peft import LoraConfig

    torch.manual_seed(0)
    m = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    args = inputs()
    with torch.no_grad():
        before = m(**args).sample
    m.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_params = [n for n, p in m.named_parameters() if p.requires_grad]
    assert lora_params and all("lora_" in n for n in lora_params)
    assert any("audio_injector" in n for n in lora_params) and any("attn2" in n for n in lora_params)
    with torch.no_grad():
        assert torch.equal(m(**args).sample, before)  # lora_B starts at zero
    m(**args).sample.square().mean().backward()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    torch.optim.SGD(trainable, lr=0.1).step()
    with torch.no_grad():
        after = m(**args).sample
    assert (after - before).abs().max() > 1e-6


def test_odd_latent_size_is_a_clear_error(model):
    args = inputs()
    args["hidden_states"] = args["hidden_states"][..., :15]
    with pytest.raises(ValueError, match="multiple of the patch"):
        model(**args)


def test_checkpoint_policies_give_the_same_gradients():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAttention(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                self.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    base = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    grads, backward_attention_calls = {}, {}
    for policy in ("none", "full", "attention"):
        m = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        m.load_state_dict(base.state_dict())
        m.configure_gradient_checkpointing(policy)
        loss = m(**inputs(motion=True)).sample.square().mean()
        with CountAttention() as counter:
            loss.backward()
        backward_attention_calls[policy] = counter.calls
        grads[policy] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["full"], grads["none"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["attention"], grads["none"], rtol=1e-5, atol=1e-7)
    # "full" re-runs every attention forward in the backward pass; "attention" re-runs none.
    assert backward_attention_calls["full"] > backward_attention_calls["attention"]


def test_chunked_feed_forward_matches_and_keeps_less_for_backward():
    torch.manual_seed(0)
    m = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    args = inputs()
    reference = m(**args).sample
    reference.square().mean().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
    m.zero_grad()

    saved_bytes = {}
    for chunk in (None, 16):
        m.set_feed_forward_chunk_size(chunk)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.numel()) or t, lambda t: t):
            out = m.blocks[0]._feed_forward(torch.randn(1, 128, 64))
        saved_bytes[chunk] = sum(sizes)
        del out
    assert saved_bytes[16] < saved_bytes[None] / 2  # only the chunk inputs are kept

    out = m(**args).sample
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    for g, p in zip(grads, m.parameters()):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="positive"):
        m.set_feed_forward_chunk_size(0)
