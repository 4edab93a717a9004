"""Tokenizer: loading, encode/decode, LLaMA-style training, vocabulary extension."""

from pathlib import Path

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from llama_jax import Tokenizer
from llama_jax.cli import main

ENGLISH = "Hello world! In 2023, Meta released Llama 2 -- 7B, 13B and 70B parameters.\n  Indented line.\tTab."
CHINESE_LINES = [
    "我们今天去北京参观故宫，天气很好。",
    "中国的历史非常悠久，文化博大精深。",
    "他喜欢在图书馆里读书和学习新的知识。",
    "春天来了，公园里的花都开了，孩子们在草地上玩耍。",
    "科学技术的发展改变了人们的生活方式。",
    "妈妈在厨房里做饭，爸爸在客厅里看报纸。",
]


def _proto(tok: Tokenizer) -> model_pb2.ModelProto:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.sp.serialized_model_proto())
    return proto


@pytest.fixture
def play_100k(play_txt: Path, tmp_path: Path) -> Path:
    path = tmp_path / "play_100k.txt"
    path.write_text(play_txt.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return path


def test_load_llama_style_model(tokenizer_32k: Path):
    tok = Tokenizer(tokenizer_32k)
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    ids = tok.encode(ENGLISH)
    assert tok.decode(ids) == ENGLISH
    assert tok.decode(np.array(ids)) == ENGLISH
    assert tok.encode(ENGLISH, bos=True, eos=True) == [1, *ids, 2]
    assert tok.encode([ENGLISH, "hi"], bos=True) == [[1, *ids], [1, *tok.encode("hi")]]
    # A character outside the vocabulary falls back to its UTF-8 bytes (<0xF0> = id 3 + 0xF0) and round-trips.
    emoji = tok.encode("🦙")
    assert tok.id_to_piece(emoji[-4]) == "<0xF0>" and emoji[-4] == 3 + 0xF0
    assert tok.decode(emoji) == "🦙"


def test_load_errors_name_the_path(tmp_path: Path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer(garbage)


def test_train_llama_style(play_100k: Path, play_txt: Path, tmp_path: Path):
    tok = Tokenizer.train(play_100k, 500, tmp_path / "shk")
    assert tok.path == tmp_path / "shk.model" and (tmp_path / "shk.vocab").exists()
    proto = _proto(tok)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert (spec.model_type, spec.byte_fallback, spec.split_digits) == (model_pb2.TrainerSpec.BPE, True, True)
    assert (spec.allow_whitespace_only_pieces, norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces) == (
        True, "identity", True, False)
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (500, 0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]

    assert tok.decode(tok.encode(ENGLISH)) == ENGLISH  # identity normalization keeps whitespace runs and tabs
    assert [tok.id_to_piece(i) for i in tok.encode("2023")] == ["▁", "<0x32>", "<0x30>", "<0x32>", "<0x33>"]
    # 188 merges learned on 100 KB compress unseen text to 2.15 bytes per token (1.0 without merges).
    held_out = play_txt.read_text(encoding="utf-8")[200_000:220_000]
    assert len(held_out.encode()) / len(tok.encode(held_out)) > 2.0


def test_train_from_text_iterator_matches_file(play_100k: Path, tmp_path: Path):
    from_file = Tokenizer.train(play_100k, 400, tmp_path / "file")
    # One 100 KB document: it is split into lines, else sentencepiece would drop it as too long.
    from_text = Tokenizer.train(iter([play_100k.read_text(encoding="utf-8")]), 400, tmp_path / "text")
    pieces = [from_file.id_to_piece(i) for i in range(400)]
    assert pieces == [from_text.id_to_piece(i) for i in range(400)]
    assert len(set(pieces[259:])) == 400 - 259


def test_train_refuses_to_overwrite_and_bad_input(play_100k: Path, tmp_path: Path):
    Tokenizer.train(play_100k, 400, tmp_path / "t")
    with pytest.raises(FileExistsError, match="t.model"):
        Tokenizer.train(play_100k, 400, tmp_path / "t")
    assert Tokenizer.train(play_100k, 420, tmp_path / "t", overwrite=True).vocab_size == 420
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Tokenizer.train([play_100k, tmp_path / "missing.txt"], 400, tmp_path / "u")
    with pytest.raises(ValueError, match="Vocabulary size is smaller than required_chars"):
        Tokenizer.train(play_100k, 311, tmp_path / "v")  # 3 special + 256 byte + 53 character pieces = 312


@pytest.mark.parametrize("base_model, lowest_merge_score", [
    ("tokenizer_1k", -740), pytest.param("tokenizer_32k", -31740, marks=pytest.mark.shared("tokenizer_32k"))])
def test_extend_with_chinese(base_model: str, lowest_merge_score: float, play_100k: Path, tmp_path: Path, request):
    base_path = request.getfixturevalue(base_model)
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(CHINESE_LINES * 30), encoding="utf-8")
    base = Tokenizer(base_path)
    new = Tokenizer.extend(base_path, [corpus], 150, tmp_path / "zh.model")

    assert new.vocab_size == base.vocab_size + 150
    base_proto, new_proto = _proto(base), _proto(new)
    assert new_proto.pieces[: base.vocab_size] == base_proto.pieces  # existing ids, scores and types untouched
    added = new_proto.pieces[base.vocab_size :]
    assert all(p.type == model_pb2.ModelProto.SentencePiece.NORMAL for p in added)
    # Below every ranked base merge; only LLaMA's whitespace-run pieces keep their -1e9 sentinel lower.
    ranked = [p.score for p in base_proto.pieces if p.score > -1e8]
    assert max(p.score for p in added) < min(ranked) == lowest_merge_score
    assert len({p.piece for p in new_proto.pieces}) == new.vocab_size

    english = play_100k.read_text(encoding="utf-8")[:20_000] + ENGLISH
    assert new.encode(english) == base.encode(english)
    # 32k base: the corpus' sentences take 134 -> 36 tokens, a new sentence made of its words 30 -> 18.
    seen = "".join(CHINESE_LINES)
    assert 3 * len(new.encode(seen)) < len(base.encode(seen))
    unseen = "春天来了，我们去北京的公园里读书，学习科学技术和文化知识。"
    assert len(new.encode(unseen)) < 0.7 * len(base.encode(unseen))
    assert new.decode(new.encode(unseen)) == unseen

    with pytest.raises(FileExistsError, match="zh.model"):
        Tokenizer.extend(base_path, [corpus], 150, tmp_path / "zh.model")
    # Asking for more than the corpus offers adds all it has (232 pieces here); after that, nothing is left.
    full = Tokenizer.extend(base_path, [corpus], 1000, tmp_path / "full.model")
    assert new.vocab_size < full.vocab_size < base.vocab_size + 1000
    with pytest.raises(ValueError, match="already in"):
        Tokenizer.extend(full.path, [corpus], 10, tmp_path / "again.model")


def test_cli_train_and_extend(play_100k: Path, tokenizer_1k: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli" / "shk"
    assert main(["tokenizer", "train", "--input", str(play_100k), "--vocab-size", "400", "--out", str(out)]) == 0
    assert Tokenizer(f"{out}.model").vocab_size == 400
    assert main(["tokenizer", "train", "--input", str(play_100k), "--vocab-size", "400", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(CHINESE_LINES * 10), encoding="utf-8")
    extended = tmp_path / "zh.model"
    args = ["tokenizer", "extend", "--base", str(tokenizer_1k), "--corpus", str(corpus), "--new-pieces", "40"]
    assert main([*args, "--out", str(extended)]) == 0
    assert Tokenizer(extended).vocab_size == 1040
    assert main([*args[:3], str(tmp_path / "missing.model"), *args[4:], "--out", str(tmp_path / "x.model")]) == 2
    assert "missing.model" in capsys.readouterr().err
