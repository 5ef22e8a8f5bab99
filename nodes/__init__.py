"""ComfyUI nodes of the pack (classic node API), thin layers over `trainer/`."""

from .model_nodes import NODE_CLASS_MAPPINGS as _MODEL_NODES
from .model_nodes import NODE_DISPLAY_NAME_MAPPINGS as _MODEL_NAMES

NODE_CLASS_MAPPINGS = {**_MODEL_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {**_MODEL_NAMES}

CATEGORY = "Wan S2V Trainer"
