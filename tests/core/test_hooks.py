"""The model-side hooks are declared once (core.hooks): every class that provides one keeps its Protocol,
and no module outside core/hooks.py spells a hook's name as a string in getattr/hasattr/setattr."""
import ast
from pathlib import Path

import pytest

import optistack
from optistack.checkpoints.loadables import register_loadables
from optistack.core import hooks
from optistack.core.load_registry import MODULES, RUNTIMES

register_loadables()  # what optistack.load_model does first: every loadable class registers itself
SRC = Path(optistack.__file__).parent
# bench/ is another owner's: bench/memory.py still reads "model_bytes" by name (to switch to MODEL_BYTES_ATTR).
NOT_YET: set[str] = set()
_ACCESSORS = {"getattr", "hasattr", "setattr", "delattr", "__setattr__", "__delattr__"}


@pytest.mark.parametrize("key", sorted(k for k in MODULES if k.startswith("optistack.")))
def test_every_loadable_layer_is_a_savable_layer(key):
    assert issubclass(MODULES[key].resolve(), hooks.SavableLayer), key


@pytest.mark.parametrize("key", sorted(RUNTIMES))
def test_every_runtime_form_saves_itself(key):
    assert issubclass(RUNTIMES[key].resolve(), hooks.SavableRuntime), key


def test_decoding_and_prompt_hooks_keep_their_protocols():
    from optistack.passes.decoding.kv_cache import DynamicCacheFactory, QuantizedCacheFactory, StaticCacheFactory
    from optistack.passes.decoding.lookup import PromptLookup
    from optistack.passes.decoding.speculative import SpeculativeDecoder
    from optistack.passes.serving.prompt_compress import CompressedPromptModel
    from optistack.workloads.longqa import LongQAWorkload

    for factory in (StaticCacheFactory(None, 64), QuantizedCacheFactory(8, None), DynamicCacheFactory()):
        assert isinstance(factory, hooks.CacheFactory)
    assert isinstance(SpeculativeDecoder(PromptLookup(3, 2), 4), hooks.DecodeStrategy)
    assert issubclass(CompressedPromptModel, hooks.PromptRewriter)
    assert hooks.rewrites_prompts(LongQAWorkload) and not hooks.rewrites_prompts(object())


def hook_names_spelled(path: Path) -> list[str]:
    """`getattr(x, "optistack_cache")`-style reads and writes of a hook by its string name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or len(node.args) < 2:
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        name = node.args[1]
        if func in _ACCESSORS and isinstance(name, ast.Constant) and name.value in hooks.HOOKS:
            found.append(f"line {node.lineno}: {func}(..., {name.value!r})")
    return found


def test_no_module_spells_a_hook_name():
    offenders = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "core/hooks.py" or rel in NOT_YET:
            continue
        hits = hook_names_spelled(path)
        if hits:
            offenders[rel] = hits
    assert not offenders, f"use the constants of optistack.core.hooks: {offenders}"


def test_the_spelling_check_sees_getattr_and_object_setattr(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('getattr(m, "optistack_cache", None)\nobject.__setattr__(m, "optistack_decode", s)\n'
                 'hasattr(w, "rewrites_prompts")\nd.get("model_bytes")\n')
    assert len(hook_names_spelled(f)) == 3
