"""The notebooks in experiments/notebooks run headless top to bottom, and are committed without outputs."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tiny_lm import TEXT

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "experiments" / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code), \
        f"{path.name} has outputs; clear them before committing (Edit > Clear all outputs)"
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1


def _with_parameters(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """Insert a cell setting `values` right after the `parameters` cell, as papermill does."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return nb


@pytest.mark.e2e
def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # the kernel's mesh: 2 CPU devices
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXT * 150))
    run_dir = tmp_path / "run"
    nb = _with_parameters(
        nbformat.read(REPO / "experiments" / "notebooks" / "quickstart.ipynb", as_version=4),
        INSTALL=False, CONFIG=str(REPO / "experiments" / "configs" / "tiny_ci.yaml"), TRAIN_STEPS=12,
        TRAIN_MINUTES=2.0, RUN_DIR=str(run_dir), NEW_TOKENS=16, CHECKPOINT=str(tmp_path / "run-hf"),
        CHECKPOINT_TOKENIZER=str(run_dir / "tokenizer.model"),
        OVERRIDES=[f"data.sources=[{{name: {corpus}}}]", "data.validation=null", "data.validation_fraction=0.1",
                   f"data.cache_dir={tmp_path / 'cache'}", "data.tokenizer_vocab_size=320", "model.vocab_size=320",
                   "model.max_seq_len=256",  # room for the chat turns
                   "checkpoint.every=1000", "train.sample_tokens=0"])  # one save; the notebook samples itself

    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

    def text(i: int) -> str:
        return "".join(o.get("text", "") for o in nb.cells[i].outputs if o.output_type == "stream")

    outputs = [text(i) for i in range(len(nb.cells)) if nb.cells[i].cell_type == "code"]
    joined = "\n".join(outputs)
    assert "runtime: CPU, 2 x cpu" in joined and "mesh: {'data': 1, 'fsdp': 2, 'tensor': 1}" in joined
    assert "stopped at step 12 (steps)" in joined
    assert any(o.output_type == "display_data" and "image/png" in o.data for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)
    assert (tmp_path / "run-hf" / "config.json").is_file()
    assert "['system', 'user', 'assistant', 'user', 'assistant']" in joined


@pytest.mark.e2e
def test_finetune_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    out = tmp_path / "ft"
    nb = _with_parameters(nbformat.read(REPO / "experiments" / "notebooks" / "finetune.ipynb", as_version=4),
                          INSTALL=False, OUT=str(out), N_TRAIN=64, N_TEST=8, BASE_EPOCHS=1.0, LORA_EPOCHS=1.0)

    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

    joined = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                       if o.output_type == "stream")
    assert "accuracy before fine-tuning:" in joined and "accuracy after LoRA fine-tuning:" in joined
    assert "['adapter_config.json', 'adapter_model.safetensors']" in joined and "'peft_type': 'LORA'" in joined
    assert (out / "merged" / "config.json").is_file() and "merged checkpoint accuracy:" in joined
