"""The run's training log: one JSON record per logged step in ``<run>/logs/train_log.jsonl``,
and TensorBoard scalars beside it when `tensorboard` is on and installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig


class NoTrainLog:
    """What processes other than rank 0 log to: nothing."""

    path = None

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TrainLog:
    """Rank 0's log: a fresh file for a new run, appended to on resume."""

    def __init__(self, output_dir: Path, config: TrainConfig, resumed_step: int):
        # confined: a `logs` folder or log file that links elsewhere is refused, not written through
        self.path = config.confine(output_dir / "logs" / "train_log.jsonl", what="training log")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step == 0 and self.path.exists():
            self.path.unlink()
        self.tb = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb_dir = config.confine(output_dir / "logs" / "tensorboard", what="tensorboard folder")
                self.tb = SummaryWriter(str(tb_dir), purge_step=resumed_step + 1)
            except ImportError:  # tensorboard not installed
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()



def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:  # Windows
        return float("nan")
