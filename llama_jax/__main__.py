"""`python -m llama_jax ...` entry point."""

import sys

from llama_jax.cli import main

sys.exit(main())
