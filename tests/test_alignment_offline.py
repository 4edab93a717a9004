"""Preference data, reward models and DPO: the paper's arithmetic against NumPy, the reference-log-prob cache, bad
records, a reward model learning separated pairs, resume after SIGKILL on 8 devices, and the worked example."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chains import assert_chains_train_as_one
from flax import nnx
from tiny_lm import make_tiny_lm

from llama_jax.alignment import dpo, rewards_math
from llama_jax.alignment.preferences import Pair, pair_rows, read_pairs
from llama_jax.alignment.reward import RewardModel, accuracy_by_level, reward_objective
from llama_jax.alignment.sequences import sequence_logps
from llama_jax.chat import encode_turns
from llama_jax.cli import main
from llama_jax.config import Config, ConfigError, DpoConfig, LlamaConfig, MeshConfig, OptimConfig, TrainConfig
from llama_jax.config import load_config
from llama_jax.model import Llama
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer
from sigkill import killed_at_step

REPO = Path(__file__).resolve().parents[1]
CHOSEN = np.array([1.5, -0.2, 0.3, 2.0, -1.0, 0.0], np.float32)
REJECTED = np.array([0.5, 0.4, 0.3, -1.0, -3.0, 0.1], np.float32)
LEVELS = np.array([0, 1, 2, 3, -1, 0], np.int32)


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


@pytest.mark.parametrize("table,values", [("small", (1, 2 / 3, 1 / 3, 0)), ("large", (3, 2, 1, 0)),
                                          ("none", (0, 0, 0, 0))])
def test_margin_ranking_loss_equals_numpy(table, values):
    margin = np.array([values[level] if level >= 0 else 0.0 for level in LEVELS], np.float32)
    expected = -_log_sigmoid(CHOSEN.astype(np.float64) - REJECTED - margin)
    got = rewards_math.ranking_loss(jnp.asarray(CHOSEN), jnp.asarray(REJECTED),
                                    rewards_math.margins(table, jnp.asarray(LEVELS)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_whiten_and_logit_equal_numpy():
    x = np.array([0.01, 0.2, 0.5, 0.73, 0.99, 0.4], np.float32)
    logit = np.log(x.astype(np.float64) / (1 - x))
    np.testing.assert_allclose(np.asarray(rewards_math.logit(jnp.asarray(x))), logit, rtol=1e-5)
    white = (logit - logit.mean()) / np.sqrt(logit.var() + 1e-8)
    np.testing.assert_allclose(np.asarray(rewards_math.whiten(jnp.asarray(logit, jnp.float32))), white, rtol=1e-5,
                               atol=1e-6)
    kept = np.asarray(rewards_math.whiten(jnp.asarray(logit, jnp.float32), shift_mean=False))
    np.testing.assert_allclose(kept, white + logit.mean(), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(rewards_math.logit(jnp.array([0.0, 1.0])))).all()


def test_safety_and_helpfulness_combine_by_the_papers_rule():
    helpful = jnp.array([0.9, 0.8, 0.7, 0.6])
    safety = jnp.array([0.5, 0.1, 0.9, 0.149])
    unsafe = jnp.array([False, False, True, False])
    # row 0: safe prompt, safety >= 0.15 -> helpfulness; 1: safety < 0.15 -> safety; 2: tagged unsafe -> safety;
    # 3: safety just below the threshold -> safety
    combined = rewards_math.combine_rewards(helpful, safety, unsafe)
    np.testing.assert_allclose(np.asarray(combined), [0.9, 0.1, 0.9, 0.149], rtol=1e-6)
    reward = np.asarray(rewards_math.rlhf_reward(helpful, safety, unsafe))
    logit = np.log(np.array([0.9, 0.1, 0.9, 0.149]) / (1 - np.array([0.9, 0.1, 0.9, 0.149])))
    np.testing.assert_allclose(reward, (logit - logit.mean()) / np.sqrt(logit.var() + 1e-8), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant,smoothing", [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0)])
def test_dpo_and_ipo_losses_equal_numpy(variant, smoothing):
    beta = 0.3
    pc, pr = np.array([-10.0, -4.0, -7.5]), np.array([-12.0, -3.0, -7.0])
    rc, rr = np.array([-11.0, -4.5, -7.0]), np.array([-11.5, -3.5, -8.0])
    h = (pc - rc) - (pr - rr)
    expected = (h - 1 / (2 * beta)) ** 2 if variant == "ipo" else \
        -(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h)
    losses, chosen, rejected = dpo.dpo_losses(*(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr)), beta,
                                              variant, smoothing)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(chosen), beta * (pc - rc), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rejected), beta * (pr - rr), rtol=1e-6)


def test_bad_dpo_and_reward_settings_are_one_line_errors(capsys):
    with pytest.raises(ConfigError, match="dpo.variant 'ipa' is not one of .*did you mean 'ipo'"):
        DpoConfig(variant="ipa")
    with pytest.raises(ConfigError, match="label_smoothing applies to variant dpo only"):
        DpoConfig(variant="ipo", label_smoothing=0.1)
    assert main(["align", "reward", "--config", str(REPO / "experiments/configs/rm_llama2_7b.yaml"),
                 "reward.margin=huge"]) == 2
    assert "error: reward.margin 'huge' is not one of" in capsys.readouterr().err
    assert main(["align", "dpo", "--config", str(REPO / "experiments/configs/dpo_llama2_7b.yaml")]) == 2
    assert "finetune.init_from is not set" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    hf, tok_path, model, tok = make_tiny_lm(root, max_seq_len=64)
    return root, hf, tok_path, model, tok


def _record(rng, i):
    words = "cat dog mat sea robot books".split()
    return {"prompt": f"say {words[i % 6]}", "chosen": " ".join(rng.choice(words, 3)),
            "rejected": " ".join(rng.choice(words, 2)), "rating": ["better", "unsure", "slightly better"][i % 3]}


def test_25_malformed_preference_records_are_reported_with_file_and_line(tiny, tmp_path, capsys):
    tok = tiny[4]
    rng = np.random.default_rng(0)
    broken = ["{oops", json.dumps([1]), json.dumps({"chosen": "a", "rejected": "b"}),
              json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}),
              json.dumps({"prompt": "p", "chosen": "a"}), json.dumps({"prompt": "p", "chosen": "a", "rejected": 3}),
              json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "rating": "much better"}),
              json.dumps({"messages": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}),
              json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
              json.dumps({"messages": "hi", "chosen": "a", "rejected": "b"})]
    lines, bad = [], []
    for i in range(25):
        lines += [json.dumps(_record(rng, i)), broken[i % len(broken)]]
        bad.append(len(lines))
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, issues = read_pairs(str(path), tok, 64, "skip")
    assert len(pairs) == 25 and [p.level for p in pairs[:3]] == [1, 3, 2]
    assert [(b.file, b.line) for b in issues.bad] == [(str(path), n) for n in bad]
    err = capsys.readouterr().err
    assert f"{path}: 25 bad record(s) skipped" in err and all(f"{path}:{n}:" in err for n in bad)
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        read_pairs(str(path), tok, 64, "fail")


def test_completion_logps_equal_a_plain_log_softmax(tiny):
    model = tiny[3]
    prompts, completions = [[1, 5, 9, 11], [1, 7]], [[20, 21, 2], [30, 31, 32, 33, 2]]
    got = sequence_logps(model, prompts, completions)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        logp = jax.nn.log_softmax(forward(params, jnp.asarray([p + c]))[0].astype(jnp.float32), axis=-1)
        expected = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
        assert got[i] == pytest.approx(expected, abs=1e-4)


def test_dpo_loss_with_cached_reference_equals_recomputing_it(tiny, tmp_path):
    root, hf, tok_path, model, tok = tiny
    rng = np.random.default_rng(1)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(_record(rng, i)) + "\n" for i in range(12)))
    pairs, _ = read_pairs(str(path), tok, 48)
    rows = pair_rows(pairs, 48)
    cfg = load_config(None, [f"finetune.init_from={hf}", f"checkpoint.dir={tmp_path / 'run'}"])
    cfg.model = model.cfg
    cached = dpo.cached_reference(cfg, rows, None, "fp")
    assert (tmp_path / "run" / dpo.REFERENCE_CACHE).is_file()
    again = dpo.cached_reference(cfg, rows, None, "fp")  # read back from disk
    np.testing.assert_array_equal(again["ref_chosen"], cached["ref_chosen"])

    policy = nnx.split(Llama(model.cfg, rngs=nnx.Rngs(7)))  # a policy that moved away from the reference
    reference = nnx.split(model)
    objective = dpo.dpo_objective(DpoConfig(beta=0.1))

    @jax.jit
    def losses(policy_params, reference_params, batch, cached):
        loss = lambda refs: objective.loss(nnx.merge(policy[0], policy_params), {**batch, **refs})[0]
        ref_chosen, ref_rejected = dpo.pair_logps(nnx.merge(reference[0], reference_params), batch)  # recomputed
        return loss(cached), loss({"ref_chosen": ref_chosen, "ref_rejected": ref_rejected})

    with_cache, recomputed = losses(policy[1], reference[1], rows, cached)
    assert float(with_cache) == pytest.approx(float(recomputed), abs=1e-5)
    assert float(with_cache) / 12 != pytest.approx(np.log(2), abs=1e-3)  # the policy differs from the reference


def _separated_pairs(rng, n, vocab):
    """Chosen sequences rich in token 5, rejected ones rich in token 6 (random other tokens around them)."""
    pairs = []
    for _ in range(n):
        sides = []
        for rich in (5, 6):
            ids = rng.integers(10, vocab, 12)
            ids[rng.random(12) < 0.5] = rich
            ids[0] = 1
            sides.append((ids.tolist(), [False] * 4 + [True] * 8))
        pairs.append(Pair(sides[0], sides[1], int(rng.integers(0, 2))))
    return pairs


@pytest.mark.e2e
def test_reward_model_reaches_90_percent_on_separated_pairs():
    model_cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
    cfg = Config(model=model_cfg, mesh=MeshConfig(), train=TrainConfig(steps=20, batch_size=16),
                 optim=OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0))
    rng = np.random.default_rng(0)
    train, held = _separated_pairs(rng, 256, 64), _separated_pairs(rng, 64, 64)
    trainer = Trainer(cfg, make_mesh(cfg.mesh), reward_objective("small"))
    state = trainer.init_state()
    rows = pair_rows(train, 16)
    for step in range(cfg.train.steps):
        pick = rng.choice(len(train), 16, replace=False)
        state, metrics = trainer.train_step(state, {k: v[pick] for k, v in rows.items()})
    assert float(metrics["loss"]) < 0.5 and float(metrics["accuracy"]) >= 0.9
    result = RewardModel(trainer.model(state.params)).pair_accuracy(held)
    assert result["accuracy"] >= 0.9, result
    assert set(result) >= {"accuracy/significantly better", "accuracy/better", "pairs/better"}


def test_reward_steps_in_two_chains_on_one_cpu_device_match_one_chain():
    """A pair objective (chosen and rejected rows scored together) split into two gradient chains on a one-device
    CPU mesh trains as one chain does."""
    model_cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
    cfg = Config(model=model_cfg, mesh=MeshConfig(1, 1, 1), train=TrainConfig(steps=3, batch_size=8),
                 optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0))
    rows = pair_rows(_separated_pairs(np.random.default_rng(0), 24, 64), 16)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    assert_chains_train_as_one(lambda: Trainer(cfg, mesh, reward_objective("small")), Trainer.init_state,
                               [{k: v[i * 8:(i + 1) * 8] for k, v in rows.items()} for i in range(3)], atol=1e-6)


def test_accuracy_by_level_counts_each_rating():
    out = accuracy_by_level(CHOSEN, REJECTED, LEVELS)
    assert out["accuracy"] == pytest.approx(np.mean(CHOSEN > REJECTED))
    assert out["accuracy/significantly better"] == 0.5 and out["pairs/significantly better"] == 2
    assert out["accuracy/unrated"] == 1.0 and out["accuracy/slightly better"] == 0.0


# steps 4-5 run after checkpoint 3: after the kill they must be redone identically
KILLED = {"reward": killed_at_step(5, "llama_jax.alignment.reward:train_reward_model"),
          "dpo": killed_at_step(5, "llama_jax.alignment.dpo:train_dpo")}


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_stage_resumes_bit_exactly_after_sigkill_on_8_devices(stage, tiny, tmp_path):
    from llama_jax.alignment.dpo import train_dpo
    from llama_jax.alignment.reward import train_reward_model
    root, hf, tok_path, model, tok = tiny
    rng = np.random.default_rng(2)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(_record(rng, i)) + "\n" for i in range(40)))
    config = REPO / "experiments" / "configs" / f"{'rm' if stage == 'reward' else 'dpo'}_rlhf_example.yaml"
    common = [f"finetune.init_from={hf}", f"finetune.train={tmp_path / 'train.jsonl'}", f"data.tokenizer={tok_path}",
              "finetune.epochs=0", "train.steps=6", "checkpoint.every=3", "train.batch_size=8", "train.log_every=1",
              "optim.lr=1e-2"]
    run = {"reward": train_reward_model, "dpo": train_dpo}[stage]
    straight = run(load_config(config, [*common, f"checkpoint.dir={tmp_path / 'straight'}"]))
    assert straight.training.step == 6 and jax.device_count() == 8
    resumed = [*common, f"checkpoint.dir={tmp_path / 'resumed'}"]
    killed = subprocess.run([sys.executable, "-c", KILLED[stage], str(config), *resumed], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if stage == "dpo":
        cache = tmp_path / "resumed" / dpo.REFERENCE_CACHE
        written = cache.stat().st_mtime_ns
    again = run(load_config(config, resumed))
    assert again.training.step == 6
    if stage == "dpo":
        assert cache.stat().st_mtime_ns == written  # the resumed run read the cache instead of recomputing it
    a, b = straight.training.state.params, again.training.state.params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if stage == "reward":  # score completions with the resumed reward model through the CLI
        (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "say cat", "completion": "cat dog"}) + "\n" +
                                           json.dumps({"messages": [{"role": "user", "content": "say sea"}],
                                                       "completion": "sea"}) + "\n")
        assert main(["align", "score", "--config", str(config), f"checkpoint.dir={tmp_path / 'resumed'}",
                     f"data.tokenizer={tok_path}", f"reward.score_input={tmp_path / 'in.jsonl'}",
                     f"reward.score_output={tmp_path / 'out.jsonl'}"]) == 0
        scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        dialog = [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "cat dog"}]
        direct = RewardModel.load(tmp_path / "resumed").score([[]], [encode_turns(tok, dialog)[0]])
        assert scored[0]["completion"] == "cat dog" and len(scored) == 2
        assert scored[0]["reward"] == pytest.approx(float(direct[0]), abs=1e-4)


@pytest.mark.e2e
def test_worked_example_shortened_rm_accuracy_dpo_rejection_and_ppo_gains(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import rlhf_example
    # scale 0.2: 600 SFT replies, 512 pairs, 64 evaluation prompts, 102 online prompts, 16 PPO iterations
    results = rlhf_example.run(tmp_path, scale=0.2, stages=("rm", "dpo", "rejection", "ppo"))
    report = rlhf_example.report(results)
    bound = results["kl_bound"]  # nats per reply
    assert results["rm/accuracy_separated"] >= 0.9, report
    # measured at scale 0.3 (one CPU device): true reward 0.24 -> 0.46, KL 2.8 nats per reply
    assert results["dpo/true_reward"] >= results["sft/true_reward"] + 0.1, report
    assert results["dpo/rm_score"] > results["sft/rm_score"], report
    assert 0 < results["dpo/kl"] < bound, report
    # measured at scale 0.3: best of 8 0.40 vs 0.20 over all samples; fine-tuned on the best 0.24 -> 0.40
    assert results["rejection/best_of_k_true_reward"] > results["rejection/samples_true_reward"] + 0.03, report
    assert results["rejection/true_reward"] > results["sft/true_reward"], report
    # measured at scale 0.3: 0.24 -> 0.47 true reward at 1.6 nats per reply (KL target 1.5, max_kl 3)
    assert results["ppo/true_reward"] >= results["sft/true_reward"] + 0.1, report
    assert results["ppo/rm_score"] > results["sft/rm_score"], report
    assert 0 < results["ppo/kl"] < bound, report
