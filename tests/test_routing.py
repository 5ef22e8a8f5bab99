"""TREAD token routing in the S2V transformer (tiny model)."""

from __future__ import annotations

import pytest
import torch
from test_transformer_s2v import H, T, W, inputs

from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.model.routing import TokenRoute, kept_video_tokens, parse_routes

TOKENS_PER_FRAME = (H // 2) * (W // 2)


def test_parse_routes_normalises_and_validates():
    routes = parse_routes({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}, 40)
    assert routes == [TokenRoute(0.5, 2, 38)]
    with pytest.raises(ValueError, match="overlap"):
        parse_routes([TokenRoute(0.5, 0, 3), TokenRoute(0.5, 3, 5)], 10)
    with pytest.raises(ValueError, match="fraction of tokens dropped"):
        parse_routes([TokenRoute(1.0, 0, 3)], 10)
    with pytest.raises(ValueError, match="do not fit"):
        parse_routes([TokenRoute(0.5, 5, 2)], 10)


def test_kept_tokens_are_equal_per_frame_and_sorted():
    keep = kept_video_tokens(3, 32, 0.75, "cpu")
    assert keep.numel() == 3 * 8
    assert torch.equal(keep, keep.sort().values)
    assert torch.equal((keep // 32).bincount(), torch.tensor([8, 8, 8]))


def record_blocks(model):
    calls = []
    original = model._block_and_audio

    def recording(index, x, temb, split, rotary, context, num_video, audio):
        out = original(index, x, temb, split, rotary, context, num_video, audio)
        calls.append({"index": index, "x": x.detach().clone(), "out": out.detach().clone(), "split": split,
                      "rotary": rotary, "num_video": num_video})
        return out

    model._block_and_audio = recording
    return calls


@pytest.fixture
def routed_model():
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    model.set_token_routes({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]})
    return model.train()


def test_dropped_tokens_skip_the_route_unchanged(routed_model):
    calls = record_blocks(routed_model)
    routed_model(**inputs(motion=True)).sample.sum().backward()
    num_video = T * TOKENS_PER_FRAME
    kept = calls[1]["num_video"]
    assert kept == T * TOKENS_PER_FRAME // 2 and calls[2]["num_video"] == kept
    assert calls[0]["num_video"] == calls[3]["num_video"] == num_video
    before, after = calls[0]["out"], calls[3]["x"]
    routed_in = calls[1]["x"]
    # Which video tokens were kept: find each routed token in the pre-route sequence.
    keep = torch.tensor([int((before[0, :num_video] == tok).all(-1).nonzero()[0]) for tok in routed_in[0, :kept]])
    dropped = torch.tensor(sorted(set(range(num_video)) - set(keep.tolist())))
    assert torch.equal(after[:, dropped], before[:, dropped])
    # Kept tokens come back from the route's last block; reference/motion tokens too.
    assert torch.equal(after[:, keep], calls[2]["out"][:, :kept])
    assert torch.equal(after[:, num_video:], calls[2]["out"][:, kept:])
    # Inside the route the kept tokens keep their own RoPE rows and the timestep split.
    rows = torch.cat([keep, torch.arange(num_video, before.shape[1])])
    assert torch.equal(calls[1]["rotary"][0], calls[0]["rotary"][0][rows])
    assert calls[1]["split"] == kept


def test_routing_is_off_in_eval_and_without_grad(routed_model):
    calls = record_blocks(routed_model)
    with torch.no_grad():
        routed_model(**inputs())
    routed_model.eval()
    routed_model(**inputs())
    assert {c["num_video"] for c in calls} == {T * TOKENS_PER_FRAME}


def test_zero_ratio_route_equals_no_route():
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).train()
    plain = model(**inputs(motion=True)).sample
    model.set_token_routes([TokenRoute(0.0, 1, 2)])
    routed = model(**inputs(motion=True)).sample
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-6)


def test_routing_with_checkpointing_gives_the_same_gradients(routed_model):
    grads = []
    for policy in ("none", "attention"):
        routed_model.zero_grad()
        routed_model.configure_gradient_checkpointing(policy)
        torch.manual_seed(3)  # same kept tokens in both runs
        routed_model(**inputs(motion=True)).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in routed_model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_capture_returns_video_tokens_after_the_block(routed_model):
    calls = record_blocks(routed_model)
    routed_model.eval()
    out = routed_model(**inputs(), capture_block=1)
    num_video = T * TOKENS_PER_FRAME
    assert out.captured_mask is None
    assert torch.equal(out.captured_hidden_states, calls[1]["out"][:, :num_video])


def test_capture_inside_a_route_marks_the_tokens_that_ran(routed_model):
    calls = record_blocks(routed_model)
    out = routed_model(**inputs(), capture_block=1)
    kept = calls[1]["num_video"]
    mask = out.captured_mask
    assert mask is not None and int(mask.sum()) == kept
    assert torch.equal(out.captured_hidden_states[:, mask], calls[1]["out"][:, :kept])
    assert torch.equal(out.captured_hidden_states[:, ~mask], calls[0]["out"][:, : T * TOKENS_PER_FRAME][:, ~mask])
    out.captured_hidden_states.square().mean().backward()  # gradients flow from the capture
    assert routed_model.blocks[1].attn1.to_q.weight.grad is not None
