"""The lm-evaluation-harness adapter: a local multiple-choice task scored through lm_eval equals our direct math."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval.utils import get_rolling_token_windows

from llama_jax import Llama, LlamaConfig
from llama_jax.evaluation import loglikelihood
from llama_jax.evaluation.lm_eval_adapter import LlamaJaxLM
from llama_jax.evaluation.loglikelihood import score_continuations
from llama_jax.inference.generate import generate
from llama_jax.inference.text import continuation
from tiny_lm import make_tiny_lm

QUESTIONS = [
    ("The cat sat on the", ["mat", "dog", "sea"], 0),
    ("Paris is the capital of", ["Italy", "France", "books"], 1),
    ("Water boils at one hundred", ["shells", "robots", "degrees"], 2),
    ("Once upon a time there was a little", ["robot", "capital", "zero"], 0),
    ("She sells sea shells by the sea", ["shore", "mat", "four"], 0),
    ("A question: what is two plus two? The answer is", ["four", "five", "Rome"], 0),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    hf_dir, tok_path, model, tok = make_tiny_lm(root, max_seq_len=32)
    return SimpleNamespace(root=root, hf_dir=hf_dir, tok_path=tok_path, model=model, tok=tok)


@pytest.fixture(scope="module")
def reference(tiny):
    """`tiny` plus the same checkpoint in transformers (torch), the independent reference (tests marked torch_ref)."""
    import transformers

    hf_model = transformers.LlamaForCausalLM.from_pretrained(tiny.hf_dir, attn_implementation="eager").eval()
    return SimpleNamespace(**vars(tiny), hf_model=hf_model)


def _direct_loglikelihood(tiny, context: str, cont: str) -> float:
    """log P(cont | BOS + context) from one unpadded forward pass of the same checkpoint in transformers (torch)."""
    ids = tiny.tok.encode(context + cont, bos=True)
    n_cont = len(ids) - len(tiny.tok.encode(context, bos=True))
    ids = ids[-(tiny.model.cfg.max_seq_len + 1):]
    return _torch_logprob_sum(tiny, ids[:-1], ids[-n_cont:])


def _torch_logprob_sum(tiny, inputs: list[int], preds: list[int]) -> float:
    """Summed log-probability of `preds` at the last len(preds) positions of `inputs`, per transformers."""
    import torch

    with torch.no_grad():
        logits = tiny.hf_model(torch.tensor([inputs])).logits[0, -len(preds):].double()
    return float(torch.log_softmax(logits, -1)[torch.arange(len(preds)), torch.tensor(preds)].sum())


def _write_task(root, questions) -> str:
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in questions))
    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return str(root / "tasks")


def _expected_accuracies(tiny, questions) -> tuple[float, float]:
    acc, acc_norm = [], []
    for question, choices, answer in questions:
        lls = np.array([_direct_loglikelihood(tiny, question, " " + c) for c in choices])
        lengths = np.array([len(c) for c in choices])  # lm_eval's acc_norm: characters of the choice
        acc.append(np.argmax(lls) == answer)
        acc_norm.append(np.argmax(lls / lengths) == answer)
    return float(np.mean(acc)), float(np.mean(acc_norm))


@pytest.mark.torch_ref
def test_scores_equal_direct_forward_pass(reference):
    import torch

    tiny = reference
    lm = LlamaJaxLM(model=tiny.model, tokenizer=tiny.tok, batch_size=4)
    requests = [SimpleNamespace(args=(q, " " + c)) for q, choices, _ in QUESTIONS for c in choices]
    got = lm.loglikelihood(requests)
    want = [_direct_loglikelihood(tiny, *r.args) for r in requests]
    np.testing.assert_allclose([g for g, _ in got], want, rtol=1e-4, atol=1e-4)
    # is_greedy: true only for the argmax token
    ids = tiny.tok.encode("The cat", bos=True)
    logits = tiny.hf_model(torch.tensor([ids])).logits[0, -1].detach().numpy()
    top, other = int(np.argmax(logits)), int(np.argmin(logits))
    (lp_top, greedy_top), (lp_other, greedy_other) = score_continuations(tiny.model, [(ids, [top]), (ids, [other])])
    assert (greedy_top, greedy_other) == (True, False) and lp_top > lp_other


@pytest.mark.torch_ref
def test_rolling_loglikelihood_predicts_each_token_once(reference):
    tiny = reference
    lm = LlamaJaxLM(model=tiny.model, tokenizer=tiny.tok, batch_size=4)
    short = "The cat sat on the mat."
    long = " ".join(q for q, _, _ in QUESTIONS)  # more tokens than the 32-token context: several windows
    assert len(tiny.tok.encode(long)) > 2 * tiny.model.cfg.max_seq_len
    got_short, got_long = lm.loglikelihood_rolling([SimpleNamespace(args=(short,)), SimpleNamespace(args=(long,))])
    assert got_short == pytest.approx(_direct_loglikelihood(tiny, "", short), abs=1e-4)
    ids, want, predicted = tiny.tok.encode(long), 0.0, 0
    for inputs, preds in get_rolling_token_windows(ids, tiny.tok.bos_id, tiny.model.cfg.max_seq_len, 1):
        want += _torch_logprob_sum(tiny, inputs, preds)
        predicted += len(preds)
    assert predicted == len(ids)
    assert got_long == pytest.approx(want, abs=1e-3)


def test_generate_until_cuts_at_stop_sequences(tiny):
    lm = LlamaJaxLM(model=tiny.model, tokenizer=tiny.tok, batch_size=2)
    prompts = ["The cat sat", "Paris is", "Water"]
    full = [continuation(tiny.tok, ids[-1:], new) for ids, new in
            ((ids, generate(tiny.model, [ids], max_new_tokens=12, eos_id=tiny.tok.eos_id)[0])
             for ids in (tiny.tok.encode(p, bos=True) for p in prompts))]
    stop = full[0][3:5]  # a stop string that occurs in the first continuation
    got = lm.generate_until([SimpleNamespace(args=(p, {"until": [stop], "max_gen_toks": 12})) for p in prompts])
    assert got[0] == full[0][:full[0].index(stop)] and len(got[0]) < len(full[0])
    assert got[1:] == [text[:text.index(stop)] if stop in text else text for text in full[1:]]


@pytest.mark.e2e
@pytest.mark.torch_ref
def test_lm_eval_task_accuracy_equals_direct_computation(reference):
    tiny = reference
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="llama_jax", model_args=f"checkpoint={tiny.hf_dir},tokenizer={tiny.tok_path},dtype=float32",
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=_write_task(tiny.root, QUESTIONS)),
        batch_size=4)
    got = results["results"]["tiny_mc"]
    acc, acc_norm = _expected_accuracies(tiny, QUESTIONS)
    assert (got["acc,none"], got["acc_norm,none"]) == pytest.approx((acc, acc_norm), abs=1e-9)


@pytest.mark.e2e
@pytest.mark.torch_ref
def test_cli_runs_lm_eval_with_our_model(reference):
    tiny = reference
    tasks, out = _write_task(tiny.root, QUESTIONS), tiny.root / "cli_results"
    result = subprocess.run(
        [sys.executable, "-m", "llama_jax", "lm-eval", "run", "--model", "llama_jax", "--model_args",
         f"checkpoint={tiny.hf_dir},tokenizer={tiny.tok_path}", "--tasks", "tiny_mc", "--include_path", tasks,
         "--batch_size", "4", "--output_path", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["tiny_mc"]
    assert (got["acc,none"], got["acc_norm,none"]) == pytest.approx(_expected_accuracies(tiny, QUESTIONS), abs=1e-9)


def _venv_with_llama_jax(root):
    """A fresh venv holding an installed copy of this repository (built as pip builds it: wheel, the .pth, entry
    points), seeing the test environment's other packages through a .pth of its own."""
    import shutil
    import site
    from pathlib import Path

    repo, src, venv = Path(__file__).parents[1], root / "src", root / "venv"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "llama_jax_lm_eval.py", "llama_jax_lm_eval.pth"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "llama_jax", src / "llama_jax", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    base = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    Path(purelib, "test_base.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in base))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
                   check=True, capture_output=True, timeout=300)
    return python


@pytest.mark.e2e
@pytest.mark.torch_ref
def test_plain_lm_eval_command_finds_installed_llama_jax(reference, tmp_path):
    """`lm_eval --model llama_jax` (lm_eval's own entry point, no llama_jax wrapper) on an installed llama_jax."""
    tiny = reference
    python = _venv_with_llama_jax(tmp_path)
    tasks, out = _write_task(tiny.root, QUESTIONS), tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the installed copy
    result = subprocess.run(
        [python, "-m", "lm_eval", "--model", "llama_jax", "--model_args",
         f"checkpoint={tiny.hf_dir},tokenizer={tiny.tok_path}", "--tasks", "tiny_mc", "--include_path", tasks,
         "--batch_size", "4", "--output_path", str(out)], capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["tiny_mc"]
    assert (got["acc,none"], got["acc_norm,none"]) == pytest.approx(_expected_accuracies(tiny, QUESTIONS), abs=1e-9)


def test_long_rows_are_scored_in_sequence_chunks():
    """Rows past `LOSS_CHUNK` positions are scored chunk by chunk, never holding `[batch, seq, vocab]` logits, with
    the log-probabilities and greedy flags of one plain forward pass."""
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, max_seq_len=2048)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 512, 1500).tolist()
    logits = np.asarray(jax.jit(lambda t: model(t))(jnp.asarray([ids[:-1]]))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    top = int(logits[1300].argmax())  # the greedy token after ids[:1301], in the second chunk
    pairs = [(ids[:-300], ids[-300:]), (ids[:1301], [top])]
    (lp, greedy), (lp_top, greedy_top) = loglikelihood.score_continuations(model, pairs, batch_size=2)
    assert lp == pytest.approx(logp[np.arange(1199, 1499), ids[-300:]].sum(), rel=1e-5)
    assert lp_top == pytest.approx(logp[1300, top], abs=1e-4)
    assert (greedy, greedy_top) == (False, True)
    graphdef, params = nnx.split(model)
    rows = jnp.zeros((2, 2048), jnp.int32)
    text = loglikelihood._row_scores_jit.lower(graphdef, params, rows, rows, rows.astype(jnp.float32)).as_text()
    assert "2048x512xf32" not in text and "1024x512xf32" in text
