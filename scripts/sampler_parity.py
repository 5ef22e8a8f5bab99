"""First-step parity of our S2V sampler with ComfyUI's native S2V path in a real server.

    python scripts/sampler_parity.py --comfyui /tmp/ComfyUI      # or set COMFYUI_PATH

One set of small random models is written in ComfyUI's file formats; a real ComfyUI server
(`comfyui_server.py`, CPU) and our `trainer.sample.sample_s2v` then run the same inputs
(reference image, speech, prompts, seed) for one Euler step from the first sigma to 0, whose
result is the model's first prediction x0 = x - sigma * v. The script prints one row per case
(max abs and relative L2 error of ours against ComfyUI's, in the normalised latent space the
transformer sees) and exits 1 when an asserted case is above its tolerance.

ComfyUI graph (native nodes except the text conditioning, see below), queued once per cfg:

    UNETLoader -> ModelSamplingSD3 -> KSampler(seed, steps 1, cfg, euler, simple, denoise 1) -> SaveLatent
    VAELoader, LoadImage, LoadAudio -> AudioEncoderLoader -> AudioEncoderEncode
    WanSoundImageToVideo(positive, negative, vae, width, height, length, audio, ref_image)

The models: the transformer has ComfyUI's fixed widths (head_dim 128, text_dim 4096,
audio_dim 1024, all 12 audio injectors; 5 blocks of width 256) so that UNETLoader detects it
from the file alone; the VAE (Wan 2.1, 127 M parameters, bf16 file) and wav2vec2 (large,
315 M, fp16 file like ComfyUI's) have the full size because ComfyUI hard-codes their widths.
All weights are random. They are built once (about 1 GB) and reused from the work folder.

Bypassed: ComfyUI's UMT5 class is the fixed umt5-xxl (5.7 B parameters), so CLIPLoader +
CLIPTextEncode are replaced by the helper node `WanS2VParityConditioning` (`scripts/parity/`),
which hands ComfyUI the embeddings our tiny UMT5 (d_model 4096) computed for the same prompts.
A second branch of the same graph ("audio features") also replaces LoadAudio +
AudioEncoderLoader + AudioEncoderEncode by our wav2vec2 hidden states, which tells a
difference in the audio encoder apart from one in the rest of the path; ComfyUI's own
encoder output is saved too and compared with ours layer by layer.

Noise and schedule: ComfyUI's KSampler draws the noise with torch.manual_seed(seed) on the
CPU, exactly what our sampler draws for chunk 0, and starts at sigma 1 (the simple scheduler
starts at sigma_max = 1 whatever the shift). Our schedule starts at shift(0.999); with one step
the shift only sets that first sigma, so the compared cases use a shift that rounds it to 1.0
(`MATCHED_SHIFT`), making both first steps x0 = noise - v(noise, t=1000). The "schedule gap"
row shows the difference at our default shift (informational).

Cases: numerics "comfyui" at cfg 1 and cfg > 1 (asserted; ComfyUI's CFG pairs the positive
prompt with the negative prompt + zeroed audio, as ours does); numerics "official"
(informational: the official audio alignment differs from ComfyUI's by design); a reference
image of another size than the video (informational: ComfyUI crops to the aspect ratio, then
scales bilinearly without antialiasing; our `cover_resize` scales with antialiasing, then crops).
The asserted cases use a reference image of exactly the video size, which both leave as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# scripts/ is not a package: comfyui_server is imported from this folder.
from comfyui_server import REPO_ROOT, ComfyUIError, ComfyUIServer

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HELPER_NODES = Path(__file__).resolve().parent / "parity"
HELPER_LINK_NAME = "wan_s2v_parity_nodes"

#: The transformer: ComfyUI detects dim, ffn_dim, num_layers from the tensors and assumes
#: head_dim 128, text_dim 4096, audio_dim 1024 and the 12 official audio injectors.
PARITY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 128,
    "ffn_dim": 512,
    "num_layers": 5,
    "text_dim": 4096,
    "audio_dim": 1024,
    "num_audio_token": 4,
}
FILES = {
    "transformer": "diffusion_models/wan_s2v_parity_transformer.safetensors",
    "vae": "vae/wan_s2v_parity_vae.safetensors",
    "audio_encoder": "audio_encoders/wan_s2v_parity_wav2vec2_fp16.safetensors",
    "text_encoder": "text_encoders/wan_s2v_parity_umt5.safetensors",  # read by our side only
}
IMAGE_NAME = "wan_s2v_parity_ref.png"
RESIZED_IMAGE_NAME = "wan_s2v_parity_ref_other_size.png"
AUDIO_NAME = "wan_s2v_parity_speech.wav"
TEXT_NAME = "wan_s2v_parity_text.safetensors"
FEATURES_NAME = "wan_s2v_parity_audio.safetensors"
MANIFEST = "wan_s2v_parity_models.json"
SAVED_AUDIO_FEATURES = "comfyui_audio_features"
#: The graph's two audio branches: ComfyUI's own wav2vec2, or our hidden states (helper node).
AUDIO_SOURCES = ("native", "features")
#: Every sampler branch of the graph: (audio encoder output node, reference image node).
BRANCHES = {
    "native": ("audio_native", "image"),
    "features": ("audio_features", "image"),
    "resized": ("audio_features", "image_resized"),  # a reference image of another size
}
MODELS_VERSION = 1

#: A shift that makes our first sigma shift(0.999) round to 1.0 in float32 (1 - sigma ~ 1e-9).
MATCHED_SHIFT = 1e6
COMFY_SHIFT = 3.0  # ModelSamplingSD3; with the simple scheduler the first sigma is 1 whatever it is
DEFAULT_TOLERANCE = 1e-5  # relative L2 for the asserted cases


@dataclass
class ParitySettings:
    """Inputs shared by both sides. length: ComfyUI's video length (4k + 1); our chunk has the
    same latent frames (frames_per_chunk = 4 * ((length - 1) // 4 + 1))."""

    width: int = 96
    height: int = 64
    length: int = 13
    seed: int = 42
    guidance: float = 4.5
    prompt: str = "A woman with long dark hair talks to the camera in a bright kitchen."
    negative_prompt: str = "Low quality, blurry, static, still picture, worst quality, deformed face."
    audio_seconds: float = 1.3
    other_image_size: tuple[int, int] = (128, 100)  # (width, height) of the "resized" case's image
    model_seed: int = 0
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def frames_per_chunk(self) -> int:
        return 4 * ((self.length - 1) // 4 + 1)


@dataclass
class ParityRow:
    """One comparison. tolerance None = informational (not asserted)."""

    case: str
    numerics: str
    cfg: float
    first_sigma: float
    max_abs: float
    rel_l2: float
    tolerance: float | None

    @property
    def passed(self) -> bool:
        return self.tolerance is None or (math.isfinite(self.rel_l2) and self.rel_l2 <= self.tolerance)


@dataclass
class ParityReport:
    rows: list[ParityRow]
    settings: ParitySettings
    reference_norm: dict[float, float] = field(default_factory=dict)  # ||x0_comfy|| / sqrt(n) per cfg
    seconds: dict[str, float] = field(default_factory=dict)
    audio_layer_rel_l2: list[float] = field(
        default_factory=list
    )  # our wav2vec2 states vs ComfyUI's, per layer

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)


# ----------------------------------------------------------------------------- models


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def _perturb(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Noise on every parameter, so that norm scales and zero biases differ too (a tensor
    loaded into the wrong place then changes the output)."""
    for parameter in model.parameters():
        parameter.add_(torch.randn_like(parameter) * std)
    return model.eval()


@torch.no_grad()
def _random_wav2vec2(seed: int):
    """wav2vec2-large (xlsr-53-english structure, what ComfyUI's loader hard-codes) with random
    weights, built on the meta device and filled directly (the default init takes ~15 s)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from trainer.model.audio_encoder import XLSR53_ENGLISH_CONFIG

    with torch.device("meta"):
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**XLSR53_ENGLISH_CONFIG))
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if parameter.ndim == 1 and "norm" in name and name.endswith("weight"):
            parameter.copy_(1.0 + 0.1 * noise)  # layer norm scales
        elif parameter.ndim == 1:
            parameter.copy_(0.02 * noise)  # biases, masked_spec_embed
        elif "original0" in name or name.endswith("weight_g"):
            parameter.copy_(1.0 + 0.1 * noise)  # positional conv weight-norm magnitude
        else:
            fan_in = parameter[0].numel()
            parameter.copy_(noise / math.sqrt(fan_in))
    for buffer in model.buffers():
        buffer.zero_()
    return model.eval()


def build_parity_models(models_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the parity models into `models_dir` (a ComfyUI `models` folder layout); reuses
    them when a manifest of the same version and seed is there. Returns the file paths."""
    from diffusers import AutoencoderKLWan

    from trainer.model.audio_encoder import save_audio_encoder
    from trainer.model.text_encoder import load_tokenizer, save_text_encoder
    from trainer.model.tiny import build_tiny_text_encoder, train_tiny_tokenizer
    from trainer.model.transformer_io import save_transformer
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel
    from trainer.model.vae import save_vae

    paths = {name: models_dir / rel for name, rel in FILES.items()}
    manifest = models_dir / MANIFEST
    wanted = {"version": MODELS_VERSION, "seed": seed, "transformer": PARITY_TRANSFORMER_CONFIG}
    if (
        manifest.is_file()
        and json.loads(manifest.read_text()) == wanted
        and all(p.is_file() for p in paths.values())
    ):
        return paths
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)

    with _seeded(seed):
        transformer = _perturb(WanS2VTransformer3DModel(**PARITY_TRANSFORMER_CONFIG))
    save_transformer(transformer, paths["transformer"], layout="comfyui")
    del transformer

    with _seeded(seed + 1):
        vae = _perturb(AutoencoderKLWan())  # the Wan 2.1 VAE's own widths
    save_vae(vae, paths["vae"], layout="comfyui", dtype=torch.bfloat16)
    del vae

    spiece = train_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(spiece)
        tokenizer = load_tokenizer(Path(tmp) / "spiece.model")
    text_encoder = build_tiny_text_encoder(PARITY_TRANSFORMER_CONFIG["text_dim"], seed + 2)
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise RuntimeError("tiny tokenizer larger than the text encoder's vocabulary")
    save_text_encoder(text_encoder, paths["text_encoder"], "comfyui", spiece_model=spiece)
    del text_encoder

    audio_encoder = _random_wav2vec2(seed + 3)
    save_audio_encoder(audio_encoder, paths["audio_encoder"], "comfyui", dtype=torch.float16)
    del audio_encoder

    manifest.write_text(json.dumps(wanted))
    return paths


# ----------------------------------------------------------------------------- inputs


def make_reference_image(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth colourful [H, W, 3] uint8 image (gradients, a disc and low-frequency noise)."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 9.0)], -1)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.45) ** 2) < (min(width, height) * 0.3) ** 2
    image[disc] = image[disc] * 0.3 + np.array([0.9, 0.6, 0.4], np.float32) * 0.7
    image += rng.uniform(-0.08, 0.08, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def make_speech(seconds: float, seed: int, rate: int = 16_000) -> np.ndarray:
    """Speech-like int16 mono audio: a gliding harmonic voice with syllable-rate amplitude."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t) ** 2
    signal = 0.25 * voice * envelope + 0.01 * rng.randn(len(t))
    return np.clip(signal * 32767, -32768, 32767).astype(np.int16)


def write_inputs(folder: Path, settings: ParitySettings) -> tuple[Path, Path, Path]:
    """The reference PNGs (the target size and `other_image_size`) and the 16 kHz mono wav in
    `folder` (ComfyUI's input folder)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / IMAGE_NAME
    Image.fromarray(make_reference_image(settings.width, settings.height, settings.seed)).save(image_path)
    resized_path = folder / RESIZED_IMAGE_NAME
    Image.fromarray(make_reference_image(*settings.other_image_size, settings.seed)).save(resized_path)
    audio_path = folder / AUDIO_NAME
    with wave.open(str(audio_path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(make_speech(settings.audio_seconds, settings.seed).tobytes())
    return image_path, resized_path, audio_path


# ----------------------------------------------------------------------------- our side


class _FirstStepTaken(Exception):
    """Raised from the progress callback once the first prediction is captured."""


def sampler_config(settings: ParitySettings, numerics: str, guidance: float, shift: float):
    """Our settings for one chunk of `frames_per_chunk` frames, one Euler step (shift 0 = ours)."""
    from trainer.sample.config import SamplerConfig

    return SamplerConfig(
        prompt=settings.prompt,
        negative_prompt=settings.negative_prompt,
        width=settings.width,
        height=settings.height,
        frames_per_chunk=settings.frames_per_chunk,
        max_chunks=1,
        steps=1,
        guidance=guidance,
        shift=shift,
        seed=settings.seed,
        scheduler="euler",
        cfg_mode="batch",
        numerics=numerics,
    )


def our_first_prediction(bundle, image_path: Path, audio_path: Path, config) -> tuple[torch.Tensor, float]:
    """Our sampler's first-step prediction x0 [1, 16, T, h, w] (normalised latents) and the
    first sigma, taken from its progress callback; sampling stops right after (no decode)."""
    from trainer.sample.pipeline import make_scheduler, sample_s2v

    captured: dict[str, torch.Tensor] = {}

    def progress(step: int, total: int, preview: torch.Tensor | None) -> None:
        captured["x0"] = preview.detach().float().cpu().clone()
        raise _FirstStepTaken

    with contextlib.suppress(_FirstStepTaken):
        sample_s2v(bundle, str(image_path), str(audio_path), config, progress=progress)
    if "x0" not in captured:
        raise RuntimeError("the sampler finished without reporting a step")
    first_sigma = float(make_scheduler(config.resolved()[0]).sigmas[0])
    return captured["x0"], first_sigma


def text_embeddings(bundle, settings: ParitySettings) -> dict[str, torch.Tensor]:
    """Our encoder's embeddings of the positive and negative prompts, [1, 512, 4096] each,
    computed as `sample_s2v` computes them."""
    from trainer.model.text_encoder import encode_prompt

    cfg, _ = sampler_config(settings, "comfyui", settings.guidance, MATCHED_SHIFT).resolved()
    return {
        "positive": encode_prompt(bundle.text_encoder, bundle.tokenizer, [cfg.prompt]).float().contiguous(),
        "negative": encode_prompt(bundle.text_encoder, bundle.tokenizer, [cfg.negative_prompt])
        .float()
        .contiguous(),
    }


def audio_hidden_states(bundle, audio_path: Path) -> dict[str, torch.Tensor]:
    """Our wav2vec2 hidden states [25, N, 1024] of the speech, as `sample_s2v` computes them."""
    from trainer.media import decode_audio_file, speech_16k_mono
    from trainer.model.audio_encoder import encode_speech

    wave_, rate = decode_audio_file(audio_path)
    speech = speech_16k_mono(wave_, rate)
    return {
        "hidden_states": encode_speech(bundle.audio_encoder, speech).contiguous(),
        "num_samples": torch.tensor([len(speech)]),
    }


# ----------------------------------------------------------------------------- ComfyUI side


def comfy_graph(settings: ParitySettings, cfg: float, prefix: str) -> dict[str, dict[str, Any]]:
    """The API-format graph; its `BRANCHES` share the model, VAE and text:

    - "native": LoadAudio -> AudioEncoderLoader -> AudioEncoderEncode -> WanSoundImageToVideo
      -> KSampler -> SaveLatent (and the encoder output saved for the per-layer comparison);
    - "features": our wav2vec2 hidden states (helper node) -> WanSoundImageToVideo -> KSampler;
    - "resized": as "features" with a reference image WanSoundImageToVideo has to resize.
    """

    def node(class_type: str, **inputs: Any) -> dict[str, Any]:
        return {"class_type": class_type, "inputs": inputs}

    graph = {
        "unet": node("UNETLoader", unet_name=Path(FILES["transformer"]).name, weight_dtype="default"),
        "shift": node("ModelSamplingSD3", model=["unet", 0], shift=COMFY_SHIFT),
        "vae": node("VAELoader", vae_name=Path(FILES["vae"]).name),
        "pos": node("WanS2VParityConditioning", file=TEXT_NAME, key="positive"),
        "neg": node("WanS2VParityConditioning", file=TEXT_NAME, key="negative"),
        "image": node("LoadImage", image=IMAGE_NAME),
        "image_resized": node("LoadImage", image=RESIZED_IMAGE_NAME),
        "audio": node("LoadAudio", audio=AUDIO_NAME),
        "audio_model": node("AudioEncoderLoader", audio_encoder_name=Path(FILES["audio_encoder"]).name),
        "audio_native": node("AudioEncoderEncode", audio_encoder=["audio_model", 0], audio=["audio", 0]),
        "audio_features": node("WanS2VParityAudioFeatures", file=FEATURES_NAME, key="hidden_states"),
        "save_audio": node(
            "WanS2VParitySaveAudioFeatures",
            audio_encoder_output=["audio_native", 0],
            name=SAVED_AUDIO_FEATURES,
        ),
    }
    for source, (audio, image) in BRANCHES.items():
        graph[f"s2v_{source}"] = node(
            "WanSoundImageToVideo",
            positive=["pos", 0],
            negative=["neg", 0],
            vae=["vae", 0],
            width=settings.width,
            height=settings.height,
            length=settings.length,
            batch_size=1,
            audio_encoder_output=[audio, 0],
            ref_image=[image, 0],
        )
        graph[f"sampler_{source}"] = node(
            "KSampler",
            model=["shift", 0],
            seed=settings.seed,
            steps=1,
            cfg=cfg,
            sampler_name="euler",
            scheduler="simple",
            positive=[f"s2v_{source}", 0],
            negative=[f"s2v_{source}", 1],
            latent_image=[f"s2v_{source}", 2],
            denoise=1.0,
        )
        graph[f"save_{source}"] = node(
            "SaveLatent", samples=[f"sampler_{source}", 0], filename_prefix=f"{prefix}_{source}"
        )
    return graph


def _extra_paths_yaml(work: Path, models_dir: Path) -> Path:
    """extra_model_paths config: our models folders and a custom_nodes folder holding only a
    link to the helper nodes."""
    custom_nodes = work / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / HELPER_LINK_NAME
    if not link.exists():
        link.symlink_to(HELPER_NODES, target_is_directory=True)
    folders = sorted({Path(rel).parts[0] for rel in FILES.values()})
    lines = ["wan_s2v_parity:", f"  base_path: {models_dir}"]
    lines += [f"  {name}: {name}" for name in folders]
    lines.append(f"  custom_nodes: {custom_nodes}")
    path = work / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


_LOAD_WARNINGS = (
    "unet missing",
    "unet unexpected",
    "Missing VAE keys",
    "missing audio encoder",
    "unexpected audio encoder",
)


@dataclass
class ComfyUIOutputs:
    """latents[(cfg, audio source)]: KSampler's saved latents (raw VAE space, as SaveLatent
    writes them); audio_features: AudioEncoderEncode's hidden states [L, N, D]."""

    latents: dict[tuple[float, str], torch.Tensor]
    audio_features: torch.Tensor


def run_comfyui(
    comfyui: str | os.PathLike,
    work: Path,
    models_dir: Path,
    settings: ParitySettings,
    cfgs: list[float],
    tensors: dict[str, dict[str, torch.Tensor]],
    timeout: float = 600.0,
) -> ComfyUIOutputs:
    """Start a server, queue the graph once per cfg and read back what it saved."""
    from safetensors.torch import load_file, save_file

    config = _extra_paths_yaml(work, models_dir)
    latents: dict[tuple[float, str], torch.Tensor] = {}
    with ComfyUIServer(comfyui, extra_args=["--extra-model-paths-config", str(config)]) as server:
        write_inputs(server.input_dir, settings)
        for name, group in tensors.items():
            save_file(group, str(server.input_dir / name))
        for cfg in cfgs:
            prefix = f"wan_s2v_parity/cfg_{cfg:g}".replace(".", "_")
            result = server.wait_for(server.queue_prompt(comfy_graph(settings, cfg, prefix)), timeout=timeout)
            for source in BRANCHES:
                saved = result.outputs[f"save_{source}"]["latents"][0]
                path = server.output_dir / saved.get("subfolder", "") / saved["filename"]
                latents[(cfg, source)] = load_file(str(path))["latent_tensor"].float()
        features_path = server.output_dir / "wan_s2v_parity" / f"{SAVED_AUDIO_FEATURES}.safetensors"
        audio_features = load_file(str(features_path))["hidden_states"]
        log = server.log_text()
    problems = [line for line in log.splitlines() if any(w in line for w in _LOAD_WARNINGS)]
    if problems:
        raise ComfyUIError("ComfyUI did not load every tensor of the parity models:\n" + "\n".join(problems))
    return ComfyUIOutputs(latents, audio_features)


# ----------------------------------------------------------------------------- comparison


def compare(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative L2 error ||ours - ref|| / ||ref||), in float64."""
    if ours.shape != reference.shape:
        raise ValueError(f"shapes differ: ours {tuple(ours.shape)}, ComfyUI {tuple(reference.shape)}")
    diff = ours.double() - reference.double()
    return diff.abs().max().item(), (diff.norm() / reference.double().norm()).item()


def default_work_dir() -> Path:
    """Where the parity models are kept between runs: env S2V_PARITY_DIR, else the user cache."""
    if os.environ.get("S2V_PARITY_DIR"):
        return Path(os.environ["S2V_PARITY_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "comfyui-wan-s2v-trainer" / "sampler-parity"


def run_parity(
    comfyui: str | os.PathLike,
    settings: ParitySettings | None = None,
    work_dir: str | os.PathLike | None = None,
    log=print,
) -> ParityReport:
    """Build the models (or reuse those in `work_dir`), run ComfyUI and ours; the report."""
    from trainer.model.vae import normalize_latents
    from trainer.sample.bundle import load_model_bundle

    settings = settings or ParitySettings()
    seconds: dict[str, float] = {}
    cfgs = [1.0] if settings.guidance == 1.0 else [1.0, settings.guidance]
    work = Path(work_dir) if work_dir else default_work_dir()
    models_dir = work / "models"
    start = time.perf_counter()
    log(f"models: {models_dir}")
    files = build_parity_models(models_dir, settings.model_seed)
    seconds["models"] = time.perf_counter() - start

    start = time.perf_counter()
    bundle = load_model_bundle(
        transformer=files["transformer"],
        vae=files["vae"],
        text_encoder=files["text_encoder"],
        audio_encoder=files["audio_encoder"],
        dtype=torch.float32,
        text_encoder_dtype=torch.float32,
    )
    with tempfile.TemporaryDirectory(prefix="s2v-parity-") as tmp:
        run_dir = Path(tmp)
        image_path, resized_path, audio_path = write_inputs(run_dir / "inputs", settings)
        our_audio = audio_hidden_states(bundle, audio_path)
        tensors = {TEXT_NAME: text_embeddings(bundle, settings), FEATURES_NAME: our_audio}
        seconds["load ours"] = time.perf_counter() - start

        start = time.perf_counter()
        log("running ComfyUI ...")
        comfy = run_comfyui(comfyui, run_dir, models_dir, settings, cfgs, tensors)
        seconds["ComfyUI"] = time.perf_counter() - start
        reference = {key: normalize_latents(latent, bundle.vae) for key, latent in comfy.latents.items()}

        start = time.perf_counter()
        log("running ours ...")
        rows = []
        for numerics in ("comfyui", "official"):
            tolerance = settings.tolerance if numerics == "comfyui" else None
            for cfg in cfgs:
                config = sampler_config(settings, numerics, cfg, MATCHED_SHIFT)
                ours, sigma = our_first_prediction(bundle, image_path, audio_path, config)
                for source in AUDIO_SOURCES:
                    max_abs, rel = compare(ours, reference[(cfg, source)])
                    rows.append(
                        ParityRow(
                            f"matched schedule, audio {source}", numerics, cfg, sigma, max_abs, rel, tolerance
                        )
                    )
        config = sampler_config(settings, "comfyui", cfgs[-1], 0.0)  # our default shift
        ours, sigma = our_first_prediction(bundle, image_path, audio_path, config)
        # against the "features" branch, so that only the schedule differs
        rows.append(
            ParityRow(
                "schedule gap: our default shift",
                "comfyui",
                cfgs[-1],
                sigma,
                *compare(ours, reference[(cfgs[-1], "features")]),
                None,
            )
        )
        config = sampler_config(settings, "comfyui", cfgs[-1], MATCHED_SHIFT)
        ours, sigma = our_first_prediction(bundle, resized_path, audio_path, config)
        width, height = settings.other_image_size
        rows.append(
            ParityRow(
                f"reference {width}x{height} resized",
                "comfyui",
                cfgs[-1],
                sigma,
                *compare(ours, reference[(cfgs[-1], "resized")]),
                None,
            )
        )
        seconds["ours"] = time.perf_counter() - start
    layer_errors = [
        compare(ours_layer, theirs)[1]
        for ours_layer, theirs in zip(our_audio["hidden_states"], comfy.audio_features)
    ]
    norms = {
        cfg: (
            reference[(cfg, "native")].double().norm() / math.sqrt(reference[(cfg, "native")].numel())
        ).item()
        for cfg in cfgs
    }
    return ParityReport(rows, settings, norms, seconds, layer_errors)


def format_report(report: ParityReport) -> str:
    s = report.settings
    lines = [
        (
            f"first-step prediction x0 vs ComfyUI (WanSoundImageToVideo + KSampler euler/simple, 1 step, "
            f"seed {s.seed}, {s.width}x{s.height}, length {s.length})"
        ),
        f"{'case':32} {'numerics':9} {'cfg':>4} {'sigma0':>10} {'max abs':>10} {'rel L2':>10}  result",
    ]
    for row in report.rows:
        result = "info" if row.tolerance is None else ("ok" if row.passed else "FAIL")
        limit = "" if row.tolerance is None else f" (<= {row.tolerance:.0e})"
        lines.append(
            f"{row.case:32} {row.numerics:9} {row.cfg:>4g} {row.first_sigma:>10.7f} "
            f"{row.max_abs:>10.3e} {row.rel_l2:>10.3e}  {result}{limit}"
        )
    if report.audio_layer_rel_l2:
        errors = report.audio_layer_rel_l2
        worst = max(range(len(errors)), key=errors.__getitem__)
        lines.append(
            f"wav2vec2 hidden states, ours vs ComfyUI's AudioEncoderEncode (rel L2): layers 0-{len(errors) - 2} "
            f"<= {max(errors[:-1]):.1e}, layer {len(errors) - 1}: {errors[-1]:.1e} (worst: layer {worst})"
        )
    lines.append(
        "ComfyUI x0 rms: " + ", ".join(f"cfg {c:g}: {n:.3f}" for c, n in report.reference_norm.items())
    )
    lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()))
    lines.append("PASS" if report.passed else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--comfyui",
        default=os.environ.get("COMFYUI_PATH"),
        help="ComfyUI checkout (default: env COMFYUI_PATH)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="relative L2 limit of the asserted (numerics comfyui) cases",
    )
    parser.add_argument("--cfg", type=float, default=4.5, help="guidance of the cfg > 1 cases")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the models are built and reused (default: env S2V_PARITY_DIR, else "
        "~/.cache/comfyui-wan-s2v-trainer/sampler-parity)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("pass --comfyui or set COMFYUI_PATH")
    settings = ParitySettings(seed=args.seed, guidance=args.cfg, tolerance=args.tolerance)
    try:
        report = run_parity(args.comfyui, settings, args.work_dir)
    except ComfyUIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(
            json.dumps([row.__dict__ | {"passed": row.passed} for row in report.rows], indent=1)
        )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
