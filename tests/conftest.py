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
