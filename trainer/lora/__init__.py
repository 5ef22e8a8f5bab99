"""LoRA files: saved in ComfyUI's native Wan format or the Diffusers format; read from those and
from the layouts other trainers write (kohya / musubi-tuner, DiffSynth-Studio, full differences),
with a report of what each file holds."""

from .io import LoraFile, LoraFileError, adapter_state_dict, load_lora, read_lora_file, save_lora, to_comfyui
from .report import LoraReport

__all__ = ["LoraFile", "LoraFileError", "LoraReport", "adapter_state_dict", "load_lora", "read_lora_file",
           "save_lora", "to_comfyui"]
