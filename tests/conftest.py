import os

# Several host devices so that sharding code paths run on a CPU-only machine.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (the small pipeline runs above all), and each module's
# compiled code is dropped when it ends (below): a compilation cache on disk for the session
# (subprocesses included) lets later modules load them instead of compiling them again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="bayesnoise-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_code():
    """Every compiled XLA executable keeps its code mapped in memory. A whole test session
    compiles thousands, and the process would run past the kernel's limit on memory maps
    (vm.max_map_count, 65,530 by default), which crashes XLA inside a later compilation. So
    each test module's executables are dropped when it ends."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def digits_small_run(tmp_path_factory):
    """One finished small digits run (tests/small_run.py's settings, iterative pruning on),
    shared by the tests that read a run or resume copies of it: a run costs about a minute."""
    from small_run import ITERATIVE, run_cli

    out = tmp_path_factory.mktemp("shared_run") / "digits"
    assert run_cli(out, *ITERATIVE) == 0
    return out
