"""T5 tokenizer from a serialized SentencePiece model, without the `protobuf` package.

transformers converts a `spiece.model` into its fast tokenizer by parsing the model with
`protobuf`; when that package is missing it silently falls back to a tiktoken reader and
fails. ComfyUI's text encoder files embed exactly such a model (`spiece_model`), so the
pack reads the few fields the conversion needs itself and builds the tokenizer in
transformers' T5 layout: Unigram pieces with their scores, the normalizer's precompiled
character map, Metaspace pre-tokenizer, `</s>` appended, control pieces as special tokens.
Its ids are SentencePiece's own (the library ComfyUI tokenizes this model with), on every
transformers version; transformers' own conversion agrees from 5.25 on, while earlier
versions split the text around user-defined pieces.

The SentencePiece model is a protobuf `ModelProto`
(sentencepiece/src/sentencepiece_model.proto): field 1 repeats `SentencePiece {piece = 1,
score = 2, type = 3}`, field 3 is `NormalizerSpec {precompiled_charsmap = 2}`. Only the
wire format's varint, 32-bit and length-delimited records occur in it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import PreTrainedTokenizerFast

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
#: The `SentencePiece.Type` of pieces matched in the text as special tokens.
_CONTROL = 3
#: T5's fixed special ids (Wan's UMT5 tokenizer keeps them).
_EOS_ID, _UNK_ID = 1, 2


class SentencePieceModelError(ValueError):
    """The bytes are not a serialized SentencePiece model."""


@dataclass(frozen=True)
class Piece:
    piece: str
    score: float
    type: int = 1  # NORMAL


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise SentencePieceModelError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of each record of one message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        elif wire == _BYTES:
            size, pos = _varint(data, pos)
            value = data[pos:pos + size]
            if len(value) != size:
                raise SentencePieceModelError("truncated record")
            pos += size
        elif wire in (_FIXED32, _FIXED64):
            size = 4 if wire == _FIXED32 else 8
            value = data[pos:pos + size]
            pos += size
        else:
            raise SentencePieceModelError(f"unexpected wire type {wire}")
        yield number, wire, value


def _piece(data: bytes) -> Piece:
    piece, score, kind = "", 0.0, 1
    for number, wire, value in _fields(data):
        if number == 1 and wire == _BYTES:
            piece = value.decode("utf-8")
        elif number == 2 and wire == _FIXED32:
            (score,) = struct.unpack("<f", value)
        elif number == 3 and wire == _VARINT:
            kind = value
    return Piece(piece, score, kind)


def read_spiece_model(data: bytes) -> tuple[list[Piece], bytes | None]:
    """The pieces (in id order) and the precompiled normalization map of a model."""
    pieces: list[Piece] = []
    charsmap = None
    for number, wire, value in _fields(data):
        if number == 1 and wire == _BYTES:
            pieces.append(_piece(value))
        elif number == 3 and wire == _BYTES:
            for inner, inner_wire, inner_value in _fields(value):
                if inner == 2 and inner_wire == _BYTES:
                    charsmap = inner_value or None
    if not pieces:
        raise SentencePieceModelError("no pieces: not a SentencePiece model")
    return pieces, charsmap


def t5_tokenizer_from_spiece(data: bytes) -> PreTrainedTokenizerFast:
    """The T5 tokenizer (pad 0, eos 1, unk 2, no sentinel ids) of a serialized
    SentencePiece model; SentencePiece's ids, with control pieces in the text matched whole."""
    pieces, charsmap = read_spiece_model(data)
    backend = Tokenizer(Unigram([(p.piece, p.score) for p in pieces], unk_id=_UNK_ID, byte_fallback=False))
    if charsmap is not None:
        backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", _EOS_ID)],
    )
    # User-defined pieces stay in the Unigram model, which emits them whole after the dummy
    # prefix as SentencePiece does; as added tokens they would split the text around them.
    backend.add_special_tokens([
        AddedToken(p.piece, normalized=False, special=True) for p in pieces if p.type == _CONTROL
    ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
