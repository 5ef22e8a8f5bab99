"""Pose in training: the pose_dropout_probability setting, the per-item dropout draw from the
loop's generator (the same numbers whatever the process split), validation cases with a pose
video, and the loop on items that carry pose latents."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from trainer.data import synthetic as S
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.train.batching import collate, mark_pose_dropout
from trainer.train.config import TrainConfig
from trainer.train.loop import train
from trainer.train.synthetic import SyntheticTalkingDataset


def test_pose_dropout_probability_setting():
    assert TrainConfig().pose_dropout_probability == 0.0
    config = TrainConfig.from_dict({"pose_dropout_probability": 0.25})
    assert config.pose_dropout_probability == 0.25
    assert TrainConfig.from_dict(config.to_flat_dict()) == config
    assert TrainConfig.from_dict({"pose_dropout_probability": 1}).pose_dropout_probability == 1
    for bad in (-0.1, 1.5, "0.5", True, None, math.nan):
        with pytest.raises(ValueError, match=r"pose_dropout_probability must be a finite number in \[0, 1\]"):
            TrainConfig.from_dict({"pose_dropout_probability": bad})


def _batch(absent: list[bool]) -> dict:
    size = len(absent)
    batch = {"latents": torch.zeros(size, 16, 2, 4, 4), "pose_latents": torch.ones(size, 16, 2, 4, 4)}
    batch["pose_dropped"] = torch.tensor(absent)
    return batch


def test_pose_dropout_draws_per_item_from_the_generator():
    absent = [False, True, False, False, False, False]
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    off = _batch(absent)
    mark_pose_dropout(off, 0.0, g, 6)
    assert off["pose_dropped"].tolist() == absent and torch.equal(g.get_state(), state)  # nothing drawn at 0

    always = _batch(absent)
    mark_pose_dropout(always, 1.0, torch.Generator().manual_seed(7), 6)
    assert always["pose_dropped"].all()

    whole = _batch(absent)
    g = torch.Generator().manual_seed(7)
    mark_pose_dropout(whole, 0.5, g, 6)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(7)) < 0.5
    assert whole["pose_dropped"].tolist() == (expected | torch.tensor(absent)).tolist()
    assert 0 < int(expected.sum()) < 6  # this seed picks some rows and keeps others
    # data parallel: three processes with two rows each see the rows of one process with all six
    shares = []
    for offset in (0, 2, 4):
        share = _batch(absent[offset:offset + 2])
        g_share = torch.Generator().manual_seed(7)
        mark_pose_dropout(share, 0.5, g_share, 6, offset)
        assert torch.equal(g_share.get_state(), g.get_state())  # every process stays in step
        shares.append(share["pose_dropped"])
    assert torch.equal(torch.cat(shares), whole["pose_dropped"])
    # a batch without pose still draws (processes whose share has a pose video stay in step)
    plain = {"latents": torch.zeros(6, 16, 2, 4, 4)}
    g_plain = torch.Generator().manual_seed(7)
    mark_pose_dropout(plain, 0.5, g_plain, 6)
    assert set(plain) == {"latents"} and torch.equal(g_plain.get_state(), g.get_state())


class _WithPose(Dataset):
    """Synthetic items, every other one with pose latents (a pose video of the same window)."""

    def __init__(self, items: Dataset):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.items[index])
        if index % 2 == 0:
            item["pose_latents"] = torch.randn(item["latents"].shape, generator=torch.Generator().manual_seed(index))
        return item


def test_the_loop_trains_on_items_with_and_without_pose(tmp_path):
    data = _WithPose(SyntheticTalkingDataset(num_sources=2, windows_per_source=2, text_len=64))
    batch = collate([data[0], data[1]])
    assert batch["pose_dropped"].tolist() == [False, True] and (batch["pose_latents"][1] == 0).all()
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    config = TrainConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "max_train_steps": 2, "train_batch_size": 2, "lora_rank": 4,
        "lora_alpha": 4, "learning_rate": 1e-3, "checkpoint_step_interval": 0, "tensorboard": False,
        "pose_dropout_probability": 0.5})
    result = train(model, data, config)
    assert result.global_step == 2 and all(math.isfinite(loss) for _, loss in result.loss_history)


def test_validation_cases_carry_a_pose_video(tmp_path):
    from sample_helpers import reference_image, speech, write_png, write_wav

    write_png(tmp_path / "ref.png", reference_image())
    write_wav(tmp_path / "speech.wav", speech(0.5), 16_000)
    pose = S.write_video(tmp_path / "pose.mp4", fps=30, duration=1.0, audio=False)
    case = {"reference_image": str(tmp_path / "ref.png"), "audio": str(tmp_path / "speech.wav"), "prompt": "hi",
            "name": "posed", "pose_video": str(pose)}
    config = TrainConfig.from_dict({"validation_step_interval": 5, "validation_cases": [case]})
    assert config.validation.cases()[0]["pose_video"] == str(pose)
    without = {k: v for k, v in case.items() if k != "pose_video"}
    assert "pose_video" not in TrainConfig.from_dict({"validation_cases": [without]}).validation.cases()[0]
    with pytest.raises(ValueError, match=r"validation_cases\[0\] \('posed'\): pose_video file not found: .*gone\.mp4"):
        TrainConfig.from_dict({"validation_cases": [{**case, "pose_video": str(tmp_path / "gone.mp4")}]})
