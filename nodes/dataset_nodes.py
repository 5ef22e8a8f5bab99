"""Dataset node: a folder of talking videos -> cached S2V dataset, report and preview."""

from __future__ import annotations

from . import comfy_adapter
from . import socket_types as types

CATEGORY = "Wan S2V Trainer/data"
TINY = "(tiny random test model)"
CACHED_ONLY = "(cached only: no model)"
DEMO_MEDIA = "(demo media)"
DEMO_MEDIA_FOLDER = "wan_s2v_demo_media"


def _demo_media(input_dir) -> str:
    """Write two short synthetic talking videos (pattern + chirp, with captions) into
    `<input>/wan_s2v_demo_media` where they are missing or differ; returns that folder (which
    must resolve inside the input folder). A symlink in place of one of these files is
    replaced by the real file, never written through."""
    import uuid

    from ..trainer.data.synthetic import write_video
    from ..trainer.io_utils import atomic_write

    folder = comfy_adapter.confine_path(DEMO_MEDIA_FOLDER, [input_dir], what="demo media folder")
    for index, (duration, caption) in enumerate([(1.5, "a person talks calmly"), (2.0, "a person speaks fast")]):
        video, text = folder / f"demo_talk_{index}.mp4", folder / f"demo_talk_{index}.txt"
        if video.is_symlink() or not video.is_file():
            # a fresh name (never an existing link); the rename replaces a link, not its target
            tmp = write_video(folder / f".demo_talk_{index}.{uuid.uuid4().hex[:8]}.tmp.mp4", fps=25,
                              duration=duration, size=(96, 64))
            tmp.replace(video)
        if text.is_symlink() or not text.is_file() or text.read_text(encoding="utf-8") != caption:
            with atomic_write(text) as tmp:
                tmp.write_text(caption, encoding="utf-8")
    return str(folder)


def _choices(kind: str) -> list[str]:
    return comfy_adapter.list_model_files(kind) + [TINY, CACHED_ONLY]


_CACHED_ONLY_TIP = (f" '{CACHED_ONLY}': never load it, take its items from this dataset's cache (an error says "
                    "how many windows are missing if any are not cached).")


class WanS2VDataset:
    """Scan a folder of talking videos, cache latents / text / audio features / references."""

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.data.config import AUDIO_SOURCES, CAPTION_STRATEGIES, REFERENCE_MODES, RESOLUTION_TYPES

        return {
            "required": {
                "folder": ("STRING", {"default": "s2v_dataset", "tooltip": "Folder of videos, relative to ComfyUI's "
                                      "input folder (or inside a root listed in WAN_S2V_TRAINER_ROOTS). "
                                      f"'{DEMO_MEDIA}' writes two synthetic talking clips to input/{DEMO_MEDIA_FOLDER} "
                                      "and uses them (demo workflow)."}),
                "vae": (_choices("vae"), {"tooltip": "Wan 2.1 VAE (wan_2.1_vae.safetensors)." + _CACHED_ONLY_TIP}),
                "text_encoder": (_choices("text_encoders"), {"tooltip": "UMT5-XXL (umt5_xxl_fp8_e4m3fn_scaled / fp16)."
                                                             + _CACHED_ONLY_TIP}),
                "audio_encoder": (_choices("audio_encoders"), {"tooltip": "wav2vec2-large english "
                                                               "(wav2vec2_large_english_fp16)." + _CACHED_ONLY_TIP}),
                "caption_strategy": (list(CAPTION_STRATEGIES), {"default": "textfile",
                                     "tooltip": "textfile: same-stem .txt; filename: the file name; instance_prompt: one fixed prompt."}),
                "instance_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "The caption of every clip when caption_strategy is instance_prompt."}),
                "num_frames": ("INT", {"default": 81, "min": 1, "max": 1001, "step": 4, "tooltip": "4k+1 frames at 16 fps per window."}),
                "window_stride": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "16 fps frames between windows; 0 = num_frames."}),
                "max_windows_per_video": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "0 = all."}),
                "resolution": ("FLOAT", {"default": 624, "min": 0.001, "max": 4096, "tooltip": "pixel_area: ~resolution^2 px per bucket (624 -> 832x480); area: megapixels."}),
                "resolution_type": (list(RESOLUTION_TYPES), {"tooltip": 'pixel_area: buckets of about resolution^2 pixels (624 -> 832x480 for 16:9); area: resolution megapixels.', "default": "pixel_area"}),
                "crop": ("BOOLEAN", {"default": True, "tooltip": "Cover and centre-crop (else stretch) to the bucket."}),
                "allow_zero_audio": ("BOOLEAN", {"default": False, "tooltip": "Train clips without audio with zero audio features instead of skipping them."}),
            },
            "optional": {
                "recursive": ("BOOLEAN", {"tooltip": 'Also look for videos in subfolders.', "default": False}),
                "audio_folder": ("STRING", {"default": "", "tooltip": "Audio files matched by the clip's stem (under "
                                 "the input folder, like folder); see audio_source."}),
                "reference_mode": (list(REFERENCE_MODES), {"tooltip": 'Reference image of each window: its first frame, a seeded random frame, or an image with the same stem in reference_folder.', "default": "first_frame"}),
                "reference_folder": ("STRING", {"default": "", "tooltip": "Reference images by stem (reference_mode image)."}),
                "reference_seed": ("INT", {"tooltip": 'Seed of the random reference frame choice.', "default": 0, "min": 0, "max": 2**31 - 1}),
                "minimum_image_size": ("FLOAT", {"tooltip": 'Skip videos smaller than this (same unit as resolution; 0 = off).', "default": 0, "min": 0, "max": 8192}),
                "maximum_image_size": ("FLOAT", {"tooltip": 'Cap bucket sizes at this (same unit as resolution; 0 = off).', "default": 0, "min": 0, "max": 8192}),
                "offload_during_startup": ("BOOLEAN", {"default": True, "tooltip": "Free the encoders after caching."}),
                "preview_count": ("INT", {"tooltip": "How many clips' first frames the preview output shows.", "default": 4, "min": 1, "max": 64}),
                "teacher_frames": ("BOOLEAN", {"default": False, "tooltip": "Cache CREPA teacher frames (one pixel "
                                   "frame per latent frame, uint8 on disk). Needed when the training node uses CREPA; "
                                   "costs disk, so off unless asked."}),
                "teacher_short_side": ("INT", {"default": 518, "min": 14, "max": 2048, "step": 1, "tooltip": "Short "
                                       "side of the cached teacher frames in px (518 for dinov2_vitg14; 224 suffices "
                                       "for dinov2_vits14). Never above the source's resolution."}),
                "motion_context": ("BOOLEAN", {"default": False, "tooltip": "Cache the VAE latents of the 73 frames "
                                   "before each window (windows starting at frame 73 or later) so training with "
                                   "motion_context_probability > 0 also learns continuation, as the sampler "
                                   "conditions later chunks."}),
                "audio_source": (list(AUDIO_SOURCES), {"default": "auto", "tooltip": "auto: an audio file with the "
                                 "clip's stem (.wav/.mp3/.flac/.ogg/.m4a) in audio_folder or beside the clip, else "
                                 "the clip's own track; video: always the clip's own track; folder: always the file "
                                 "in audio_folder. The report says which each clip used."}),
                "pose_folder": ("STRING", {"default": "", "tooltip": "Optional pose videos (control) matched by "
                                "the clip's stem, under the input folder like folder. Without it, <stem>_pose.mp4 "
                                "beside a clip is its pose video (never a clip itself). Read on the clip's 16 fps "
                                "frame times, fitted like the clip, cached as pose latents."}),
            },
        }

    RETURN_TYPES = (types.DATASET, "STRING", "IMAGE")
    RETURN_NAMES = ("dataset", "report", "preview")
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Cuts 16 fps windows with their exactly aligned 16 kHz audio from a folder of talking videos, "
                   "caches VAE latents, UMT5 embeddings, wav2vec2 features and reference latents (optionally "
                   "pose video latents, CREPA teacher frames and FramePack motion latents), and reports every "
                   "skipped file with its reason.")

    def build(self, folder, vae, text_encoder, audio_encoder, caption_strategy, instance_prompt, num_frames,
              window_stride, max_windows_per_video, resolution, resolution_type, crop, allow_zero_audio,
              recursive=False, audio_folder="", reference_mode="first_frame", reference_folder="", reference_seed=0,
              minimum_image_size=0, maximum_image_size=0, offload_during_startup=True, preview_count=4,
              teacher_frames=False, teacher_short_side=518, motion_context=False, audio_source="auto", pose_folder=""):
        import hashlib

        from ..trainer.data import DatasetConfig, build_dataset, scan_folder

        roots = [comfy_adapter.input_directory(), *comfy_adapter.extra_model_roots()]

        def confine(path: str, what: str) -> str:
            return str(comfy_adapter.confine_path(path, roots, what))

        source = _demo_media(roots[0]) if folder.strip() == DEMO_MEDIA else confine(folder, "dataset folder")
        cache_dir = comfy_adapter.confine_path(
            f"wan_s2v_cache/{source.rstrip('/').split('/')[-1]}-{hashlib.sha256(source.encode()).hexdigest()[:8]}",
            [comfy_adapter.output_directory()], "dataset cache folder")
        config = DatasetConfig(
            folder=source, recursive=recursive, caption_strategy=caption_strategy, instance_prompt=instance_prompt,
            audio_source=audio_source,
            audio_folder=confine(audio_folder, "audio_folder") if audio_folder else "",
            pose_folder=confine(pose_folder, "pose_folder") if pose_folder else "", reference_mode=reference_mode,
            reference_folder=confine(reference_folder, "reference_folder") if reference_folder else "",
            reference_seed=reference_seed,
            num_frames=num_frames, window_stride=window_stride, max_windows_per_video=max_windows_per_video,
            resolution=resolution, resolution_type=resolution_type, minimum_image_size=minimum_image_size,
            maximum_image_size=maximum_image_size, crop=crop, allow_zero_audio=allow_zero_audio,
            cache_dir=str(cache_dir), offload_during_startup=offload_during_startup, teacher_frames=teacher_frames,
            teacher_short_side=teacher_short_side, motion_context=motion_context,
            allowed_roots=[str(root) for root in comfy_adapter.allowed_roots()],
        ).validate()
        scan = scan_folder(config)
        if not scan.clips:
            raise ValueError("no usable clip in the dataset folder.\n" + scan.report())
        encoders = self._encoders(vae, text_encoder, audio_encoder, cache_dir)
        progress = comfy_adapter.Progress(max(1, scan.num_windows))
        dataset = build_dataset(config, encoders, scan, progress=lambda done, total, name: progress.update(done),
                                check_interrupt=comfy_adapter.raise_if_interrupted)
        report = scan.report() + f"\ncache: {cache_dir}\nencoded now: {dataset.stats}"
        return (dataset, report, self._preview(scan, preview_count, config.crop))

    @staticmethod
    def _encoders(vae, text_encoder, audio_encoder, cache_dir):
        import torch

        from ..trainer.data import Encoders

        tiny = None
        if TINY in (vae, text_encoder, audio_encoder):
            folder = comfy_adapter.confine_path(cache_dir.parent / "_tiny_models", [comfy_adapter.output_directory()],
                                                "tiny model folder")
            tiny = Encoders.tiny(folder)
        device = "cuda" if torch.cuda.is_available() else "cpu"

        def pick(choice, kind, tiny_path):
            if choice == CACHED_ONLY:
                return None  # cached only: the encoder is never built
            return tiny_path if choice == TINY else str(comfy_adapter.model_file_path(kind, choice))

        return Encoders(
            pick(vae, "vae", tiny and tiny.vae_path), pick(text_encoder, "text_encoders", tiny and tiny.text_encoder_path),
            pick(audio_encoder, "audio_encoders", tiny and tiny.audio_encoder_path),
            tiny.tokenizer_path if tiny and text_encoder == TINY else None, device=device,
            vae_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
            text_dtype=torch.bfloat16 if device == "cuda" or text_encoder != TINY else torch.float32,
        )

    @staticmethod
    def _preview(scan, count, crop):
        import numpy as np
        import torch

        from ..trainer.media import MediaError, first_frame

        h, w = scan.clips[0].bucket
        images = []
        for clip in scan.clips[:count]:
            try:
                images.append(first_frame(clip.video, (w, h), crop))
            except MediaError:
                continue
        if not images:
            return torch.zeros(1, h, w, 3)
        return torch.from_numpy(np.stack(images)).float() / 255.0


NODE_CLASS_MAPPINGS = {"WanS2VDataset": WanS2VDataset}
NODE_DISPLAY_NAME_MAPPINGS = {"WanS2VDataset": "Wan S2V Dataset (talking videos)"}
