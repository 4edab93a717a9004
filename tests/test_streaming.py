"""Streaming data: exact resume for every source kind, one window per epoch across processes, batches independent
of the process count (also after resuming on another count), exact mixture proportions, shards and errors."""

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
import yaml

from llama_jax.config import Config, ConfigError, DataConfig, DataSource, LlamaConfig, load_config
from llama_jax.data import build_train_data
from llama_jax.data.shards import source_shards
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.loop import train

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
def tok(tokenizer_1k):
    return Tokenizer(tokenizer_1k)


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
    owns = []
    for part in parts:
        alone = build_train_data(stream_cfg([part], streams=4), tok, 100)
        owns.append({bytes(r) for r in np.concatenate(take(alone, int(part.weight * 100) + 4))})
    # Every row is some source's own window; a few short windows can occur in two sources (identical text).
    assert all(any(bytes(r) in own for own in owns) for r in rows)
    counts = [sum(bytes(r) in own for r in rows) for own in owns]
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
    with pytest.raises(ValueError, match="stream a whole split"):  # tfrecord files: no random access to a slice
        source_shards(DataSource(name="tiny_shakespeare", split="train[:50%]"), str(tfds_dir), 1)
    with pytest.raises(FileNotFoundError, match="is not prepared"):
        source_shards(DataSource(name="stream_test_text"), str(tfds_dir), 1)


def test_tfds_in_tfrecord_files_streams_in_order_and_resumes(tok, tfds_dir, play_txt):
    cfg = stream_cfg([DataSource(name="tiny_shakespeare")], str(tfds_dir), streams=1, seq_len=64)
    straight = take(build_train_data(cfg, tok, 4), 12)
    it = build_train_data(cfg, tok, 4)
    take(it, 7)
    state = json.loads(json.dumps(it.state()))
    resumed = build_train_data(cfg, tok, 4)
    resumed.restore(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 5)), np.stack(straight[7:]))
    text = " ".join(play_txt.read_text().split())
    for row in straight[0]:  # the text in order (this tokenizer may lack a few letters: ⁇)
        assert all(" ".join(part.split()) in text for part in tok.decode(row.tolist()).split("⁇"))


@pytest.mark.e2e
def test_worker_processes_give_the_same_batches_and_resume(sources, tok):
    threads = take(build_train_data(source_cfg(sources, "jsonl", streams=4), tok, 8), 12)
    workers = build_train_data(source_cfg(sources, "jsonl", streams=4, workers=2), tok, 8)
    np.testing.assert_array_equal(np.stack(take(workers, 6)), np.stack(threads[:6]))
    state = json.loads(json.dumps(workers.state()))
    workers.close()
    resumed = build_train_data(source_cfg(sources, "jsonl", streams=4, workers=2), tok, 8)
    resumed.restore(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 6)), np.stack(threads[6:]))
    resumed.close()


def train_config(tmp_path, sources_yaml: list[dict], data_dir: str, tokenizer: str, **train) -> Path:
    """A tiny streaming pretraining config (fixed tokenizer, constant learning rate) written under tmp_path."""
    raw = {
        "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 1000,
                  "max_seq_len": 32},
        "data": {"sources": sources_yaml, "seq_len": 32, "tokenizer": tokenizer, "streaming": True, "streams": 2,
                 "shuffle_buffer": 16, "data_dir": data_dir, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0},
        "train": {"steps": 8, "batch_size": 8, "log_every": 2, "eval_every": 0, "sample_tokens": 0, **train},
        "checkpoint": {"dir": str(tmp_path / "run"), "every": 4, "async_save": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.e2e
def test_sigkill_mid_epoch_then_resume_is_bit_identical_for_tfds_hf_and_jsonl(sources, tmp_path, monkeypatch,
                                                                               tokenizer_1k):
    from test_train_loop import kill_at_step_6_then_resume, record_batches

    mix = [{"name": sources["tfds"][0], "weight": 0.5}, {"name": sources["hf_disk"][0], "weight": 0.3},
           {"name": sources["jsonl"][0], "weight": 0.2}]
    config = train_config(tmp_path, mix, sources["tfds_dir"][0], str(tokenizer_1k))
    seen = record_batches(monkeypatch)
    result = train(load_config(config, [f"checkpoint.dir={tmp_path / 'straight'}"]))
    assert result.step == 8 and result.train_loss is not None
    kill_at_step_6_then_resume(config, [f"checkpoint.dir={tmp_path / 'resumed'}"], seen, dict(seen),
                               tmp_path / "straight", tmp_path / "resumed")
    # Each of the 64 rows per 8 steps is one window, 32 target tokens: the per-source counts add up.
    meta = json.loads((tmp_path / "resumed" / "8" / "meta" / "metadata").read_text())
    assert sum(meta["data"]["tokens"]) == 8 * 8 * 32


BIG_CORPUS_RUN = textwrap.dedent("""
    import json, resource, sys, time
    start = time.monotonic()
    from llama_jax.config import load_config
    from llama_jax.training import step as step_module
    from llama_jax.training.loop import train
    original, first = step_module.Trainer.train_step, []
    def timed(self, state, batch):
        first.append(time.monotonic() - start)
        return original(self, state, batch)
    step_module.Trainer.train_step = timed
    cfg = load_config(sys.argv[1], sys.argv[2:])
    from llama_jax.data import build_train_data
    from llama_jax.tokenizer import Tokenizer
    built = time.monotonic()
    data = build_train_data(cfg, Tokenizer(cfg.data.tokenizer))
    next(data)
    data_s = time.monotonic() - built
    data.close()
    result = train(cfg)
    print(json.dumps({"step": result.step, "first_batch_s": first[0], "data_s": data_s,
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


@pytest.mark.e2e
def test_multi_gigabyte_corpus_starts_training_in_seconds_with_bounded_memory(tmp_path, tokenizer_1k):
    from test_train_loop import REPO

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    lines = [json.dumps({"text": " ".join(words[rng.integers(0, len(words), 400)])}) for _ in range(2000)]
    block = ("\n".join(lines) + "\n").encode()
    first = corpus / "part-0000.jsonl"
    first.write_bytes(block * (16 * 2**20 // len(block)))
    for i in range(1, 300):  # 300 files x 14 MB = 4.3 GB of JSONL (hard links: generated in a second)
        (corpus / f"part-{i:04d}.jsonl").hardlink_to(first)
    size = sum(f.stat().st_size for f in corpus.iterdir())
    assert size > 4 * 10**9
    def run(pattern: str, name: str) -> dict:
        config = train_config(tmp_path / name, [{"name": str(corpus / pattern)}], None, str(tokenizer_1k),
                              steps=3, log_every=1)
        proc = subprocess.run([sys.executable, "-c", BIG_CORPUS_RUN, str(config), "checkpoint.every=0"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # The same run over 8 of the files (128 MB) is the baseline: the process's own
    # footprint (JAX, TensorFlow, compilation) must not grow with the corpus.
    (tmp_path / "small").mkdir()
    small = run("part-000[0-7].jsonl", "small")
    (tmp_path / "big").mkdir()
    report = run("*.jsonl", "big")
    print(f"{size / 2**30:.1f} GiB corpus: pipeline to first batch {report['data_s']:.2f} s; first train step "
          f"{report['first_batch_s']:.1f} s after process start; peak RSS {report['max_rss_mib']:.0f} MiB "
          f"({small['max_rss_mib']:.0f} MiB over 128 MB)")
    assert report["step"] == 3
    assert report["max_rss_mib"] < small["max_rss_mib"] + 512  # 32x the corpus, not even +512 MiB
    assert report["data_s"] < 30  # a guard against whole-corpus passes (which take many minutes here)


def test_bench_data_runs_in_short_form(capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_data.py"
    spec = importlib.util.spec_from_file_location("bench_data", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # No --tokenizer: one is trained on the generated corpus's first documents (the streaming provisioning path).
    result = bench.main(["--seconds", "0.5", "--files", "4", "--docs", "40", "--streams", "4", "--seq-len", "64"])
    out = capsys.readouterr().out
    assert result["tokens_per_s"] > 0 and result["wait_per_step_s"] >= 0 and "tokens/s" in out
    assert f"{result['tokens_per_s']:,.0f} tokens/s" in out


def test_readme_streaming_config_is_valid(tmp_path):
    from test_readme import _blocks

    (block,) = [b for b in _blocks("yaml") if "streaming: true" in b]
    path = tmp_path / "streaming.yaml"
    path.write_text(block)
    data = load_config(path).data
    assert data.streaming and data.streams == 8 and [s.weight for s in data.sources] == [0.8, 0.1, 0.1]
    assert data.sources[2].name == "hf:my-org/zh-en-parallel" and data.sources[1].text_feature == "content"


def test_in_memory_path_reads_parquet_and_hf_sources_too(sources, tmp_path):
    from llama_jax.data.sources import documents, open_source

    for kind, first in (("parquet", "pq 0: "), ("hf_disk", "hf 0: ")):
        name, field = sources[kind]
        source = DataSource(name=name, text_feature=field)
        docs = list(documents(source, open_source(source, None, str(tmp_path / "cache"))))
        assert len(docs) == 300 and len(set(docs)) == 300 and any(d.startswith(first) for d in docs)
