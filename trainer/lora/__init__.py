"""LoRA files: ComfyUI native Wan format and Diffusers format, save and load."""

from .io import LoraFile, adapter_state_dict, load_lora, read_lora_file, save_lora, to_comfyui

__all__ = ["LoraFile", "adapter_state_dict", "load_lora", "read_lora_file", "save_lora", "to_comfyui"]
