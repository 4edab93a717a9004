"""Benchmark evaluation: batched continuation log-likelihoods and the lm-evaluation-harness adapter."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llama_jax.extras import require


def run_lm_eval(argv: Sequence[str]) -> None:
    """lm_eval's own command line (`run --model llama_jax ...`) with our model registered under `llama_jax`."""
    require("lm_eval", extra="eval")
    import llama_jax.evaluation.lm_eval_adapter  # noqa: F401  (registers the model)
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
