"""Test configuration: 8 host CPU devices for the data-parallel tests, fast compiles.

XLA reads this flag once, when the backend starts, so it is set before any
test module imports jax.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run small programs many times: compile time, not run time, is most of
# the suite's cost, and XLA's optimizing passes are most of compile time
# (this cuts the suite by about a quarter). Subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Many tests compile the same small programs (the common battery runs each
# method's step in several checks; the CLI tests' subprocesses compile the
# same train step): a compilation cache on disk, shared by the test workers
# and their subprocesses, compiles each once (about a fifth of the battery).
# Keyed by the program, the flags and the jax version, so never stale.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"sharpjax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
