"""The frozen encoders used to build the caches, loaded lazily and released afterwards."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def file_identity(path: str | Path) -> str:
    """Cheap identity of model weights (path, sizes and mtimes; hashing 10 GB would be slow)."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [str(path)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files[:200]]
    return "|".join(parts)


@dataclass
class Encoders:
    """Paths of the VAE, UMT5 and wav2vec2 (ComfyUI files or Diffusers folders); each model is
    loaded on first use and dropped by `release()`.

    A path left None means "cached only": `build_dataset` then takes that encoder's items from
    the cache (made with whichever weights made most of them) and raises `CacheMissingError`
    if one is missing; `Encoders()` opens a fully cached dataset without any model file.
    """

    vae_path: str | None = None
    text_encoder_path: str | None = None
    audio_encoder_path: str | None = None
    tokenizer_path: str | None = None
    device: str = "cpu"
    vae_dtype: torch.dtype = torch.float32
    text_dtype: torch.dtype = torch.bfloat16
    audio_dtype: torch.dtype = torch.float32
    _models: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def tiny(cls, out_dir: str | Path, device: str = "cpu") -> Encoders:
        """The built-in tiny model set (random weights), built once into `out_dir`."""
        from ..model.tiny import build_tiny_model_set

        out = Path(out_dir)
        root = out / "diffusers"
        if not (root / "model_index.json").is_file():
            build_tiny_model_set(out)
        return cls(str(root / "vae"), str(root / "text_encoder"), str(root / "audio_encoder"),
                   str(root / "tokenizer"), device=device, text_dtype=torch.float32)

    def _path(self, name: str) -> str | None:
        return {"vae": self.vae_path, "text": self.text_encoder_path, "audio": self.audio_encoder_path}[name]

    def available(self, name: str) -> bool:
        """Whether encoder `name` ("vae", "text", "audio") has weights to load (else cached only)."""
        return bool(self._path(name))

    def identity(self, name: str) -> str:
        path = self._path(name)
        if not path:
            raise ValueError(f"no {name} encoder path given (needed to build the {name} cache)")
        return file_identity(path) + f"|{self._dtype(name)}"

    def _dtype(self, name: str) -> torch.dtype:
        """The dtype encoder `name` computes in, which its cache entries record: the VAE
        computes in bfloat16 on CUDA whatever dtype its weights load in
        (`trainer.model.vae.compute_dtype`)."""
        if name == "vae":
            from ..model.vae import compute_dtype

            return compute_dtype(self.vae_dtype, self.device)
        return {"text": self.text_dtype, "audio": self.audio_dtype}[name]

    @property
    def vae(self):
        if "vae" not in self._models:
            from ..model.vae import load_vae

            self.identity("vae")
            self._models["vae"] = load_vae(self.vae_path, dtype=self.vae_dtype, device=self.device)
        return self._models["vae"]

    @property
    def text(self):
        if "text" not in self._models:
            from ..model.text_encoder import load_text_encoder

            self.identity("text")
            self._models["text"] = load_text_encoder(self.text_encoder_path, dtype=self.text_dtype, device=self.device,
                                                     tokenizer_path=self.tokenizer_path)
        return self._models["text"]

    @property
    def audio(self):
        if "audio" not in self._models:
            from ..model.audio_encoder import load_audio_encoder

            self.identity("audio")
            self._models["audio"] = load_audio_encoder(self.audio_encoder_path, dtype=self.audio_dtype,
                                                       device=self.device)
        return self._models["audio"]

    def audio_shape(self) -> tuple[int, int]:
        """(hidden states, width) of the audio encoder's features: (25, 1024) for wav2vec2-large."""
        config = self.audio.config
        return config.num_hidden_layers + 1, config.hidden_size

    @property
    def loaded(self) -> list[str]:
        return sorted(self._models)

    def release(self) -> None:
        """Drop every loaded encoder and free its memory (training then holds only the transformer)."""
        self._models.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
