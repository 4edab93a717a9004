"""`info`: parameter count, shard shapes and bytes per device of llama2-7b on 8 devices, checked against Meta's
shapes counted by hand; bad meshes are one-line errors."""

import re

from llama_jax.cli import main

# llama2-7b (Meta's params.json): dim 4096, 32 layers, 32 heads, FFN 11008, vocab 32000, untied output.
DIM, LAYERS, FFN, VOCAB = 4096, 32, 11008, 32000
NORMS = (2 * LAYERS + 1) * DIM  # RMSNorm gains: replicated on every device
PARAMS = LAYERS * (4 * DIM * DIM + 3 * DIM * FFN) + 2 * VOCAB * DIM + NORMS


def test_llama2_7b_on_fsdp_4_tensor_2(capsys):
    assert main(["info", "--preset", "llama2-7b", "mesh.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert PARAMS == 6_738_415_616
    assert f"parameters: {PARAMS:,} (analytic {PARAMS:,})" in out
    # Every matrix is split 8 ways (fsdp 4 x tensor 2); each device holds the norms whole.
    per_device = 4 * ((PARAMS - NORMS) // 8 + NORMS)
    assert f"parameter bytes per device (float32): {per_device:,} = 3.14 GiB" in out
    assert "mesh: {'data': 1, 'fsdp': 4, 'tensor': 2} over 8 cpu devices" in out

    shards = {name: (shape, shard) for name, shape, shard in
              re.findall(r"^(\S+) +(\([\d, ]+\)) +\S+ +(\([\d, ]+\))$", out, re.MULTILINE)}
    assert len(shards) == 9 * LAYERS + 3
    assert shards["layers.31.attention.wq"] == ("(4096, 32, 128)", "(1024, 16, 128)")
    assert shards["layers.0.attention.wo"] == ("(32, 128, 4096)", "(16, 128, 1024)")
    assert shards["layers.7.feed_forward.w2"] == ("(11008, 4096)", "(5504, 1024)")
    assert shards["layers.0.ffn_norm.weight"] == ("(4096,)", "(4096,)")
    assert shards["tok_embeddings"] == ("(32000, 4096)", "(16000, 1024)")


def test_mesh_that_does_not_split_the_heads_is_one_line(capsys):
    assert main(["info", "--preset", "stories15m", "mesh.tensor=4"]) == 2  # 6 heads
    assert capsys.readouterr().err == "error: mesh tensor=4 does not divide n_heads=6; choose a divisor\n"
