"""ComfyUI entry point of the Wan 2.2 S2V LoRA trainer pack.

Importing this module must stay cheap: the node classes only declare their inputs and
outputs; torch, diffusers and the model code are imported inside the node functions.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain file, not as a pack: pytest does this with the repository root
    # when the checkout's folder name is not a Python identifier (comfyui-wan-s2v-trainer).
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
