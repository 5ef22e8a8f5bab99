"""Model loading nodes."""

from __future__ import annotations

from . import comfy_adapter
from . import socket_types as types

CATEGORY = "Wan S2V Trainer/model"
TINY = "(tiny random test model)"


class WanS2VLoadTransformer:
    """Load a Wan 2.2 S2V transformer from ComfyUI's diffusion_models folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "transformer": (
                    comfy_adapter.list_model_files("diffusion_models") + [TINY],
                    {"tooltip": "wan2.2_s2v_14B_bf16.safetensors (or fp8_scaled) from models/diffusion_models. "
                     "An fp8_scaled file's block weights stay fp8 with their scales (half the RAM); training "
                     "with base_model_precision fp8 uses them as shipped, no_change/int8 dequantize them. "
                     "The tiny entry builds the built-in tiny random transformer (demo, tests; float32, the "
                     "same weights as the tiny entry of Load Wan S2V Model Bundle)."},
                ),
                "dtype": (
                    ["bfloat16", "float16", "float32"],
                    {"default": "bfloat16", "tooltip": "Compute dtype of the loaded weights."},
                ),
                "numerics": (
                    ["official", "comfyui"],
                    {
                        "default": "official",
                        "tooltip": "official: the Wan2.2 reference forward the weights were trained with. "
                        "comfyui: ComfyUI's S2V forward (audio alignment, motion RoPE), to match its sampler.",
                    },
                ),
            }
        }

    RETURN_TYPES = (types.TRANSFORMER,)
    RETURN_NAMES = ("transformer",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the S2V transformer with strict key checking (any missing or unexpected key is an error)."

    def load(self, transformer: str, dtype: str, numerics: str):
        """The model, holding its `ModelSource` so that training can reload it in child
        processes (several GPUs). Nothing here keeps a reference: the model lives as long as
        ComfyUI keeps this node's output."""
        import torch

        from ..trainer.model.transformer_io import load_transformer
        from ..trainer.train.launcher import ModelSource, attach_model_source

        if transformer == TINY:
            from ..trainer.model.tiny import build_tiny_transformer

            model = build_tiny_transformer(0)
            model.numerics = numerics
            return (attach_model_source(model, ModelSource("tiny", dtype="float32", numerics=numerics, seed=0)),)
        # A 14B model does not fit beside ComfyUI's cached models: have ComfyUI drop them first.
        comfy_adapter.free_comfyui_models()
        path = comfy_adapter.model_file_path("diffusion_models", transformer)
        # An fp8_scaled file stays fp8 (half the RAM while ComfyUI caches this output); the
        # training node's base_model_precision decides: fp8 as shipped, no_change/int8 dequantize.
        model = load_transformer(path, dtype=getattr(torch, dtype), device="cpu", numerics=numerics, keep_fp8=True)
        return (attach_model_source(model, ModelSource(str(path), dtype=dtype, numerics=numerics)),)


NODE_CLASS_MAPPINGS = {"WanS2VLoadTransformer": WanS2VLoadTransformer}
NODE_DISPLAY_NAME_MAPPINGS = {"WanS2VLoadTransformer": "Load Wan S2V Transformer"}
