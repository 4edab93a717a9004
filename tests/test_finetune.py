"""`finetune` end to end: CLI with a bad-record report, LoRA resume after SIGKILL bit-exact, merge, the adapter
export of a 2-process run, the worked example."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from llama_jax.checkpoints import save_pretrained
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer
from test_multiprocess import CHILD_XLA_FLAGS
from sigkill import killed_at_step

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "sft_reverse.yaml"
SCALE, MARGIN = 0.5, 0.5  # measured: 0% -> 87% exact match at half scale (README: 0% -> 100% at full scale)
TINY = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16, max_seq_len=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    words = "red green blue black white pink brown grey".split()
    records = []
    for i in range(120):
        w = list(rng.choice(words, 3))
        records.append({"messages": [{"role": "user", "content": "reverse: " + " ".join(w)},
                                     {"role": "assistant", "content": " ".join(w[::-1])}]} if i % 2 else
                       {"prompt": "copy: " + " ".join(w) + " =", "completion": " ".join(w)})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:20]))
    text = [f"[INST] reverse: {' '.join(rng.choice(words, 3))} [/INST] copy: =" for _ in range(200)]
    Tokenizer.train(iter(text), TINY.vocab_size, root / "tok")
    save_pretrained(Llama(TINY, rngs=nnx.Rngs(0)), root / "base", "hf")
    return root


def overrides(root: Path, run: str, *extra: str) -> list[str]:
    return [f"finetune.init_from={root / 'base'}", f"finetune.train={root / 'train.jsonl'}",
            f"finetune.validation={root / 'valid.jsonl'}", f"data.tokenizer={root / 'tok.model'}",
            f"checkpoint.dir={root / run}", "finetune.epochs=0", "train.steps=6", "checkpoint.every=3",
            "train.log_every=1", *extra]


# steps 4-5 run after checkpoint 3: after the kill they must be redone identically
KILLED_RUN = killed_at_step(5, "llama_jax.training.finetune:finetune")


@pytest.mark.e2e
def test_lora_finetune_resumes_bit_exactly_after_sigkill_and_merges(setup, tmp_path):
    lora = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.1", "lora.targets=[q,v,down]"]
    straight = subprocess.run([sys.executable, "-m", "llama_jax", "finetune", "--config", str(CONFIG),
                               *overrides(setup, "straight", *lora)], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert f"{setup / 'train.jsonl'}:121: not valid JSON" in straight.stderr
    assert "stopped at step 6 (steps)" in straight.stdout and "validation: loss" in straight.stdout

    resumed = overrides(setup, "resumed", *lora)
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(CONFIG), *resumed], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = subprocess.run([sys.executable, "-m", "llama_jax", "finetune", "--config", str(CONFIG), *resumed],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Exception ignored" not in again.stderr and "Traceback" not in again.stderr, again.stderr[-3000:]
    a = load_file(setup / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(setup / "resumed" / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 2 * 3 * TINY.n_layers
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)  # the adapters were trained
    config = json.loads((setup / "straight" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["down_proj", "q_proj", "v_proj"])

    merged = subprocess.run([sys.executable, "-m", "llama_jax", "merge", "--base", str(setup / "base"), "--adapter",
                             str(setup / "straight" / "adapter"), "--output", str(tmp_path / "merged")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.e2e
def test_worked_example_shortened_raises_accuracy(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import sft_example
    results = sft_example.run(tmp_path, scale=SCALE, variants=("full",))
    assert results["full"]["accuracy"] >= results["base"]["accuracy"] + MARGIN, sft_example.report(results)


@pytest.mark.e2e
def test_two_process_lora_export_gathers_the_sharded_adapters(setup):
    """LoRA across 2 processes x 4 devices (adapter A sharded over fsdp = all 8): every process joins the gather,
    process 0 writes, and the adapter equals the one this process (8 devices) trains."""
    from llama_jax.config import load_config
    from llama_jax.training.finetune import finetune

    lora = ["lora.rank=4", "lora.alpha=8", "lora.targets=[q,v,down]", "train.steps=2", "finetune.validation=null"]
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "launch_local.py"), "-n", "2", "-d", "4",
                           "--command", "finetune", "--config", str(CONFIG), *overrides(setup, "p2", *lora)],
                          cwd=REPO, env={**os.environ, "XLA_FLAGS": CHILD_XLA_FLAGS}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert done.stdout.count("stopped at step 2 (steps)") == 2, done.stdout[-3000:]
    finetune(load_config(CONFIG, overrides(setup, "p1", *lora)))
    two, one = (load_file(setup / name / "adapter" / "adapter_model.safetensors") for name in ("p2", "p1"))
    assert sorted(two) == sorted(one) and len(one) == 2 * 3 * TINY.n_layers
    assert any(np.abs(v).max() > 0 for k, v in two.items() if "lora_B" in k)  # trained, not the zero init
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


