"""LoRA training engine: typed settings, flow-matching objective, loop, checkpoints."""

from .config import LoraConfig, OptimizerConfig, ScheduleConfig, TrainConfig, load_config, save_config

__all__ = ["LoraConfig", "OptimizerConfig", "ScheduleConfig", "TrainConfig", "load_config", "save_config"]
