"""The UMT5 tokenizer is built from a SentencePiece model without the protobuf package and
gives SentencePiece's own ids (what ComfyUI tokenizes its text encoder files with)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from trainer.model.spiece import SentencePieceModelError, read_spiece_model, t5_tokenizer_from_spiece
from trainer.model.tiny import _CORPUS, build_tiny_model_set, train_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXTS = [
    "A woman talks to the camera.",
    "  double  spaces\tand\ttabs \n newline ",
    "ｆｕｌｌ　ｗｉｄｔｈ ﬁne café",  # NFKC folds these: the precompiled map must be applied
    "<speaker> says @@ hi",  # user-defined pieces come out whole, after the dummy prefix
    "x@@y <speaker><speaker>",
    "",
    "日本語 テキスト unknown ☃ char",
]


def _nfkc_model_with_symbols() -> bytes:
    """A model like UMT5's: nmt_nfkc normalization, plus user-defined and control pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4 + ["ｆｕｌｌ　ｗｉｄｔｈ café naïve 日本語 テキスト"] * 3),
        model_writer=model, vocab_size=300, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        normalization_rule_name="nmt_nfkc", user_defined_symbols=["<speaker>", "@@"], control_symbols=["<ctl>"],
    )
    return model.getvalue()


@pytest.fixture(scope="module", params=["tiny", "nfkc_with_symbols"])
def spiece(request) -> bytes:
    return train_tiny_tokenizer() if request.param == "tiny" else _nfkc_model_with_symbols()


def _sentencepiece_ids(spiece: bytes, texts: list[str]) -> list[list[int]]:
    processor = spm.SentencePieceProcessor(model_proto=spiece, add_eos=True)
    return [processor.encode(text) for text in texts]


def test_same_ids_as_sentencepiece(spiece):
    ours = t5_tokenizer_from_spiece(spiece)
    assert len(ours) == spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    assert [ours(text).input_ids for text in TEXTS] == _sentencepiece_ids(spiece, TEXTS)
    assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2)


def test_control_pieces_in_the_text_are_special_tokens():
    """As in transformers' T5 tokenizers (the official Wan2.2 code's), where SentencePiece
    would spell them out in ordinary pieces."""
    ours = t5_tokenizer_from_spiece(_nfkc_model_with_symbols())
    ctl, eos = ours.convert_tokens_to_ids(["<ctl>", "</s>"])
    assert ours("hi <ctl>").input_ids[-2:] == [ctl, eos]
    assert ours("hi </s>").input_ids[-2:] == [eos, eos]


def test_pieces_and_normalization_map_are_read(spiece):
    pieces, charsmap = read_spiece_model(spiece)
    processor = spm.SentencePieceProcessor(model_proto=spiece)
    assert [p.piece for p in pieces] == [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    assert [round(p.score, 4) for p in pieces] == [round(processor.get_score(i), 4) for i in range(len(pieces))]
    assert charsmap is not None and len(charsmap) > 1000


@pytest.mark.parametrize("data", [b"", b"\x0a\xff\xff\xff", b"not a sentencepiece model at all"])
def test_other_bytes_are_refused(data):
    with pytest.raises(SentencePieceModelError):
        t5_tokenizer_from_spiece(data)


def test_comfyui_text_encoder_loads_without_protobuf(tmp_path):
    """The embedded `spiece_model` of a ComfyUI file, in a process where protobuf and
    tiktoken cannot be imported (a fresh environment with only the pack's requirements)."""
    paths = build_tiny_model_set(tmp_path / "tiny", seed=0)
    script = (
        "import sys, json\n"
        "for name in ('google', 'google.protobuf', 'tiktoken'):\n"
        "    sys.modules[name] = None\n"
        "from trainer.model.text_encoder import load_text_encoder\n"
        f"_, tokenizer = load_text_encoder({str(paths['text_encoder_comfyui'])!r})\n"
        f"print(json.dumps([tokenizer(t).input_ids for t in {TEXTS!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == _sentencepiece_ids(train_tiny_tokenizer(), TEXTS)
