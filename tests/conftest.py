"""Test-wide settings: CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
