"""Prefill and decode throughput of `llama_jax.generate`'s compiled programs, with random weights.

For each model shape and batch size: prefill tokens/s (B x prompt tokens in one pass) and decode tokens/s (B tokens
per step of the jitted `while_loop`, greedy unless `--temperature` (and `--top-p`) sample, no EOS so every step
runs), after one warm-up run that compiles, and the step's floor: the bytes it must read (every weight, the whole
preallocated cache) over a measured bandwidth.
Defaults: `python experiments/bench_decode.py` (stories15m and stories110m shapes, batch 1 and 16, prompt 128,
128 new tokens) on whatever devices jax sees; a quick smoke run:
`python experiments/bench_decode.py --models tiny --batch-sizes 1 --prompt-len 8 --new-tokens 8`.

`--compare-torch` times HF `generate` (static KV cache, same weights' shape, same device) on the same batch,
prompt and new tokens; its tokens/s count the whole call (prefill included). The peers decode as ours does: greedy,
or sampled at the same `--temperature` / `--top-p` (HF with its default top-k 50 turned off; llama2.c's `-t` / `-p`).
`--llama2c PATH` times a llama2.c `run` binary that you built (batch 1 only: it decodes one sequence) on our llama2c
export of the same random weights, with a synthetic byte-level `tokenizer.bin` and a prompt of the same length,
`--repeats` times, keeping its best run as ours keeps its best loop; llama2.c's own "achieved tok/s" counts every
position it runs (prompt positions go one token at a time there). `--llama2c-runq PATH` does the same for llama2.c's
int8 `runq` on our version-2 (Q8_0) export. `--quant int8|int4` times weight-only quantized weights
(`execution.quant`); the floor then counts their packed bytes. `matmuls ms` (float weights) is the same weights'
matrix products alone, chained in one jitted loop: the part of a step the backend's matrix kernels take by
themselves. Ratios are this run's, on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from peers import hf_model, measured_bandwidth, record, releasing_torch, timed, torch_device, torch_sync

from llama_jax.checkpoints.io import save_pretrained
from llama_jax.checkpoints.llama2c import TOKENIZER, write_tokenizer_bin
from llama_jax.config import ATTENTION, QUANT, ExecutionConfig, LlamaConfig
from llama_jax.einsum import einsum
from llama_jax.inference.generate import PAD, bucket, decode_loop_jit, prefill_jit
from llama_jax.inference.sampling import Sampling
from llama_jax.model import Llama
from llama_jax.quant import parameter_bytes, quantize_model
from llama_jax.sharding import make_mesh, sharded_init


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return time.perf_counter() - start, result


def step_bytes(model: Llama, batch: int, slots: int) -> int:
    """Bytes one decode step must read: every weight once, and the keys/values of every cache slot."""
    cfg = model.cfg
    cache = 2 * cfg.n_layers * batch * slots * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(model.execution.dtype).itemsize
    return parameter_bytes(nnx.state(model, nnx.Param)) + cache


def matmul_ms(model: Llama, batch: int, steps: int = 20) -> float:
    """Milliseconds per step of the step's weight products alone: each projection and the output head as a
    `[batch, in] x [in, out]` product, one after another (each input waits for the previous product) in one jitted
    loop; no attention, norms, cache or sampling. What the backend's matrix kernels cost by themselves at this batch."""
    specs, mats = [], []  # as the model multiplies them (`random_model` keeps the layers unrolled)
    for module, name, in_dims in model.projections():
        value = getattr(module, name)[...]
        specs.append("bi,io->bo")
        mats.append(value.reshape(math.prod(value.shape[:in_dims]), -1))
    if model.cfg.tie_embeddings:  # the logits read the table as it is stored, [vocab, dim]
        specs.append("bi,oi->bo")
        mats.append(model.tok_embeddings[...])
    rng = np.random.default_rng(0)
    inputs = [jnp.asarray(rng.standard_normal((batch, m.shape[0] if spec == "bi,io->bo" else m.shape[1])), m.dtype)
              for spec, m in zip(specs, mats)]

    @jax.jit
    def loop(mats: list[jax.Array], inputs: list[jax.Array]) -> jax.Array:
        def body(_: int, link: jax.Array) -> jax.Array:
            for spec, m, x in zip(specs, mats, inputs):
                link = einsum(spec, x + link, m)[0, 0] * 1e-6
            return link
        return jax.lax.fori_loop(0, steps, body, jnp.zeros((), mats[0].dtype))

    loop(mats, inputs).block_until_ready()
    return 1e3 * min(_timed(lambda: loop(mats, inputs))[0] for _ in range(3)) / steps


def random_model(cfg: LlamaConfig, execution: ExecutionConfig) -> Llama:
    """Random weights born sharded on all devices, then quantized as `execution.quant` asks."""
    model = sharded_init(lambda: Llama(cfg, dataclasses.replace(execution, quant="none"), rngs=nnx.Rngs(0)),
                         make_mesh())
    return quantize_model(model, execution.quant, execution.quant_group_size) if execution.quant != "none" else model


def bench(cfg: LlamaConfig, execution: ExecutionConfig, batch: int, prompt_len: int, new_tokens: int,
          repeats: int, sampling: Sampling = Sampling()) -> tuple[dict, Llama]:
    """Best-of-`repeats` seconds for prefill and for the decode loop of one (model, batch) setting."""
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt {prompt_len} + new {new_tokens} exceeds the context of {cfg.max_seq_len}")
    mesh = make_mesh()
    model = random_model(cfg, execution)
    graphdef, params = nnx.split(model)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    pad = np.zeros((batch,), np.int32)
    n_out = bucket(new_tokens, 1)
    args = dict(sampling=sampling, slots=prompt_len + n_out, n_out=n_out)
    eos, max_new = jnp.int32(PAD), jnp.int32(new_tokens)

    def prefill():
        return prefill_jit(graphdef, params, tokens, pad, jax.random.key(0), eos, **args)

    prefill_s, decode_s = [], []
    with jax.set_mesh(mesh):
        for _ in range(repeats + 1):  # the first round compiles
            seconds, state = _timed(prefill)
            prefill_s.append(seconds)
            seconds, state = _timed(lambda: decode_loop_jit(graphdef, params, state, eos, max_new,
                                                            sampling=args["sampling"]))
            decode_s.append(seconds)
    assert int(state.step) == new_tokens
    prefill_best, decode_best = min(prefill_s[1:]), min(decode_s[1:])
    return dict(params_m=cfg.num_params() / 1e6, prefill_tok_s=batch * prompt_len / prefill_best,
                decode_tok_s=batch * (new_tokens - 1) / decode_best,
                ms_per_step=1e3 * decode_best / (new_tokens - 1)), model


@releasing_torch
def bench_torch(cfg: LlamaConfig, dtype: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                sampling: Sampling = Sampling()) -> float:
    """Tokens/s of HF `generate` (static cache; greedy, or sampled as `sampling` says) for `batch` random prompts,
    prefill included."""
    import torch

    device = torch_device()
    hf = hf_model(cfg, dtype, device).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
    drawing = (dict(do_sample=False) if sampling.greedy else
               dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0))

    def run() -> None:
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, cache_implementation="static", pad_token_id=0, **drawing)
        torch_sync(device)

    return batch * new_tokens / min(timed(run, 1, 1 if i == 0 else 0) for i in range(repeats))


def bench_llama2c(binary: str, model: Llama, prompt_len: int, new_tokens: int, version: int = 0,
                  repeats: int = 1, sampling: Sampling = Sampling()) -> float:
    """llama2.c's best reported tokens/s of `repeats` runs on one export of `model` (version 0 float32 for `run`,
    version 2 int8 for `runq`), prompt of `prompt_len` tokens, greedy or sampled as `sampling` says."""
    if not Path(binary).is_file():
        raise FileNotFoundError(f"{binary} does not exist; build llama2.c's `run` / `runq` (make runomp) first")
    with tempfile.TemporaryDirectory() as tmp:
        out = save_pretrained(model, Path(tmp) / "export", format="llama2c", dtype="float32", version=version)
        vocab = model.cfg.vocab_size
        # ids 3..258 are the byte-fallback pieces llama2.c encodes any text with; " " is its dummy prefix.
        pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)] + [b" "]
        pieces += [f"t{i}".encode() for i in range(len(pieces), vocab)]
        write_tokenizer_bin(pieces[:vocab], [0.0] * vocab, Path(tmp) / TOKENIZER)
        prompt = "a" * (prompt_len - 2)  # + BOS + the dummy prefix = prompt_len tokens
        rates = []
        for _ in range(repeats):
            run = subprocess.run([binary, str(Path(out) / "model.bin"), "-z", str(Path(tmp) / TOKENIZER),
                                  "-t", str(sampling.temperature), "-p", str(sampling.top_p),
                                  "-n", str(prompt_len + new_tokens), "-i", prompt],
                                 capture_output=True, text=True, timeout=600)
            found = re.search(r"achieved tok/s: ([\d.]+)", run.stderr + run.stdout)
            if run.returncode != 0 or not found:
                raise RuntimeError(f"{binary} failed (exit {run.returncode}): {run.stderr.strip()[-300:]}")
            rates.append(float(found[1]))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories15m,stories110m", help="comma-separated LlamaConfig presets")
    parser.add_argument("--layers", type=int, help="override each preset's layer count")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens per row (>= 2)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs after the compiling one, and runs of each llama2.c binary (best is kept)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    parser.add_argument("--attention", default="auto", choices=ATTENTION)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the peers sample alike)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (1 = off)")
    parser.add_argument("--compare-torch", action="store_true", help="also time HF generate with a static cache")
    parser.add_argument("--llama2c", metavar="PATH", help="also time this llama2.c `run` binary (batch 1 rows)")
    parser.add_argument("--llama2c-runq", metavar="PATH", help="also time this llama2.c int8 `runq` binary (batch 1)")
    parser.add_argument("--quant", default="none", choices=QUANT, help="weight-only quantization (execution.quant)")
    parser.add_argument("--quant-group-size", type=int, default=128, help="int4: input features per scale")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first token comes from prefill)")
    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p)
    except ValueError as err:
        parser.error(f"--temperature / --top-p: {err}")
    configs = {}
    for preset in args.models.split(","):
        try:
            configs[preset] = LlamaConfig.preset(preset, **({} if args.layers is None else {"n_layers": args.layers}))
        except ValueError as err:
            parser.error(str(err))
        if args.prompt_len + args.new_tokens > configs[preset].max_seq_len:
            parser.error(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds {preset}'s context "
                         f"of {configs[preset].max_seq_len} tokens; lower them")

    devices = jax.devices()
    bandwidth = measured_bandwidth(0.25 if jax.default_backend() == "cpu" else 1.0)
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); prompt {args.prompt_len}, "
          f"new {args.new_tokens}, {sampling}, {args.dtype}, quant {args.quant}; measured memory bandwidth "
          f"{bandwidth / 1e9:,.0f} GB/s")
    header = (f"{'model':<12} {'params':>8} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8} "
              f"{'floor ms':>8} {'matmuls ms':>10}")
    print(header + ("  peer tok/s  ratio" if args.compare_torch or args.llama2c or args.llama2c_runq else ""))
    print("-" * len(header))
    for preset, cfg in configs.items():
        execution = ExecutionConfig(dtype=args.dtype, param_dtype=args.dtype, attention=args.attention,
                                    quant=args.quant, quant_group_size=args.quant_group_size)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r, model = bench(cfg, execution, batch, args.prompt_len, args.new_tokens, args.repeats, sampling)
            slots = args.prompt_len + bucket(args.new_tokens, 1)
            r["floor_ms"] = 1e3 * step_bytes(model, batch, slots) / bandwidth
            r["matmul_ms"] = matmul_ms(model, batch) if args.quant == "none" else None
            line = (f"{preset:<12} {r['params_m']:>7.1f}M {batch:>5} {r['prefill_tok_s']:>14,.0f} "
                    f"{r['decode_tok_s']:>13,.1f} {r['ms_per_step']:>8.2f} {r['floor_ms']:>8.2f} "
                    f"{'—' if r['matmul_ms'] is None else format(r['matmul_ms'], '.2f'):>10}")
            peers = {}
            if args.compare_torch:
                peers["hf_static"] = bench_torch(cfg, args.dtype, batch, args.prompt_len, args.new_tokens, args.repeats,
                                                 sampling)
            # llama2.c's binaries run as often as our loop is timed, and keep their best too.
            if args.llama2c and batch == 1:
                peers["llama2c"] = bench_llama2c(args.llama2c, model, args.prompt_len, args.new_tokens,
                                                 repeats=args.repeats, sampling=sampling)
            if args.llama2c_runq and batch == 1:
                peers["llama2c_runq"] = bench_llama2c(args.llama2c_runq, model, args.prompt_len, args.new_tokens, 2,
                                                      repeats=args.repeats, sampling=sampling)
            for name, rate in peers.items():
                # llama2.c's tokens/s counts prompt tokens, each a one-token forward pass: its ms/step is comparable
                # with our step and the floor (HF's rate includes prefill).
                step = f" ({1e3 / rate:.2f} ms/step)" if name.startswith("llama2c") else ""
                line += f"  {name} {rate:,.1f} tok/s{step}, ratio {r['decode_tok_s'] / rate:.2f}"
            print(line, flush=True)
            record(args.json, kind="decode", model=preset, layers=cfg.n_layers, batch=batch, dtype=args.dtype,
                   quant=args.quant, prompt=args.prompt_len, new=args.new_tokens, temperature=args.temperature,
                   top_p=args.top_p, device=devices[0].device_kind,
                   xla_flags=os.environ.get("XLA_FLAGS", ""), **r, **peers)


if __name__ == "__main__":
    main()
