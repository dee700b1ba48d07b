import pytest
import torch

from optistack import Pipeline
from optistack.core.errors import PassConfigError, PipelineParseError, UnknownPassError
from optistack.core.pass_protocol import PassContext


@pytest.mark.parametrize("text", [
    "identity",
    "int8-dynamic,compile",
    "prune-magnitude{sparsity=0.3},cast{dtype=fp16},compile{mode=max-autotune,dynamic=false}",
    "prune-structured{sparsity=0.5,heads=0.25},int8-weight{skip=lm_head}",
    'int8-dynamic{skip="a|b, c"},compile',
    "",
])
def test_text_round_trips_to_an_equal_pipeline(text):
    p = Pipeline.parse(text)
    again = Pipeline.parse(str(p))
    assert again == p
    assert str(again) == str(p)


def test_defaults_are_not_printed():
    assert str(Pipeline.parse("prune-magnitude{sparsity=0.5},compile{mode=default}")) == "prune-magnitude,compile"


def test_unknown_pass_and_bad_option_are_clear_errors():
    with pytest.raises(UnknownPassError, match="did you mean 'compile'"):
        Pipeline.parse("int8-dynamic,compille")
    with pytest.raises(PassConfigError, match="prune-magnitude.*sparsity"):
        Pipeline.parse("prune-magnitude{sparsity=2}")
    with pytest.raises(PassConfigError, match="unknown option 'sparsty'"):
        Pipeline.parse("prune-magnitude{sparsty=0.2}")


def test_a_pass_that_cannot_take_the_previous_form_is_refused_at_parse_time():
    with pytest.raises(PipelineParseError) as info:
        Pipeline.parse("compile,int8-dynamic")
    msg = str(info.value)
    assert "'int8-dynamic' cannot run after 'compile'" in msg
    assert "put 'int8-dynamic' before 'compile'" in msg


def test_identity_takes_every_form():
    assert str(Pipeline.parse("compile,identity")) == "compile,identity"


def test_pipeline_is_itself_a_pass():
    model = torch.nn.Linear(4, 4)
    inner = Pipeline.parse("prune-magnitude{sparsity=0.5},identity")
    outer = Pipeline([inner])
    result = outer.apply(model, PassContext())
    assert result.modified
    zeros = (result.model.weight == 0).float().mean().item()
    assert abs(zeros - 0.5) < 0.01
    assert outer.gives == "module" and Pipeline.parse("compile").gives == "compiled"


def test_a_nested_pipeline_prints_text_that_parses_back_to_an_equal_pipeline():
    inner = Pipeline.parse("prune-magnitude{sparsity=0.3},cast{dtype=fp16}")
    nested = Pipeline([Pipeline.parse("identity"), inner, Pipeline([Pipeline(), Pipeline.parse("compile")])])
    assert str(nested) == "identity,prune-magnitude{sparsity=0.3},cast{dtype=fp16},compile"
    assert Pipeline.parse(str(nested)) == nested and repr(nested) == f"Pipeline.parse({str(nested)!r})"
    assert [p.name for p in nested] == ["identity", "prune-magnitude", "cast", "compile"]  # one flat chain
    assert len(inner) == 2  # the inner pipeline itself is left as it was
    with pytest.raises(PipelineParseError, match="'int8-dynamic' cannot run after 'compile'"):
        Pipeline([Pipeline.parse("compile"), Pipeline.parse("int8-dynamic")])  # forms checked across the seam
