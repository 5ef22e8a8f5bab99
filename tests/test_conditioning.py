"""One forward for training and sampling (`trainer.model.conditioning`): the training loop's
path (`prepare_inputs` -> `compute_losses`) and the sampler's chunk forward give the model the
same inputs and so the same prediction, in both numerics, with and without pose latents."""

from __future__ import annotations

import pytest
import torch

from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.model.conditioning import stack_pose_latents, transformer_inputs
from trainer.sample import pipeline
from trainer.train.batching import collate
from trainer.train.config import TrainConfig
from trainer.train.objective import compute_losses, prepare_inputs
from trainer.train.synthetic import SyntheticTalkingDataset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
    with torch.no_grad():  # a pose embedder bias far from zero: zeros and None then differ clearly
        model.condition_embedder.pose_embedder.bias.normal_(0.0, 1.0)
    return model


def _item(with_pose: bool) -> dict:
    item = SyntheticTalkingDataset(num_sources=1, windows_per_source=1, text_len=16, seed=4)[0]
    if with_pose:
        item["pose_latents"] = torch.randn(item["latents"].shape, generator=torch.Generator().manual_seed(5))
    return item


def _training_prediction(model, item: dict, numerics: str) -> tuple[torch.Tensor, dict]:
    """The prediction `compute_losses` makes (recorded from the model call) and its inputs."""
    config = TrainConfig(numerics=numerics, caption_dropout_probability=0.0, audio_dropout_probability=0.0)
    inputs = prepare_inputs(collate([item]), config, torch.Generator().manual_seed(0), CPU, train=True)
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(kwargs, sample=output.sample)

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            noise = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(1))
            compute_losses(model, inputs, torch.tensor([0.63]), noise, config, CPU)
    finally:
        handle.remove()
    return seen["sample"], seen


@pytest.mark.parametrize("with_pose", [False, True], ids=["no_pose", "pose"])
@pytest.mark.parametrize("numerics", ["official", "comfyui"])
def test_training_and_sampler_forward_predict_the_same(model, numerics, with_pose):
    item = _item(with_pose)
    trained, seen = _training_prediction(model, item, numerics)
    assert seen["numerics"] == numerics
    assert seen["pose_latents"] is not None  # zeros without a pose video, as the samplers pass
    cond = {"context": item["text_embeds"][None], "audio": item["audio_embeds"][None],
            "pose": item["pose_latents"][None] if with_pose else None}
    with torch.no_grad():
        sampled = pipeline._guided_velocity(model, seen["hidden_states"], seen["timestep"],
                                            item["reference_latents"][None], None, cond, None, 1.0, "batch", numerics)
        # the sampler's CFG batch (cond + uncond in one batch of 2) keeps the conditional row
        uncond = {"context": torch.zeros_like(cond["context"]), "audio": cond["audio"] * 0, "pose": cond["pose"]}
        guided = pipeline._guided_velocity(model, seen["hidden_states"], seen["timestep"],
                                           item["reference_latents"][None], None, cond, uncond, 1.0, "batch",
                                           numerics)
        bare = model(seen["hidden_states"], seen["timestep"], item["text_embeds"][None],
                     audio_embeds=item["audio_embeds"][None], reference_latents=item["reference_latents"][None],
                     numerics=numerics).sample
    assert torch.equal(trained, sampled)
    torch.testing.assert_close(guided, trained, rtol=1e-5, atol=1e-5)
    # sensitive: a forward without pose latents (what training used to run) differs clearly
    if not with_pose:
        assert (bare - trained).norm() > 0.05 * trained.norm()


def test_pose_dropout_and_missing_pose_equal_no_pose(model):
    """A dropped pose and an item without a pose video in a batch give what "no pose" gives."""
    g = torch.Generator().manual_seed(2)
    x, ref = torch.randn(3, 16, 2, 8, 8, generator=g), torch.randn(3, 16, 1, 8, 8, generator=g)
    text, audio = torch.randn(3, 8, 32, generator=g), torch.randn(3, 25, 48, 8, generator=g)
    pose = torch.randn(3, 16, 2, 8, 8, generator=g)
    t = torch.tensor([300.0, 500.0, 700.0])
    for numerics in ("official", "comfyui"):
        with torch.no_grad():
            none = model(**transformer_inputs(x, t, text, audio, ref, numerics=numerics)).sample
            posed = model(**transformer_inputs(x, t, text, audio, ref, numerics=numerics, pose_latents=pose)).sample
            dropped = model(**transformer_inputs(x, t, text, audio, ref, numerics=numerics, pose_latents=pose,
                                                 drop_pose=torch.tensor([False, True, False]))).sample
            mixed = stack_pose_latents([pose[0], None, pose[2]], x)
            missing = model(**transformer_inputs(x, t, text, audio, ref, numerics=numerics,
                                                 pose_latents=mixed)).sample
        torch.testing.assert_close(dropped[1], none[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(dropped[[0, 2]], posed[[0, 2]], rtol=0, atol=1e-6)
        assert torch.equal(missing, dropped)
        assert (posed[1] - none[1]).abs().max() > 1e-2
    assert stack_pose_latents([None, None, None], x) is None
    with pytest.raises(ValueError, match="shape of the video latents"):
        transformer_inputs(x, t, text, audio, ref, numerics="official", pose_latents=pose[:, :, :1])
