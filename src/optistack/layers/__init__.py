"""The quantized module types optistack's passes put into models and its kernels read: `Int4Linear`
(int4.py, on the group-wise grid of int4_grid.py), `Int8Linear` (int8.py) and `Fp8Linear` (fp8.py).

This layer stands on core alone: passes build these modules, kernels repack them, checkpoints write
them in other formats, and `optistack.load_model` rebuilds them (each registers its loader with
`core.load_registry` when its module is imported).
"""
