import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optistack.core.errors import PipelineParseError
from optistack.core.syntax import parse_pipeline_text


def test_parses_names_and_options():
    assert parse_pipeline_text("a{x=1,y=two},b , c{}") == [("a", {"x": "1", "y": "two"}), ("b", {}), ("c", {})]


def test_empty_text_is_empty_pipeline():
    assert parse_pipeline_text("   ") == []


def test_quoted_values_keep_commas_braces_and_escapes():
    assert parse_pipeline_text('p{skip="a,b{c}",q="say \\"hi\\""}') == [("p", {"skip": "a,b{c}", "q": 'say "hi"'})]


@pytest.mark.parametrize("text,fragment", [
    ("a{x=1", "expected '}'"),
    ("a b", "expected ','"),
    ("a{x}", "expected '='"),
    ("a{x=1,x=2}", "given twice"),
    ("a,,b", "pass name"),
    ('a{x="open}', "unterminated"),
    ("A", "pass name"),
])
def test_malformed_text_points_at_the_problem(text, fragment):
    with pytest.raises(PipelineParseError) as info:
        parse_pipeline_text(text)
    assert fragment in str(info.value)
    assert "^" in str(info.value)  # a caret under the position


names = st.from_regex(r"[a-z][a-z0-9\-]{0,8}", fullmatch=True)
keys = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
values = st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(names, st.dictionaries(keys, values, max_size=3)), max_size=4))
def test_any_items_survive_formatting_and_parsing(items):
    from optistack.core.pass_protocol import _quote

    text = ",".join(
        name + ("{" + ",".join(f"{k}={_quote(v)}" for k, v in opts.items()) + "}" if opts else "")
        for name, opts in items
    )
    # bare values are stripped of surrounding spaces; the formatter quotes values containing spaces
    assert parse_pipeline_text(text) == [(n, dict(o)) for n, o in items]
