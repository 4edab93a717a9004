"""Online RLHF: PPO's objective pieces against NumPy, rollouts' sampling log-probs, best-of-K rejection sampling,
Ghost Attention data, and PPO end to end (reward up, KL bounded, sharded on 8 devices, SIGKILL then resume)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.alignment import gatt, ppo, rejection
from llama_jax.alignment.rollout import Prompt, Sampler
from llama_jax.config import GattConfig, LlamaConfig, RejectionConfig
from llama_jax.data.sft import encode_record
from llama_jax.inference.sampling import Sampling
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "ppo_tiny.yaml"
RNG = np.random.default_rng(0)


def completion_masks(b: int, t: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Masks with one contiguous run per row (start, end) of varied placement and length."""
    mask, spans = np.zeros((b, t), np.float32), []
    for row in range(b):
        start = int(RNG.integers(0, t // 2))
        end = int(RNG.integers(start + 1, t + 1))
        mask[row, start:end] = 1
        spans.append((start, end))
    return mask, spans


def test_gae_matches_numpy_loop():
    b, t, gamma, lam = 5, 9, 0.99, 0.95
    rewards, values = RNG.normal(size=(b, t)).astype(np.float32), RNG.normal(size=(b, t)).astype(np.float32)
    mask, spans = completion_masks(b, t)
    expected = np.zeros((b, t))
    for row, (start, end) in enumerate(spans):
        running = 0.0
        for i in reversed(range(start, end)):
            next_value = values[row, i + 1] if i + 1 < end else 0.0
            running = rewards[row, i] + gamma * next_value - values[row, i] + gamma * lam * running
            expected[row, i] = running
    advantages, returns = ppo.gae(jnp.asarray(rewards * mask), jnp.asarray(values * mask), jnp.asarray(mask),
                                  gamma, lam)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, (expected + values) * mask, rtol=1e-5, atol=1e-5)


def test_clipped_policy_and_value_losses_match_numpy():
    b, t, clip = 4, 7, 0.2
    mask, _ = completion_masks(b, t)
    logp, old = RNG.normal(-2, 0.3, (b, t)), RNG.normal(-2, 0.3, (b, t))
    adv, values, old_values, returns = (RNG.normal(size=(b, t)) for _ in range(4))
    ratio = np.exp(logp - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    clipped = (np.abs(ratio - 1) > clip) & (adv * (ratio - 1) > 0)  # where the clipped term is the larger loss
    loss, fraction = ppo.clipped_policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)), clip)
    np.testing.assert_allclose(loss, (per_token * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(fraction, (clipped * mask).sum() / mask.sum(), rtol=1e-6)
    v_clipped = old_values + np.clip(values - old_values, -clip, clip)
    expected = 0.5 * (np.maximum((values - returns) ** 2, (v_clipped - returns) ** 2) * mask).sum() / mask.sum()
    value_loss = ppo.clipped_value_loss(*(jnp.asarray(x, jnp.float32) for x in (values, old_values, returns, mask)),
                                        clip)
    np.testing.assert_allclose(value_loss, expected, rtol=1e-5)


def test_kl_penalised_token_rewards_match_numpy():
    b, t, beta = 6, 8, 0.01
    mask, spans = completion_masks(b, t)
    raw = RNG.uniform(0.05, 0.95, b)
    logp, ref = RNG.normal(-2, 0.5, (b, t)), RNG.normal(-2, 0.5, (b, t))
    logits = np.log(raw / (1 - raw))
    whitened = (logits - logits.mean()) / logits.std()
    expected = -beta * (logp - ref) * mask
    for row, (_, end) in enumerate(spans):
        expected[row, end - 1] += whitened[row]
    scores = ppo.sequence_scores(jnp.asarray(raw, jnp.float32), use_logit=True, use_whiten=True)
    rewards, kl = ppo.token_rewards(scores, *(jnp.asarray(x, jnp.float32) for x in (logp, ref, mask)), beta)
    np.testing.assert_allclose(scores, whitened, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rewards, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kl, (logp - ref) * mask, rtol=1e-5, atol=1e-6)


def test_adaptive_kl_coef_follows_ziegler_et_al_in_numpy():
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon), each iteration; no target: fixed."""
    from llama_jax.alignment.kl_control import next_kl_coef

    kls, target, batch, horizon = [0.5, 3.0, 6.5, 5.9, 12.0, 0.0], 6.0, 64, 1000
    beta, expected = 0.05, []
    for kl in kls:
        beta = beta * (1 + min(max(kl / target - 1, -0.2), 0.2) * batch / horizon)
        expected.append(beta)
    got, coef = [], 0.05
    for kl in kls:
        coef = next_kl_coef(coef, kl, target, batch, horizon)
        got.append(coef)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[1] < got[0] < 0.05 and got[2] > got[1] and got[4] > got[3] and got[5] < got[4]
    assert next_kl_coef(0.05, 40.0, None, batch, horizon) == 0.05


def test_chunked_entropy_equals_the_full_softmax_entropy():
    from llama_jax.training.loss import chunked_token_entropy

    features = RNG.normal(size=(3, 10, 8)).astype(np.float32)
    head = RNG.normal(size=(8, 17)).astype(np.float32)
    logits = features.astype(np.float64) @ head
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -(np.exp(logp) * logp).sum(-1)
    got = chunked_token_entropy(lambda f: f @ jnp.asarray(head), jnp.asarray(features), chunk=4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny(tokenizer_1k):
    tok = Tokenizer(tokenizer_1k)
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=64)
    return Llama(cfg, rngs=nnx.Rngs(0)), tok


@pytest.mark.e2e
def test_lora_ppo_trains_adapters_and_value_head_against_the_base_with_adapters_off():
    """Under LoRA the reference is the frozen base (KL exactly 0 before any update); a step moves the adapters and
    the value head and leaves the base weights as they were."""
    from llama_jax.config import Config, LoraConfig, PpoConfig
    from llama_jax.lora import LoRAParam
    from llama_jax.sharding import make_mesh

    model_cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    cfg = Config(model=model_cfg, lora=LoraConfig(rank=4, targets=["q", "v"]),
                 ppo=PpoConfig(batch_size=8, minibatch_size=8, lr=1e-2, critic="separate"))
    mesh = make_mesh(cfg.mesh)
    trainer = ppo.PpoTrainer(cfg, mesh, Llama(model_cfg, rngs=nnx.Rngs(0)))
    state = trainer.init_state()
    tokens = RNG.integers(1, 64, (8, 12)).astype(np.int32)
    mask = np.zeros((8, 11), np.float32)
    mask[:, 4:] = 1
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(11, dtype=np.int32),
             (8, 1)), "segment_ids": np.ones((8, 11), np.int32), "mask": mask}
    prepared = jax.device_get(trainer.prepare(state, trainer.put(batch), jnp.asarray(RNG.uniform(0.1, 0.9, 8)),
                                              cfg.ppo.kl_coef))
    np.testing.assert_allclose(prepared["kl"], 0.0, atol=1e-6)
    before = jax.device_get(state.params)
    base = jax.device_get(nnx.to_flat_state(trainer.frozen))
    rows = {**batch, **{k: prepared[k] for k in ("old_logp", "ref_logp", "old_values", "returns", "advantages")}}
    state, metrics = trainer.train_step(state, trainer.put(rows))
    assert np.isfinite(metrics["policy_loss"]) and float(metrics["clip_fraction"]) == 0.0
    after = jax.device_get(state.params)
    kinds = {type(v).__name__ for _, v in nnx.to_flat_state(after)}
    assert kinds == {"LoRAParam", "ValueParam"}  # only adapters (policy and critic) and the value head train
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in
             zip(nnx.to_flat_state(before), nnx.to_flat_state(after))]
    assert sum(moved) >= len(moved) // 2
    for (_, a), (_, b) in zip(base, nnx.to_flat_state(jax.device_get(trainer.frozen))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert issubclass(ppo.ValueParam, nnx.Param) and not issubclass(ppo.ValueParam, LoRAParam)
    # ppo.max_kl: a step is refused exactly when the moved policy's KL per reply on its rows exceeds the bound.
    kl = float(np.mean(jax.device_get(trainer.prepare(state, trainer.put(batch), jnp.full((8,), 0.5),
                                                      cfg.ppo.kl_coef))["kl"]))
    margin = 0.01 * abs(kl)  # the prepare and train programs round differently
    assert margin > 1e-6
    stepped = jax.device_get(state)  # the train step donates its input state
    kept, metrics = trainer.train_step(state, trainer.put(rows), kl - margin)
    assert float(metrics["kl_stop"]) == 1.0
    for x, y in zip(jax.tree.leaves(jax.device_get(kept)), jax.tree.leaves(stepped), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    moved_on, metrics = trainer.train_step(kept, trainer.put(rows), kl + margin)
    assert float(metrics["kl_stop"]) == 0.0 and int(moved_on.step) == int(stepped.step) + 1


PROMPTS = ("ROMEO:", "JULIET:", "What say you, my lord", "Enter the king")


def low_token_share(prompts, completions, mask):
    """A computable reward: the share of generated tokens whose id is below 500."""
    return ((completions < 500) & (mask > 0)).sum(1) / np.maximum(mask.sum(1), 1)


def test_rollout_logprobs_are_the_policy_logprobs_of_the_sampled_tokens(tiny):
    model, tok = tiny
    prompts = [tok.encode(text, bos=True) for text in PROMPTS] * 4  # the shapes best-of-K samples: one compile
    rollout = Sampler(gather=False)(model, prompts, 10, Sampling(1.0), tok.eos_id, seed=3)
    batch = rollout.sequences()
    forward = np.asarray(nnx.jit(ppo.logprobs)(model, {k: jnp.asarray(v) for k, v in batch.items()}))
    mask = batch["mask"] > 0
    start = rollout.prompts.shape[1] - 1
    np.testing.assert_allclose(forward[mask], rollout.logprobs[:, :forward.shape[1] - start][mask[:, start:]],
                               atol=1e-4)
    assert mask.sum() == rollout.mask.sum() > 0


def test_best_of_k_beats_the_mean_of_its_samples_and_pools_earlier_rounds(tiny):
    model, tok = tiny
    prompts = [Prompt(tok.encode(t, bos=True), text=t) for t in PROMPTS]
    cfg = RejectionConfig(samples=4, temperatures=[1.0], max_new_tokens=10, batch_size=16)
    samples = rejection.draw_samples(model, tok, prompts, low_token_share, cfg, seed=0)
    best = samples.rewards[np.arange(len(prompts)), samples.best()]
    np.testing.assert_array_equal(best, samples.rewards.max(axis=1))
    assert best.mean() > samples.rewards.mean() + 0.02
    earlier = {**prompts[0].record("an earlier, better answer"), "reward": 2.0}
    records, pooled = rejection.select_best(prompts, samples, rejection.read_pool_records([earlier]))
    assert pooled == 1 and records[0] == earlier
    assert [r["reward"] for r in records[1:]] == pytest.approx(best[1:].tolist())
    for record in records:  # each is a fine-tuning example the SFT reader accepts
        ids, learn = encode_record(record, tok)
        assert any(learn)


INSTRUCTIONS = {"hobbies": [("You enjoy tennis.", "Tennis")], "languages": [("Always answer in French.", "French")],
                "personas": [("Act as Napoleon.", "Napoleon")]}


def test_gatt_instruction_on_every_sampled_turn_first_turn_only_in_training(tokenizer_1k):
    tok = Tokenizer(tokenizer_1k)
    dialogs = [[{"role": role, "content": f"question {i}.{turn}" if role == "user" else "old reply"}
                for turn in range(n) for role in ("user", "assistant")] for i, n in enumerate((3, 1, 2))]
    seen = []

    def reply(batch):
        seen.extend(batch)
        return [f"reply to {m[-1]['content'].split()[-1]}" for m in batch]

    cfg = GattConfig(max_combined=3, shorten=0.5, all_turns=True, batch_size=2)
    records = gatt.build_gatt(dialogs, INSTRUCTIONS, reply, cfg, seed=1)
    assert len(seen) == 6 and len(records) == 6  # one reply, and one training record, per user turn
    drawn = {r["instruction"] for r in records}
    for prompt in seen:  # while sampling, every user turn carries the dialog's instruction
        users = [m["content"] for m in prompt if m["role"] == "user"]
        instruction = users[0].rsplit(" question", 1)[0]
        assert instruction in drawn and all(u.startswith(instruction + " question") for u in users)
    for record in records:
        messages, instruction = record["messages"], record["instruction"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        assert users[0].startswith(instruction + " question") and all(u.startswith("question") for u in users[1:])
        assert [m.get("train", True) for m in messages if m["role"] == "assistant"] == [False] * (len(users) - 1) + [
            True]
        ids, learn = encode_record(record, tok)
        learned = [i for i, flag in zip(ids, learn) if flag]
        assert learned[-1] == tok.eos_id and tok.decode(learned[:-1]).strip() == messages[-1]["content"]
    assert len(drawn) == 3


def test_gatt_instructions_combine_distinct_categories_and_shorten():
    rng = np.random.default_rng(0)
    full = {"You enjoy tennis.", "Always answer in French.", "Act as Napoleon."}
    drawn = [gatt.draw_instruction(INSTRUCTIONS, rng, 2, 0.0) for _ in range(40)]
    assert all(1 <= sum(f in d for f in full) <= 2 for d in drawn) and {sum(f in d for f in full) for d in drawn} == {
        1, 2}
    assert {gatt.draw_instruction(INSTRUCTIONS, rng, 1, 1.0) for _ in range(30)} == {"Tennis", "French", "Napoleon"}


REWARD_MODULE = textwrap.dedent("""
    import numpy as np
    def low_tokens(tokenizer):
        half = tokenizer.vocab_size // 2
        return lambda prompts, completions, mask: ((completions < half) & (mask > 0)).sum(1) / np.maximum(mask.sum(1), 1)
""")

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from llama_jax.alignment import ppo as ppo_module
    from llama_jax.config import load_config
    original = ppo_module.ppo_iteration
    def killing(trainer, state, tokenizer, prompts, reward_fn, iteration, kl_coef):
        if iteration == 5:  # iteration 5 (0-based) ran after the checkpoint at 4: it must be redone identically
            os.kill(os.getpid(), signal.SIGKILL)
        return original(trainer, state, tokenizer, prompts, reward_fn, iteration, kl_coef)
    ppo_module.ppo_iteration = killing
    ppo_module.ppo(load_config(sys.argv[1], sys.argv[2:]))
""")


@pytest.mark.e2e
def test_ppo_raises_reward_with_bounded_kl_sharded_and_resumes_bit_exactly_after_sigkill(tmp_path):
    """On 8 simulated devices: `align ppo` raises a computable reward with KL to the reference below a bound (KL
    coefficient adapted, updates stopped at ppo.max_kl); a run SIGKILLed after its checkpoint resumes to the same
    final parameters bit for bit."""
    from tiny_lm import make_tiny_lm

    hf, tok_path, _, _ = make_tiny_lm(tmp_path, max_seq_len=64)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "The cat sat", "Paris is", "Water boils", "Once upon a time", "She sells")))
    (tmp_path / "task_reward.py").write_text(REWARD_MODULE)
    # Each process compiles the same programs: a persistent cache lets the later two skip it (~60 s -> ~20 s).
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "JAX_COMPILATION_CACHE_DIR": str(
        tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    common = [f"ppo.init_from={hf}", f"data.tokenizer={tok_path}", f"ppo.prompts={tmp_path / 'prompts.jsonl'}",
              "ppo.reward=task_reward:low_tokens", "ppo.iterations=12", "ppo.batch_size=16", "ppo.minibatch_size=8",
              "ppo.max_new_tokens=8", "ppo.lr=1e-2", "ppo.kl_coef=0.1", "ppo.logit_reward=false", "ppo.critic=shared",
              "ppo.kl_target=4.0", "ppo.kl_horizon=80", "ppo.max_kl=8.0", "checkpoint.every=4",
              "checkpoint.async_save=false"]

    def run(*args, run_dir):
        return subprocess.run([*args, *common, f"checkpoint.dir={tmp_path / run_dir}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    straight = run(sys.executable, "-m", "llama_jax", "align", "ppo", "--config", str(CONFIG), run_dir="straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "straight" / ppo.METRICS_FILE).read_text().splitlines()]
    rewards = [h["reward"] for h in history]
    # measured: the share rises from 0.48 to 0.87 (mean of the first and last three iterations), KL at most 13
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    assert max(h["kl"] for h in history) < 20.0, history  # nats per completion of 8 tokens
    # the KL coefficient adapts (resumed from the checkpoint below, or the runs would differ)
    assert len({h["kl_coef"] for h in history}) == len(history) and history[0]["kl_coef"] == 0.1, history
    assert (tmp_path / "straight" / ppo.POLICY_DIR).is_dir()

    killed = run(sys.executable, "-c", KILLED_RUN, str(CONFIG), run_dir="resumed")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.name.isdigit()) == ["4"]
    resumed = run(sys.executable, "-m", "llama_jax", "align", "ppo", "--config", str(CONFIG), run_dir="resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from llama_jax.checkpoints import load_pretrained
    a, b = (nnx.state(load_pretrained(tmp_path / d / ppo.POLICY_DIR)) for d in ("straight", "resumed"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.e2e
def test_align_rejection_and_gatt_commands(tmp_path, monkeypatch):
    """`align rejection` (module:factory reward, best of 4 at two temperatures, then fine-tuned on) and `align gatt`
    write SFT data the fine-tuning reader accepts."""
    from tiny_lm import make_tiny_lm

    from llama_jax.cli import main

    hf, tok_path, _, tok = make_tiny_lm(tmp_path, max_seq_len=64)
    (tmp_path / "task_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n"
                                                    for p in ("The cat sat", "Paris is", "Water boils", "Once")))
    (tmp_path / "dialogs.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "Where is Paris?"}, {"role": "assistant", "content": "In France."},
        {"role": "user", "content": "And Rome?"}, {"role": "assistant", "content": "In Italy."}]}) + "\n")
    (tmp_path / "instructions.yaml").write_text("persona: [{full: Act as a cat., short: Cat}]\nlanguage: [French]\n")
    configs = REPO / "experiments" / "configs"
    common = [f"data.tokenizer={tok_path}", "train.log_every=1"]
    assert main(["align", "rejection", "--config", str(configs / "rejection_tiny.yaml"), *common,
                 f"rejection.init_from={hf}", f"rejection.prompts={tmp_path / 'prompts.jsonl'}",
                 "rejection.reward=task_reward:low_tokens", "rejection.samples=4", "rejection.temperatures=[0.8,1.2]",
                 f"rejection.output={tmp_path / 'best.jsonl'}", f"checkpoint.dir={tmp_path / 'rs'}",
                 "finetune.epochs=0", "train.steps=2"]) == 0
    kept = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert len(kept) == 4 and all(r["messages"][-1]["role"] == "assistant" for r in kept)
    assert (tmp_path / "rs" / "2").is_dir()  # the fine-tuning run on the kept replies
    assert main(["align", "gatt", "--config", str(configs / "gatt_tiny.yaml"), *common, f"gatt.init_from={hf}",
                 f"gatt.dialogs={tmp_path / 'dialogs.jsonl'}", f"gatt.output={tmp_path / 'gatt.jsonl'}",
                 f"gatt.instructions={tmp_path / 'instructions.yaml'}", "gatt.max_new_tokens=8",
                 "gatt.temperature=1.0", "gatt.top_p=1.0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "gatt.jsonl").read_text().splitlines()]
    assert records  # (a dialog whose sampled reply came out empty is left out)
    for record in records:
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert users[0].startswith(record["instruction"]) and users[1:] in ([], ["And Rome?"])
        assert any(encode_record(record, tok)[1])


@pytest.mark.e2e
def test_bench_rollout_reports_rollout_and_train_rates(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    from bench_rollout import bench

    rates = bench("tiny", batch=8, prompt_len=8, new_tokens=8, repeats=1)
    assert len(rates) == 3 and all(np.isfinite(r) and r > 0 for r in rates.values()), rates
