"""Command line: `python -m llama_jax <command> ...`. Each command only parses arguments and calls the library.

Every command is an `_add_<name>` function registering a subparser whose `run` default is the function to call.
Expected failures (bad config, bad input files, full disk: see `llama_jax.errors`) become one line on stderr and
exit status 2; `--debug` (or LLAMA_JAX_DEBUG=1) shows their traceback instead. Bugs always keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter count, layer shapes and per-device shards of a model on a mesh")
    p.add_argument("--preset", default="tiny", help="model preset name (llama2-7b, llama2-13b, llama2-70b, tiny, ...)")
    p.add_argument("--config", help="YAML config whose model/mesh sections are used instead of --preset")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices when no accelerator is present")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. mesh.tensor=2")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from llama_jax.info import print_info
    print_info(args.preset, args.config, args.overrides, args.devices)


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a LLaMA-style sentencepiece BPE tokenizer or extend one's vocabulary")
    actions = p.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a BPE model with LLaMA 2's settings (byte fallback, split digits)")
    train.add_argument("--input", nargs="+", required=True, help="text files to train on")
    train.add_argument("--vocab-size", type=int, required=True, help="number of pieces, e.g. 32000")
    train.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")
    train.set_defaults(run=_run_tokenizer_train)
    extend = actions.add_parser("extend", help="append pieces learned on a new corpus; existing ids are unchanged")
    extend.add_argument("--base", required=True, help="the sentencepiece BPE .model to extend")
    extend.add_argument("--corpus", nargs="+", required=True, help="text files in the new language or domain")
    extend.add_argument("--new-pieces", type=int, required=True, help="at most this many pieces are appended")
    extend.add_argument("--out", required=True, help="output .model path")
    extend.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    extend.set_defaults(run=_run_tokenizer_extend)


def _run_tokenizer_train(args: argparse.Namespace) -> None:
    from llama_jax.tokenizer import Tokenizer
    print(Tokenizer.train(args.input, args.vocab_size, args.out, overwrite=args.overwrite))


def _run_tokenizer_extend(args: argparse.Namespace) -> None:
    from llama_jax.tokenizer import Tokenizer
    print(Tokenizer.extend(args.base, args.corpus, args.new_pieces, args.out, overwrite=args.overwrite))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint (format detected) to orbax, hf, meta or llama2c")
    p.add_argument("--input", required=True, help="checkpoint directory (or llama2.c .bin file)")
    p.add_argument("--output", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--format", required=True, choices=["orbax", "hf", "meta", "llama2c"])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the input's dtype")
    p.add_argument("--num-shards", type=int, help="meta only: number of consolidated.NN.pth files (default 1)")
    p.add_argument("--tokenizer", help="llama2c only: sentencepiece .model to also write as tokenizer.bin")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from llama_jax.checkpoints.convert import convert
    options = {k: v for k, v in (("num_shards", args.num_shards), ("tokenizer", args.tokenizer)) if v is not None}
    print(convert(args.input, args.output, args.format, args.dtype, args.overwrite, **options))


def _add_resize_vocab(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resize-vocab", help="grow a checkpoint's vocabulary to an extended tokenizer's size")
    p.add_argument("--checkpoint", required=True, help="input checkpoint (any format)")
    p.add_argument("--tokenizer", required=True, help="the extended sentencepiece .model")
    p.add_argument("--output", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--format", choices=["orbax", "hf", "meta", "llama2c"], help="default: the input's format")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(run=_run_resize_vocab)


def _run_resize_vocab(args: argparse.Namespace) -> None:
    from llama_jax.checkpoints.resize import resize_checkpoint
    print(resize_checkpoint(args.checkpoint, args.tokenizer, args.output, args.format, args.overwrite))


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="magnitude, N:M (2:4) or structured (FFN channels, KV groups) pruning of a "
                                     "checkpoint")
    p.add_argument("--input", required=True, help="input checkpoint (any format)")
    p.add_argument("--output", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--config", help="YAML config whose prune section is used")
    p.add_argument("--format", choices=["orbax", "hf", "meta", "llama2c"], help="default: the input's format")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the input's dtype")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prune.method=2:4 or "
                   "prune.method=structured prune.ffn_hidden_dim=256")
    p.set_defaults(run=_run_prune)


def _run_prune(args: argparse.Namespace) -> None:
    from llama_jax.compression.prune import prune_checkpoint
    from llama_jax.config import load_config
    cfg = load_config(args.config, args.overrides)
    print(prune_checkpoint(args.input, args.output, cfg.prune, args.format, args.dtype, args.overwrite).report())


def _add_decoding_args(p: argparse.ArgumentParser, temperature: float, top_p: float, max_new: int) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="model checkpoint (an HF dir or any format load_pretrained reads)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's dtype")
    p.add_argument("--quant", choices=["none", "int8", "int4"],
                   help="weight-only quantization applied at load (default: as the checkpoint stores it)")
    p.add_argument("--quant-group-size", type=int, default=128, help="int4: input features sharing one scale")
    p.add_argument("--max-new-tokens", type=int, default=max_new, help="stop after this many tokens (or at EOS)")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")


def _load_for_decoding(args: argparse.Namespace) -> tuple[Any, Any]:
    """(tokenizer, model) as the decoding arguments ask."""
    from llama_jax import Tokenizer, load_pretrained
    quant = {} if args.quant is None else {"quant": args.quant, "quant_group_size": args.quant_group_size}
    return Tokenizer(args.tokenizer), load_pretrained(args.checkpoint, dtype=args.dtype, **quant)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a text prompt, streaming the new text")
    _add_decoding_args(p, temperature=0.0, top_p=1.0, max_new=256)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from llama_jax import generate_text
    from llama_jax.tokenizer import check_utf8
    prompt = check_utf8(args.prompt, "--prompt")
    tokenizer, model = _load_for_decoding(args)
    print(prompt, end="", flush=True)
    generate_text(model, tokenizer, [prompt], args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                  args.seed, on_text=lambda _, piece: print(piece, end="", flush=True))
    print()


def _add_chat(sub: argparse._SubParsersAction) -> None:
    from llama_jax.chat import CHAT_TEMPERATURE, CHAT_TOP_P
    p = sub.add_parser("chat", help="interactive Llama-2-chat conversation on stdin (/reset, /exit)")
    _add_decoding_args(p, temperature=CHAT_TEMPERATURE, top_p=CHAT_TOP_P, max_new=512)
    p.add_argument("--system", help="system prompt, kept for the whole conversation")
    p.set_defaults(run=_run_chat)


def _run_chat(args: argparse.Namespace) -> None:
    from llama_jax.inference.chat_session import chat
    tokenizer, model = _load_for_decoding(args)
    chat(model, tokenizer, sys.stdin, lambda text: print(text, end="", flush=True), args.system,
         args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)


def _add_config_command(sub: argparse._SubParsersAction, name: str, help: str, example: str, overrides: str,
                        target: str) -> None:
    """A command that runs the library function `target` ("module:function") on a YAML config with `key=value`
    overrides and prints its report; the module is imported only when the command runs."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
    p.add_argument("overrides", nargs="*", help=f"key=value config overrides, e.g. {overrides}")
    p.set_defaults(run=lambda args: _run_config(args, target))


def _run_config(args: argparse.Namespace, target: str) -> None:
    import importlib

    from llama_jax.config import load_config
    cfg = load_config(args.config, args.overrides)  # config errors surface before the heavy imports
    module, function = target.split(":")
    print(getattr(importlib.import_module(module), function)(cfg).report())


def _add_train(sub: argparse._SubParsersAction) -> None:
    _add_config_command(sub, "train", "pretrain (or resume) a model from a YAML config; see experiments/configs/",
                        "experiments/configs/shakespeare.yaml", "train.steps=100 optim.lr=1e-3",
                        "llama_jax.training.loop:train")


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    _add_config_command(sub, "finetune", "supervised fine-tuning (full or LoRA) on JSONL chat/instruction/text data",
                        "experiments/configs/sft_llama2_7b.yaml", "finetune.init_from=DIR lora.rank=16",
                        "llama_jax.training.finetune:finetune")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    _add_config_command(sub, "distill", "knowledge distillation: train a small student on a frozen teacher's soft "
                        "targets", "experiments/configs/distill_shakespeare.yaml",
                        "distill.teacher=DIR distill.temperature=2", "llama_jax.training.distill:distill")


# `align <action>`: (help, example config, example overrides, "module:function" run on the config). Add a stage here.
ALIGN_ACTIONS: dict[str, tuple[str, str, str, str]] = {
    "reward": ("train a reward model on preference pairs (ranking loss with margin), report held-out accuracy",
               "experiments/configs/rm_llama2_7b.yaml", "reward.margin=large",
               "llama_jax.alignment.reward:train_reward_model"),
    "score": ("score prompt/completion JSONL records with a trained reward model",
              "experiments/configs/rm_llama2_7b.yaml", "reward.score_input=IN.jsonl reward.score_output=OUT.jsonl",
              "llama_jax.alignment.reward:score_file"),
    "dpo": ("direct preference optimisation (dpo, ipo, label-smoothed) from an SFT checkpoint",
            "experiments/configs/dpo_llama2_7b.yaml", "dpo.beta=0.1 dpo.variant=ipo",
            "llama_jax.alignment.dpo:train_dpo"),
    "ppo": ("PPO against a reward (model or callable) with a KL penalty to the initial policy",
            "experiments/configs/ppo_tiny.yaml", "ppo.iterations=50 ppo.kl_coef=0.02", "llama_jax.alignment.ppo:ppo"),
    "rejection": ("best-of-K sampling scored by a reward, written as SFT data and fine-tuned on",
                  "experiments/configs/rejection_tiny.yaml", "rejection.samples=8",
                  "llama_jax.alignment.rejection:rejection_sampling"),
    "gatt": ("Ghost Attention data: dialogs sampled with an instruction on every turn, kept in the first only",
             "experiments/configs/gatt_tiny.yaml", "gatt.max_combined=3", "llama_jax.alignment.gatt:gatt"),
}


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="RLHF as Llama 2 did it: " + ", ".join(ALIGN_ACTIONS))
    actions = p.add_subparsers(dest="action", required=True)
    for name, (help, example, overrides, target) in ALIGN_ACTIONS.items():
        _add_config_command(actions, name, help, example, overrides, target)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter (PEFT format) into its base and write a full checkpoint")
    p.add_argument("--base", required=True, help="the base checkpoint the adapter was trained on (any format)")
    p.add_argument("--adapter", required=True, help="PEFT adapter dir (a finetune run writes RUN/adapter)")
    p.add_argument("--output", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--format", default="hf", choices=["orbax", "hf", "meta", "llama2c"])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the base's dtype")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> None:
    from llama_jax.checkpoints.peft import merge_adapter
    print(merge_adapter(args.base, args.adapter, args.output, args.format, args.dtype, args.overwrite))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a checkpoint on a dataset")
    p.add_argument("--checkpoint", required=True, help="a training run dir, a step dir, or any load_pretrained format")
    p.add_argument("--data", required=True, help="TFDS dataset name or comma-separated .txt/.jsonl files")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: tokenizer.model of the training run)")
    p.add_argument("--split", default="validation", help="dataset split (local files: train)")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per evaluated window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (global)")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (default: the whole split)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. mesh.tensor=2")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from llama_jax.training.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, args.data, args.tokenizer, args.split, args.data_dir, args.seq_len,
                                 args.batch_size, args.max_batches, args.overrides)
    print(result.report())


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="AOT-compile the train step for a TPU slice (or N GPUs): memory per chip, fits?")
    p.add_argument("--config", help="YAML config, e.g. experiments/configs/llama2_70b_v5p_128.yaml")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="TPU slice: v4-8, v5p-128, v5e-16 / v5litepod-16, v6e-8, or v5p:4x4x8")
    target.add_argument("--gpus", type=int, help="number of GPUs (a CPU-compiled estimate)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU for --gpus (default 80)")
    p.add_argument("--headroom", type=float, default=0.05, help="warn when less than this fraction of the usable "
                   "memory per chip stays free (default 0.05)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.batch_size=128")
    p.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> None:
    from llama_jax.plan import plan
    print(plan(args.config, args.overrides, args.topology, args.gpus, args.gpu_memory_gib, args.headroom).report())


def _add_lm_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness with our model registered as `--model llama_jax`",
                       description="Runs lm_eval's own command line; everything after `lm-eval` goes to it, e.g. "
                                   "run --model llama_jax --model_args checkpoint=DIR,tokenizer=FILE --tasks hellaswag")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval arguments (see `lm-eval run --help`)")
    p.set_defaults(run=_run_lm_eval)


def _run_lm_eval(args: argparse.Namespace) -> None:
    from llama_jax.evaluation import run_lm_eval
    run_lm_eval(args.lm_eval_args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (any format load_pretrained reads)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's dtype")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together in one batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more get HTTP 503")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long an idle server waits after a request so a burst is prefilled together")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel mesh size (the rest goes to fsdp)")
    p.add_argument("--quant", choices=["none", "int8", "int4"],
                   help="weight-only int8 (per channel) or int4 (groups of 128) at load (default: as stored)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from llama_jax.serving.engine import BatchingConfig
    from llama_jax.serving.server import serve
    serve(args.checkpoint, args.tokenizer, args.host, args.port, args.dtype, args.model_name,
          BatchingConfig(args.max_batch, args.max_queue, args.batch_wait_ms), args.tensor, args.quant)


COMMANDS = [_add_info, _add_tokenizer, _add_convert, _add_resize_vocab, _add_prune, _add_generate, _add_chat,
            _add_train, _add_finetune, _add_distill, _add_align, _add_merge, _add_eval, _add_plan, _add_lm_eval,
            _add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from llama_jax.errors import debug_enabled, expected_failure
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except Exception as err:
        if type(err).__name__ == "JaxRuntimeError":
            from llama_jax.distributed import await_peer_verdict
            await_peer_verdict(err)
        message = expected_failure(err)
        if message is None or args.debug or debug_enabled():
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
