"""Presets (`@name`): chosen by machine features, usable wherever pipeline text is, composable, recorded
in the report, and an unknown name is one clear error listing the valid ones."""
from __future__ import annotations

import json

import pytest
import torch

from optistack import presets
from optistack.bench.report import Report
from optistack.bench.timer import TimingConfig
from optistack.cli import main
from optistack.core.errors import PipelineParseError
from optistack.core.pipeline import Pipeline
from optistack.core.syntax import parse_pipeline_text
from optistack.presets import FEATURES, PRESETS, Preset, Variant, describe_presets, expand_preset


@pytest.mark.parametrize("features,expected", [
    ({"amx", "avx512_bf16", "avx512", "avx2"}, "pt2e-int8{mixed=bf16}"),
    ({"avx512_bf16", "avx512"}, "pt2e-int8{mixed=bf16}"),
    ({"avx512", "avx2"}, "int8-dynamic,compile"),
    (set(), "int8-dynamic,compile"),
    ({"cuda", "amx"}, "cast{dtype=fp16},compile"),
])
def test_encoder_preset_follows_the_machine(features, expected):
    assert expand_preset("@encoder-latency", features) == expected
    assert expand_preset("encoder-latency", features) == expected  # the '@' is optional here


def test_llm_decode_is_the_engine_with_vnni_else_the_compiled_chain():
    for features in ({"amx", "avx512_vnni", "avx512"}, {"avx512_vnni"}):
        assert expand_preset("@llm-decode", features) == "awq{head=int8,zero_grid=float},embed-int8,fuse-kernels,decode-engine"
    for features in ({"amx"}, {"avx512", "avx2"}, set()):
        text = expand_preset("@llm-decode", features)
        assert text.startswith("awq{head=int8,zero_grid=float},fuse-kernels,kv-cache{impl=static},compile{")
        assert "freezing=true" in text and "cpp_wrapper=true" in text and "max-autotune" not in text
    assert "max-autotune" in expand_preset("@llm-decode", {"cuda", "avx512_vnni"})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_variant_is_a_valid_pipeline(name):
    for variant in PRESETS[name].variants:
        assert variant.when in FEATURES + (presets.ANY,) and variant.why
        pipe = Pipeline.parse(variant.pipeline)
        assert len(pipe) >= 1 and Pipeline.parse(str(pipe)) == pipe  # pt2e-int8 alone quantizes and compiles
    assert PRESETS[name].variants[-1].when == presets.ANY  # every machine gets something


def test_parse_expands_for_this_machine_and_prints_the_expansion():
    pipe = Pipeline.parse("@llm-decode")
    assert pipe == Pipeline.parse(expand_preset("@llm-decode"))
    assert "@" not in str(pipe) and pipe.preset == "@llm-decode"
    assert Pipeline.parse(str(pipe)).preset is None  # the expansion is ordinary text


def test_presets_compose_with_passes_on_either_side():
    pipe = Pipeline.parse("identity, @encoder-latency")
    assert [p.name for p in pipe][0] == "identity"
    assert str(pipe) == "identity," + str(Pipeline.parse(expand_preset("@encoder-latency")))
    assert pipe.preset == "identity, @encoder-latency"
    with pytest.raises(PipelineParseError, match="cannot run after"):  # forms are still checked
        Pipeline.parse("@encoder-latency,prune-magnitude")


def test_unknown_preset_is_one_error_listing_valid_names():
    with pytest.raises(PipelineParseError) as err:
        Pipeline.parse("identity,@llm-decod")
    msg = str(err.value)
    assert "unknown preset '@llm-decod'" in msg and "did you mean '@llm-decode'" in msg
    assert all("@" + n in msg for n in PRESETS)


def test_syntax_refuses_options_on_a_preset_and_presets_where_not_accepted():
    with pytest.raises(PipelineParseError, match="takes no options"):
        Pipeline.parse("@llm-decode{bits=8}")
    with pytest.raises(PipelineParseError, match="not accepted here"):
        parse_pipeline_text("@llm-decode")
    with pytest.raises(PipelineParseError, match="preset name"):
        Pipeline.parse("@,identity")
    # an '@' inside a quoted value is a value, not a preset
    assert parse_pipeline_text('a{x="@b"}', expand=lambda name: pytest.fail("expanded")) == [("a", {"x": "@b"})]


def test_cli_lists_presets_with_their_expansion_here(capsys):
    assert main(["presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["features"]) <= set(FEATURES)
    rows = {r["name"]: r for r in data["presets"]}
    assert set(rows) == {"@" + n for n in PRESETS}
    for name, row in rows.items():
        assert row["expansion"] == expand_preset(name) and row["variants"]
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "@llm-decode" in out and expand_preset("@llm-decode") in out


def test_cli_unknown_preset_exits_2_before_loading_a_model(capsys):
    assert main(["run", "--model", "smollm2", "--pipeline", "@fastest"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset '@fastest'" in err and "@llm-decode" in err and "Traceback" not in err


def test_report_records_the_preset_and_its_expansion(monkeypatch):
    from tiny_models import tiny_llama, tiny_llama_workload

    tiny = Preset("tiny", "test preset", (Variant(presets.ANY, "identity", "test"),))
    monkeypatch.setitem(PRESETS, "tiny", tiny)
    workload = tiny_llama_workload(tiny_llama(vocab_size=128))
    result = Pipeline.parse("@tiny").run(workload, timing=TimingConfig(min_rounds=3, max_rounds=3, warmup=1),
                                        verbose=False)
    report = result.report
    assert report.preset == "@tiny" and report.pipeline == "identity"
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.preset == "@tiny" and again.pipeline == "identity"
    assert "@tiny" in str(report)


def test_describe_marks_the_chosen_variant():
    rows = {r["name"]: r for r in describe_presets({"avx2"})}
    assert rows["@encoder-latency"]["chosen_for"] == presets.ANY
    assert rows["@encoder-latency"]["expansion"] == "int8-dynamic,compile"
    assert torch.__version__  # torch stays importable alongside (presets import it lazily)
