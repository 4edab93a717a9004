"""Ships `llama_jax_lm_eval.pth` at the top of site-packages (wheels and editable installs); all metadata is in
pyproject.toml. The .pth lets `lm_eval --model llama_jax` work on lm-eval 0.4.13 (see llama_jax_lm_eval.py)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "llama_jax_lm_eval.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        # an editable install keeps no build copy: its wheel is assembled from install_lib
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(target, PTH))


setup(cmdclass={"build_py": BuildPyWithPth})
