import os

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


def char_tokenizer(path, *, truncate: int | None = None, pad: int | None = None):
    """Write a character-level tokenizer.json (255 characters + [UNK] = 256 ids) to `path`,
    optionally with the truncation and padding settings a shipped tokenizer may carry."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(
        models.WordLevel({chr(i): i for i in range(255)} | {"[UNK]": 255}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if truncate:
        tok.enable_truncation(max_length=truncate)
    if pad:
        tok.enable_padding(length=pad, pad_id=0, pad_token="\x00")
    tok.save(str(path))
    return path


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
