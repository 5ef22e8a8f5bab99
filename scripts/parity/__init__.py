"""Helper nodes for `scripts/sampler_parity.py` (not part of the pack).

`sampler_parity.py` links this folder into a throw-away `custom_nodes` folder of the ComfyUI
server it starts. The nodes stand in for the two native loaders that cannot read a small
model file:

- `WanS2VParityConditioning` replaces CLIPLoader + CLIPTextEncode: ComfyUI's UMT5 class has
  the fixed umt5-xxl size (24 layers, 5.7 B parameters), so it cannot load a tiny text
  encoder; the node returns the text embeddings our encoder computed, as a CONDITIONING.
- `WanS2VParityAudioFeatures` replaces LoadAudio + AudioEncoderLoader + AudioEncoderEncode in
  the second ("features") branch of the graph: it returns our wav2vec2 hidden states as an
  AUDIO_ENCODER_OUTPUT, so that a difference in ComfyUI's wav2vec2 can be told apart from
  one in the rest of the S2V path.

Both read a safetensors file from ComfyUI's input folder, so a prompt cannot reach other
files. `WanS2VParitySaveAudioFeatures` (an output node) saves the native AudioEncoderEncode
output so the script can compare ComfyUI's wav2vec2 hidden states with ours layer by layer.
"""

from __future__ import annotations

import os

import folder_paths
import torch
from safetensors.torch import load_file


def _input_tensors(name: str) -> dict[str, torch.Tensor]:
    """The tensors of `name`, a safetensors file directly in ComfyUI's input folder."""
    folder = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(folder, name))
    if os.path.dirname(path) != folder or not os.path.isfile(path):
        raise FileNotFoundError(f"{name!r} is not a file in ComfyUI's input folder")
    return load_file(path)


class WanS2VParityConditioning:
    """CONDITIONING from saved text embeddings [1, L, text_dim] (what CLIPTextEncode gives)."""

    CATEGORY = "testing/wan_s2v_parity"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "file": (
                    "STRING",
                    {"default": "parity_text.safetensors", "tooltip": "safetensors file in the input folder"},
                ),
                "key": (
                    "STRING",
                    {"default": "positive", "tooltip": "tensor name in the file: [1, L, text_dim]"},
                ),
            }
        }

    def load(self, file: str, key: str):
        context = _input_tensors(file)[key].float()
        return ([[context, {"pooled_output": None}]],)


class WanS2VParityAudioFeatures:
    """AUDIO_ENCODER_OUTPUT from saved wav2vec2 hidden states [L, N, D] at 50 per second
    (the layout of ComfyUI's `AudioEncoderEncode` output: one [1, N, D] tensor per layer)."""

    CATEGORY = "testing/wan_s2v_parity"
    RETURN_TYPES = ("AUDIO_ENCODER_OUTPUT",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "file": (
                    "STRING",
                    {
                        "default": "parity_audio.safetensors",
                        "tooltip": "safetensors file in the input folder",
                    },
                ),
                "key": (
                    "STRING",
                    {"default": "hidden_states", "tooltip": "tensor name in the file: [L, N, D]"},
                ),
            }
        }

    def load(self, file: str, key: str):
        tensors = _input_tensors(file)
        hidden = tensors[key].float()
        output = {
            "encoded_audio": hidden[-1:],
            "encoded_audio_all_layers": list(hidden.unsqueeze(1).unbind(0)),
            "audio_samples": int(tensors["num_samples"].item()) if "num_samples" in tensors else 0,
        }
        return (output,)


class WanS2VParitySaveAudioFeatures:
    """Saves an AUDIO_ENCODER_OUTPUT's hidden states [L, N, D] (float32) to
    `<output>/wan_s2v_parity/<name>.safetensors`, to compare them with ours."""

    CATEGORY = "testing/wan_s2v_parity"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio_encoder_output": ("AUDIO_ENCODER_OUTPUT", {"tooltip": "AudioEncoderEncode's output"}),
                "name": (
                    "STRING",
                    {"default": "comfyui_audio_features", "tooltip": "file name without extension"},
                ),
            }
        }

    def save(self, audio_encoder_output, name: str):
        from safetensors.torch import save_file

        if os.path.basename(name) != name or not name:
            raise ValueError(f"{name!r} must be a plain file name")
        folder = os.path.join(folder_paths.get_output_directory(), "wan_s2v_parity")
        os.makedirs(folder, exist_ok=True)
        hidden = torch.cat(list(audio_encoder_output["encoded_audio_all_layers"])).float().contiguous()
        save_file({"hidden_states": hidden}, os.path.join(folder, f"{name}.safetensors"))
        return {"ui": {"parity_files": [f"wan_s2v_parity/{name}.safetensors"]}}


NODE_CLASS_MAPPINGS = {
    "WanS2VParityConditioning": WanS2VParityConditioning,
    "WanS2VParityAudioFeatures": WanS2VParityAudioFeatures,
    "WanS2VParitySaveAudioFeatures": WanS2VParitySaveAudioFeatures,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanS2VParityConditioning": "Wan S2V parity: conditioning from file",
    "WanS2VParityAudioFeatures": "Wan S2V parity: audio encoder output from file",
    "WanS2VParitySaveAudioFeatures": "Wan S2V parity: save audio encoder output",
}
