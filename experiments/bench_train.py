"""Train-step throughput: tokens/s, MFU and peak memory of llama_jax's jitted step, optionally against HF torch.

    python experiments/bench_train.py                       # the ~25M-param config and the `tiny` preset
    python experiments/bench_train.py --models bench25m --compare-torch   # + HF LlamaForCausalLM/torch AdamW
    python experiments/bench_train.py --models llama2-7b --layers 8 --batch 4 --seq 4096 --dtype bfloat16 \
        --remat full --scan --attention cudnn --compare-torch    # the GPU table's row

MFU = LlamaConfig.flops_per_token(seq) x tokens/s / peak, against both the chip's spec (`llama_jax.chips`; a
timed matmul in the compute dtype on CPU) and a matmul ceiling timed here (n x n in the compute dtype, random data).
`--dtype bfloat16` computes in bf16 with float32 master weights (torch: autocast bf16 over float32 parameters). With
`--compare-torch` the HF peer runs first in the same process (sdpa attention, gradient checkpointing when `--remat`
is not `none`, fused AdamW on CUDA) and hands its memory back before JAX allocates. `--rounds N` (CPU) times the two
in turn N times and reports each round's ratio and the medians: a 2-core CPU's speed drifts by 10-25% between
sittings, so one pair of timings minutes apart can land on either side of 1.0.
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import numpy as np
from peers import (hf_model, jax_peak_gib, record, releasing_torch, timed, torch_device, torch_peak_gib,
                   torch_sync)

from llama_jax.attention import check_setting
from llama_jax.config import (ATTENTION, PRESETS, REMAT_POLICIES, Config, ConfigError, ExecutionConfig, LlamaConfig,
                             MeshConfig)
from llama_jax.sharding import make_mesh
from llama_jax.chips import chip_for_device_kind
from llama_jax.training.metrics import measured_matmul_flops, peak_flops_per_device
from llama_jax.training.step import Trainer

MODELS = {
    "bench25m": dict(dim=512, n_layers=5, n_heads=8, vocab_size=8192, multiple_of=32, max_seq_len=1024),
    **PRESETS,
}


def bench_jax(model: LlamaConfig, execution: ExecutionConfig, batch: int, seq: int, steps: int,
              warmup: int) -> tuple[float, float | None]:
    """(tokens/s, peak GiB) of the train step on all local devices (FSDP)."""
    cfg = Config(model=model, execution=execution, mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
    trainer = Trainer(cfg, make_mesh(cfg.mesh))
    holder = {"state": trainer.init_state()}
    tokens = {"tokens": np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq + 1)).astype(np.int32)}

    def step() -> None:
        holder["state"], metrics = trainer.train_step(holder["state"], tokens)
        jax.block_until_ready(metrics["loss"])

    return batch * seq * steps / timed(step, steps, warmup), jax_peak_gib()


@releasing_torch
def bench_torch(model: LlamaConfig, execution: ExecutionConfig, batch: int, seq: int, steps: int,
                warmup: int) -> tuple[float, float | None]:
    """(tokens/s, peak GiB) of HF LlamaForCausalLM + torch AdamW on the same shapes, float32 parameters."""
    import torch

    device = torch_device()
    hf = hf_model(model, "float32", device)
    if execution.remat != "none":
        hf.gradient_checkpointing_enable()
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                            fused=device == "cuda")
    tokens = torch.randint(0, model.vocab_size, (batch, seq + 1), device=device)
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if execution.dtype == "bfloat16"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            logits = hf(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        torch_sync(device)

    return batch * seq * steps / timed(step, steps, warmup), torch_peak_gib(device)


def matmul_ceiling(dtype: str) -> float:
    """FLOP/s of a timed matmul in the compute dtype: 8192^3 on accelerators, 1024^3 on CPU."""
    return measured_matmul_flops(8192 if jax.default_backend() != "cpu" else 1024, 5, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench25m", "tiny"], choices=list(MODELS))
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default="auto", choices=ATTENTION)
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    parser.add_argument("--scan", action="store_true", help="scan over stacked layers (compiles one layer)")
    parser.add_argument("--peak-flops-per-device", type=float, help="override the device's spec peak (FLOP/s)")
    parser.add_argument("--compare-torch", action="store_true", help="also time HF LlamaForCausalLM + torch AdamW")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time llama_jax (and torch) this many times in turn; report the medians (CPU only)")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.rounds > 1 and jax.default_backend() != "cpu":
        parser.error("--rounds above 1 runs on CPU only: JAX keeps its accelerator memory pool after its first "
                     "round, so a second torch round would not fit; rerun the script instead")

    devices = jax.devices()
    overrides = {} if args.layers is None else {"n_layers": args.layers}
    models = {name: LlamaConfig(**{**MODELS[name], **overrides}) for name in args.models}
    for model in models.values():
        try:
            check_setting(args.attention, devices[0].platform, args.dtype, model.head_dim)
        except ConfigError as err:
            parser.error(f"--attention {args.attention}: {err}")
    spec = peak_flops_per_device(args.peak_flops_per_device, args.dtype) * len(devices)
    ceiling = matmul_ceiling(args.dtype) * len(devices)
    known = chip_for_device_kind(devices[0].device_kind) is not None
    print(f"devices: {len(devices)} x {devices[0].device_kind}; spec peak {spec:.3e} FLOP/s"
          f"{'' if known or args.peak_flops_per_device else f' (timed {args.dtype} matmul)'}; "
          f"measured {args.dtype} matmul {ceiling:.3e} FLOP/s", flush=True)
    for name, model in models.items():
        execution = ExecutionConfig(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                                    scan_layers=args.scan, attention=args.attention)
        rates, torch_rates = [], []
        for _ in range(args.rounds):
            if args.compare_torch:
                torch_rate, torch_peak = bench_torch(model, execution, args.batch, args.seq, args.steps, args.warmup)
                torch_rates.append(torch_rate)
            rate, peak = bench_jax(model, execution, args.batch, args.seq, args.steps, args.warmup)
            rates.append(rate)
        rate = float(np.median(rates))
        torch_rate, torch_peak = (float(np.median(torch_rates)), torch_peak) if torch_rates else (None, None)
        flops = model.flops_per_token(args.seq)
        line = (f"{name} ({model.n_layers} layers, {model.num_params() / 1e6:,.1f}M params), batch {args.batch}x"
                f"{args.seq}, {args.dtype}, attention {args.attention}, remat {args.remat}: llama_jax {rate:,.0f} "
                f"tokens/s, MFU {rate * flops / spec:.1%} of spec, {rate * flops / ceiling:.1%} of measured matmul"
                + (f", peak {peak:.1f} GiB" if peak else ""))
        if torch_rate:
            line += (f"; torch {torch_rate:,.0f} tokens/s (MFU {torch_rate * flops / spec:.1%})"
                     + (f", peak {torch_peak:.1f} GiB" if torch_peak else "")
                     + f"; llama_jax/torch = {rate / torch_rate:.2f}")
        if args.rounds > 1:
            line += f" (medians of {args.rounds} rounds)\n  rounds: llama_jax " + ", ".join(f"{r:,.0f}" for r in rates)
            if torch_rates:
                line += ("; torch " + ", ".join(f"{t:,.0f}" for t in torch_rates) + "; ratios "
                         + ", ".join(f"{r / t:.2f}" for r, t in zip(rates, torch_rates)))
        print(line, flush=True)
        record(args.json, kind="train", model=name, layers=model.n_layers, batch=args.batch, seq=args.seq,
               dtype=args.dtype, param_dtype=args.param_dtype, attention=args.attention, remat=args.remat, tok_s=rate,
               mfu_spec=rate * flops / spec, mfu_measured=rate * flops / ceiling, peak_gib=peak,
               torch_tok_s=torch_rate, torch_mfu_spec=torch_rate * flops / spec if torch_rate else None,
               torch_peak_gib=torch_peak, device=devices[0].device_kind, rounds_tok_s=rates,
               rounds_torch_tok_s=torch_rates or None)


if __name__ == "__main__":
    main()
