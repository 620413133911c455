import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

import depthjax as dj  # noqa: E402


@pytest.fixture(scope="session")
def tokens():
    """int32 [2, 12] byte tokens."""
    return np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)


@pytest.fixture(scope="session")
def llama():
    return dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop jax's compiled executables after each test module. XLA:CPU maps each one's code
    into its own memory regions; a process that keeps thousands of them (the whole suite in
    one pytest run) ends with LLVM failing to map more and segfaulting inside a compile."""
    yield
    jax.clear_caches()
