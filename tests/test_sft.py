"""Supervised fine-tuning data and loss: answer-only targets, bad-record reports, packing that equals running alone."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.chat import encode_dialog, encode_turns
from llama_jax.config import LlamaConfig
from llama_jax.data.sft import Examples, encode_record, pack, read_examples
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.step import model_losses, token_losses

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour"},
          {"role": "assistant", "content": "Blue."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = [f"[INST] question {i} about colours and {i * 7} things [/INST] answer {i}: blue, red, green."
            for i in range(300)]
    return Tokenizer.train(iter(text), 400, tmp_path_factory.mktemp("tok") / "sft")


def test_chat_targets_are_exactly_the_replies_and_their_eos(tokenizer):
    ids, learn = encode_turns(tokenizer, DIALOG)
    assert ids[:len(encode_dialog(tokenizer, DIALOG[:2]))] == encode_dialog(tokenizer, DIALOG[:2])
    assert ids == encode_dialog(tokenizer, DIALOG + [{"role": "user", "content": "x"}])[:len(ids)]
    replies = [[i for i, f in zip(ids[s:e], learn[s:e]) if f] for s, e in _pair_spans(ids, tokenizer)]
    assert [tokenizer.decode(r) for r in replies] == ["Hello! ", "Blue. "]  # Meta ends each reply with a space
    assert all(r[-1] == tokenizer.eos_id for r in replies)
    _, last_only = encode_turns(tokenizer, DIALOG, last_turn_only=True)
    assert sum(last_only) == len(replies[1]) and last_only[-len(replies[1]):] == [True] * len(replies[1])


def _pair_spans(ids, tokenizer):
    starts = [i for i, t in enumerate(ids) if t == tokenizer.bos_id] + [len(ids)]
    return list(zip(starts[:-1], starts[1:]))


def test_prompt_completion_and_text_shapes(tokenizer):
    ids, learn = encode_record({"prompt": "2+3=", "completion": "5"}, tokenizer)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode([i for i, f in zip(ids, learn) if f]) == "5"
    assert ids[:learn.index(True)] == tokenizer.encode("2+3=", bos=True)
    ids, learn = encode_record({"text": "blue red"}, tokenizer)
    assert ids == tokenizer.encode("blue red", bos=True, eos=True) and learn == [False] + [True] * (len(ids) - 1)


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_bad_record_is_reported_with_file_and_line(tokenizer, tmp_path, capsys):
    good = json.dumps({"messages": DIALOG})
    broken = [
        "{not json", json.dumps([1, 2]), json.dumps({"other": 1}),
        json.dumps({"messages": [{"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "u"}]}),
        json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}),
        json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": "hello"}), json.dumps({"prompt": "p"}), json.dumps({"prompt": 3, "completion": "c"}),
        json.dumps({"prompt": "p", "completion": "  "}), json.dumps({"text": ""}),
    ]
    lines, bad_lines = [], []
    for i in range(25):
        lines.append(good)
        lines.append(broken[i % len(broken)])
        bad_lines.append(len(lines))
    data = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    examples = read_examples(str(data), tokenizer, seq_len=128, policy="skip")
    assert len(examples.ids) == 25
    assert [(b.file, b.line) for b in examples.bad] == [(str(data), n) for n in bad_lines]
    err = capsys.readouterr().err
    assert f"{data}: 25 bad record(s) skipped" in err
    assert all(f"{data}:{n}:" in err for n in bad_lines)
    with pytest.raises(ValueError, match=f"{data}:2: not valid JSON"):
        read_examples(str(data), tokenizer, seq_len=128, policy="fail")


def test_overlong_examples_follow_the_policy(tokenizer, tmp_path):
    long = {"prompt": "question " * 3, "completion": " blue" * 80}
    data = _write_jsonl(tmp_path / "long.jsonl", [json.dumps(long), json.dumps({"messages": DIALOG})])
    truncated = read_examples(str(data), tokenizer, seq_len=80, policy="truncate")
    assert [len(x) for x in truncated.ids][0] == 81 and [(t.line) for t in truncated.truncated] == [1]
    skipped = read_examples(str(data), tokenizer, seq_len=80, policy="skip")
    assert len(skipped.ids) == 1 and skipped.bad[0].line == 1 and "more than seq_len + 1" in skipped.bad[0].reason


def _random_examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = Examples()
    for n in lengths:
        out.ids.append(rng.integers(3, CFG.vocab_size, n).astype(np.int32))
        out.learn.append(np.arange(n) >= n // 2)  # the second half is the "answer"
    return out


def _model(seed=0):
    return Llama(CFG, rngs=nnx.Rngs(seed))


@nnx.jit
def _losses(model, batch):
    return model_losses(model, batch)


@nnx.jit
def _logits(model, batch):
    return model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])


def test_packed_row_equals_each_example_alone():
    examples = _random_examples([9, 14, 6])
    packed = {k: jnp.asarray(v) for k, v in pack(examples, seq_len=32).items()}
    assert packed["tokens"].shape == (1, 32)
    assert list(np.asarray(packed["segment_ids"][0])) == [1] * 8 + [2] * 13 + [3] * 5 + [0] * 6
    assert list(np.asarray(packed["positions"][0, 6:10])) == [6, 7, 0, 1]
    model = _model()
    loss, count = _losses(model, packed)
    logits = _logits(model, packed)
    # Unpacked: one example per row, padded after it (causal attention never sees the padding), plain positions.
    alone = {k: jnp.asarray(v) for k, v in pack(examples, seq_len=32, packing=False).items()}
    plain = {k: alone[k] for k in ("tokens", "targets", "loss_mask")}
    alone_loss, alone_count = _losses(model, plain)
    alone_logits = nnx.jit(lambda m, t: m(t))(model, alone["tokens"])
    start = 0
    for row, ids in enumerate(examples.ids):
        n = len(ids) - 1
        np.testing.assert_allclose(logits[0, start:start + n], alone_logits[row, :n], rtol=1e-5, atol=1e-5)
        start += n
    assert float(count) == float(alone_count) == sum(int(x[1:].sum()) for x in examples.learn)
    assert float(loss) == pytest.approx(float(alone_loss), rel=1e-5)


def test_prompt_targets_change_neither_loss_nor_gradients():
    examples = _random_examples([10, 12, 8], seed=1)
    batch = {k: jnp.asarray(v) for k, v in pack(examples, seq_len=16).items()}
    scrambled = dict(batch, targets=jnp.where(batch["loss_mask"] == 1, batch["targets"],
                                              (batch["targets"] * 7 + 5) % CFG.vocab_size))
    assert not np.array_equal(scrambled["targets"], batch["targets"])
    graphdef, params = nnx.split(_model())
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: token_losses(graphdef, p, b)[0]))
    (loss_a, grads_a), (loss_b, grads_b) = grad_fn(params, batch), grad_fn(params, scrambled)
    assert float(loss_a) == float(loss_b)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a)) > 0


def test_unpacked_rows_hold_one_example_each():
    rows = pack(_random_examples([5, 7, 4]), seq_len=8, packing=False)
    assert rows["tokens"].shape == (3, 8)
    assert [int(r.max()) for r in rows["segment_ids"]] == [1, 1, 1]
    assert list(rows["positions"][1]) == [0, 1, 2, 3, 4, 5, 0, 0]


def _dataset_records():
    """Two good chats, a chat with alternation broken (index 2), a good one (index 3)."""
    turns = [DIALOG[1:3], DIALOG[3:5], [DIALOG[1], DIALOG[1]], DIALOG[1:5]]
    return [{"messages": t} for t in turns]


def test_tfds_and_hf_datasets_read_like_jsonl_with_renamed_columns_and_indexed_bad_records(tokenizer, tmp_path,
                                                                                           capsys):
    import datasets
    import tensorflow_datasets as tfds

    from llama_jax.config import DataConfig

    chats = _dataset_records()
    jsonl = _write_jsonl(tmp_path / "chats.jsonl", [json.dumps(r) for r in chats])
    expected = read_examples(str(jsonl), tokenizer, 128, "skip")
    assert [b.line for b in expected.bad] == [3]

    features = tfds.features.FeaturesDict({"messages": tfds.features.Sequence(
        {"role": tfds.features.Text(), "content": tfds.features.Text()})})
    tfds.dataset_builders.store_as_tfds_dataset("sft_chats", "1.0.0", features, {"train": [(str(i), r) for i, r in enumerate(chats)]},
                                                data_dir=tmp_path / "tfds", disable_shuffling=True)
    pairs = [{"question": "2+3=", "answer": "5"}, {"question": "1+1=", "answer": " "}, {"question": "4+4=", "answer": "8"}]
    datasets.Dataset.from_list(pairs).save_to_disk(tmp_path / "hf_saved")
    (tmp_path / "hf_parquet").mkdir()
    datasets.Dataset.from_list(chats).to_parquet(tmp_path / "hf_parquet" / "train.parquet")
    data = DataConfig(data_dir=str(tmp_path / "tfds"))

    for spec in ["tfds:sft_chats:1.0.0", f"hf:{tmp_path / 'hf_parquet'}"]:
        got = read_examples(spec, tokenizer, 128, "skip", data=data)
        assert [x.tolist() for x in got.ids] == [x.tolist() for x in expected.ids]
        assert [x.tolist() for x in got.learn] == [x.tolist() for x in expected.learn]
        assert [(b.file, b.line) for b in got.bad] == [(f"{spec} [train]", 2)]
        assert f"{spec} [train] record 2: " in capsys.readouterr().err

    spec = f"hf:{tmp_path / 'hf_saved'}"
    got = read_examples(spec, tokenizer, 128, "skip", fields={"prompt": "question", "completion": "answer"})
    assert [x.tolist() for x in got.ids] == [encode_record({"prompt": p["question"], "completion": p["answer"]},
                                                           tokenizer)[0] for p in (pairs[0], pairs[2])]
    with pytest.raises(ValueError, match=rf"{spec} \[train\] record 1: 'completion' is empty"):
        read_examples(spec, tokenizer, 128, "fail", fields={"prompt": "question", "completion": "answer"})
    with pytest.raises(ValueError, match="has no split 'test'"):
        read_examples("tfds:sft_chats:1.0.0", tokenizer, 128, split="test", data=data)
