"""Test-wide settings: CPU only, and cheap XLA compiles.

Most of the suite's time is XLA compiling many small programs, not running
them. Backend optimization level 0 skips LLVM's heavy passes: numerics are the
same operations (every parity check still holds to its tolerance), compiles
are roughly a third faster. Benchmarks never use this setting.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
