"""Test configuration: 8 host CPU devices for the data-parallel tests.

XLA reads this flag once, when the backend starts, so it is set before any
test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
