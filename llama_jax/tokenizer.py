"""SentencePiece tokenizer: load and use any `.model`, train LLaMA-style BPE models, extend a vocabulary."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from llama_jax.paths import PathLike

# LLaMA 2's trainer settings (read from Meta's tokenizer.model), plus knobs that keep small corpora fast:
# a soft vocab limit (a tiny corpus may support fewer pieces) and sampling of at most 1M sentences.
LLAMA_TRAINER_OPTIONS: dict[str, object] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "split_digits": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "allow_whitespace_only_pieces": True,
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "character_coverage": 0.99995,
    "max_sentencepiece_length": 16,
    "max_sentence_length": 4192,
    "hard_vocab_limit": False,
    "input_sentence_size": 1_000_000,
    "shuffle_input_sentence": True,
    "num_threads": os.cpu_count() or 1,
    "minloglevel": 2,
}


def _sentencepiece_property(name: str) -> property:
    """A read-only int property forwarding to the sentencepiece processor's method `name`."""
    return property(lambda self: int(getattr(self.sp, name)()), doc=f"sentencepiece `{name}()`")


class Tokenizer:
    """A thin, typed face over `sentencepiece.SentencePieceProcessor`; BOS/EOS are added only on request."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path} (pass a sentencepiece .model file)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path} is not a readable sentencepiece model ({e})") from None

    @overload
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...
    @overload
    def encode(self, text: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]: ...

    def encode(self, text: str | list[str], bos: bool = False, eos: bool = False) -> list[int] | list[list[int]]:
        """Token ids of one string, or of each string in a list (batched in C++)."""
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids (a list, or a 1-D numpy/jax array)."""
        return self.sp.decode([int(i) for i in ids])

    vocab_size = _sentencepiece_property("vocab_size")
    bos_id = _sentencepiece_property("bos_id")
    eos_id = _sentencepiece_property("eos_id")
    pad_id = _sentencepiece_property("pad_id")
    unk_id = _sentencepiece_property("unk_id")

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @classmethod
    def train(
        cls,
        inputs: PathLike | Sequence[PathLike] | Iterator[str],
        vocab_size: int,
        out_prefix: PathLike,
        *,
        overwrite: bool = False,
        **options: object,
    ) -> Tokenizer:
        """Train a LLaMA-style BPE model, write `{out_prefix}.model` and `.vocab`, and load it.

        `inputs` is a text file, a list of text files, or an iterator of strings (e.g. documents from a dataset);
        strings are split into lines, as sentencepiece skips sentences longer than `max_sentence_length`.
        `options` override LLAMA_TRAINER_OPTIONS (any `SentencePieceTrainer.train` keyword).
        """
        out_prefix = Path(out_prefix)
        model_path = out_prefix.with_name(out_prefix.name + ".model")
        _check_writable(model_path, overwrite)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        _train_sentencepiece(
            **_input_options(inputs),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            **{**LLAMA_TRAINER_OPTIONS, **options},
        )
        return cls(model_path)

    @classmethod
    def extend(
        cls,
        base_model: PathLike,
        corpus_files: Sequence[PathLike],
        new_pieces: int,
        out_path: PathLike,
        *,
        overwrite: bool = False,
        **options: object,
    ) -> Tokenizer:
        """Append up to `new_pieces` pieces learned on `corpus_files` that `base_model` lacks; write `out_path`.

        A BPE model is trained on the corpus; its pieces absent from the base are appended in its merge order, with
        scores below every ranked base merge, so existing ids stay and old merges keep priority: text in which no new
        piece can form (e.g. English after adding Chinese) encodes exactly as before. The model's embeddings must
        then grow to the new vocab_size.
        """
        if new_pieces < 1:
            raise ValueError(f"new_pieces must be a positive number of pieces to add, got {new_pieces}")
        out_path = Path(out_path)
        _check_writable(out_path, overwrite)
        base = cls(base_model)
        proto = model_pb2.ModelProto()
        proto.ParseFromString(base.sp.serialized_model_proto())
        if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
            raise ValueError(f"{base.path} is not a BPE model; extend supports BPE models such as LLaMA's")
        known = {p.piece for p in proto.pieces}

        # The BPE trainer always keeps the corpus' characters; ask for room for them plus twice the pieces wanted,
        # since some learned pieces are already in the base vocabulary (the limit is soft).
        corpus = _input_options(list(corpus_files))
        learned_proto = io.BytesIO()
        _train_sentencepiece(
            **corpus,
            model_writer=learned_proto,
            vocab_size=2 * new_pieces + len(_distinct_chars(corpus["input"])) + 3,
            **{**LLAMA_TRAINER_OPTIONS, "byte_fallback": False, **options},
        )
        learned = model_pb2.ModelProto()
        learned.ParseFromString(learned_proto.getvalue())
        normal = model_pb2.ModelProto.SentencePiece.NORMAL
        candidates = [p.piece for p in learned.pieces if p.type == normal and p.piece not in known]
        if not candidates:
            raise ValueError(f"every piece learned on {corpus['input']} is already in {base.path}; nothing to add")

        # Whitespace-only pieces carry a -1e9 sentinel score in LLaMA models (merged last); rank below the rest.
        score = min(p.score for p in proto.pieces if p.type == normal and p.score > -1e8)
        for piece in candidates[:new_pieces]:
            score -= 1.0
            proto.pieces.add(piece=piece, score=score, type=normal)
        proto.trainer_spec.vocab_size = len(proto.pieces)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(proto.SerializeToString())
        return cls(out_path)


def _train_sentencepiece(**kwargs: object) -> None:
    """SentencePieceTrainer.train with its errors (vocab too small for the corpus' characters, ...) as ValueError."""
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {e}") from None


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output or pass overwrite=True (--overwrite)")


def _input_options(inputs: PathLike | Sequence[PathLike] | Iterable[str]) -> dict[str, object]:
    """Trainer keywords for files (`input=`) or an iterator of text (`sentence_iterator=`)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("no training input files given")
        for f in inputs:
            if not Path(f).is_file():
                raise FileNotFoundError(f"training input file not found: {f} (pass strings as an iterator, not a list)")
        return {"input": [str(f) for f in inputs]}
    return {"sentence_iterator": (line for text in inputs for line in text.splitlines())}


def _distinct_chars(files: list[str]) -> set[str]:
    chars: set[str] = set()
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                chars.update(line)
    return chars
