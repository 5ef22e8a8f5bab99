"""Sampling nodes: model bundle loader, LoRA list (file / trained), S2V sampler, save video."""

from __future__ import annotations

from ..trainer import options
from . import comfy_adapter
from . import socket_types as types

CATEGORY = "Wan S2V Trainer/sampling"
TINY = "(tiny random test model)"


def _choices(kind: str) -> list[str]:
    return comfy_adapter.list_model_files(kind) + [TINY]


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


class WanS2VLoadModelBundle:
    """Transformer + VAE + UMT5 + wav2vec2 for sampling, from ComfyUI's model folders."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "transformer": (_choices("diffusion_models"), {"tooltip": "wan2.2_s2v_14B_bf16 (or fp8_scaled) from "
                                "models/diffusion_models. The tiny entry builds the whole tiny random model set "
                                "(tests; the other files are then ignored)."}),
                "vae": (_choices("vae"), {"tooltip": "Wan 2.1 VAE (wan_2.1_vae.safetensors)."}),
                "text_encoder": (_choices("text_encoders"), {"tooltip": "UMT5-XXL (umt5_xxl_fp16 or fp8_e4m3fn_scaled)."}),
                "audio_encoder": (_choices("audio_encoders"), {"tooltip": "wav2vec2-large english "
                                  "(wav2vec2_large_english_fp16)."}),
                "dtype": (["bfloat16", "float16", "float32"], {"default": "bfloat16",
                          "tooltip": "Compute dtype of the transformer and the text encoder."}),
                "numerics": (["official", "comfyui"], {"default": "official", "tooltip": "official: the Wan2.2 "
                             "forward the weights were trained with; comfyui: ComfyUI's S2V forward."}),
                "device": (["auto", "cuda", "cpu"], {"default": "auto", "tooltip": "Where sampling runs "
                           "(auto: the GPU if there is one)."}),
            },
            "optional": {
                "transformer_model": (types.TRANSFORMER, {"tooltip": "An already loaded transformer (e.g. the "
                                      "one a training node uses); replaces the transformer file."}),
                "fp8_compute": ("BOOLEAN", {"default": False, "tooltip": "Run the transformer's large matmuls on "
                                "the GPU's FP8 tensor cores (Ada, Hopper, Blackwell), as ComfyUI's --fast fp8_matrix_mult "
                                "does: faster steps, slightly different pixels. An fp8_scaled "
                                "file's weights are used as shipped; a connected transformer_model stays as it is "
                                "(the FP8 weights are an extra copy of one byte per weight)."}),
                "fp8_attention": ("BOOLEAN", {"default": False, "tooltip": "Run the transformer's self-attention "
                                  "on FP8 tensor cores (cuDNN's FP8 attention, like SageAttention in other "
                                  "ComfyUI workflows: faster steps, slightly different pixels). Hopper or Blackwell "
                                  "GPU; pip install nvidia-cudnn-frontend."}),
            },
        }

    RETURN_TYPES = (types.MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads every model the S2V sampler needs (strict key checks), or the tiny random set for tests."

    def load(self, transformer, vae, text_encoder, audio_encoder, dtype, numerics, device, transformer_model=None,
             fp8_compute=False, fp8_attention=False):
        from ..trainer.model.fp8_attention import check_device
        from ..trainer.sample.bundle import check_fp8_compute, with_fp8_compute

        device = _device(device)
        if fp8_compute:
            check_fp8_compute(device)  # before any file is read
        if fp8_attention:
            check_device(device)
        bundle = _load_bundle(transformer, vae, text_encoder, audio_encoder, dtype, numerics, device, transformer_model)
        if fp8_compute:  # a connected transformer stays as it is: the training node may hold it
            bundle = with_fp8_compute(bundle, copy=transformer_model is not None)
        bundle.fp8_attention = fp8_attention  # set for each sampling call only: a shared transformer stays as it is
        return (bundle,)


def _load_bundle(transformer, vae, text_encoder, audio_encoder, dtype, numerics, device, transformer_model):
    from ..trainer.sample.bundle import build_tiny_bundle, load_model_bundle

    tiny_encoders = (vae, text_encoder, audio_encoder) == (TINY, TINY, TINY)
    if transformer == TINY and transformer_model is None:
        return build_tiny_bundle(device=device, numerics=numerics)
    if TINY in (vae, text_encoder, audio_encoder) and not (tiny_encoders and transformer_model is not None):
        raise ValueError("pick real VAE, text encoder and audio encoder files (the tiny entries only work "
                         "together: as the whole set, or around a connected transformer_model of the tiny "
                         "model's widths)")
    comfy_adapter.free_comfyui_models()
    path = lambda kind, name: comfy_adapter.model_file_path(kind, name)
    if transformer_model is not None:
        import dataclasses

        bundle = build_tiny_bundle() if tiny_encoders else None
        if bundle is None:
            from ..trainer.model.audio_encoder import load_audio_encoder
            from ..trainer.model.text_encoder import load_text_encoder
            from ..trainer.model.vae import load_vae
            from ..trainer.sample.bundle import ModelBundle, _dtype

            te, tok = load_text_encoder(path("text_encoders", text_encoder), dtype=_dtype(dtype))
            bundle = ModelBundle(transformer_model, load_vae(path("vae", vae)), te, tok,
                                 load_audio_encoder(path("audio_encoders", audio_encoder)), device, _dtype(dtype))
        return dataclasses.replace(bundle, transformer=transformer_model, device=device)
    return load_model_bundle(
        path("diffusion_models", transformer), path("vae", vae), path("text_encoders", text_encoder),
        path("audio_encoders", audio_encoder), dtype=dtype, device=device, numerics=numerics,
    )


def _lora_list(loras) -> list:
    return list(loras) if loras else []


class WanS2VLoadLoRA:
    """Add a LoRA file with a strength to a LoRA list, and say what the file holds."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (comfy_adapter.list_model_files("loras"), {"tooltip": "A LoRA from models/loras: "
                              "made for S2V, or a Wan 2.1/2.2 T2V / I2V LoRA (its self/cross-attention and "
                              "feed-forward apply to S2V), in ComfyUI, kohya / musubi-tuner, Diffusers or "
                              "DiffSynth-Studio keys; step-distill files with full differences (.diff) too. "
                              ".safetensors only."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                             "tooltip": "Multiplies the LoRA's weight delta (full differences too); 0 = off "
                                        "(bit-exact with no LoRA)."}),
            },
            "optional": {
                "loras": (types.LORA_STACK, {"tooltip": "LoRAs to keep in the list (chain several Load LoRA nodes)."}),
            },
        }

    RETURN_TYPES = (types.LORA_STACK, "STRING")
    RETURN_NAMES = ("loras", "report")
    OUTPUT_TOOLTIPS = ("The LoRA list with this LoRA appended.",
                       ("What the file holds: its key layout, what it was made for (S2V, T2V, I2V, another "
                        "model), the LoRA pairs and full differences per module group that apply to S2V, and "
                        "every key that does not (also printed to the log)."))
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Appends a LoRA file and its strength to a LoRA list for the S2V sampler. The file is checked "
                   "here: unreadable, empty or NaN files and files of which nothing applies to S2V are errors.")

    def load(self, lora_name, strength, loras=None):
        import dataclasses

        from ..trainer.lora.io import read_lora_file
        from ..trainer.sample.config import check_strength
        from ..trainer.sample.lora import LoraSpec

        strength = check_strength(strength, f"strength of LoRA '{lora_name}'")  # before reading the file
        path = comfy_adapter.model_file_path("loras", lora_name)
        lora = read_lora_file(path)
        report = dataclasses.replace(lora.report, source=lora_name).text()
        print(report)
        spec = LoraSpec(lora, strength, name=lora_name)
        return (_lora_list(loras) + [spec], report)


class WanS2VApplyLoRA:
    """Add the LoRA a training node produced (in memory) with a strength to a LoRA list."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (types.TRAINED_LORA, {"tooltip": "The trained LoRA output of the Wan S2V training node."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                             "tooltip": "Multiplies the LoRA's weight delta; 0 = off."}),
            },
            "optional": {
                "loras": (types.LORA_STACK, {"tooltip": "LoRAs to keep in the list."}),
            },
        }

    RETURN_TYPES = (types.LORA_STACK,)
    RETURN_NAMES = ("loras",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Puts an in-memory trained LoRA with a strength into a LoRA list for the S2V sampler."

    def apply(self, lora, strength, loras=None):
        from ..trainer.sample.lora import LoraSpec

        return (_lora_list(loras) + [LoraSpec(lora, float(strength), name="trained LoRA")],)


class WanS2VSampler:
    """Reference image + speech + prompt -> talking video (official chunked S2V generation)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (types.MODEL, {"tooltip": "From Load Wan S2V Model Bundle."}),
                "image": ("IMAGE", {"tooltip": "Reference image (first of the batch); resized to cover and "
                          "centre-cropped to width x height."}),
                "audio": ("AUDIO", {"tooltip": "Speech, any length, rate, mono or stereo. It sets the number of "
                          "chunks; the output audio is this, cut to the video length."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What the video shows."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Used with zeroed "
                                    "audio for the unconditional pass; empty = the official negative prompt."}),
                "width": ("INT", {"default": 832, "min": 64, "max": 4096, "step": 16,
                          "tooltip": "Snapped to a multiple of 16."}),
                "height": ("INT", {"default": 480, "min": 64, "max": 4096, "step": 16,
                           "tooltip": "Snapped to a multiple of 16."}),
                "frames_per_chunk": ("INT", {"default": 80, "min": 4, "max": 400, "step": 4, "tooltip": "Frames "
                                     "per generated chunk (4k; official 80). The first chunk yields 3 fewer."}),
                "max_chunks": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "0 = as many as the audio "
                               "needs; else at most this many. Chunks after the first continue from the last "
                               "73 frames (FramePack motion)."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 200, "tooltip": "Denoising steps per chunk."}),
                "guidance": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 20.0, "step": 0.1,
                             "tooltip": "CFG scale; <= 1 turns the unconditional pass off."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1,
                          "tooltip": "Sigma shift; 0 = 3 at 480p, 5 at 720p (official)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "tooltip": "Chunk r uses seed + r."}),
                "scheduler": (list(options.SAMPLER_SCHEDULERS), {"default": "unipc", "tooltip": "UniPC multistep (flow) as the "
                              "official sampler, or flow-matching Euler."}),
                "cfg_mode": (list(options.CFG_MODES), {"default": "batch", "tooltip": "Cond and uncond as one "
                             "batch (faster) or one after the other (less memory)."}),
            },
            "optional": {
                "loras": (types.LORA_STACK, {"tooltip": "LoRAs with strengths (Load LoRA / Apply LoRA), applied for "
                          "this run only."}),
                "pose_video": ("IMAGE", {"tooltip": "Optional pose frames driving the motion (16 fps)."}),
                "offload": ("BOOLEAN", {"default": False, "tooltip": "Keep models on the CPU and move each to the "
                            "GPU only while it runs."}),
                "save_mp4": ("BOOLEAN", {"default": True, "tooltip": "Also write an mp4 with the audio to "
                             "output/wan_s2v_samples/ (then the video output is that file)."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "AUDIO", "VIDEO")
    RETURN_NAMES = ("frames", "audio", "video")
    OUTPUT_TOOLTIPS = ("The generated frames (16 fps).", "The driving audio, cut to the video length.",
                       ("The video with its audio, for ComfyUI's Save Video / Get Video Components (the mp4 "
                        "when save_mp4 is on)."))
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Wan 2.2 S2V sampling as the official pipeline: CFG with the negative prompt and zeroed audio, "
                   "long audio in chunks with the last 73 frames as motion context. The video output goes to "
                   "ComfyUI's Save Video; frames and audio to Create Video or Save Wan S2V Video.")

    def sample(self, model, image, audio, prompt, negative_prompt, width, height, frames_per_chunk, max_chunks,
               steps, guidance, shift, seed, scheduler, cfg_mode, loras=None, pose_video=None, offload=False,
               save_mp4=True):
        from ..trainer.sample.config import SamplerConfig
        from ..trainer.sample.pipeline import SamplingCancelled, sample_s2v

        config = SamplerConfig(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                               frames_per_chunk=frames_per_chunk, max_chunks=max_chunks, steps=steps,
                               guidance=guidance, shift=shift, seed=seed, scheduler=scheduler, cfg_mode=cfg_mode,
                               offload=offload).validate()
        bar = {"bar": None}

        def progress(step, total, _preview):
            if bar["bar"] is None:
                bar["bar"] = comfy_adapter.Progress(total)
            bar["bar"].update(step)

        out_path = _next_path("wan_s2v_samples", "s2v") if save_mp4 else None
        try:
            result = sample_s2v(model, image, audio, config, loras=loras, pose_video=pose_video, progress=progress,
                                should_stop=comfy_adapter.interrupt_requested, out_path=out_path, log=print)
        except SamplingCancelled:
            comfy_adapter.raise_if_interrupted()
            raise
        audio_out = result.comfy_audio()
        video = comfy_adapter.video_output(result.frames, audio_out, result.fps, result.path)
        return (result.frames, audio_out, video)


def _next_path(subfolder: str, prefix: str):
    out = comfy_adapter.confine_path(subfolder, [comfy_adapter.output_directory()], "video folder")
    out.mkdir(parents=True, exist_ok=True)
    index = 1 + max((int(p.stem.rsplit("_", 1)[-1]) for p in out.glob(f"{prefix}_*.mp4")
                     if p.stem.rsplit("_", 1)[-1].isdigit()), default=0)
    return out / f"{prefix}_{index:05d}.mp4"


class WanS2VSaveVideo:
    """Write frames + audio as an mp4 (H.264 + AAC) into ComfyUI's output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "Video frames (the sampler's frames output)."}),
                "filename_prefix": ("STRING", {"default": "wan_s2v", "tooltip": "File name start; a counter "
                                    "follows. Saved under output/wan_s2v_videos/."}),
                "fps": ("INT", {"default": 16, "min": 1, "max": 120, "tooltip": "S2V generates 16 fps."}),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Audio to mux (the sampler's audio output)."}),
            },
        }

    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("video",)
    OUTPUT_TOOLTIPS = ("The saved mp4 (ComfyUI VIDEO; its path where ComfyUI is absent).",)
    FUNCTION = "save"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "Saves an mp4 with its audio muxed (PyAV: libx264 + AAC) and shows it."

    def save(self, frames, filename_prefix, fps, audio=None):
        from ..trainer.media import write_mp4

        prefix = "".join(c if c.isalnum() or c in "-_" else "_" for c in filename_prefix) or "wan_s2v"
        path = _next_path("wan_s2v_videos", prefix)
        wave, rate = None, None
        if audio is not None:
            wave, rate = audio["waveform"][0], int(audio["sample_rate"])
        write_mp4(path, frames, fps, wave, rate)
        ui = {"images": [{"filename": path.name, "subfolder": "wan_s2v_videos", "type": "output"}],
              "animated": (True,)}
        return {"ui": ui, "result": (comfy_adapter.video_output(frames, audio, fps, path),)}


NODE_CLASS_MAPPINGS = {
    "WanS2VLoadModelBundle": WanS2VLoadModelBundle,
    "WanS2VLoadLoRA": WanS2VLoadLoRA,
    "WanS2VApplyLoRA": WanS2VApplyLoRA,
    "WanS2VSampler": WanS2VSampler,
    "WanS2VSaveVideo": WanS2VSaveVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanS2VLoadModelBundle": "Load Wan S2V Model Bundle",
    "WanS2VLoadLoRA": "Load Wan S2V LoRA",
    "WanS2VApplyLoRA": "Apply Trained Wan S2V LoRA",
    "WanS2VSampler": "Wan S2V Sampler",
    "WanS2VSaveVideo": "Save Wan S2V Video (with audio)",
}
