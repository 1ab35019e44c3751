"""Test configuration: 8 host CPU devices for the data-parallel tests, fast compiles.

XLA reads this flag once, when the backend starts, so it is set before any
test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run small programs many times: compile time, not run time, is most of
# the suite's cost, and XLA's optimizing passes are most of compile time
# (this cuts the suite by about a quarter). Subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
