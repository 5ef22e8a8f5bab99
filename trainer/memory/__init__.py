"""Memory settings for training the 14B S2V transformer on smaller cards: int8/fp8
base weights, block offload that trains, checkpoint policies, chunked feed-forward, and an
automatic plan from a VRAM budget."""

from .apply import MemorySetup, apply_memory_config, configure_checkpointing
from .config import MemoryConfig, MemoryConfigError
from .offload import BlockOffloader, enable_block_offload
from .plan import MemoryPlan, estimate_memory, plan_memory

__all__ = [
    "BlockOffloader",
    "MemoryConfig",
    "MemoryConfigError",
    "MemoryPlan",
    "MemorySetup",
    "apply_memory_config",
    "configure_checkpointing",
    "enable_block_offload",
    "estimate_memory",
    "plan_memory",
]
