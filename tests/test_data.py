"""Pretraining data: packing, determinism, resume, per-process sharding, mixtures, bytes, sources, global batches."""

import json

import grain
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from llama_jax.config import Config, ConfigError, DataConfig, DataSource, LlamaConfig, MeshConfig
from llama_jax.data import build_train_data, build_validation_data, provision_tokenizer
from llama_jax.data.pipeline import window_count, windows
from llama_jax.data.sources import documents, open_source
from llama_jax.data.tokenized import token_stream
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import Tokenizer

SEQ = 16


def _text(seed: int, words: list[str], n: int = 1500) -> str:
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(n // 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small local text files with disjoint vocabularies, and a shared cache dir."""
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text(_text(0, ["the", "cat", "sat", "on", "a", "mat", "and", "was", "happy"]))
    (root / "b.txt").write_text(_text(1, ["QUICK", "BROWN", "FOX", "JUMPS", "OVER", "LAZY", "DOG"], n=600))
    return root


@pytest.fixture(scope="module")
def tok1k(tokenizer_1k):
    return Tokenizer(tokenizer_1k)


def _cfg(root, sources, **data) -> Config:
    data = {"cache_dir": str(root / "cache"), "seq_len": SEQ, **data}
    return Config(model=LlamaConfig.preset("tiny", vocab_size=32000), data=DataConfig(sources=sources, **data))


def _take(it, k: int) -> list[np.ndarray]:
    return [next(it)["tokens"] for _ in range(k)]


def _all_windows(root, tok, name: str) -> np.ndarray:
    cfg = _cfg(root, [DataSource(name=str(root / name))])
    source = cfg.data.sources[0]
    builder = open_source(source, None, cfg.data.cache_dir)
    stream = token_stream(documents(source, builder), f"check-{name}", tok, root / "cache")
    n = window_count(len(stream), SEQ)
    return np.stack([w["tokens"] for w in windows(stream, SEQ, grain.MapDataset.range(n))])


def test_packing_eos_between_documents_and_contiguous_windows(tmp_path, tok1k):
    docs = ["First document here.", "A second, longer document with more words in it.", "Third."]
    stream = token_stream(docs, "docs", tok1k, tmp_path)
    expected = [t for d in tok1k.encode(docs) for t in d + [tok1k.eos_id]]
    np.testing.assert_array_equal(np.asarray(stream.tokens), expected)
    assert np.flatnonzero(np.asarray(stream.tokens) == tok1k.eos_id).tolist() == list(
        np.cumsum([len(t) + 1 for t in tok1k.encode(docs)]) - 1)

    seq = 5
    n = window_count(len(stream), seq)
    rows = [w["tokens"] for w in windows(stream, seq, grain.MapDataset.range(n))]
    assert all(r.shape == (seq + 1,) for r in rows)
    for a, b in zip(rows, rows[1:]):
        assert a[-1] == b[0]  # consecutive windows share one token: each token is a target exactly once
    covered = np.concatenate([rows[0][:1]] + [r[1:] for r in rows])
    np.testing.assert_array_equal(covered, expected[:len(covered)])
    assert 0 <= len(expected) - len(covered) < seq  # only the tail is dropped


def test_long_single_document_is_packed(tmp_path, tok1k):
    text = _text(3, ["long", "document", "words"], n=3000)
    stream = token_stream([text], "long", tok1k, tmp_path)
    n_tokens = len(tok1k.encode(text)) + 1
    assert len(stream) == n_tokens and window_count(len(stream), SEQ) == (n_tokens - 1) // SEQ > 100


def test_same_seed_same_batches_other_seed_differs(corpus, tok1k):
    src = [DataSource(name=str(corpus / "a.txt"))]
    first = _take(build_train_data(_cfg(corpus, src), tok1k, 4), 6)
    again = _take(build_train_data(_cfg(corpus, src), tok1k, 4), 6)
    other = _take(build_train_data(_cfg(corpus, src, shuffle_seed=1), tok1k, 4), 6)
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))


def test_resume_gives_identical_batches_across_epochs(corpus, tok1k):
    cfg = _cfg(corpus, [DataSource(name=str(corpus / "b.txt"))])
    n_windows = len(_all_windows(corpus, tok1k, "b.txt"))
    k = n_windows // 8 + 3  # the resumed run continues past the end of the first epoch
    uninterrupted = _take(build_train_data(cfg, tok1k, 8), k + 20)

    it = build_train_data(cfg, tok1k, 8)
    _take(it, k)
    state = json.loads(json.dumps(it.state()))
    resumed = build_train_data(cfg, tok1k, 8)
    resumed.restore(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 20)), np.stack(uninterrupted[k:]))

    with pytest.raises(ValueError, match="different data settings"):
        build_train_data(_cfg(corpus, cfg.data.sources, shuffle_seed=5), tok1k, 8).restore(state)


def test_epoch_covers_every_window_once_and_processes_split_it(corpus, tok1k):
    cfg = _cfg(corpus, [DataSource(name=str(corpus / "a.txt"))])
    all_windows = _all_windows(corpus, tok1k, "a.txt")
    batch = 8
    steps = -(-len(all_windows) // batch)
    single = np.concatenate(_take(build_train_data(cfg, tok1k, batch), steps))[:len(all_windows)]
    assert sorted(map(bytes, single)) == sorted(map(bytes, all_windows))  # one epoch = a permutation

    p0 = _take(build_train_data(cfg, tok1k, batch, process_index=0, process_count=2), steps)
    p1 = _take(build_train_data(cfg, tok1k, batch, process_index=1, process_count=2), steps)
    for step in range(steps - 1):
        rows0, rows1 = set(map(bytes, p0[step])), set(map(bytes, p1[step]))
        assert p0[step].shape == (batch // 2, SEQ + 1) and not rows0 & rows1
        global_rows = single[step * batch:(step + 1) * batch]
        assert rows0 | rows1 == set(map(bytes, global_rows))


def test_shifted_windows_move_each_epoch_and_resume_exactly(corpus, tok1k):
    """data.shift_windows: every window is a contiguous piece of the stream, each epoch cuts the stream at its own
    offset (one window fewer leaves room for it), and a resumed iterator continues bit-identically."""
    cfg = _cfg(corpus, [DataSource(name=str(corpus / "b.txt"))], shift_windows=True)
    stream = np.concatenate(_all_windows(corpus, tok1k, "b.txt")[:, :-1])  # the packed stream, tail dropped
    n = window_count(len(stream) + 1 - (SEQ - 1), SEQ)
    rows = np.concatenate(_take(build_train_data(cfg, tok1k, 2), -(-3 * n // 2)))
    offsets = []
    for epoch in range(3):
        epoch_rows = rows[epoch * n:(epoch + 1) * n]
        cuts = {o for o in range(SEQ)
                if sorted(map(bytes, epoch_rows)) == sorted(bytes(stream[o + SEQ * i:o + SEQ * (i + 1) + 1])
                                                             for i in range(n))}
        assert len(cuts) == 1  # the epoch is a permutation of the windows cut at one offset
        offsets.append(cuts.pop())
    assert len(set(offsets)) > 1

    it = build_train_data(cfg, tok1k, 2)
    _take(it, n // 2 + 2)
    resumed = build_train_data(cfg, tok1k, 2)
    resumed.restore(json.loads(json.dumps(it.state())))
    start = 2 * (n // 2 + 2)
    np.testing.assert_array_equal(np.concatenate(_take(resumed, 5)), rows[start:start + 10])
    with pytest.raises(ValueError, match="different data settings"):
        build_train_data(_cfg(corpus, cfg.data.sources), tok1k, 2).restore(it.state())


def test_mixture_follows_weights(corpus, tok1k):
    sources = [DataSource(name=str(corpus / "a.txt"), weight=3.0), DataSource(name=str(corpus / "b.txt"), weight=1.0)]
    a_rows = set(map(bytes, _all_windows(corpus, tok1k, "a.txt")))
    b_rows = set(map(bytes, _all_windows(corpus, tok1k, "b.txt")))
    rows = np.concatenate(_take(build_train_data(_cfg(corpus, sources), tok1k, 8), 50))
    from_a = sum(bytes(r) in a_rows for r in rows)
    from_b = sum(bytes(r) in b_rows for r in rows)
    assert from_a + from_b == len(rows) == 400
    assert abs(from_a / len(rows) - 0.75) < 0.02


def test_validation_bytes_are_exact(tmp_path, tok1k):
    tok = tok1k  # byte fallback: every character below is encoded, most of them as UTF-8 bytes
    text = "Héllo wörld, 日本語 🙂 ꙮ𓀀 tabs\tand  spaces\n\n" + "plain words to finish the text " * 6
    path = tmp_path / "val.txt"
    path.write_text(text)
    ids = tok.encode(text)
    seq, batch = 3, 2
    cfg = _cfg(tmp_path, [DataSource(name=str(path))], validation=DataSource(name=str(path)), seq_len=seq)
    val = build_validation_data(cfg, tok, batch)
    batches = list(val)
    assert len(batches) == len(val) == (len(ids) + 1 - 1) // seq // batch
    targets = len(batches) * batch * seq  # tokens 1..targets of the stream are the targets
    expected = len(tok.decode(ids[:targets + 1]).encode()) - len(tok.decode(ids[:1]).encode())
    assert sum(int(b["target_bytes"].sum()) for b in batches) == expected
    assert [b["tokens"].tolist() for b in val] == [b["tokens"].tolist() for b in batches]  # re-iterable, in order

    whole = build_validation_data(_cfg(tmp_path, cfg.data.sources, validation=cfg.data.validation, seq_len=1), tok, 1)
    assert sum(int(b["target_bytes"][0]) for b in whole) == len(text.encode()) - len(tok.decode(ids[:1]).encode())


def test_local_txt_and_jsonl_through_the_builder(tmp_path, tok1k):
    (tmp_path / "one.txt").write_text("A whole text file is one document.\nEven with lines.")
    records = [{"text": "first json doc"}, {"text": "second json doc", "id": 2}, {"text": "third"}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    source = DataSource(name=f"{tmp_path}/one.txt,{tmp_path}/*.jsonl")
    builder = open_source(source, None, str(tmp_path / "cache"))
    assert list(documents(source, builder)) == [
        "A whole text file is one document.\nEven with lines.", "first json doc", "second json doc", "third"]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no string field 'text'"):
        open_source(DataSource(name=str(tmp_path / "bad.jsonl")), None, str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_source(DataSource(name=str(tmp_path / "missing*.txt")), None, str(tmp_path / "cache"))


def test_tiny_shakespeare_offline_with_holdout(tmp_path, tfds_dir, play_txt, tok1k):
    cfg = _cfg(tmp_path, [DataSource()], data_dir=str(tfds_dir), validation_fraction=0.1)
    source = cfg.data.sources[0]
    builder = open_source(source, cfg.data.data_dir, None)
    full = list(documents(source, builder))
    head = "".join(documents(source, builder, 0.1))
    tail = "".join(documents(source, builder, 0.1, tail=True))
    assert len(full) == 1 and head + tail == full[0] and play_txt.read_text().startswith(full[0])
    assert abs(len(tail) / len(full[0]) - 0.1) < 1e-4

    batch = next(build_train_data(cfg, tok1k, 4))["tokens"]
    assert batch.shape == (4, SEQ + 1) and batch.dtype == np.int32
    val = build_validation_data(cfg, tok1k, 4)
    first = next(iter(val))
    assert tok1k.decode(first["tokens"][0]) in tail
    assert 0 < int(first["target_bytes"].sum()) < 4 * SEQ * 8


def test_real_tiny_shakespeare_copy_is_the_whole_text(tmp_path, shared_tfds_dir, shakespeare_txt):
    """../shared's prepared TFDS copy, read by name like a downloaded one: its three splits are the raw text."""
    splits = [DataSource(split=split) for split in ("train", "validation", "test")]
    builder = open_source(splits[0], str(shared_tfds_dir), None)
    text = "".join(doc for source in splits for doc in documents(source, builder))
    assert len(text) == 1_115_394 and text == shakespeare_txt.read_text()


def test_config_errors(corpus, tok1k):
    sources = [DataSource(name=str(corpus / "a.txt"))]
    with pytest.raises(ConfigError, match="not both"):
        build_validation_data(_cfg(corpus, sources, validation=sources[0], validation_fraction=0.1), tok1k, 2)
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        build_train_data(_cfg(corpus, sources), tok1k, 4, process_index=0, process_count=3)
    assert build_validation_data(_cfg(corpus, sources), tok1k, 2) is None


def test_tokenizer_trained_once_into_run_dir(corpus, tmp_path):
    cfg = _cfg(corpus, [DataSource(name=str(corpus / "a.txt"))], tokenizer_vocab_size=300)
    tok = provision_tokenizer(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.model").is_file() and tok.vocab_size <= 300
    text = "the cat sat on a mat"
    assert tok.decode(tok.encode(text)) == text
    mtime = (tmp_path / "run" / "tokenizer.model").stat().st_mtime_ns
    again = provision_tokenizer(cfg, tmp_path / "run")
    assert again.encode(text) == tok.encode(text) and (tmp_path / "run" / "tokenizer.model").stat().st_mtime_ns == mtime


def test_global_batch_on_8_device_mesh(corpus, tok1k):
    cfg = _cfg(corpus, [DataSource(name=str(corpus / "a.txt"))])
    mesh = make_mesh(MeshConfig(data=2, fsdp=4), jax.devices()[:8])
    local = _take(build_train_data(cfg, tok1k, 8), 2)
    it = build_train_data(cfg, tok1k, 8, mesh)
    for expected in local:
        batch = next(it)["tokens"]
        assert isinstance(batch, jax.Array) and batch.shape == (8, SEQ + 1)
        assert batch.sharding.spec == PartitionSpec(("data", "fsdp"), None)
        assert len(batch.addressable_shards) == 8 and batch.addressable_shards[0].data.shape == (1, SEQ + 1)
        np.testing.assert_array_equal(np.asarray(batch), expected)
