"""`attention`: attn_implementation switches and SDPA backends keep a tiny Llama's outputs."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama

from optistack.core.errors import PassApplyError, PassConfigError
from optistack.core.pass_protocol import PassContext
from optistack.passes.serving.attention import AttentionPass

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.inference_mode():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.mark.parametrize("impl,backend", [("eager", "auto"), ("sdpa", "auto"), ("sdpa", "math"), ("sdpa", "flash")])
def test_outputs_match_the_original(impl, backend):
    model = tiny_llama(vocab_size=128)
    ref = logits(model)
    result = AttentionPass(impl=impl, backend=backend).apply(copy.deepcopy(model), PassContext())
    assert result.model.config._attn_implementation == impl
    assert torch.allclose(logits(result.model), ref, atol=1e-4, rtol=1e-4)
    assert result.info["impl"] == impl


def test_backend_is_enforced_and_released():
    """With backend=math the hooks pin SDPA to MATH inside forward, and restore torch's state after."""
    seen = []
    model = AttentionPass(backend="math").apply(tiny_llama(vocab_size=128), PassContext()).model
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: seen.append(torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled()))
    logits(model)
    assert seen == [True]
    assert torch._C._get_flash_sdp_enabled()  # outside the forward, the global choice is untouched


def test_refusals():
    with pytest.raises(PassApplyError, match="attention: .*not a transformers PreTrainedModel"):
        AttentionPass().apply(torch.nn.Linear(4, 4), PassContext())
    with pytest.raises(PassConfigError, match="needs impl=sdpa"):
        AttentionPass(impl="eager", backend="math")
    avail = AttentionPass(impl="flash_attention_2").requirements()
    if not avail:
        assert "flash" in avail.reason
    if not torch.cuda.is_available():
        assert "CUDA" in AttentionPass(backend="efficient").requirements().reason


def test_refuses_a_workload_that_is_not_a_causal_lm_unless_told():
    from types import SimpleNamespace

    ctx = PassContext(workload=SimpleNamespace(kind="encoder", name="minilm"))
    with pytest.raises(PassApplyError, match=r"attention: a serving pass for causal LMs; workload 'minilm' is "
                                             r"'encoder'.*attention\{causal_lm_only=false\}"):
        AttentionPass().apply(tiny_llama(vocab_size=128), ctx)
    result = AttentionPass(causal_lm_only=False, impl="eager").apply(tiny_llama(vocab_size=128), ctx)
    assert result.info["impl"] == "eager"
