"""Worked fine-tuning example: a tiny model learns to reverse three words; full fine-tuning vs LoRA.

Stage 1 builds a small "pretrained" base offline from a random init with plain-text records (the `text` shape)
that show the skill in prose, `tiger lemon piano backwards is piano lemon tiger`; stage 2 fine-tunes it on
Llama-2-chat dialogs (`messages` shape, loss on the answers only) that ask for it as an instruction, twice: every
weight, and LoRA adapters on all seven projections. Accuracy is exact match of the greedy answer on held-out chat
prompts.

    python experiments/sft_example.py --out runs/sft_example            # the README numbers
    python experiments/sft_example.py --out /tmp/sft --scale 0.25       # a shortened run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from llama_jax.chat import encode_dialog
from llama_jax.checkpoints import load_pretrained, save_pretrained
from llama_jax.checkpoints.peft import load_peft
from llama_jax.config import Config, LlamaConfig, load_config
from llama_jax.inference.generate import generate
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.finetune import finetune

CONFIG = Path(__file__).resolve().parent / "configs" / "sft_reverse.yaml"
WORDS = ("apple river stone cloud tiger lemon piano rocket garden silver candle forest violin marble copper "
         "window").split()
MODEL = LlamaConfig(dim=96, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)


def task(rng: np.random.Generator, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        words = list(rng.choice(WORDS, 3, replace=False))
        out.append({"messages": [{"role": "user", "content": "reverse: " + " ".join(words)},
                                 {"role": "assistant", "content": " ".join(reversed(words))}]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def chat_corpus(records: list[dict]) -> list[str]:
    """Tokenizer training text of single-turn chat records, as the chat template lays them out."""
    return [f"[INST] {r['messages'][0]['content']} [/INST] {r['messages'][1]['content']}" for r in records]


def random_base(out: Path, model: LlamaConfig, corpus: list[str]) -> Tokenizer:
    """Train `out/tokenizer.model` on `corpus` and write a randomly initialised `model` to `out/random`."""
    tokenizer = Tokenizer.train(iter(corpus), model.vocab_size, out / "tokenizer", overwrite=True)
    # a small corpus (the notebook's test settings) yields fewer pieces; the model must not emit ids beyond them
    model = dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
    save_pretrained(Llama(model, rngs=nnx.Rngs(0)), out / "random", "orbax", overwrite=True)
    return tokenizer


def finetune_run(out: Path, name: str, init_from: str, data: str, validation: str | None, epochs: float,
                 *extra: str, config: Path = CONFIG, stage: Callable[[Config], Any] = finetune) -> tuple[float, Any]:
    """Fine-tune `init_from` on the JSONL `data` into `out/name` with `config` (tokenizer from `random_base`), or run
    another `stage` that starts from a checkpoint (reward model, DPO); returns the seconds it took and its result."""
    overrides = [f"finetune.init_from={init_from}", f"finetune.train={data}", f"finetune.validation={validation}",
                 f"data.tokenizer={out / 'tokenizer.model'}", f"checkpoint.dir={out / name}",
                 f"finetune.epochs={epochs}", *extra]
    start = time.perf_counter()
    result = stage(load_config(config, overrides))
    return time.perf_counter() - start, result


def accuracy(model: Llama, tokenizer: Tokenizer, records: list[dict]) -> float:
    """Exact-match rate of the greedy reply to each record's user turn."""
    prompts = [encode_dialog(tokenizer, r["messages"][:1]) for r in records]
    replies = generate(model, prompts, max_new_tokens=12, eos_id=tokenizer.eos_id)
    answers = [tokenizer.decode([t for t in reply if t != tokenizer.eos_id]).strip() for reply in replies]
    return float(np.mean([a == r["messages"][1]["content"] for a, r in zip(answers, records)]))


VARIANTS = {"full": (), "lora": ("lora.rank=8", "lora.alpha=16", "lora.targets=[.*]")}


def make_data(out: Path, n_train: int, n_test: int = 100) -> tuple[dict[str, str], list[dict], Tokenizer]:
    """The task's JSONL files (chat `train` / `valid`, plain-text `text` for the base), held-out test records, and
    the tokenizer and random init (`out/random`) of `random_base`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train, valid, test = task(rng, n_train), task(rng, 64), task(rng, n_test)
    text = [{"text": f"{' '.join(w)} backwards is {' '.join(reversed(w))}"}
            for w in (list(rng.choice(WORDS, 3, replace=False)) for _ in range(2 * n_train))]
    files = {name: write_jsonl(out / f"{name}.jsonl", recs)
             for name, recs in (("train", train), ("valid", valid), ("text", text))}
    tokenizer = random_base(out, MODEL, chat_corpus(train) + [t["text"] for t in text])
    return files, test, tokenizer


def run(out: Path, scale: float = 1.0, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, dict[str, float]]:
    """Build the data, tokenizer and base, fine-tune each variant, and return the measured numbers per variant."""
    files, test, tokenizer = make_data(out, max(64, int(2000 * scale)))

    def tune(name: str, init_from: str, data: str, epochs: float, *extra: str) -> tuple[float, Any]:
        return finetune_run(out, name, init_from, data, files["valid"], epochs, *extra)

    tune("base", str(out / "random"), files["text"], max(1.0, 4 * scale))
    base = load_pretrained(out / "base")
    results = {"base": {"accuracy": accuracy(base, tokenizer, test)}}
    epochs = max(1.0, 6 * scale)
    for name in variants:
        seconds, result = tune(name, str(out / "base"), files["train"], epochs, *VARIANTS[name])
        state = result.state
        model = _tuned(result.run_dir, out / "base", lora=bool(VARIANTS[name]))
        trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
        optimizer = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
        results[name] = {"accuracy": accuracy(model, tokenizer, test), "trainable_params": trainable,
                         "optimizer_bytes": optimizer, "tokens_per_s": result.tokens_per_s or 0.0,
                         "validation_loss": result.validation.loss, "steps": result.step, "seconds": seconds}
    return results


def _tuned(run_dir: Path, base: Path, lora: bool) -> Llama:
    """The fine-tuned model: the run's newest step (full), or the base with the run's PEFT adapter (LoRA)."""
    if not lora:
        return load_pretrained(run_dir)
    return load_peft(load_pretrained(base), Path(run_dir) / "adapter")


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [f"accuracy before fine-tuning: {results['base']['accuracy']:.0%}",
             "variant  accuracy  trainable params  optimizer state  tokens/s  valid loss  steps"]
    for name in (n for n in VARIANTS if n in results):
        r = results[name]
        lines.append(f"{name:<8} {r['accuracy']:>8.0%} {r['trainable_params']:>17,} {r['optimizer_bytes'] / 1024:>13.0f} KiB"
                     f" {r['tokens_per_s']:>9.0f} {r['validation_loss']:>11.4f} {r['steps']:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sft_example", help="directory for data, tokenizer and runs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the data and epochs (0.25 = quick)")
    args = parser.parse_args()
    print(report(run(Path(args.out), args.scale)))
