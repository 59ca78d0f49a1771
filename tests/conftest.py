"""Test-session settings, applied before anything imports jax."""

import os

# The suite runs thousands of tiny programs: XLA's CPU backend optimizations cost ~2 s per
# compile of a random initializer and buy nothing at these sizes (level 0: ~0.2 s). Numerics are
# unchanged in kind; tests that compare runs compare them under the same setting. A caller's own
# XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
