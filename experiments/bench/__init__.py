"""nnlib against eager PyTorch on the CPU: ``python experiments/bench/run.py`` (NOTES.md)."""
