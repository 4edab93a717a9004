"""Train the same steps in two gradient chains and in one on a one-device CPU mesh, and check they agree: the
compiled step of the chains holds twice the products, losses match to 1e-6 and parameters to 1e-5 (+ `atol`)."""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

from llama_jax.training import step as step_module


def assert_chains_train_as_one(make_trainer: Callable[[], step_module.Trainer], init: Callable[[Any], Any],
                               batches: list[dict[str, np.ndarray]], atol: float) -> None:
    """`make_trainer()` builds a Trainer on a one-device CPU mesh; `init(trainer)` its first state."""
    results, dots = {}, {}
    for label, chains in (("chains", step_module.gradient_chains), ("one", lambda *args: 1)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(step_module, "gradient_chains", chains)
            trainer = make_trainer()
            state = init(trainer)
            with jax.set_mesh(trainer.mesh):
                hlo = trainer.jitted_train_step(batches[0]).lower(state, trainer.frozen, trainer.objective.inputs,
                                                                  batches[0]).as_text()
            dots[label] = hlo.count("stablehlo.dot_general")
            losses = []
            for batch in batches:
                state, metrics = trainer.train_step(state, batch)
                losses.append(float(metrics["loss"]))
        results[label] = losses, jax.device_get(state.params)
    assert dots["chains"] == 2 * dots["one"], dots
    np.testing.assert_allclose(results["chains"][0], results["one"][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results["chains"][1]), jax.tree.leaves(results["one"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
