"""optistack.load_model registers every loadable class from above before core reads a folder: a fresh
process (nothing imported but optistack) loads int4, int8 and fp8 layers, and old class names load too."""
import subprocess
import sys

import torch
from torch import nn

import optistack as ost
from optistack.checkpoints.loadables import REGISTERING, RENAMED, register_loadables
from optistack.core import load_registry

FRESH = """
import sys, torch
from torch import nn
from optistack.core import load_registry
before = sorted(k for k in load_registry.MODULES if k.startswith("optistack."))
import optistack
torch.manual_seed(0)
fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
model = optistack.load_model(sys.argv[1], model=fresh)
print(before, type(model[0]).__module__ + ":" + type(model[0]).__name__, float(model(torch.ones(2, 64)).sum()))
"""


def test_a_fresh_process_loads_a_saved_int4_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    result = ost.Pipeline.parse("rtn-int4{group_size=32}").run(
        ost.workloads.GenericWorkload(model, torch.randn(2, 64)), instruments=[], verbose=False)
    result.save(tmp_path)
    out = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, cls, total = out.stdout.strip().rsplit(" ", 2)
    assert before == "[]", "core knows no optistack class until the classes register"
    assert cls == "optistack.layers.int4:Int4Linear"
    assert abs(float(total) - float(result.model(torch.ones(2, 64)).sum())) < 1e-4


def test_every_registering_module_registers_and_every_old_name_points_at_a_registered_class():
    register_loadables()
    tables = {**load_registry.MODULES, **load_registry.RUNTIMES}
    for module in REGISTERING:
        assert any(entry.module == module for entry in tables.values()), f"{module} registers nothing"
    for old, new in RENAMED.items():
        assert new in tables and tables[old] is tables[new], old
        assert tables[old].module != old.split(":")[0]  # the old module is never imported
