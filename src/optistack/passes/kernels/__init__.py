"""Custom kernels (C++ CPU, Triton, CUDA) and the `fuse-kernels` pass that swaps them into a model.

Backends share one API (see `reference.py`); import them lazily, they may be unavailable here.
"""
