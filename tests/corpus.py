"""Play-like English text generated from a seed, so the tests need no downloaded corpus.

Speeches ("ROMEO:" then a few lines) over a Zipf-distributed lexicon of pronounceable made-up words: a BPE model
finds real merges in it and a small LLaMA learns it quickly, like tiny_shakespeare. It uses letters, spaces,
newlines and `,.;:!?'` only (no digits), and `random.Random`, whose stream is the same on every Python version.
"""

import itertools
import random

SPEAKERS = ["ROMEO", "JULIET", "MENENIUS", "CORIOLANUS", "FIRST CITIZEN", "KING RICHARD", "LADY ANNE", "GLOUCESTER",
            "NURSE", "FRIAR LAURENCE"]
ONSETS = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "th", "st", "br", "gr", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "ee"]
CODAS = ["", "", "n", "r", "s", "t", "th", "ll", "nd", "st"]
COMMON = ["the", "and", "of", "to", "my", "i", "you", "a", "that", "in", "is", "not", "with", "me", "it", "for",
          "his", "be", "your", "thou", "thy", "what", "shall", "have", "lord", "good", "come", "love", "king", "o"]


def _lexicon(rng: random.Random, size: int) -> list[str]:
    words = list(COMMON)
    while len(words) < size:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                       for _ in range(rng.choice([1, 1, 2, 2, 3])))
        if word not in words:
            words.append(word)
    return words


def play_text(n_chars: int, seed: int = 0, lexicon_size: int = 800) -> str:
    """About `n_chars` characters (whole speeches) of generated play text; the same for the same arguments."""
    rng = random.Random(seed)
    words = _lexicon(rng, lexicon_size)
    cum_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))
    speeches, total = [], 0
    while total < n_chars:
        lines = []
        for _ in range(rng.randint(1, 4)):
            line = rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 10))
            line[0] = line[0].capitalize()
            lines.append(" ".join(line).replace(" i ", " I ") + rng.choice([",", ".", ";", "!", "?", ":", "'s."]))
        speech = f"{rng.choice(SPEAKERS)}:\n" + "\n".join(lines) + "\n\n"
        speeches.append(speech)
        total += len(speech)
    return "".join(speeches)
