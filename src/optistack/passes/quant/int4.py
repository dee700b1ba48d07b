"""Deprecated alias: this module was renamed `optistack.passes.quant.int4_linear` (it holds the
`Int4Linear` layer and the int4 helpers, not a pass). Importing it warns once and gives that module.

Folders saved under the old class path still load: `core.load_registry` maps
"optistack.passes.quant.int4:Int4Linear" to the new module without importing this alias.
"""
import sys
import warnings

from . import int4_linear

warnings.warn("optistack.passes.quant.int4 is deprecated: import optistack.passes.quant.int4_linear instead",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = int4_linear
