"""Model variants: scan and remat equal the plain loop, bf16 compute stays near float32, the KV cache is exact."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import KVCache, Llama, LlamaConfig
from llama_jax.config import ExecutionConfig
from llama_jax.checkpoints.layout import build_model, iter_meta_tensors

CFG = LlamaConfig.preset("tiny")
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 24)), jnp.int32)


def _variant(model: Llama, **changes) -> Llama:
    """The same weights under another execution (scan, remat, dtype), via the checkpoint tensor mapping."""
    tensors = dict(iter_meta_tensors(model))
    return build_model(model.cfg, ExecutionConfig(**changes), tensors.__getitem__)


# Jitted: one compile per model variant instead of one per operation in eager mode (~5x faster on CPU).
forward = nnx.jit(lambda m, tokens: m(tokens))
forward_cached = nnx.jit(lambda m, tokens, cache: m(tokens, cache=cache))


@nnx.jit
@nnx.grad
def loss_grads(m: Llama) -> jax.Array:
    return jnp.mean(jax.nn.log_softmax(m(TOKENS))[..., 0])


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference(model) -> tuple[np.ndarray, np.ndarray]:
    """The plain loop's logits and its gradient for layer 1's w1."""
    return np.asarray(forward(model, TOKENS)), np.asarray(loss_grads(model).layers[1].feed_forward.w1[...])


@pytest.mark.parametrize("changes", [dict(scan_layers=True), dict(remat="full"), dict(remat="save_dots"),
                                     dict(scan_layers=True, remat="full"), dict(remat="save_attention"),
                                     dict(scan_layers=True, remat="offload_attention")], ids=str)
def test_scan_and_remat_match_plain_loop(model, reference, changes):
    logits, w1_grad = reference
    variant = _variant(model, **changes)
    np.testing.assert_allclose(np.asarray(forward(variant, TOKENS)), logits, atol=1e-5, rtol=0)
    grads = loss_grads(variant)
    g = grads.layers.feed_forward.w1[...][1] if changes.get("scan_layers") else grads.layers[1].feed_forward.w1[...]
    np.testing.assert_allclose(np.asarray(g), w1_grad, atol=1e-6)


def test_bf16_compute_within_stated_tolerance(model):
    """bf16 compute with float32 weights: logits within 0.05 absolute (stated in the README) of float32."""
    ref = np.asarray(model(TOKENS))
    out = _variant(model, dtype="bfloat16")(TOKENS)
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - ref).max()
    assert 0 < err < 0.05


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer arrays", "stacked"])
def test_prefill_then_decode_equals_full_forward(model, reference, scan):
    full, _ = reference
    model = _variant(model, scan_layers=True) if scan else model
    cache = KVCache.create(CFG, batch=2, slots=32, stacked=scan)
    logits, cache = forward_cached(model, TOKENS[:, :10], cache)
    steps = [logits]
    for t in range(10, TOKENS.shape[1]):
        logits, cache = forward_cached(model, TOKENS[:, t:t + 1], cache)
        steps.append(logits)
    assert int(cache.index) == TOKENS.shape[1]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), full, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=f"stacked={scan}"):
        model(TOKENS[:, :1], cache=KVCache.create(CFG, batch=2, slots=32, stacked=not scan))


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer arrays", "stacked"])
def test_bf16_cache_on_cpu_is_written_in_place_and_reads_back_exactly(model, scan, monkeypatch):
    """On CPU a bf16 cache holds bit patterns (uint16): its slot writes compile in place, where a bf16 array's were
    widened to float32 (the whole layer converted there and back); the logits equal a plain bf16 cache's, bit for
    bit, and `place` moves rows between the two kinds."""
    import llama_jax.model as model_module

    bf16 = _variant(model, dtype="bfloat16", scan_layers=scan)
    bits = KVCache.create(CFG, batch=2, slots=32, dtype=jnp.bfloat16, stacked=scan)
    monkeypatch.setattr(model_module, "current_platform", lambda: "gpu")
    plain = KVCache.create(CFG, batch=2, slots=32, dtype=jnp.bfloat16, stacked=scan)
    monkeypatch.undo()
    assert jax.tree.leaves(bits)[0].dtype == jnp.uint16 and jax.tree.leaves(plain)[0].dtype == jnp.bfloat16

    for chunk in (TOKENS[:, :10], TOKENS[:, 10:11], TOKENS[:, 11:12]):
        got, bits = forward_cached(bf16, chunk, bits)
        want, plain = forward_cached(bf16, chunk, plain)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for (k_bits, v_bits), (k, v) in ((bits.read(i), plain.read(i)) for i in range(CFG.n_layers)):
        assert k_bits.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(k_bits, np.float32), np.asarray(k, np.float32))
        np.testing.assert_array_equal(np.asarray(v_bits, np.float32), np.asarray(v, np.float32))
    moved = bits.place(plain, row=0, slot=0).read(0)[0]
    np.testing.assert_array_equal(np.asarray(moved, np.float32), np.asarray(plain.read(0)[0], np.float32))

    def float_writes(cache: KVCache) -> list[str]:
        """The compiled step's slot writes into a whole layer's cache in a float type (jax 0.10.2's XLA:CPU widens
        them to float32; on jax 0.12 bf16 writes left a batch-16 decode loop 1.8x slower than bit patterns)."""
        graphdef, state = nnx.split(bf16)
        text = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c)).lower(
            state, TOKENS[:, :1], cache).compile().as_text()
        layer = ",".join(map(str, bits.read(0)[0].shape))
        return re.findall(rf"= (?:f32|bf16)\[(?:\d+,)?{layer}\]\S* dynamic-update-slice\(", text)

    assert not float_writes(bits)
    assert float_writes(plain)


def test_output_is_float32_logits_of_vocab_size(model):
    out = forward(model, TOKENS)
    assert out.shape == (2, 24, CFG.vocab_size) and out.dtype == jnp.float32


def test_residual_dropout_only_under_a_training_key(model, reference):
    """execution.dropout: no effect without a training key (evaluation, inference); under one, each layer and branch
    draws its own mask, the same with scanned layers and with remat, and zeroes about `rate` of the branch."""
    from llama_jax.dropout import dropout, training_key

    logits, _ = reference
    dropped = _variant(model, dropout=0.3)
    np.testing.assert_array_equal(np.asarray(forward(dropped, TOKENS)), logits)

    @nnx.jit
    def train_forward(m: Llama, key: jax.Array) -> jax.Array:  # the key is set inside the trace, as a train step does
        with training_key(key):
            return m(TOKENS)

    key = jax.random.key(7)
    outputs = [np.asarray(train_forward(_variant(model, dropout=0.3, **changes), key))
               for changes in ({}, {"scan_layers": True}, {"scan_layers": True, "remat": "full"})]
    assert np.abs(outputs[0] - logits).max() > 0.1
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], atol=1e-5, rtol=0)

    ones = jnp.ones((64, 64, 64))
    with training_key(key):
        masks = [np.asarray(dropout(ones, 0.3, layer, branch)) for layer in (0, 1) for branch in (0, 1)]
    for mask in masks:  # 77 of 256 byte values drop: rate 0.3 to 1/256, survivors scaled by 256 / 179
        assert set(np.unique(mask)) == {0.0, np.float32(256 / 179)}
        assert abs((mask == 0).mean() - 0.3) < 0.01 and abs(mask.mean() - 1) < 0.01
    assert len({m.tobytes() for m in masks}) == 4


def test_random_bytes_are_uniform_independent_and_the_same_however_sharded():
    """Dropout's bytes, four from each 32-bit draw: each value about equally often, bytes of one word uncorrelated,
    the same array when the output is sharded across the 8 devices, and one draw per entry for an odd last axis."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from llama_jax.dropout import random_bytes

    key = jax.random.key(3)
    draw = np.asarray(random_bytes(key, (64, 64, 64)))
    counts = np.bincount(draw.ravel(), minlength=256)
    assert draw.dtype == np.uint8 and counts.min() > 0.9 * draw.size / 256 and counts.max() < 1.1 * draw.size / 256
    assert abs(np.corrcoef(draw[..., 0::4].ravel(), draw[..., 1::4].ravel())[0, 1]) < 0.01
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), PartitionSpec(None, None, "x"))
    sharded = jax.jit(lambda k: random_bytes(k, (64, 64, 64)), out_shardings=sharding)(key)
    np.testing.assert_array_equal(np.asarray(sharded), draw)
    odd = np.asarray(random_bytes(key, (64, 63)))
    assert odd.shape == (64, 63) and len(np.unique(odd)) > 200


def test_hand_written_gradients_equal_autodiff():
    """`linear` (several contracted axes merged into one), `swiglu` and XLA attention carry their own backward rules
    (faster on CPU); each equals the plain formula and JAX's autodiff of it, with grouped-query heads and a padding
    mask for attention."""
    from llama_jax.attention import Visibility, xla_attention
    from llama_jax.model import linear, swiglu

    rng = np.random.default_rng(0)
    x, w, gate, up = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 5, 8), (8, 3, 4), (2, 5, 6),
                                                                                  (2, 5, 6)))
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, n, 4)), jnp.float32) for n in (6, 3, 3))
    mask = jnp.asarray(rng.random((2, 7, 7)) > 0.2) | jnp.eye(7, dtype=bool)
    allowed = Visibility(mask=mask).dense(7, 7)

    def plain_attention(q, k, v):
        grouped = q.reshape(2, 7, 3, 2, 4)
        scores = jnp.einsum("BTKRH,BSKH->BKRTS", grouped, k) / 2.0
        probs = jax.nn.softmax(jnp.where(allowed[:, None, None], scores, -1e30), axis=-1)
        return jnp.einsum("BKRTS,BSKH->BTKRH", probs, v).reshape(q.shape)

    heads_out = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)  # wo's two contracted axes, merged
    pairs = [(lambda x, w: linear("BTD,DNH->BTNH", x, w), lambda x, w: jnp.einsum("BTD,DNH->BTNH", x, w), (x, w)),
             (lambda o, w: linear("BTNH,NHD->BTD", o, w), lambda o, w: jnp.einsum("BTNH,NHD->BTD", o, w),
              (heads_out, jnp.moveaxis(w, 0, -1))),
             (swiglu, lambda g, u: jax.nn.silu(g) * u, (gate, up)),
             (lambda q, k, v: xla_attention(q, k, v, allowed), plain_attention, (q, k, v))]
    for fast, plain, args in pairs:
        np.testing.assert_allclose(np.asarray(fast(*args)), np.asarray(plain(*args)), atol=1e-5, rtol=1e-5)
        probe = jnp.asarray(rng.standard_normal(plain(*args).shape), jnp.float32)
        grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * probe), argnums=tuple(range(len(args))))(*args)
                 for f in (fast, plain)]
        for got, want in zip(*grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("TD,DF->TF", (4, 64), (64, 32)),
    ("TD,DF->TF", (1, 64), (64, 32)),  # one row: XLA:CPU upcast the weight to float32 on every call
    ("BTD,VD->BTV", (1, 1, 64), (32, 64)),  # a decode step's output head over the table as stored
])
def test_bf16_products_run_as_bf16_dots_on_cpu(spec, x_shape, w_shape):
    """`llama_jax.einsum` with bf16 operands: the product of the float32 values rounded once to bf16, computed by a dot
    that reads the bf16 operands (XLA:CPU upcast both operands of a bf16 -> bf16 dot to float32, 5x slower, and of
    any bf16 dot with one row)."""
    from llama_jax.einsum import einsum

    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in (x_shape, w_shape))
    got = einsum(spec, x, w)
    want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64)).astype(np.float32)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8, atol=1e-6)
    hlo = jax.jit(lambda a, b: einsum(spec, a, b)).lower(x, w).compile().as_text()
    lhs, rhs = re.search(r" dot\(%([\w.]+), %([\w.]+)\)", hlo).groups()
    operand_types = [re.search(rf"%{re.escape(name)} = (\w+)\[", hlo).group(1) for name in (lhs, rhs)]
    assert operand_types == ["bf16", "bf16"], hlo


@pytest.mark.parametrize("spec, x_shape, w_shape, batched", [
    ("BTD,DNH->BTNH", (1, 1, 64), (64, 4, 8), True),  # a projection: two products over halves of D
    ("BTa,aD->BTD", (1, 1, 32), (32, 64), True),  # wo with its contracted axes merged
    ("BTD,VD->BTV", (1, 1, 64), (32, 64), False),  # the tied head: D is not the table's leading axis
    ("BTD,DF->BTF", (1, 2, 64), (64, 32), False),  # two rows: XLA:CPU already uses both cores
    ("BTD,DF->BTF", (1, 1, 63), (63, 32), False),  # an odd input axis has no halves
])
def test_one_float32_row_is_multiplied_by_halves_of_the_weight_on_cpu(spec, x_shape, w_shape, batched):
    """At batch 1 a float32 projection is one batched product over the two halves of the weight's input axis (XLA:CPU
    ran a matrix-vector product on one core; the halves run on both), with the plain product's values."""
    from llama_jax.einsum import einsum

    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in (x_shape, w_shape))
    got = einsum(spec, x, w)
    want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(lambda a, b: einsum(spec, a, b)).lower(x, w).compile().as_text()
    dots = re.findall(r" dot\(.*", hlo)
    assert len(dots) == 1 and ("lhs_batch_dims" in dots[0]) == batched, hlo
