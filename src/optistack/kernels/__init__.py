"""Custom kernels as a library: C++ CPU (`cpu`), Triton (`triton`), CUDA (`cuda`) and the plain torch
`reference`, behind one backend interface (`backend.py`), with the modules that call them (`modules.py`).

The `fuse-kernels` pass (optistack.passes.kernels.fuse) swaps these modules into a model; anything else
may call the kernels directly. Backends are imported lazily: they may be unavailable here.
"""
