"""Will this config fit? AOT-compile the real train step for a TPU slice (or N GPUs) on this machine and report memory.

For TPUs, libtpu describes the named slice's chips without any TPU present (`jax.experimental.topologies`); the
`Trainer`'s jitted step is lowered on abstract inputs (ShapeDtypeStructs carrying the mesh's NamedShardings) and
compiled by the TPU compiler, whose memory analysis gives the bytes each chip needs: arguments (parameters,
optimizer state, batch), temporaries (activations, gradients, gathered weights) and code. Nothing is allocated.
The total is compared with the chip's *usable* HBM (`llama_jax.chips`: what XLA may allocate, e.g. 30.75 of a v4's
32 GiB), and a plan that leaves less than `headroom` of it free gets a warning.
For GPUs there is no such compiler here, so the step is compiled for N CPU devices: an estimate of the same program's
per-device memory, not a GPU measurement.

Slice names follow Cloud TPU accelerator types: the suffix counts TensorCores for v4 and v5p (2 per chip, `v5p-128`
= 64 chips) and chips for v5e (`v5litepod-16`, `v5e-16`) and v6e (`v6e-8`). An explicit topology (`v5p:4x4x8`,
`v5e:4x8`) is accepted too.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama_jax.attention import resolve
from llama_jax.chips import GIB, Chip, chip
from llama_jax.config import Config, ConfigError, load_config
from llama_jax.sharding import batch_sharding, bytes_per_device, check_model_fits, make_mesh, simulate_cpu_devices
from llama_jax.training.step import Trainer

DEFAULT_HEADROOM = 0.05


@dataclass(frozen=True)
class Generation:
    """One TPU generation: topology prefix, whether the name counts TensorCores, chip layout, the chip itself."""

    prefix: str
    cores_per_chip_in_name: int
    dims: int
    chip_config: str
    chip: Chip


GENERATIONS = {
    "v4": Generation("v4", 2, 3, "megacore", chip("v4")),
    "v5p": Generation("v5p", 2, 3, "megacore", chip("v5p")),
    "v5e": Generation("v5e", 1, 2, "default", chip("v5e")),
    "v6e": Generation("v6e", 1, 2, "default", chip("v6e")),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}
NAME_HELP = "e.g. v4-8, v5p-128, v5e-16 (or v5litepod-16), v6e-8, or an explicit topology such as v5p:4x4x8"


@dataclass(frozen=True)
class Target:
    """What to compile for: devices, the memory a program may use on each (and the nominal size), report words."""

    devices: list[Any]
    memory_bytes: float
    description: str
    peak_flops: float | None
    estimate_note: str = ""
    nominal_bytes: float | None = None


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's shape for a power-of-two chip count: from one host's 2x2(x1) chips, double the smallest axis,
    the last one first (v5p: 4 chips 2x2x1, 16 2x2x4, 64 4x4x4, 128 4x4x8; v5e: 8 chips 2x4, 16 4x4)."""
    shape = [1] * dims if chips == 1 and dims == 2 else [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        i = max(j for j in range(dims) if shape[j] == min(shape))
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise ConfigError(f"{chips} chips has no standard slice shape; pass an explicit topology, {NAME_HELP}")
    return tuple(shape)


def parse_topology(name: str) -> tuple[Generation, str, int]:
    """(generation, libtpu topology string, chips) for an accelerator type or explicit topology name."""
    m = re.fullmatch(r"(v\d+[a-z]*)([-:])(\d+(?:x\d+)*)", name.strip().lower())
    gen_name = ALIASES.get(m[1], m[1]) if m else None
    if gen_name not in GENERATIONS:
        raise ConfigError(f"unknown TPU topology '{name}'; use one of {sorted(GENERATIONS)}: {NAME_HELP}")
    gen = GENERATIONS[gen_name]
    if m[2] == ":":
        shape = tuple(int(d) for d in m[3].split("x"))
        if len(shape) != gen.dims:
            raise ConfigError(f"topology '{name}' must have {gen.dims} dimensions for {gen.prefix}, e.g. "
                              f"{gen.prefix}:{'x'.join(['2'] * gen.dims)}")
    else:
        count = int(m[3])
        if count % gen.cores_per_chip_in_name:
            raise ConfigError(f"'{name}': {gen.prefix}-N counts TensorCores ({gen.cores_per_chip_in_name} per chip), "
                              "so N must be even")
        shape = slice_shape(count // gen.cores_per_chip_in_name, gen.dims)
    return gen, f"{gen.prefix}:{'x'.join(map(str, shape))}", math.prod(shape)


def tpu_target(name: str) -> Target:
    """The abstract chips of a TPU slice (needs libtpu; no TPU needed)."""
    gen, topology, chips = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f'planning for TPU needs libtpu: pip install "jax[tpu]=={jax.__version__}" '
                          "(or pip install -r requirements-tpu-plan.txt)")
    # libtpu looks for a TPU VM's metadata unless told the slice (these two only quiet its warnings), and takes a
    # machine-wide lock that any JAX process probing for TPUs may hold; describing a topology needs neither.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{gen.prefix}-{chips * gen.cores_per_chip_in_name}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=gen.chip_config)
    spec = gen.chip
    return Target(list(desc.devices), spec.usable_hbm_gib * GIB,
                  f"{name} (topology {topology}, {chips} chips of {desc.devices[0].device_kind}, "
                  f"{spec.usable_hbm_gib:g} GiB usable of {spec.hbm_gib:g} GiB HBM each)", spec.peak_flops,
                  nominal_bytes=spec.hbm_gib * GIB)


def gpu_target(count: int, memory_gib: float) -> Target:
    """`count` CPU devices standing in for GPUs with `memory_gib` each."""
    if count < 1 or memory_gib <= 0:
        raise ConfigError(f"--gpus ({count}) must be >= 1 and --gpu-memory-gib ({memory_gib}) positive")
    simulate_cpu_devices(count)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ConfigError(f"planning for {count} GPUs needs {count} CPU devices but this process has "
                          f"{len(devices)}; run plan in a fresh process or set "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    return Target(devices[:count], memory_gib * GIB, f"{count} GPUs with {memory_gib:g} GiB each", None,
                  "estimate: compiled by the CPU compiler for simulated devices; GPU fusion and kernels differ")


@dataclass
class Plan:
    target: Target
    mesh_shape: dict[str, int]
    batch: tuple[int, int]
    params_bytes: int
    opt_bytes: int
    batch_bytes: int
    temp_bytes: int
    other_bytes: int
    flops_per_step: float
    compile_s: float
    headroom: float = DEFAULT_HEADROOM
    attention: str = "xla"
    frozen_bytes: int = 0  # the base weights LoRA keeps fixed (not in the optimizer)

    @property
    def total_bytes(self) -> int:
        return (self.params_bytes + self.frozen_bytes + self.opt_bytes + self.batch_bytes + self.temp_bytes
                + self.other_bytes)

    @property
    def fits(self) -> bool:
        """At most the usable memory per device (what XLA may allocate, not the nominal HBM)."""
        return self.total_bytes <= self.target.memory_bytes

    @property
    def fits_with_headroom(self) -> bool:
        """Fits and leaves at least `headroom` of the usable memory free (fragmentation, other libtpu releases)."""
        return self.total_bytes <= (1 - self.headroom) * self.target.memory_bytes

    def verdict(self) -> str:
        """'fits', 'fits, but ...' (under the headroom) or 'does not fit ...', with the numbers."""
        usable, total = self.target.memory_bytes / GIB, self.total_bytes / GIB
        if not self.fits:
            return (f"does not fit: needs {total:.2f} GiB per chip, {total - usable:.2f} GiB more than the "
                    f"{usable:g} GiB usable")
        free = 1 - total / usable
        if not self.fits_with_headroom:
            return (f"fits, but warning: only {100 * free:.1f}% ({usable - total:.2f} GiB) free, under the "
                    f"{100 * self.headroom:g}% headroom; use a smaller batch or sequence, or more chips")
        return f"fits ({100 * free:.0f}% free)"

    def report(self) -> str:
        per = "chip" if self.target.peak_flops else "device"
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh_shape.items())
        trained = [("parameters", self.params_bytes)] if not self.frozen_bytes else [
            ("LoRA adapters", self.params_bytes), ("frozen base", self.frozen_bytes)]
        rows = [*trained, ("optimizer state", self.opt_bytes), ("batch", self.batch_bytes),
                ("activations + temporaries", self.temp_bytes), ("outputs + code", self.other_bytes)]
        lines = [f"plan: {self.target.description}", f"mesh: {mesh}; global batch {self.batch[0]} x {self.batch[1]} "
                 f"tokens; attention {self.attention}; compiled in {self.compile_s:.1f} s", f"memory per {per}:"]
        lines += [f"  {name:<27}{b / GIB:9.2f} GiB" for name, b in rows]
        nominal = self.target.nominal_bytes
        of = f"{self.target.memory_bytes / GIB:g} GiB" + (
            f" usable ({nominal / GIB:g} GiB nominal)" if nominal and nominal != self.target.memory_bytes else "")
        lines.append(f"  {'total':<27}{self.total_bytes / GIB:9.2f} GiB of {of} "
                     f"({100 * self.total_bytes / self.target.memory_bytes:.0f}%): {self.verdict()}")
        flops = f"model FLOPs per step: {self.flops_per_step:.3e}"
        if self.target.peak_flops:
            ideal = self.flops_per_step / (self.target.peak_flops * len(self.target.devices))
            flops += f" ({ideal:.2f} s per step at 100% MFU)"
        lines.append(flops)
        if self.target.estimate_note:
            lines.append(self.target.estimate_note)
        return "\n".join(lines)


def plan_step(cfg: Config, target: Target, headroom: float = DEFAULT_HEADROOM) -> Plan:
    """Compile `cfg`'s train step for `target`'s devices on `cfg.mesh` and measure its memory per device."""
    if not 0 <= headroom < 1:
        raise ConfigError(f"--headroom must be a fraction in [0, 1), e.g. 0.05, got {headroom}")
    mesh = make_mesh(cfg.mesh, target.devices)
    check_model_fits(cfg.model, mesh)
    trainer = Trainer(cfg, mesh)
    state, frozen = trainer.abstract_state(), trainer.abstract_frozen()
    shape = (cfg.train.batch_size, cfg.data.seq_len + 1)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, shape))}
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = trainer.jitted_train_step(batch).lower(state, frozen, trainer.objective.inputs, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    params, opt, data, fixed = (bytes_per_device(x) for x in (state.params, state.opt_state, batch, frozen))
    other = (memory.argument_size_in_bytes - params - opt - data - fixed + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.generated_code_size_in_bytes)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return Plan(target, dict(_mesh_sizes(mesh)), (cfg.train.batch_size, cfg.data.seq_len), params, opt, data,
                memory.temp_size_in_bytes, other, cfg.model.flops_per_token(cfg.data.seq_len) * tokens, seconds,
                headroom, resolve(cfg.execution.attention, target.devices[0].platform), fixed)


def _mesh_sizes(mesh: Mesh) -> list[tuple[str, int]]:
    return [(name, mesh.shape[name]) for name in mesh.axis_names]


def plan(config: str | None, overrides: list[str], topology: str | None = None, gpus: int | None = None,
         gpu_memory_gib: float = 80.0, headroom: float = DEFAULT_HEADROOM) -> Plan:
    """Plan `config` (+ overrides) for a TPU `topology` or for `gpus` GPUs of `gpu_memory_gib` each; warn when less
    than `headroom` of the usable memory would stay free."""
    if (topology is None) == (gpus is None):
        raise ConfigError("give exactly one of --topology (e.g. v5p-128) or --gpus N")
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # the host side; TPU chips come from libtpu's description
    cfg = load_config(config, overrides)
    target = tpu_target(topology) if topology is not None else gpu_target(gpus, gpu_memory_gib)
    return plan_step(cfg, target, headroom)
