"""Seconds to create a preset's random parameters with `sharded_init`, unrolled and scanned, on the current devices.

    python experiments/bench_init.py --preset llama2-7b            # compile + run (needs the memory: 27 GB fp32)
    python experiments/bench_init.py --preset llama2-7b --aot      # compile only, nothing allocated (any machine)

Each parameter is drawn by its own small jitted program, one per distinct (initializer, shape, sharding), so the
count stays the same at any depth.
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx
from peers import record

from llama_jax.config import ExecutionConfig, LlamaConfig
from llama_jax.model import Llama
from llama_jax.sharding import compile_init, make_mesh, sharded_init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--aot", action="store_true", help="compile every init program but run none")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()

    mesh = make_mesh()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
    for scan in (False, True):
        cfg = LlamaConfig.preset(args.preset, **({} if args.layers is None else {"n_layers": args.layers}))
        execution = ExecutionConfig(param_dtype=args.param_dtype, scan_layers=scan)

        def ctor() -> Llama:
            return Llama(cfg, execution, rngs=nnx.Rngs(0))

        start = time.perf_counter()
        if args.aot:
            programs = compile_init(ctor, mesh)
        else:
            model = sharded_init(ctor, mesh)
            jax.block_until_ready(nnx.state(model))
            programs = None
            del model
        seconds = time.perf_counter() - start
        what = f"compiled {programs} programs (AOT)" if args.aot else "compiled and ran"
        layout = "scanned" if scan else "unrolled"
        print(f"{args.preset} ({cfg.n_layers} layers, {layout}, {args.param_dtype}): {what} in {seconds:.1f} s",
              flush=True)
        record(args.json, kind="init", model=args.preset, layers=cfg.n_layers, scan=scan, aot=args.aot,
               seconds=seconds, device=jax.devices()[0].device_kind)


if __name__ == "__main__":
    main()
