"""Sampling follows its definitions on fixed logits: greedy, temperature, top-k, Meta's top-p, seeding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.inference import sampling as sampling_module
from llama_jax.inference.sampling import Sampling, filter_logits

sample = jax.jit(sampling_module.sample, static_argnums=2)  # one compile per setting, not one per operation

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 stored in a shuffled vocabulary order.
PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]
DRAWS = 20000


def frequencies(sampling: Sampling, seed: int = 0) -> np.ndarray:
    """Empirical token frequencies from DRAWS rows sampled in one call."""
    tokens = sample(jnp.repeat(LOGITS, DRAWS, axis=0), jax.random.key(seed), sampling)
    return np.bincount(np.asarray(tokens), minlength=PROBS.size) / DRAWS


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (6, 50))
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), Sampling()), np.argmax(logits, axis=-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    expected = PROBS ** (1 / temperature) / np.sum(PROBS ** (1 / temperature))
    np.testing.assert_allclose(frequencies(Sampling(temperature=temperature)), expected, atol=0.015)


def test_top_k_keeps_exactly_the_k_most_likely():
    kept = np.isfinite(np.asarray(filter_logits(LOGITS, Sampling(temperature=1.0, top_k=2))[0]))
    np.testing.assert_array_equal(kept, [False, True, False, True, False])
    freq = frequencies(Sampling(temperature=1.0, top_k=3))
    assert freq[0] == 0 and freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3, 4]], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.015)


# 0.69 / 0.71 straddle the prefix mass 0.7: p = 0.7 itself is a float32 tie that jax 0.11.2's cumsum broke the other
# way (it kept token 4; jax 0.10.2 and 0.12.0.1 dropped it).
@pytest.mark.parametrize("top_p, kept", [(0.35, [1]), (0.5, [1, 3]), (0.69, [1, 3]), (0.71, [1, 3, 4]),
                                         (0.8, [1, 3, 4]), (0.9, [1, 3, 4, 0])])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    freq = frequencies(Sampling(temperature=1.0, top_p=top_p))
    outside = np.setdiff1d(np.arange(PROBS.size), kept)
    assert np.all(freq[outside] == 0), "mass outside the nucleus was sampled"
    np.testing.assert_allclose(freq[kept], PROBS[kept] / PROBS[kept].sum(), atol=0.015)


def test_top_k_then_top_p_then_renormalise():
    # Top-3 renormalised is .47, .35, .18, so p = 0.8 keeps two; on the raw probabilities (.4, .3) it would keep three.
    freq = frequencies(Sampling(temperature=1.0, top_k=3, top_p=0.8))
    np.testing.assert_array_equal(freq > 0, [False, True, False, True, False])


def test_same_seed_same_tokens_different_seed_differs():
    logits = jax.random.normal(jax.random.key(3), (64, 100))
    sampling = Sampling(temperature=1.0, top_p=0.9, top_k=50)
    a = sample(logits, jax.random.key(5), sampling)
    np.testing.assert_array_equal(a, sample(logits, jax.random.key(5), sampling))
    assert np.any(np.asarray(a) != np.asarray(sample(logits, jax.random.key(6), sampling)))


@pytest.mark.parametrize("kwargs, message", [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                                             (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k")])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_per_row_settings_follow_each_rows_own_definition():
    """`sample_rows` (a continuous batch mixes requests): greedy, temperature and top-p rows side by side."""
    rows = [(0.0, 1.0), (2.0, 1.0), (1.0, 0.75)]  # (temperature, top_p) in turn, DRAWS rows of each
    temperature, top_p = (jnp.repeat(jnp.asarray(col, jnp.float32), DRAWS) for col in zip(*rows))
    keys = jax.random.split(jax.random.key(0), len(rows) * DRAWS)
    tokens = jax.jit(sampling_module.sample_rows)(jnp.repeat(LOGITS, len(rows) * DRAWS, axis=0), keys,
                                                  temperature, top_p)
    freq = [np.bincount(np.asarray(t), minlength=PROBS.size) / DRAWS for t in np.split(np.asarray(tokens), 3)]
    np.testing.assert_array_equal(freq[0], np.eye(PROBS.size)[np.argmax(PROBS)])
    np.testing.assert_allclose(freq[1], PROBS ** 0.5 / np.sum(PROBS ** 0.5), atol=0.015)
    nucleus = np.where(PROBS >= 0.15, PROBS, 0) / 0.85  # 0.4 + 0.3 < 0.75: the nucleus needs 0.15 too
    np.testing.assert_allclose(freq[2], nucleus, atol=0.015)


def test_greedy_is_argmax_with_first_index_on_ties():
    from llama_jax.inference.sampling import greedy

    logits = np.random.default_rng(0).standard_normal((5, 300)).astype(np.float32)
    logits[1, [7, 40]] = 9.0  # a tie: the first index wins, as with argmax
    logits[2, :] = -np.inf
    logits[2, 299] = 0.0
    np.testing.assert_array_equal(np.asarray(greedy(jnp.asarray(logits))), np.argmax(logits, axis=-1))


def test_nucleus_matches_metas_rule_without_sorting():
    """Rows of 2,000 logits, peaked (a nucleus of a few tokens) or flat (most of the vocabulary), each with its own
    top_p (1 = off), against Meta's `sample_top_p` in NumPy; a float32 tie with p at the boundary may go either way.
    Neither sorts nor takes the top k of the vocabulary (a sort of 16 x 32,000 logits took 98-118 ms on 2 CPU cores)."""
    from llama_jax.inference.sampling import drop_outside_top_p

    rng = np.random.default_rng(0)
    top_p = np.array([0.5, 0.9, 0.95, 1.0, 0.3, 0.9], np.float32)[:, None]
    peaked = rng.standard_normal((6, 2000)).astype(np.float32) * 3
    flat = rng.standard_normal((6, 2000)).astype(np.float32) * 0.5
    drop = jax.jit(drop_outside_top_p)
    for logits in (peaked, flat):
        got = np.isfinite(np.asarray(drop(jnp.asarray(logits), jnp.asarray(top_p))))
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
        for row in range(len(logits)):
            order = np.argsort(-logits[row], kind="stable")
            mass_before = np.cumsum(probs[row][order]) - probs[row][order]
            want = np.empty(logits.shape[1], bool)
            want[order] = (mass_before <= top_p[row]) | (top_p[row] >= 1.0)
            clear = np.empty_like(want)
            clear[order] = np.abs(mass_before - top_p[row]) > 1e-5
            np.testing.assert_array_equal(got[row][clear], want[clear])
    kept = {name: np.isfinite(np.asarray(drop(jnp.asarray(x), jnp.asarray(top_p)))).sum(-1)[[0, 1, 2, 4, 5]]
            for name, x in (("peaked", peaked), ("flat", flat))}
    assert kept["peaked"].min() < 20 and kept["flat"].min() > 300 and kept["flat"].max() > 1000

    program = str(jax.make_jaxpr(drop_outside_top_p)(jnp.asarray(flat), jnp.asarray(top_p)))
    assert "sort" not in program and "top_k" not in program


def _draw_case() -> tuple[np.ndarray, np.ndarray]:
    """Rows of 1,000 logits (not a whole number of `DRAW_BLOCK`s) with -inf runs at block edges and the vocabulary's
    ends, a row whose only token is the last and one whose only token is the first; their probabilities in float64."""
    from llama_jax.inference.sampling import DRAW_BLOCK

    logits = np.random.default_rng(1).standard_normal((4, 1000)).astype(np.float32) * 2
    logits[0, :DRAW_BLOCK + 3] = -np.inf
    logits[0, 2 * DRAW_BLOCK - 2: 3 * DRAW_BLOCK + 1] = -np.inf
    logits[0, -5:] = -np.inf
    logits[1, DRAW_BLOCK - 1] = logits[1, DRAW_BLOCK] = 8.0  # most of the mass on both sides of a block edge
    logits[2, :-1] = -np.inf
    logits[3, 1:] = -np.inf
    probs = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return logits, probs / probs.sum(-1, keepdims=True)


def test_draw_inverts_each_rows_cumulative_distribution():
    """`draw` returns, for every uniform u, the token whose cumulative-probability interval holds u (NumPy, float64),
    never a -inf token, including u = 0 and the largest float32 below 1."""
    from llama_jax.inference.sampling import draw

    logits, probs = _draw_case()
    uniform = np.concatenate([np.linspace(0, 1, 4001, dtype=np.float32)[:-1], [np.float32(1 - 2 ** -24)]])
    tokens = np.asarray(jax.jit(jax.vmap(draw, in_axes=(None, 0)))(
        jnp.asarray(logits), jnp.broadcast_to(jnp.asarray(uniform)[:, None, None], (uniform.size, 4, 1))))
    for row in range(4):
        through = np.cumsum(probs[row])
        want = np.minimum(np.searchsorted(through, uniform, side="right"), np.flatnonzero(probs[row])[-1])
        clear = np.min(np.abs(uniform[:, None] - through[None, :]), axis=-1) > 1e-5  # float32 sums may round across
        np.testing.assert_array_equal(tokens[:, row][clear], want[clear])
        assert np.all(np.isfinite(logits[row][tokens[:, row]])), "a token of probability 0 was drawn"
    assert set(tokens[:, 2]) == {999} and set(tokens[:, 3]) == {0}


def test_sampling_draws_one_random_number_per_row_not_per_token():
    """Both samplers draw a uniform per row (the old Gumbel draw took 32 bits per vocabulary entry: 7-9 ms of random
    bits and logs per 16 x 32,000 step on 2 CPU cores, more than half of a stories15m decode step) and still sample
    the right distribution over a 1,000-token vocabulary."""
    import re

    logits, probs = _draw_case()
    rows = 4000
    batch = jnp.asarray(np.repeat(logits, rows, axis=0))
    sampling = Sampling(temperature=1.0)
    programs = [jax.make_jaxpr(sampling_module.sample, static_argnums=2)(batch, jax.random.key(0), sampling),
                jax.make_jaxpr(sampling_module.sample_rows)(batch, jax.random.split(jax.random.key(0), len(batch)),
                                                            jnp.ones(len(batch)), jnp.full(len(batch), 0.9))]
    for program in programs:
        shapes = re.findall(r"random_bits\[[^\]]*shape=\(([\d, ]*)\)", str(program))
        dims = [[int(n) for n in shape.split(",") if n.strip()] for shape in shapes]
        assert dims and all(logits.shape[1] not in d and np.prod(d) <= len(batch) for d in dims), shapes
    tokens = np.asarray(sample(batch, jax.random.key(7), sampling)).reshape(4, rows)
    for row in range(4):
        freq = np.bincount(tokens[row], minlength=1000) / rows
        assert np.all(freq[probs[row] == 0] == 0)
        np.testing.assert_allclose(freq, probs[row], atol=0.02)


def test_nucleus_keeps_the_top_token_and_its_ties():
    """However small p is, the most likely token stays, with every token tied with the last one kept; tokens of
    probability 0 (-inf) never join; bf16 logits (exact here) are filtered as float32 ones."""
    from llama_jax.inference.sampling import drop_outside_top_p

    logits = jnp.asarray([[1.0, 3.0, 3.0, 3.0, 0.0, -jnp.inf], [5.0, -jnp.inf, 1.0, 2.0, 2.0, 0.0]])
    for top_p, kept in [(1e-6, [[0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]),
                        (0.9, [[0, 1, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]]),
                        (0.999, [[1, 1, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1]])]:
        for dtype in (jnp.float32, jnp.bfloat16):
            got = jax.jit(drop_outside_top_p)(logits.astype(dtype), jnp.full((2, 1), top_p))
            assert got.dtype == dtype
            np.testing.assert_array_equal(np.isfinite(np.asarray(got, np.float32)), np.asarray(kept, bool),
                                          err_msg=f"top_p {top_p}, {dtype}")
