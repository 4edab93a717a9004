"""Chunked cross-entropy equals the loss over full logits, in value and in gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llama_jax import Llama, LlamaConfig
from llama_jax.training.loss import chunked_token_losses


def test_chunked_loss_and_grads_equal_full_logits():
    cfg = LlamaConfig.preset("tiny", n_layers=1)
    graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 25)), jnp.int32)

    def loss(params, chunk):
        model = nnx.merge(graphdef, params)
        features, _ = model.features(tokens[:, :-1])
        if chunk is None:  # the plain way: every logit at once
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(tokens[:, :-1]), tokens[:, 1:]))
        return jnp.mean(chunked_token_losses(model.logits, features, tokens[:, 1:], chunk))

    ref, ref_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, None)
    for chunk in (7,):  # 24 targets: 4 chunks, the last one padded
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunk)
        np.testing.assert_allclose(float(value), float(ref), atol=1e-5, rtol=0)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0)
    assert float(ref) > 5.0  # ~ln(1024) at init: a real loss, not a degenerate one
