import importlib.util
import os
import sys
from pathlib import Path

# Tests compile hundreds of tiny programs: XLA:CPU's LLVM optimisation costs more than it
# saves on them (about 30% of the suite's time). Set before jax starts its backend;
# subprocesses that the tests start inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import depthjax as dj  # noqa: E402


def _load_this_checkouts_kernels():
    """kernels/ installs as `depthjax.kernels` (setup.py's package_dir). With another checkout
    installed in editable mode (a git worktree tested with PYTHONPATH=its root and the main
    checkout's venv), that name maps to the other checkout's kernels/: load this one's."""
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    spec = importlib.util.find_spec("depthjax.kernels")
    if spec is not None and Path(spec.origin).resolve() == kernels / "__init__.py":
        return
    spec = importlib.util.spec_from_file_location(
        "depthjax.kernels", kernels / "__init__.py", submodule_search_locations=[str(kernels)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["depthjax.kernels"] = dj.kernels = module
    spec.loader.exec_module(module)


_load_this_checkouts_kernels()


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
