"""Deterministic, resumable batching over a map-style dataset of the training-data contract.

Batches never mix buckets. Order is a function of (seed, epoch) only, so the position
(epoch, batch index) is all a checkpoint needs to continue with the very same batches.
The bucket of an item is read from ``dataset.bucket_of(i)`` when the dataset has it (no
tensor is loaded), else from the item itself.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch

from ..data.dataset import collate_pose

logger = logging.getLogger(__name__)

TENSOR_KEYS = ("latents", "reference_latents", "audio_embeds", "text_embeds", "motion_latents", "teacher_frames")
#: Keys `collate_pose` makes (items without a pose video are zero rows marked in `pose_dropped`).
POSE_KEYS = ("pose_latents", "pose_dropped")


def _buckets(dataset) -> list[Any]:
    getter = getattr(dataset, "bucket_of", None)
    if callable(getter):
        return [getter(i) for i in range(len(dataset))]
    return [dataset[i].get("bucket", "default") for i in range(len(dataset))]


class BatchOrder:
    """Epoch-wise shuffled batches of indices, one bucket per batch; incomplete tails of a
    bucket are kept (smaller batch) so that small datasets train on every item."""

    def __init__(self, dataset, batch_size: int, seed: int, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        groups: dict[Any, list[int]] = defaultdict(list)
        for index, bucket in enumerate(_buckets(dataset)):
            groups[str(bucket)].append(index)
        self.groups = [groups[k] for k in sorted(groups)]
        self.epoch = 0
        self.position = 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=g).tolist()] if self.shuffle else group
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __len__(self) -> int:
        return len(self._batches)

    def next_indices(self) -> list[int]:
        if self.position >= len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def next_batch(self) -> dict[str, Any]:
        return collate([self.dataset[i] for i in self.next_indices()])

    def state_dict(self) -> dict[str, int]:
        """The position in (global) batches of `batch_size` items."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int], batch_size: int | None = None) -> None:
        """Continue where `state` stopped; `batch_size` is the batch size it was saved with
        (None: this one). With the same (global) batch size, also when it is now split over
        another number of processes, this is exact; with another one the epoch continues
        after the same number of items (the grouping of the rest of that epoch differs)."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._batches = self._epoch_batches(self.epoch)
        saved = int(batch_size or self.batch_size)
        if saved != self.batch_size and self.position > 0:
            current, self.batch_size = self.batch_size, saved
            consumed = sum(len(b) for b in self._epoch_batches(self.epoch)[: self.position])
            self.batch_size = current
            position, seen = 0, 0
            while position < len(self._batches) and seen < consumed:
                seen += len(self._batches[position])
                position += 1
            logger.warning("resuming with global batch %d instead of %d: epoch %d continues at batch %d "
                           "(%d items seen)", current, saved, self.epoch, position, consumed)
            self.position = position


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of items of one bucket; other fields become lists. ``motion_latents``
    is kept only when every item has it (and with equal shapes); ``pose_latents`` and
    ``pose_dropped`` when any item has a pose (`trainer.data.collate_pose`)."""
    batch: dict[str, Any] = collate_pose(items)
    for key in items[0]:
        if key in POSE_KEYS:
            continue
        values = [item.get(key) for item in items]
        if key in TENSOR_KEYS:
            if any(v is None for v in values) or len({tuple(v.shape) for v in values}) != 1:
                if key == "motion_latents":
                    continue
                shapes = sorted({tuple(v.shape) for v in values if v is not None})
                raise ValueError(f"items of one batch differ in '{key}' ({shapes}); batches must share a bucket")
            batch[key] = torch.stack([v for v in values])
        else:
            batch[key] = values
    for key in ("latents", "audio_embeds", "text_embeds"):
        if key not in batch:
            raise KeyError(f"dataset items lack '{key}'")
    return batch


def mark_pose_dropout(batch: dict[str, Any], probability: float, generator: torch.Generator, global_size: int,
                      offset: int = 0) -> None:
    """Pose dropout: mark the rows of `batch` to train without their pose in ``pose_dropped`` [B].

    `batch` holds rows ``offset:offset + B`` of a global batch of `global_size` items; one
    uniform number is drawn per item of the global batch (the same on every process, whatever
    its share holds) and rows below `probability` are marked. Nothing is drawn when
    `probability` is 0, so runs without pose dropout keep their random streams."""
    if probability <= 0:
        return
    picked = torch.rand(global_size, generator=generator)[offset : offset + len(batch["latents"])] < probability
    if "pose_dropped" in batch:
        batch["pose_dropped"] = batch["pose_dropped"] | picked
