"""UMT5-XXL text encoder (transformers `UMT5EncoderModel`) and its tokenizer.

Formats:
- Diffusers: a `text_encoder/` folder (config.json + safetensors) with `tokenizer/` beside it,
  or the pipeline root holding both.
- ComfyUI single file (`models/text_encoders/umt5_xxl_fp16.safetensors`,
  `umt5_xxl_fp8_e4m3fn_scaled.safetensors`): transformers' own key names (`shared.weight`,
  `encoder.block.N.layer.0.SelfAttention.q.weight`, ...), plus `spiece_model`, the serialized
  SentencePiece tokenizer as a uint8 tensor. The fp8 file stores Linear weights as
  float8_e4m3fn with a float32 `<module>.scale_weight` each and a `scaled_fp8` marker key;
  they are dequantized on load (w = fp8 * scale).

`encode_prompt` reproduces the official Wan text path: clean the prompt, tokenize to 512
tokens with the attention mask, encode, keep the real tokens and zero the padding.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from ..io_utils import atomic_files_into, atomic_folder
from .safetensors_reader import SafetensorsFile
from .single_file import (
    CheckpointKeyError,
    PathLike,
    check_loading_info,
    is_saved_model_folder,
    is_single_file,
    load_single_file,
    meta_device_init,
    quantize_scaled_fp8,
    read_header,
    save_single_file,
    state_dict_for_saving,
    transformers_dtype_kwargs,
)
from .spiece import t5_tokenizer_from_spiece

logger = logging.getLogger(__name__)

TEXT_LEN = 512
#: ComfyUI stores the SentencePiece model inside the text encoder file under this key.
SPIECE_KEY = "spiece_model"
#: Prefixes some single files put before transformers' names.
_KNOWN_PREFIXES = ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "transformer.", "text_encoder.")
#: UMT5-XXL (Wan's text encoder); a single file's config is read from its shapes.
UMT5_XXL_DEFAULTS = {
    "vocab_size": 256384, "d_model": 4096, "num_layers": 24, "num_heads": 64, "d_kv": 64, "d_ff": 10240,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6,
}


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: PathLike) -> PreTrainedTokenizerBase:
    """Tokenizer from a folder (tokenizer.json, spiece.model or tokenizer_config.json, in that
    order of preference) or a `spiece.model` file."""
    path = Path(path)
    if path.is_file():
        return t5_tokenizer_from_spiece(path.read_bytes())
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    if (path / "spiece.model").is_file():
        # read without transformers' conversion, which needs the protobuf package
        return t5_tokenizer_from_spiece((path / "spiece.model").read_bytes())
    if (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer_config.json or spiece.model")


def _is_tokenizer_location(path: Path) -> bool:
    if path.is_file():
        return path.name == "spiece.model"
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model"))


def _tokenizer_beside(file: Path) -> Path | None:
    """A tokenizer next to a single file: `<dir>/<stem>_tokenizer/`, `<dir>/tokenizer/`, or
    tokenizer files in the same folder."""
    for candidate in (file.parent / f"{file.stem}_tokenizer", file.parent / "tokenizer", file.parent):
        if _is_tokenizer_location(candidate):
            return candidate
    return None


def spiece_bytes(tokenizer_or_path: PreTrainedTokenizerBase | PathLike | bytes) -> bytes:
    """The serialized SentencePiece model of a tokenizer folder, a spiece.model file or a
    slow tokenizer (ComfyUI embeds it in its text encoder files)."""
    if isinstance(tokenizer_or_path, bytes):
        return tokenizer_or_path
    if isinstance(tokenizer_or_path, PreTrainedTokenizerBase):
        vocab_file = getattr(tokenizer_or_path, "vocab_file", None)
        if vocab_file and Path(vocab_file).is_file():
            return Path(vocab_file).read_bytes()
        raise ValueError("the tokenizer keeps no spiece.model; pass the spiece.model path instead")
    path = Path(tokenizer_or_path)
    return (path / "spiece.model").read_bytes() if path.is_dir() else path.read_bytes()


# ----------------------------------------------------------------------------- single file


def _strip_prefix(keys: Sequence[str]) -> str:
    for prefix in _KNOWN_PREFIXES:
        if any(k.startswith(prefix + "encoder.block.") for k in keys):
            return prefix
    return ""


def umt5_config_from_header(header: dict[str, tuple[tuple[int, ...], str]], prefix: str = "") -> UMT5Config:
    """UMT5 config from the tensor shapes of a single file (UMT5-XXL values otherwise)."""

    def shape(name: str) -> tuple[int, ...]:
        key = prefix + name
        if key not in header:
            raise CheckpointKeyError(
                f"not a UMT5 text encoder: no tensor '{key}'{_guess_text_encoder(set(header))}"
            )
        return header[key][0]

    vocab_size, d_model = shape("shared.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets, num_heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    pattern = re.compile(re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    num_layers = 1 + max(int(m.group(1)) for k in header if (m := pattern.match(k)))
    config = dict(UMT5_XXL_DEFAULTS)
    config.update(
        vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
        d_kv=inner // num_heads, d_ff=d_ff, relative_attention_num_buckets=buckets,
    )
    return UMT5Config(**config)


def _guess_text_encoder(keys: set[str]) -> str:
    """A hint about what a text encoder file is when it is not UMT5."""
    if any(".DenseReluDense.wi.weight" in k for k in keys):
        return " (this looks like an original T5 v1.0 encoder, not UMT5-XXL)"
    if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in keys and any(
        k.startswith("encoder.block.1.") for k in keys
    ):
        return " (relative attention only in block 0: a T5 v1.1 encoder such as t5xxl, not Wan's UMT5-XXL)"
    if any(k.startswith("text_model.") for k in keys):
        return " (this looks like a CLIP text encoder)"
    if any(k.startswith("model.layers.") for k in keys):
        return " (this looks like an LLM text encoder)"
    if any(k.startswith("blocks.0.attn.q") for k in keys) or "token_embedding.weight" in keys:
        return " (original Wan T5 names: convert the .pth to ComfyUI's umt5_xxl_fp16 layout first)"
    return ""


def _load_single_file(path: Path, dtype: torch.dtype, device: str | torch.device) -> UMT5EncoderModel:
    header = read_header(path)
    prefix = _strip_prefix(list(header))
    config = umt5_config_from_header(header, prefix)
    with meta_device_init():
        model = UMT5EncoderModel(config)

    def rename(key: str) -> str | None:
        if key == SPIECE_KEY:
            return None
        return key[len(prefix):] if prefix and key.startswith(prefix) else key

    # transformers keeps the FFN output projection in float32 when loading in float16
    keep_fp32 = (UMT5EncoderModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()
    load_single_file(
        model, path, rename, dtype, device, what="UMT5 text encoder",
        hint=lambda missing, unexpected: _guess_text_encoder(set(header)).strip(" ()") or None,
        keep_in_fp32=[f".{name}." for name in keep_fp32],
    )
    return model


def _embedded_spiece(path: Path) -> bytes | None:
    """The `spiece_model` tensor's bytes, read on its own (no mapping of the 11 GB file)."""
    reader = SafetensorsFile(path)
    if SPIECE_KEY not in reader.tensors:
        return None
    with reader.open() as handle:
        return reader.get_tensor(SPIECE_KEY, handle).numpy().tobytes()


def _single_file_tokenizer(path: Path, tokenizer_path: PathLike | None) -> PreTrainedTokenizerBase:
    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    spiece = _embedded_spiece(path)
    if spiece is not None:
        return t5_tokenizer_from_spiece(spiece)
    beside = _tokenizer_beside(path)
    if beside is not None:
        return load_tokenizer(beside)
    raise FileNotFoundError(
        f"{path.name} carries no tokenizer ('{SPIECE_KEY}') and none was found beside it "
        f"({path.stem}_tokenizer/, tokenizer/ or spiece.model/tokenizer.json in {path.parent}). "
        "Pass tokenizer_path: a folder with the UMT5 tokenizer (google/umt5-xxl) or its spiece.model."
    )


# ----------------------------------------------------------------------------- diffusers folder


def _diffusers_folders(path: Path, tokenizer_path: PathLike | None) -> tuple[Path, Path]:
    """(text_encoder folder, tokenizer folder) of a pipeline root or a text_encoder folder."""
    encoder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
    if not (encoder / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a text_encoder folder (config.json) nor a pipeline root")
    if tokenizer_path is not None:
        return encoder, Path(tokenizer_path)
    for candidate in (encoder.parent / "tokenizer", encoder / "tokenizer", encoder):
        if _is_tokenizer_location(candidate):
            return encoder, candidate
    raise FileNotFoundError(f"no tokenizer found for {encoder} (expected {encoder.parent / 'tokenizer'}); pass tokenizer_path")


def _load_diffusers(folder: Path, dtype: torch.dtype, device: str | torch.device) -> UMT5EncoderModel:
    model, info = UMT5EncoderModel.from_pretrained(
        str(folder), output_loading_info=True, **transformers_dtype_kwargs(dtype)
    )
    check_loading_info(info, f"UMT5 text encoder {folder}", ignore=UMT5EncoderModel._tied_weights_keys or ())
    return model.to(device)


# ----------------------------------------------------------------------------- public API


def load_text_encoder(
    path: PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    tokenizer_path: PathLike | None = None,
) -> tuple[UMT5EncoderModel, PreTrainedTokenizerBase]:
    """Load the UMT5 encoder (eval mode, frozen) and its tokenizer.

    `path`: a Diffusers `text_encoder/` folder, a pipeline root, or a ComfyUI single file
    (fp16/bf16 or scaled fp8). `tokenizer_path` overrides where the tokenizer comes from;
    a single file otherwise uses its embedded `spiece_model` or a tokenizer found beside it.
    Any missing or unexpected weight is a `CheckpointKeyError`.
    """
    path = Path(path)
    if is_single_file(path):
        model = _load_single_file(path, dtype, device)
        tokenizer = _single_file_tokenizer(path, tokenizer_path)
    else:
        encoder_folder, tokenizer_folder = _diffusers_folders(path, tokenizer_path)
        model = _load_diffusers(encoder_folder, dtype, device)
        tokenizer = load_tokenizer(tokenizer_folder)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text encoder only {model.config.vocab_size}")
    return model.eval().requires_grad_(False), tokenizer


def clean_prompt(text: str) -> str:
    """Official Wan prompt cleaning: ftfy (when installed), HTML unescape, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompt(
    text_encoder: UMT5EncoderModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | Sequence[str],
    max_length: int = TEXT_LEN,
) -> torch.Tensor:
    """Prompts -> text embeddings [B, max_length, d_model] (d_model 4096 for UMT5-XXL).

    Tokenized with padding to `max_length` and truncation, encoded with the attention mask;
    positions after each prompt's last real token (its `</s>`) are exactly zero, as in the
    official Wan code (cut to the real length, zero-pad back to max_length).
    Returned in the encoder's dtype on its device.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokens = tokenizer(
        [clean_prompt(p) for p in prompts], padding="max_length", max_length=max_length,
        truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    device = text_encoder.device
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    lengths = mask.gt(0).sum(dim=1)
    keep = torch.arange(max_length, device=device)[None, :] < lengths[:, None]
    return hidden * keep[..., None].to(hidden.dtype)


def comfyui_text_encoder_state_dict(
    model: UMT5EncoderModel,
    spiece_model: PreTrainedTokenizerBase | PathLike | bytes | None = None,
    dtype: torch.dtype | None = None,
    scaled_fp8: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict of a ComfyUI text encoder file: transformers' names without the tied
    `encoder.embed_tokens.weight`, optionally `spiece_model` and scaled-fp8 Linear weights."""
    state = state_dict_for_saving(model, dtype)
    if scaled_fp8:
        state = quantize_scaled_fp8(state, lambda key, value: value.ndim == 2 and ".layer." in key)
    if spiece_model is not None:
        state[SPIECE_KEY] = torch.frombuffer(bytearray(spiece_bytes(spiece_model)), dtype=torch.uint8)
    return state


def save_text_encoder(
    model: UMT5EncoderModel,
    path: PathLike,
    layout: str = "diffusers",
    tokenizer: PreTrainedTokenizerBase | None = None,
    spiece_model: PathLike | bytes | None = None,
    dtype: torch.dtype | None = None,
    scaled_fp8: bool = False,
) -> Path:
    """Save the encoder as a Diffusers folder (`layout="diffusers"`, with `tokenizer` saved to
    `<path>/../tokenizer`) or as a ComfyUI single file (`layout="comfyui"`, `spiece_model`
    embedded, optionally `scaled_fp8`). Written atomically (`trainer.io_utils`): an existing
    encoder folder is replaced only if it holds nothing but a saved model (else
    FileExistsError); tokenizer files are added to the tokenizer folder, others there stay.
    Returns the written path."""
    path = Path(path)
    if layout == "diffusers":
        if scaled_fp8:
            raise ValueError("scaled_fp8 is a ComfyUI single-file format")
        state = None if dtype is None else state_dict_for_saving(model, dtype)
        with atomic_folder(path, replaceable=is_saved_model_folder) as tmp:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            with atomic_files_into(path.parent / "tokenizer") as tmp:
                tokenizer.save_pretrained(str(tmp))
                if spiece_model is not None:
                    (tmp / "spiece.model").write_bytes(spiece_bytes(spiece_model))
        return path
    if layout == "comfyui":
        state = comfyui_text_encoder_state_dict(model, spiece_model, dtype, scaled_fp8)
        return save_single_file(state, path)
    raise ValueError(f"layout must be 'diffusers' or 'comfyui', got {layout!r}")


__all__ = [
    "SPIECE_KEY",
    "TEXT_LEN",
    "UMT5_XXL_DEFAULTS",
    "clean_prompt",
    "comfyui_text_encoder_state_dict",
    "encode_prompt",
    "load_text_encoder",
    "load_tokenizer",
    "save_text_encoder",
    "spiece_bytes",
    "umt5_config_from_header",
]
