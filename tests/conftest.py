"""Test-session settings, applied before anything imports jax."""

import os

# The suite runs thousands of tiny programs: XLA's CPU backend optimizations cost ~2 s per
# compile of a random initializer and buy nothing at these sizes (level 0: ~0.2 s). Numerics are
# unchanged in kind; tests that compare runs compare them under the same setting. A caller's own
# XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


import pytest  # noqa: E402  (after XLA_FLAGS: resflax imports jax)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    """The embedded digits written once per test module as a local tfds dataset (offline)."""
    from resflax import data  # pylint: disable=g-import-not-at-top

    path = tmp_path_factory.mktemp("tfds")
    data.prepare_digits(path)
    return str(path)
