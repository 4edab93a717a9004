"""Streaming data: exact resume for every source kind, one window per epoch across processes, batches independent
of the process count (also after resuming on another count), exact mixture proportions, shards and errors."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from llama_jax.config import Config, ConfigError, DataConfig, DataSource, LlamaConfig
from llama_jax.data import build_train_data
from llama_jax.data.shards import source_shards
from llama_jax.tokenizer import Tokenizer

SEQ = 16
WORDS = "the cat sat on a mat and was happy quick brown fox jumps over lazy dog".split()


def make_docs(prefix: str, n: int, seed: int) -> list[str]:
    """`n` distinct documents of 10-60 words (each starts with its own id)."""
    rng = np.random.default_rng(seed)
    return [f"{prefix} {i}: " + " ".join(rng.choice(WORDS, size=rng.integers(10, 60))) for i in range(n)]


def write_jsonl(root, name: str, files: int, docs: int, seed: int = 0) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines = [json.dumps({"text": d}) for d in make_docs(f"{name}{f}", docs, seed + f)]
        (root / f"{name}-{f:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / f"{name}-*.jsonl")


class StreamTestText(tfds.core.GeneratorBasedBuilder):
    """Generated documents as a TFDS dataset in array_record files (what `tfds.data_source` reads)."""

    VERSION = tfds.core.Version("1.0.0")
    DOCS = 400

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, doc in enumerate(make_docs("tfds", self.DOCS, 7)):
            yield i, {"text": doc}


def make_tfds(root) -> str:
    builder = StreamTestText(data_dir=str(root), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
    return str(root)


def make_hf_disk(root) -> str:
    import datasets

    datasets.Dataset.from_dict({"text": make_docs("hf", 300, 11)}).save_to_disk(str(root), num_shards=3)
    return f"hf:{root}"


def make_parquet(root) -> str:
    root.mkdir(parents=True, exist_ok=True)
    docs = make_docs("pq", 300, 13)
    for f in range(4):
        pq.write_table(pa.table({"body": docs[f::4]}), root / f"part-{f}.parquet", row_group_size=16)
    return str(root / "*.parquet")


def make_txt(root) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for f in range(4):
        (root / f"book{f}.txt").write_text("\n".join(make_docs(f"book{f}", 80, 17 + f)))
    return str(root / "*.txt")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One source of every kind (name, text field), all generated here."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "jsonl": (write_jsonl(root / "jsonl", "web", 6, 60), "text"),
        "hf_disk": (make_hf_disk(root / "hf_disk"), "text"),
        "hf_files": (f"hf:{make_parquet(root / 'hf_files').rsplit('/', 1)[0]}", "body"),
        "parquet": (make_parquet(root / "parquet"), "body"),
        "txt": (make_txt(root / "txt"), "text"),
        "tfds": ("stream_test_text", "text"),
        "tfds_dir": (make_tfds(root / "tfds"), ""),
    }


@pytest.fixture(scope="module")
def tok():
    from conftest import shared_path
    return Tokenizer(shared_path("tokenizers", "botchan_en_bpe_1000.model"))


def stream_cfg(sources: list[DataSource], data_dir: str | None = None, **data) -> Config:
    data = {"seq_len": SEQ, "streaming": True, "streams": 2, "shuffle_buffer": 8, "data_dir": data_dir, **data}
    return Config(model=LlamaConfig.preset("tiny", vocab_size=32000), data=DataConfig(sources=sources, **data))


def source_cfg(sources, kind: str, **data) -> Config:
    name, field = sources[kind]
    return stream_cfg([DataSource(name=name, text_feature=field)], sources["tfds_dir"][0], **data)


def take(it, k: int) -> list[np.ndarray]:
    return [next(it)["tokens"] for _ in range(k)]


@pytest.mark.parametrize("kind", ["jsonl", "hf_disk", "hf_files", "parquet", "txt", "tfds"])
def test_resume_gives_the_same_batches_for_every_source_kind(sources, tok, kind):
    cfg = source_cfg(sources, kind)
    straight = build_train_data(cfg, tok, 8)
    first = take(straight, 30)  # past the end of the first epoch of every kind
    it = build_train_data(cfg, tok, 8)
    assert all(np.array_equal(a, b) for a, b in zip(take(it, 17), first))
    state = json.loads(json.dumps(it.state()))
    it.close()
    resumed = build_train_data(cfg, tok, 8)
    resumed.restore(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 13)), np.stack(first[17:]))
    assert list(resumed.metrics().values()) == [30 * 8 * SEQ]  # tokens seen resume too
    batch = first[0]
    assert batch.shape == (8, SEQ + 1) and batch.dtype == np.int32 and len({bytes(r) for r in batch}) == 8


def test_two_processes_together_see_each_window_once_per_epoch(sources, tok):
    cfg = source_cfg(sources, "jsonl", streams=4)
    one_epoch = [np.concatenate([b["tokens"] for b in build_train_data(cfg, tok, 8, process_index=p, process_count=2,
                                                                         epochs=1)]) for p in range(2)]
    windows = Counter(bytes(w) for rows in one_epoch for w in rows)
    assert max(windows.values()) == 1  # no window twice (every document is distinct)
    single = Counter(bytes(w) for b in build_train_data(cfg, tok, 8, epochs=1) for w in b["tokens"])
    assert windows == single
    docs = [json.loads(line)["text"] for f in sorted(Path(cfg.data.sources[0].name).parent.glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    corpus_tokens = sum(len(ids) + 1 for ids in tok.encode(docs))
    targets = sum(windows.values()) * SEQ
    assert corpus_tokens - 4 * (SEQ + 1) <= targets < corpus_tokens  # all but each stream's last partial window


def test_batches_do_not_depend_on_the_process_count_even_after_a_resume(sources, tok):
    cfg = source_cfg(sources, "jsonl", streams=4)
    reference = take(build_train_data(cfg, tok, 8), 24)
    halves = [build_train_data(cfg, tok, 8, process_index=p, process_count=2) for p in range(2)]
    for step in range(10):
        rows = [next(h)["tokens"] for h in halves]
        np.testing.assert_array_equal(np.stack(rows, 1).reshape(8, SEQ + 1), reference[step])
    # Resume the 2-process position on 1 and on 4 processes: the same global batches continue.
    state = json.loads(json.dumps({**halves[0].state(), "position": [h.state()["position"][0] for h in halves]}))
    single = build_train_data(cfg, tok, 8)
    single.restore(state)
    np.testing.assert_array_equal(np.stack(take(single, 5)), np.stack(reference[10:15]))
    quarters = [build_train_data(cfg, tok, 8, process_index=p, process_count=4) for p in range(4)]
    for q in quarters:
        q.restore(state)
    for step in range(10, 15):
        rows = [next(q)["tokens"] for q in quarters]
        np.testing.assert_array_equal(np.stack(rows, 1).reshape(8, SEQ + 1), reference[step])


def test_mixture_proportions_over_10000_windows(sources, tok, tmp_path):
    code = write_jsonl(tmp_path / "code", "code", 4, 30, seed=100)
    weights = {"jsonl": 0.8, "hf_disk": 0.1}
    parts = [DataSource(name=sources[k][0], text_feature=sources[k][1], weight=w) for k, w in weights.items()]
    parts.append(DataSource(name=code, weight=0.1))
    it = build_train_data(stream_cfg(parts, streams=4), tok, 100)
    rows = np.concatenate(take(it, 100))
    assert len(rows) == 10_000
    assert sorted(it.metrics()) == ["tokens_seen/0_jsonl", "tokens_seen/1_hf_disk", "tokens_seen/2_code"]
    np.testing.assert_allclose(np.array(list(it.metrics().values())) / (10_000 * SEQ), [0.8, 0.1, 0.1], atol=0.01)
    # Independently: each row is one of its source's own windows (a source streams the same alone as mixed).
    counts = []
    for part in parts:
        alone = build_train_data(stream_cfg([part], streams=4), tok, 100)
        own = {bytes(r) for r in np.concatenate(take(alone, int(part.weight * 100) + 4))}
        counts.append(sum(bytes(r) in own for r in rows))
    assert sum(counts) == 10_000
    np.testing.assert_allclose(np.array(counts) / 10_000, [0.8, 0.1, 0.1], atol=0.01)


def test_shards_and_errors(sources, tok, tfds_dir):
    cfg = source_cfg(sources, "tfds", streams=4)
    shards = source_shards(cfg.data.sources[0], cfg.data.data_dir, 4)
    assert len(shards) == 4 and shards[0].start == 0 and shards[-1].stop == StreamTestText.DOCS
    assert [s.stop for s in shards[:-1]] == [s.start for s in shards[1:]]
    assert len(source_shards(DataSource(name=sources["hf_files"][0]), None, 2)) == 4  # one per parquet file
    with pytest.raises(ConfigError, match="fewer than data.streams=8"):
        source_shards(DataSource(name=sources["txt"][0]), None, 8)
    with pytest.raises(ConfigError, match="multiple of the process count"):
        build_train_data(source_cfg(sources, "jsonl", streams=3), tok, 8, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="no column 'body'"):
        source_shards(DataSource(name=sources["hf_disk"][0], text_feature="body"), None, 1)
    with pytest.raises(ValueError, match="cannot be streamed"):  # prepared as tfrecord, not array_record
        source_shards(DataSource(name="tiny_shakespeare"), str(tfds_dir), 1)
