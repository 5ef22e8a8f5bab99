"""Model code: the S2V transformer, its loaders and converters, and the other components
(text encoder, VAE, audio encoder) in their own modules."""

from .transformer_io import CheckpointError, inspect_checkpoint, load_transformer, save_transformer
from .transformer_s2v import NUMERICS, TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

__all__ = [
    "NUMERICS",
    "TINY_TRANSFORMER_CONFIG",
    "CheckpointError",
    "WanS2VTransformer3DModel",
    "inspect_checkpoint",
    "load_transformer",
    "save_transformer",
]
