"""Headless engine of the Wan 2.2 S2V LoRA trainer: model, data, training, sampling, CLI.

Nothing in this package imports ComfyUI. Imports inside it are relative so that it works
both as the top-level package `trainer` (CLI, tests) and inside the ComfyUI pack.
"""

__version__ = "0.1.0"
