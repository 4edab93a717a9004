"""RoPE: the table that default and bounded positions read agrees with the angles computed in the program, and a
forward pass that reads it compiles no sin/cos (XLA:CPU would recompute them per element of q and k)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import KVCache, Llama, LlamaConfig
from llama_jax.rope import computed_rotation, gathered_rotation, table_rotation

CFG = LlamaConfig.preset("tiny")
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 24)), jnp.int32)


def test_table_rows_match_computed_angles_within_two_ulps():
    """LLaMA 2 7B's heads (128) and theta over its whole context: every cos/sin within 2 float32 ulps of 1."""
    positions = jnp.broadcast_to(jnp.arange(4096), (2, 4096))
    computed = jax.jit(computed_rotation, static_argnums=(1, 2))(positions, 128, 10000.0)
    table = table_rotation(0, 4096, 4096, 128, 10000.0)
    for got, want in zip(table, computed):
        assert got.shape == (1, 4096, 1, 64) and want.shape == (2, 4096, 1, 64)
        assert float(jnp.max(jnp.abs(got - want))) <= 2 * 2.0 ** -23
    rows = jax.jit(lambda s: table_rotation(s, 8, 4096, 128, 10000.0))(jnp.int32(100))
    np.testing.assert_array_equal(np.asarray(rows[1]), np.asarray(table[1][:, 100:108]))
    picked = jnp.array([[7, 0, 4095], [4096, 3, 5000]])  # the second row's 4096 and 5000 break the bound
    gathered = jax.jit(gathered_rotation, static_argnums=(1, 2, 3))(picked, 4096, 128, 10000.0)
    for got, full in zip(gathered, table):
        assert got.shape == (2, 3, 1, 64)
        np.testing.assert_array_equal(np.asarray(got[0, :, 0]), np.asarray(full[0, [7, 0, 4095], 0]))
        np.testing.assert_array_equal(np.asarray(got[1, 1, 0]), np.asarray(full[0, 3, 0]))
        assert bool(jnp.all(jnp.isnan(got[1, 0::2])))


def test_default_and_bounded_positions_read_the_table_and_give_computed_positions_logits():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    explicit = jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)

    def compiled(positions: jax.Array | None, below: int | None = None):
        fn = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, positions=p, positions_below=below))
        return fn.lower(state, TOKENS, positions).compile()

    default, computed, bounded = compiled(None), compiled(explicit), compiled(explicit, CFG.max_seq_len)
    assert "cosine(" not in default.as_text() + bounded.as_text() and "cosine(" in computed.as_text()
    want = np.asarray(computed(state, TOKENS, explicit))
    np.testing.assert_allclose(np.asarray(default(state, TOKENS, None)), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(bounded(state, TOKENS, explicit)), want, atol=1e-5, rtol=0)

    cache = KVCache.create(CFG, batch=2, slots=32)
    step = nnx.jit(lambda m, t, c, p: m(t, positions=p, cache=c))
    _, cache = step(model, TOKENS[:, :10], cache, None)
    from_table, _ = step(model, TOKENS[:, 10:12], cache, None)
    from_angles, _ = step(model, TOKENS[:, 10:12], cache, explicit[:, 10:12])
    np.testing.assert_allclose(np.asarray(from_table), np.asarray(from_angles), atol=1e-5, rtol=0)
