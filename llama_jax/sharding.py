"""Device mesh and the one table that maps logical axis names onto it.

Parameters carry logical axis names in their `axes` metadata (`("embed", "heads", "head_dim")`); activations are
constrained with `constrain(x, names)`. `RULES` decides which mesh axes (`data`, `fsdp`, `tensor`) each name is split
over. A mesh axis that does not divide a dimension is dropped for that array (it is replicated instead), so odd
vocabulary sizes or few kv heads still run; the heads that must split are checked up front by `check_model_fits`.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax.config import ConfigError, LlamaConfig, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
    "norm": (),
    "seq": (),
    "act_embed": (),
    "cache_seq": (),
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve `-1` and check that the axis sizes multiply to the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    label = f"mesh.data={cfg.data} mesh.fsdp={cfg.fsdp} mesh.tensor={cfg.tensor}"
    if sizes.count(-1) > 1:
        raise ConfigError(f"{label}: at most one of data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{label}: axis sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"{label}: {known} does not divide the {n_devices} devices; choose sizes "
                              f"whose product divides {n_devices}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh data*fsdp*tensor = {math.prod(sizes)} but there are {n_devices} devices; "
            "set one axis to -1 to take the rest")
    return tuple(sizes)


def simulate_cpu_devices(count: int) -> None:
    """Give the CPU backend `count` devices (for meshes without accelerators). It must run before JAX starts that
    backend; afterwards the devices it already has stay (callers check the count they need)."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a (data, fsdp, tensor) mesh with Auto axes over `devices` (default: all devices)."""
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_model_fits(model_cfg: LlamaConfig, mesh: Mesh) -> None:
    """Query heads and the MLP width must split evenly over the tensor axis."""
    tensor = mesh.shape.get("tensor", 1)
    if model_cfg.n_heads % tensor:
        raise ConfigError(f"mesh tensor={tensor} does not divide n_heads={model_cfg.n_heads}; choose a divisor")
    if model_cfg.hidden_dim % tensor:
        raise ConfigError(f"mesh tensor={tensor} does not divide the MLP width {model_cfg.hidden_dim}")


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names`, keeping only mesh axes that divide each dimension."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis '{name}' has no sharding rule; add it to llama_jax.sharding.RULES")
        axes = []
        for axis in RULES.get(name, ()) if name else ():
            if axis in used or mesh.shape.get(axis, 1) == 1:
                continue
            if size % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]) == 0:
                axes.append(axis)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Batch rows split over the data and fsdp axes (as far as they divide), the other dimensions replicated."""
    return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def _active_mesh() -> Any:
    """The (data, fsdp, tensor) abstract mesh set by `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def active_spec(names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The PartitionSpec logical `names` get on the active mesh, or None without one."""
    mesh = _active_mesh()
    return None if mesh is None else logical_spec(names, shape, mesh)


def current_platform() -> str:
    """The platform the code being traced will run on: the active mesh's (`plan` sets TPU meshes on a CPU host),
    else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = None if mesh.empty else getattr(getattr(mesh, "abstract_device", None), "platform", None)
    return platform or jax.default_backend()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding when a mesh is active; a no-op otherwise (plain single-device use)."""
    spec = active_spec(names, x.shape)
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(_active_mesh(), spec))


def shard_map_logical(fn: Callable[..., jax.Array], args: Sequence[jax.Array],
                      in_names: Sequence[Sequence[str | None]], out_names: Sequence[str | None]) -> jax.Array:
    """Run `fn` on each device's shards of `args`, split by their logical axes (for kernels XLA cannot partition,
    such as Pallas calls); the output is shaped like the first argument. Called directly when no mesh is active."""
    mesh = _active_mesh()
    if mesh is None:
        return fn(*args)
    in_specs = tuple(logical_spec(names, a.shape, mesh) for names, a in zip(in_names, args))
    out_spec = logical_spec(out_names, args[0].shape, mesh)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every Variable in an nnx State (from its `axes` metadata; replicated if it has none)."""
    def one(v: Any) -> Any:
        if not _is_variable(v):
            return NamedSharding(mesh, PartitionSpec())
        names = v.get_metadata().get("axes") or (None,) * len(v.shape)
        return v.replace(NamedSharding(mesh, logical_spec(names, v.shape, mesh)))
    return jax.tree.map(one, state, is_leaf=_is_variable)


def abstract_init(ctor: Callable[[], nnx.Module], mesh: Mesh | None = None) -> tuple[Any, Any]:
    """Shapes, dtypes and (with a mesh) shardings of a module's state, allocating nothing."""
    abstract = nnx.eval_shape(ctor)
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(state, mesh)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, state


def sharded_init(ctor: Callable[[], nnx.Module], mesh: Mesh, seed: int = 0) -> nnx.Module:
    """Create a module with every parameter born sharded on `mesh`, each drawn by its own small jitted program.

    One program for the whole init grows with depth (an unrolled llama2-7b did not finish compiling in 200 s on an
    H200); one per distinct (initializer, shape, sharding) stays a handful at any depth. Each parameter names its
    initializer in its `init` metadata; its value depends only on `seed`, its name and its layer index, so it is the
    same on every mesh and with scanned or unrolled layers (threefry draws are partitionable).
    """
    graphdef, abstract = abstract_init(ctor, mesh)
    values = {path: program(*args) for path, program, args in _init_programs(abstract, seed)}
    state = nnx.from_flat_state([(path, var.replace(values[path])) for path, var in nnx.to_flat_state(abstract)])
    return nnx.merge(graphdef, state)


def compile_init(ctor: Callable[[], nnx.Module], mesh: Mesh, seed: int = 0) -> int:
    """Compile (AOT, nothing allocated) every program `sharded_init` would run; returns how many there are."""
    _, abstract = abstract_init(ctor, mesh)
    programs = {}
    for _, program, args in _init_programs(abstract, seed):
        programs.setdefault(program, args)
    with jax.set_mesh(mesh):
        for program, args in programs.items():
            program.lower(*args).compile()
    return len(programs)


def _init_programs(abstract: Any, seed: int) -> list[tuple[tuple[Any, ...], Any, tuple[jax.Array, ...]]]:
    """(path, jitted draw, its arguments) per parameter; layer indices in a path (unrolled) or a leading `layers`
    axis (scanned) both become the layer part of the key."""
    out = []
    key = jax.random.key(seed)
    for path, var in nnx.to_flat_state(abstract):
        meta = var.get_metadata()
        if "init" not in meta:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no `init` metadata to draw it from")
        name = "/".join(str(p) for p in path if not isinstance(p, int))
        layer = next((p for p in path if isinstance(p, int)), 0)
        stacked = var.shape[0] if (meta.get("axes") or (None,))[0] == "layers" else None
        program = _draw_program(meta["init"], tuple(var.shape), jnp.dtype(var.dtype), var.sharding, stacked)
        out.append((path, program, (key, np.uint32(zlib.crc32(name.encode())), np.int32(layer))))
    return out


@functools.lru_cache(maxsize=None)
def _draw_program(init: Callable[..., jax.Array], shape: tuple[int, ...], dtype: Any, sharding: Any,
                  layers: int | None) -> Any:
    def draw(key: jax.Array, name: jax.Array, layer: jax.Array) -> jax.Array:
        named = jax.random.fold_in(key, name)
        if layers is None:
            return init(jax.random.fold_in(named, layer), shape, dtype)
        keys = jax.vmap(lambda i: jax.random.fold_in(named, i))(jnp.arange(layers))
        return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)

    return jax.jit(draw, out_shardings=sharding)


def bytes_per_device(abstract_state: Any) -> int:
    """Bytes one device holds for an abstract state whose leaves carry NamedShardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract_state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total
