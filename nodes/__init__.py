"""ComfyUI nodes of the pack (classic node API), thin layers over `trainer/`."""

from .dataset_nodes import NODE_CLASS_MAPPINGS as _DATA_NODES
from .dataset_nodes import NODE_DISPLAY_NAME_MAPPINGS as _DATA_NAMES
from .dependency_errors import explain_missing_packages
from .model_nodes import NODE_CLASS_MAPPINGS as _MODEL_NODES
from .model_nodes import NODE_DISPLAY_NAME_MAPPINGS as _MODEL_NAMES
from .sample_nodes import NODE_CLASS_MAPPINGS as _SAMPLE_NODES
from .sample_nodes import NODE_DISPLAY_NAME_MAPPINGS as _SAMPLE_NAMES
from .train_nodes import NODE_CLASS_MAPPINGS as _TRAIN_NODES
from .train_nodes import NODE_DISPLAY_NAME_MAPPINGS as _TRAIN_NAMES

NODE_CLASS_MAPPINGS = explain_missing_packages({**_MODEL_NODES, **_TRAIN_NODES, **_DATA_NODES, **_SAMPLE_NODES})
NODE_DISPLAY_NAME_MAPPINGS = {**_MODEL_NAMES, **_TRAIN_NAMES, **_DATA_NAMES, **_SAMPLE_NAMES}

CATEGORY = "Wan S2V Trainer"
