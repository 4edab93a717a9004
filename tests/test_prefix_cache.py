"""`generate(..., prefix_cache=)`: a call that continues the last prompt and reply runs only what it adds, and
decodes the same tokens with the same log-probabilities as a fresh generation of the whole prompt."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import Llama, generate
from llama_jax.config import ExecutionConfig, LlamaConfig, MeshConfig
from llama_jax.inference import prefix_cache as pc
from llama_jax.inference.generate import decode
from llama_jax.inference.prefix_cache import PrefixCache
from llama_jax.inference.sampling import Sampling
from llama_jax.sharding import make_mesh, sharded_init

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_hidden_dim=172, max_seq_len=128)
GREEDY = Sampling(0.0, 1.0, 0)


def run(model: Llama, prompt: list[int], cache: PrefixCache | None, new: int = 6,
        sampling: Sampling = GREEDY) -> tuple[list[int], np.ndarray]:
    """New ids and their log-probabilities for one prompt."""
    state = decode(model, [prompt], new, sampling, seed=3, prefix_cache=cache)
    out, logp = np.asarray(state.out[0]), np.asarray(state.logp[0])
    return [int(t) for t in out[out >= 0]], logp[out >= 0]


def assert_same(got: tuple[list[int], np.ndarray], want: tuple[list[int], np.ndarray]) -> None:
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,scan", [("float32", False), ("float32", True), ("bfloat16", False)],
                         ids=["f32", "f32-scan", "bf16"])
def test_turns_continue_the_cache_and_match_fresh_generation(dtype, scan):
    model = Llama(CFG, ExecutionConfig(dtype=dtype, scan_layers=scan), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    cache = PrefixCache()
    dialog = [1, *rng.integers(3, 128, 20).tolist()]
    tol = 1e-5 if dtype == "float32" else 5e-2
    for turn, added in enumerate((0, 7, 30)):  # the third turn outgrows the first cache's 64 slots
        dialog = dialog + rng.integers(3, 128, added).tolist()
        held = list(cache.ids)
        reused = cache.reusable(dialog)
        got, got_logp = run(model, dialog, cache)
        want, want_logp = run(model, dialog, None)
        assert reused == (0 if turn == 0 else len(held)), "the whole held dialog is reused"
        if dtype == "float32":
            assert got == want
        np.testing.assert_allclose(got_logp, want_logp, atol=tol, rtol=0)
        assert cache.ids == dialog + got[:-1] and int(cache.cache.index) == len(cache.ids)
        dialog = dialog + got
    assert cache.cache.slots == 128


def test_a_diverging_prompt_reuses_only_the_common_prefix():
    model = Llama(CFG, rngs=nnx.Rngs(1))
    cache = PrefixCache()
    first = list(range(1, 41))
    run(model, first, cache)
    second = first[:25] + [99, 98, 97]
    assert cache.reusable(second) == 25
    assert_same(run(model, second, cache), run(model, second, None))
    assert cache.reusable([5, 6]) == 0 and cache.reusable(second) == len(second) - 1  # at least one token runs
    sampled = Sampling(1.0, 0.9, 0)
    assert_same(run(model, second, cache, sampling=sampled), run(model, second, None, sampling=sampled))


def test_a_continuation_compiles_once_per_bucket_and_streams():
    model = Llama(dataclasses.replace(CFG, vocab_size=96), rngs=nnx.Rngs(2))  # shapes no other test compiles
    cache = PrefixCache()
    run(model, list(range(1, 30)), cache)
    before = pc.extend_jit._cache_size()
    for added in (3, 9, 14):  # every rest fits the 16-token bucket, the cache its 64 slots
        prompt = cache.ids + [7] * added
        run(model, prompt, cache, new=2)
    assert pc.extend_jit._cache_size() - before == 1
    seen: list[int] = []
    prompt = cache.ids + [5, 6]
    streamed = generate(model, [prompt], max_new_tokens=5, stream=lambda t: seen.append(int(t[0])),
                        prefix_cache=cache)
    assert streamed == [seen] == generate(model, [prompt], max_new_tokens=5)


def test_a_prefix_cache_holds_one_row_of_one_model():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="a prefix cache holds one row, got 2 prompts; pass one prompt per call"):
        generate(model, [[1, 2], [3]], prefix_cache=PrefixCache())
    cache = PrefixCache()
    new = generate(model, [[1, 2]], max_new_tokens=2, prefix_cache=cache)[0]
    other = Llama(dataclasses.replace(CFG, n_kv_heads=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="holds another model's KV cache; use a new PrefixCache"):
        generate(other, [[1, 2, 3]], max_new_tokens=2, prefix_cache=cache)
    assert cache.ids == [1, 2, new[0]] and cache.cache is not None  # kept for its own model


def test_a_continuation_attends_to_the_cache_and_projects_one_position():
    """The continuation's compiled program scores its 16-token bucket against the cache's slots, and sends one
    position through the output head (no `[1, 16, vocab]` logits)."""
    model = Llama(CFG, rngs=nnx.Rngs(0))
    cache = PrefixCache()
    run(model, list(range(1, 30)), cache)
    graphdef, params = nnx.split(model)
    text = pc.extend_jit.lower(graphdef, params, cache.cache, np.zeros((1, 16), np.int32), jnp.int32(34),
                               jnp.int32(5), jax.random.key(0), jnp.int32(-1), sampling=GREEDY, slots=64,
                               n_out=16).compile().as_text()
    assert "f32[1,2,2,16,64]" in text and "f32[1,16,128]" not in text


def test_a_sharded_model_continues_its_cache_on_the_mesh():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = sharded_init(lambda: Llama(CFG, ExecutionConfig(), rngs=nnx.Rngs(0)), mesh)
    single = Llama(CFG, ExecutionConfig(), rngs=nnx.Rngs(1))
    nnx.update(single, jax.device_put(nnx.state(sharded), jax.devices()[0]))
    cache = PrefixCache()
    prompt = list(range(1, 20))
    for _ in range(2):
        assert_same(run(sharded, prompt, cache), run(single, prompt, None))
        prompt = cache.ids + [11, 12, 13]
    assert not jax.tree.leaves(cache.cache)[0].sharding.is_fully_replicated  # kv heads over `tensor`
