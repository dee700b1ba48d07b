"""Candidate text -> variants, and which orders the model-form contract allows."""
import pytest

from optistack.core.errors import OptistackError, PassConfigError
from optistack.search.space import END, SearchSpace, parse_candidates


def texts(candidates):
    from optistack.core.pass_protocol import pass_text

    return [pass_text(p) for p in parse_candidates(candidates)]


def test_bar_separated_values_are_choices_and_star_lists_a_literal():
    assert texts("cast{dtype=bf16|fp16}") == ["cast", "cast{dtype=fp16}"]
    assert texts(["ort-quantize{per_channel=*}"]) == ["ort-quantize{per_channel=false}", "ort-quantize"]
    assert texts("cast{dtype=*,mode=*}") == ["cast", "cast{mode=autocast}", "cast{dtype=fp16}",
                                              "cast{dtype=fp16,mode=autocast}"]


def test_text_options_are_never_split_and_dicts_list_choices():
    assert texts("prune-magnitude{skip=lm_head|embed}") == ["prune-magnitude"]  # the default regex
    assert texts([{"prune-magnitude": {"sparsity": [0.3, 0.5]}}, "identity"]) == [
        "prune-magnitude{sparsity=0.3}", "prune-magnitude", "identity"]


def test_bad_candidates_say_what_is_wrong():
    with pytest.raises(OptistackError, match="unknown pass 'int9'"):
        parse_candidates("int9")
    with pytest.raises(PassConfigError, match="dtype"):
        parse_candidates("cast{dtype=fp8}")
    with pytest.raises(OptistackError, match="'\\*' cannot list"):
        parse_candidates("prune-magnitude{sparsity=*}")
    with pytest.raises(OptistackError, match="at least one candidate"):
        parse_candidates([])


def test_space_follows_the_form_contract():
    space = SearchSpace(parse_candidates("compile,int8-dynamic,onnx-export,ort-optimize"), max_length=3)
    assert space.singles() == ["compile", "int8-dynamic", "onnx-export"]  # ort-optimize needs an ONNX model
    assert space.contains("int8-dynamic,compile") and not space.contains("compile,int8-dynamic")
    assert space.contains("onnx-export,ort-optimize") and not space.contains("ort-optimize")
    assert not space.contains("int8-dynamic,int8-dynamic") and not space.contains("identity")
    everything = list(space.enumerate())
    assert len(everything) == len(set(everything)) and "int8-dynamic,onnx-export,ort-optimize" in everything
    assert all(space.contains(t) for t in everything)
    assert "ort-optimize" in [t.split(",")[-1] for t in space.extensions("onnx-export")]


def test_position_params_round_trip():
    space = SearchSpace(parse_candidates("identity,int8-dynamic,compile"), max_length=3)
    assert space.position_params("int8-dynamic,compile") == {"step_0": "int8-dynamic", "step_1": "compile",
                                                              "step_2": END}
    assert END not in space.position_choices(0) and END in space.position_choices(1)
