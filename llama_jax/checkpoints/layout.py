"""The one mapping between a `Llama`'s parameters and Meta-named, torch-layout `(out, in)` tensors.

Every file format converts to and from this canonical form (Meta's names and Meta's un-permuted RoPE layout), so
shapes and head layouts are derived in exactly one place. Tensors move one at a time to keep peak memory near the
size of one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax.config import ExecutionConfig, LlamaConfig
from llama_jax.model import Llama
from llama_jax.sharding import abstract_init

TensorGetter = Callable[[str], Any]
"""Returns a tensor by Meta name; may also offer `file_name(meta_name)` to name it as the file does in errors."""


def meta_names(cfg: LlamaConfig) -> list[str]:
    """Every tensor name a Meta checkpoint of this config holds."""
    names = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        names += [f"layers.{i}.attention.w{p}.weight" for p in "qkvo"]
        names += [f"layers.{i}.feed_forward.w{p}.weight" for p in "123"]
        names += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    names.append("norm.weight")
    if not cfg.tie_embeddings:
        names.append("output.weight")
    return names


def _leaf(name: str) -> str:
    return name.split(".")[-2]


def to_model_layout(name: str, tensor: Any, cfg: LlamaConfig) -> Any:
    """Meta `(out, in)` tensor -> the model's parameter layout."""
    leaf = _leaf(name)
    if leaf in ("wq", "wk", "wv"):
        return tensor.T.reshape(cfg.dim, -1, cfg.head_dim)
    if leaf == "wo":
        return tensor.T.reshape(cfg.n_heads, cfg.head_dim, cfg.dim)
    if leaf in ("w1", "w2", "w3", "output"):
        return tensor.T
    return tensor


def to_meta_layout(name: str, param: Any, cfg: LlamaConfig) -> Any:
    """The model's parameter layout -> Meta `(out, in)` tensor (inverse of `to_model_layout`)."""
    leaf = _leaf(name)
    if leaf in ("wq", "wk", "wv"):
        return param.reshape(cfg.dim, -1).T
    if leaf == "wo":
        return param.reshape(-1, cfg.dim).T
    if leaf in ("w1", "w2", "w3", "output"):
        return param.T
    return param


def meta_shape(name: str, cfg: LlamaConfig) -> tuple[int, ...]:
    leaf, d, q, kv = _leaf(name), cfg.dim, cfg.attention_width, cfg.n_kv_heads * cfg.head_dim
    return {
        "tok_embeddings": (cfg.vocab_size, d), "output": (cfg.vocab_size, d),
        "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q),
        "w1": (cfg.hidden_dim, d), "w3": (cfg.hidden_dim, d), "w2": (d, cfg.hidden_dim),
    }.get(leaf, (d,))


def _path_name(path: tuple[Any, ...], layer: int | None) -> str:
    """nnx state path -> Meta name, e.g. ('layers', 3, 'attention', 'wq') -> 'layers.3.attention.wq.weight'."""
    parts = [str(p) for p in path]
    if layer is not None:
        parts.insert(1, str(layer))
    if parts[-1] != "weight":
        parts.append("weight")
    return ".".join(parts)


def _flat_params(state: Any) -> list[tuple[tuple[Any, ...], Any]]:
    return list(nnx.to_flat_state(state))


def iter_meta_tensors(model: Llama, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(meta_name, numpy tensor)` for every parameter, one at a time (gathered to host)."""
    cfg = model.cfg
    for path, var in _flat_params(nnx.state(model, nnx.Param)):
        stacked = model.execution.scan_layers and path[0] == "layers"
        for layer in range(cfg.n_layers) if stacked else [None]:
            value = var.get_value()[layer] if stacked else var.get_value()
            name = _path_name(path, layer)
            tensor = np.asarray(jax.device_get(to_meta_layout(name, value, cfg)))
            yield name, tensor.astype(dtype) if dtype is not None else tensor


def check_shape(name: str, tensor: Any, cfg: LlamaConfig, file_name: str | None = None) -> None:
    """One-line error naming the tensor (as the file calls it) when its shape does not match the config."""
    expected = meta_shape(name, cfg)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor '{file_name or name}' has shape {tuple(tensor.shape)} but the config expects {expected}; "
                         "the checkpoint does not match its config")


def restore_target(cfg: LlamaConfig, execution: ExecutionConfig, mesh: Mesh | None,
                   attach: Callable[[Llama], Llama] | None = None) -> tuple[Any, Any]:
    """(graphdef, abstract params) to restore a stored tree into: each array sharded on `mesh`, else on device 0;
    `attach` adds weights a training objective put on the model (a reward head)."""
    attach = attach or (lambda model: model)
    graphdef, abstract = abstract_init(lambda: attach(Llama(cfg, execution, rngs=nnx.Rngs(0))), mesh)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return graphdef, abstract


def build_model(cfg: LlamaConfig, execution: ExecutionConfig, get_tensor: TensorGetter,
                mesh: Mesh | None = None) -> Llama:
    """Assemble a `Llama` from Meta-named tensors fetched one by one, placing each on `mesh` if given."""
    graphdef, abstract = abstract_init(lambda: Llama(cfg, execution, rngs=nnx.Rngs(0)), mesh)
    dtype = jnp.dtype(execution.param_dtype)

    file_name = getattr(get_tensor, "file_name", lambda name: name)

    def fetch(name: str) -> np.ndarray:
        tensor = get_tensor(name)
        check_shape(name, tensor, cfg, file_name(name))
        return np.asarray(to_model_layout(name, jnp.asarray(tensor, dtype), cfg))

    flat = []
    for path, var in _flat_params(abstract):
        stacked = execution.scan_layers and path[0] == "layers"
        if stacked:
            value = np.stack([fetch(_path_name(path, i)) for i in range(cfg.n_layers)])
        else:
            value = fetch(_path_name(path, None))
        sharding = getattr(var.get_value(), "sharding", None)
        flat.append((path, var.replace(jax.device_put(value, sharding) if sharding else jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def restack(tree: dict[Any, Any], n_layers: int, stacked: bool) -> dict[Any, Any]:
    """A pure parameter dict with its `layers` converted between per-layer entries `{0: block, 1: block, ...}`
    (`stacked=False`) and one block whose arrays carry a leading layer axis (`stacked=True`, for `lax.scan`)."""
    layers = tree["layers"]
    if stacked:
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in range(n_layers)])
    else:
        layers = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n_layers)}
    return {**tree, "layers": layers}


def relayout_states(tree: Any, target: Any, n_layers: int, stacked: bool) -> Any:
    """`tree` with every nnx State in it (parameters, optimizer moments) restacked to `stacked` and placed with the
    shardings of the matching State in `target` (same structure, abstract arrays)."""
    def one(source: Any, dest: Any) -> Any:
        if not isinstance(source, nnx.State):
            return source
        shardings = jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(dest))
        result = jax.tree.map(lambda a: a, dest)
        nnx.replace_by_pure_dict(result, jax.device_put(restack(nnx.to_pure_dict(source), n_layers, stacked),
                                                        shardings))
        return result
    return jax.tree.map(one, tree, target, is_leaf=lambda x: isinstance(x, nnx.State))
