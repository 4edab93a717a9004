"""Every bad input through the CLI ends in one line on stderr, exit status 2, no traceback, and leaves every file that
existed before byte-identical; `--debug` / LLAMA_JAX_DEBUG=1 show the traceback; bugs keep theirs."""

import shutil
from pathlib import Path

import pytest
import yaml

from llama_jax import LlamaConfig, Llama, Tokenizer, save_pretrained
from llama_jax.cli import main
from llama_jax.errors import expected_failure

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7} times.\n" for i in range(400))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a tiny HF checkpoint, a corpus and a training config, all built here."""
    from flax import nnx
    root = tmp_path_factory.mktemp("inputs")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    tokenizer = Tokenizer.train(corpus, 300, root / "tok").path
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=300, multiple_of=16, max_seq_len=32)
    hf = save_pretrained(Llama(cfg, rngs=nnx.Rngs(0)), root / "hf")
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 300, "multiple_of": 16, "max_seq_len": 32},
        "data": {"sources": [{"name": str(corpus)}], "seq_len": 16, "tokenizer": str(tokenizer),
                 "cache_dir": str(root / "cache")},
        "train": {"steps": 2, "batch_size": 8, "eval_every": 0, "sample_tokens": 0, "log_every": 1},
        "checkpoint": {"dir": str(root / "run"), "every": 1}}))
    return {"corpus": corpus, "tokenizer": tokenizer, "hf": hf, "config": config, "root": root}


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def fails_cleanly(args: list[str], capsys, root: Path, *expected: str) -> str:
    """Run the CLI and check: exit 2, one `error:` line naming each of `expected`, no traceback, files untouched."""
    before = snapshot(root)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    after = snapshot(root)
    assert {p: after.get(p) for p in before} == before
    return lines[0]


def test_truncated_safetensors(files, tmp_path, capsys):
    hf = shutil.copytree(files["hf"], tmp_path / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails_cleanly(["generate", "--checkpoint", str(hf), "--tokenizer", str(files["tokenizer"]), "--prompt", "a"],
                  capsys, tmp_path, str(weights), "re-download")


@pytest.mark.parametrize("content, problem", [("{not json", "could not be read"),
                                              ('{"model_type": "llama"}', "lacks 'hidden_size'")])
def test_broken_hf_config_json(files, tmp_path, capsys, content, problem):
    hf = shutil.copytree(files["hf"], tmp_path / "hf")
    (hf / "config.json").write_text(content)
    fails_cleanly(["generate", "--checkpoint", str(hf), "--tokenizer", str(files["tokenizer"]), "--prompt", "a"],
                  capsys, tmp_path, str(hf / "config.json"), problem)


def test_prompt_that_is_not_utf8(files, capsys):
    # Python hands undecodable command-line bytes over as lone surrogates (PEP 383).
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    fails_cleanly(["generate", "--checkpoint", str(files["hf"]), "--tokenizer", str(files["tokenizer"]),
                   "--prompt", prompt], capsys, files["root"], "not valid UTF-8")


def test_tokenizer_that_is_not_a_model(files, capsys):
    fails_cleanly(["generate", "--checkpoint", str(files["hf"]), "--tokenizer", str(files["corpus"]),
                   "--prompt", "a"], capsys, files["root"], str(files["corpus"]), "sentencepiece")


def test_tokenizer_train_on_an_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    fails_cleanly(["tokenizer", "train", "--input", str(tmp_path / "empty.txt"), "--vocab-size", "300",
                   "--out", str(tmp_path / "tok")], capsys, tmp_path, str(tmp_path / "empty.txt"), "empty")


def test_unknown_tfds_dataset(files, tmp_path, capsys):
    line = fails_cleanly(["train", "--config", str(files["config"]), "data.sources=[{name: tiny_shakespear}]",
                          f"checkpoint.dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'tfds'}"],
                         capsys, files["root"], "tiny_shakespear", "did you mean 'tiny_shakespeare'")
    assert len(line) < 400


def test_checkpoint_dir_is_a_file(files, capsys):
    fails_cleanly(["train", "--config", str(files["config"]), f"checkpoint.dir={files['corpus']}"],
                  capsys, files["root"], "checkpoint.dir", str(files["corpus"]))


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=[", "optim.lr"),
    ("model.dimm=3", "did you mean 'model.dim'"),
    ("mesh.tensor=3", "tensor"),
    ("data.sources=[{name: missing/*.txt}]", "missing/*.txt"),
    ("data.tokenizer=/nonexistent/tok.model", "/nonexistent/tok.model"),
    ("train.nonfinite=ignore", "train.nonfinite"),
    ("optim.lr=-1", "optim.lr must be positive"),
    ("optim.b2=1.5", "optim.b2 must be in [0, 1]"),
])
def test_bad_train_settings(files, tmp_path, capsys, override, expected):
    fails_cleanly(["train", "--config", str(files["config"]), f"checkpoint.dir={tmp_path / 'run'}", override],
                  capsys, files["root"], expected)


@pytest.mark.parametrize("content, expected", [("model: {dim: [\n", "not valid YAML"), ("- a\n- b\n", "not a list")])
def test_invalid_yaml_config(tmp_path, capsys, content, expected):
    (tmp_path / "bad.yaml").write_text(content)
    fails_cleanly(["train", "--config", str(tmp_path / "bad.yaml")], capsys, tmp_path, expected)


def test_a_garbage_file_as_checkpoint(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(b"\x01\x02" * 50)  # a header with an odd head_dim, not llama2.c
    fails_cleanly(["convert", "--input", str(tmp_path / "model.bin"), "--output", str(tmp_path / "out"),
                   "--format", "hf"], capsys, tmp_path, str(tmp_path / "model.bin"), "not a known checkpoint layout")


def test_convert_of_a_missing_checkpoint(tmp_path, capsys):
    fails_cleanly(["convert", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), "--format", "hf"],
                  capsys, tmp_path, str(tmp_path / "nope"))


def test_plan_of_an_unknown_topology(capsys, tmp_path):
    fails_cleanly(["plan", "--topology", "v9-8"], capsys, tmp_path, "v9-8")


def test_debug_shows_the_traceback(files, tmp_path, monkeypatch):
    args = ["convert", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), "--format", "hf"]
    with pytest.raises(FileNotFoundError):
        main(["--debug", *args])
    monkeypatch.setenv("LLAMA_JAX_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(args)


def test_bugs_keep_their_traceback(monkeypatch):
    import llama_jax.info
    monkeypatch.setattr(llama_jax.info, "print_info", lambda *a: {}["bug"])
    with pytest.raises(KeyError):
        main(["info"])
    assert expected_failure(TypeError("x")) is None and expected_failure(OSError(28, "No space left")) is not None


@pytest.mark.e2e
def test_mismatched_resume_is_refused_untouched_and_a_corrected_rerun_continues(files, tmp_path, capsys):
    run = ["train", "--config", str(files["config"]), f"checkpoint.dir={tmp_path / 'run'}"]
    assert main([*run, "train.steps=2"]) == 0
    capsys.readouterr()
    fails_cleanly([*run, "train.steps=3", "model.dim=48"], capsys, tmp_path, "written for another model",
                  "dim: 32 vs 48", "use another checkpoint.dir or the original model settings")
    assert main([*run, "train.steps=3"]) == 0
    out, err = capsys.readouterr()
    assert "stopped at step 3" in out and "Exception ignored" not in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["1", "2", "3"]


@pytest.mark.parametrize("args, expected", [
    ("finetune finetune.train=hf:{tmp}/nope", "no directory {tmp}/nope"),
    ("finetune finetune.train={tmp}", "is a directory"),
    ("finetune finetune.train={root}/sft.jsonl finetune.fields=prompt", "finetune.fields must map"),
    ("finetune finetune.train={root}/sft.jsonl finetune.fields={{\"question\":\"q\"}}", "not record fields"),
    ("finetune finetune.train={root}/sft.jsonl finetune.init_from={tmp}/missing", "{tmp}/missing"),
    ("finetune finetune.train={root}/sft.jsonl finetune.init_from=null", "finetune.init_from is not set"),
    ("finetune finetune.train={root}/sft.jsonl lora.rank=-2", "rank >= 0"),
    ("finetune finetune.train={root}/sft.jsonl lora.rank=2 lora.targets=[zz]", "'zz' matches no module"),
    ("train mesh.data=2 mesh.fsdp=2", "set one axis to -1"),
    ("train model.n_heads=3", "divisible by model.n_heads"),
    ("train data.seq_len=64", "max_seq_len"),
    ("train train.batch_size=0", "batch size 0"),
    ("train execution.attention=cudnn execution.dtype=bfloat16", "attention='cudnn' needs an NVIDIA GPU"),
    ("generate --checkpoint {tmp} --tokenizer {tok} --prompt a", "not a known checkpoint layout"),
    ("generate --checkpoint {hf} --tokenizer {tmp} --prompt a", "tokenizer model not found"),
    ("generate --checkpoint {hf} --tokenizer {tok} --prompt a --max-new-tokens -3", "max_new_tokens"),
    ("generate --checkpoint {hf} --tokenizer {tok} --prompt a --temperature -1", "temperature"),
    ("generate --checkpoint {hf} --tokenizer {tok} --prompt a --top-p 2", "top_p"),
    ("merge --base {hf} --adapter {tmp} --output {tmp}/merged", "no adapter_config.json"),
    ("plan --topology v5e-7", "no standard slice shape"),
])
def test_more_bad_inputs_of_a_new_user(files, tmp_path, capsys, args, expected):
    """Config, data, tokenizer, checkpoint, sampling, path, mesh and topology mistakes beyond the ones above."""
    (files["root"] / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    names = {"tmp": tmp_path, "root": files["root"], "hf": files["hf"], "tok": files["tokenizer"]}
    command, *rest = args.format(**names).split()
    if command in ("train", "finetune"):
        base = [f"finetune.init_from={files['hf']}"] if command == "finetune" else []
        rest = ["--config", str(files["config"]), f"checkpoint.dir={tmp_path / 'run'}", *base, *rest]
    fails_cleanly([command, *rest], capsys, files["root"], expected.format(**names))
