"""A synthetic RLHF task whose true reward is computable, so every alignment stage's effect can be measured.

The user asks for a few words about a topic; the reply is `REPLY_WORDS` words from `WORDS`. The true reward of a
reply is the share of its words that belong to `TARGET` ("love", "lord", "king"). The SFT data draws every word
uniformly, so the SFT policy says a target word about a quarter of the time; preference pairs of its own samples,
labelled by the true reward (with rating levels and label noise), teach a reward model and DPO to say them more.
"""

from __future__ import annotations

import numpy as np

TARGET = frozenset({"love", "lord", "king"})
WORDS = ("love lord king stone river cloud apple window garden silver candle forest").split()
TOPICS = "sea night city winter bread horse music road".split()
REPLY_WORDS = 6
# Rating by how many more target words the chosen reply has (the paper's four levels; 0 = a tie).
RATINGS = {3: "significantly better", 2: "better", 1: "slightly better", 0: "negligibly better / unsure"}


def prompts(rng: np.random.Generator, n: int) -> list[str]:
    """`n` user turns, e.g. "write six words about the sea"."""
    return [f"write six words about the {rng.choice(TOPICS)}" for _ in range(n)]


def sft_records(rng: np.random.Generator, n: int) -> list[dict]:
    """Single-turn chat records whose replies are uniform draws from `WORDS` (the SFT policy's behaviour)."""
    return [{"messages": [{"role": "user", "content": prompt},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS, REPLY_WORDS))}]}
            for prompt in prompts(rng, n)]


def true_reward(completion: str) -> float:
    """Share of the completion's words that are target words (0 for an empty completion)."""
    words = completion.split()
    return sum(w in TARGET for w in words) / len(words) if words else 0.0


def target_count(completion: str) -> int:
    return sum(w in TARGET for w in completion.split())


def label_pairs(rng: np.random.Generator, prompt_texts: list[str], first: list[str], second: list[str],
                noise: float = 0.1) -> list[dict]:
    """Preference records `{"prompt", "chosen", "rejected", "rating"}` for two replies per prompt: the reply with
    more target words is chosen, rated by the difference (3+ significantly better ... 0 unsure, order random);
    pairs one word apart are flipped with probability `noise`, as human labels disagree on close calls."""
    records = []
    for prompt, a, b in zip(prompt_texts, first, second):
        if not a.strip() or not b.strip():
            continue
        diff = target_count(a) - target_count(b)
        chosen, rejected = (a, b) if diff > 0 or (diff == 0 and rng.random() < 0.5) else (b, a)
        if abs(diff) == 1 and rng.random() < noise:
            chosen, rejected = rejected, chosen
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "rating": RATINGS[min(abs(diff), 3)]})
    return records
