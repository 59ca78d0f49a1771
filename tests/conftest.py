"""Test-session settings, applied before anything imports jax."""

import os

# The suite runs thousands of tiny programs: XLA's CPU backend optimizations cost ~2 s per
# compile of a random initializer and buy nothing at these sizes (level 0: ~0.2 s). Numerics are
# unchanged in kind; tests that compare runs compare them under the same setting. A caller's own
# XLA_FLAGS win. The legacy elemental emitter instead of XLA:CPU's MLIR fusion emitters halves
# the compile of the diagnostics' programs (dozens of loop bodies, each fusion its own kernel):
# measured 2026-12-03 on 2 cores, a CIFAR ResNet-14 diagnostics compile 12.2-13.7 -> 6.3-7.3 s of
# CPU, and test_conv's scanned-vs-unrolled plus the brute-force diagnostics tests 212 -> 131 s.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")

# Many tests build the same small programs again (every training run, resume and CLI
# subprocess compiles its own jit): JAX's persistent compilation cache turns each repeat into a
# load (measured: a CIFAR ResNet-14 init + train step, 6-8 s compiled, 1.7-1.9 s from the
# cache). Shared by the xdist workers and subprocesses through the environment; a size limit
# turns on JAX's file lock, so concurrent writers and readers never see half an entry, and LRU
# eviction bounds the disk. Under .pytest_cache, so `pytest --cache-clear` empties it.
# Only programs that took at least half a second to compile are stored: each store lists and
# reads every entry under the lock (jax's LRU eviction), so caching the thousands of op-by-op
# compiles of eager code (~0.05 s each, ~4,100 entries) made every store O(entries) and
# serialized the workers on the lock. Measured 2026-12-08 on 2 quiet cores, a fresh suite:
# 14 min 42 s (5 min 17 s of it system time, 1.5 cores busy) -> 7 min 34 s (1 min 2 s; 170
# entries, most of them from test programs that are compiled in several processes).
_JAX_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))


import pytest  # noqa: E402  (after XLA_FLAGS: resflax imports jax)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    """The embedded digits written once per test module as a local tfds dataset (offline)."""
    from resflax import data  # pylint: disable=g-import-not-at-top

    path = tmp_path_factory.mktemp("tfds")
    data.prepare_digits(path)
    return str(path)
