"""A `python -c` script that runs a training entry point on a config and SIGKILLs itself at a given step, so a test
can resume the run and compare it with one that was never interrupted."""

import textwrap


def killed_at_step(step: int, entry: str) -> str:
    """Script running `entry` ("module:function") on `load_config(argv[1], argv[2:])`; the process kills itself
    when the train step is called with `state.step == step`."""
    module, function = entry.split(":")
    return textwrap.dedent(f"""
        import importlib, os, signal, sys
        from llama_jax.config import load_config
        from llama_jax.training import step as step_module
        original = step_module.Trainer.train_step
        def killing(self, state, batch):
            if int(state.step) == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, state, batch)
        step_module.Trainer.train_step = killing
        getattr(importlib.import_module("{module}"), "{function}")(load_config(sys.argv[1], sys.argv[2:]))
    """)
