"""Train-step throughput: tokens/s and MFU of llama_jax's jitted step on the current devices.

    python experiments/bench_train.py                       # the ~25M-param config and the `tiny` preset
    python experiments/bench_train.py --models bench25m --compare-torch   # + HF LlamaForCausalLM/torch AdamW

MFU = LlamaConfig.flops_per_token(seq) x tokens/s / (device peak x devices); on CPU the peak is a timed matmul.
Set train-side dtypes with --dtype (bfloat16 computes in bf16 with float32 master weights).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from llama_jax.config import PRESETS, Config, ExecutionConfig, LlamaConfig, MeshConfig
from llama_jax.sharding import make_mesh
from llama_jax.training.metrics import peak_flops_per_device
from llama_jax.training.step import Trainer

MODELS = {
    "bench25m": dict(dim=512, n_layers=5, n_heads=8, vocab_size=8192, multiple_of=32, max_seq_len=1024),
    "tiny": PRESETS["tiny"],
}


def _time(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def bench_jax(model: LlamaConfig, execution: ExecutionConfig, batch: int, seq: int, steps: int, warmup: int) -> float:
    cfg = Config(model=model, execution=execution, mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
    trainer = Trainer(cfg, make_mesh(cfg.mesh))
    holder = {"state": trainer.init_state()}
    tokens = {"tokens": np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq + 1)).astype(np.int32)}

    def step() -> None:
        holder["state"], metrics = trainer.train_step(holder["state"], tokens)
        jax.block_until_ready(metrics["loss"])

    return batch * seq * steps / _time(step, steps, warmup)


def bench_torch(model: LlamaConfig, batch: int, seq: int, steps: int, warmup: int) -> float:
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(HFConfig(
        vocab_size=model.vocab_size, hidden_size=model.dim, intermediate_size=model.hidden_dim,
        num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads, num_key_value_heads=model.n_kv_heads,
        rms_norm_eps=model.norm_eps, max_position_embeddings=model.max_seq_len, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    tokens = torch.randint(0, model.vocab_size, (batch, seq + 1))

    def step() -> None:
        logits = hf(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()

    return batch * seq * steps / _time(step, steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--peak-flops-per-device", type=float, help="override the device peak (FLOP/s)")
    parser.add_argument("--compare-torch", action="store_true", help="also time HF LlamaForCausalLM + torch AdamW")
    args = parser.parse_args()

    peak = peak_flops_per_device(args.peak_flops_per_device) * jax.device_count()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; peak {peak:.3e} FLOP/s")
    for name in args.models:
        model = LlamaConfig(**MODELS[name])
        rate = bench_jax(model, ExecutionConfig(dtype=args.dtype), args.batch, args.seq, args.steps, args.warmup)
        mfu = rate * model.flops_per_token(args.seq) / peak
        line = (f"{name}: {model.num_params() / 1e6:.1f}M params, batch {args.batch}x{args.seq}, {args.dtype}: "
                f"llama_jax {rate:,.0f} tokens/s, MFU {mfu:.1%}")
        if args.compare_torch:
            torch_rate = bench_torch(model, args.batch, args.seq, args.steps, args.warmup)
            line += f"; torch (float32) {torch_rate:,.0f} tokens/s; llama_jax/torch = {rate / torch_rate:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
