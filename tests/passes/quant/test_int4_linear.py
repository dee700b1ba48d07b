"""Int4 storage and kernels: quantize/dequantize bounds, packed layouts, Int4Linear vs a plain-torch reference."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optistack.bench.memory import model_bytes
from optistack.layers.int4 import CPU_KERNEL, CUDA_KERNEL, DEQUANT, Int4Linear, choose_kernel, param_dtype_for
from optistack.layers.int4_grid import dequantize, fake_quantize, padded_size, quantize


def seeded_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def reference(layer: Int4Linear, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain torch: x @ W^T in float64, in the kernel's activation dtype (bf16 in and out) where it has one."""
    act = layer.act_dtype
    xr = x.to(act).double() if act is not None else x.double()
    y = xr @ w.double().t()
    if act is not None:
        y = y.to(act)
    y = y.double()
    return y + bias.double() if bias is not None else y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("k,group", [(64, 32), (576, 64), (576, 128), (96, 64)])
def test_round_trip_error_is_at_most_half_a_step(k, group, zero_point):
    torch.manual_seed(1)
    w = torch.randn(48, k) * torch.rand(48, 1) * 3
    gq = quantize(w, group, zero_point)
    assert gq.q.dtype == torch.uint8 and int(gq.q.max()) <= 15
    assert gq.padded_in_features == padded_size(k, group) and gq.scale.shape == (48, gq.padded_in_features // group)
    err = (dequantize(gq) - w).abs()
    step = gq.scale.repeat_interleave(group, dim=1)[:, :k]
    # an integer zero point shifts the grid by < step/2: only a group's extremes may clip, by step/2 more
    assert bool((err <= (step if zero_point else step / 2) + 1e-6).all())
    assert float((err <= step / 2 + 1e-6).float().mean()) > 0.95
    if not zero_point:
        assert bool((gq.zero == 0).all())
    else:  # whole steps: the zero point compressed-tensors and vLLM store is an integer
        ratio = gq.zero / gq.scale
        assert torch.allclose(ratio, ratio.round(), atol=1e-4) and bool((ratio.abs() <= 8).all())
    assert torch.equal(fake_quantize(w, group, zero_point), dequantize(gq))


def test_padding_copies_real_columns_so_the_range_is_unchanged():
    torch.manual_seed(2)
    w = torch.randn(16, 96)  # groups of 64: the second group has 32 real columns, padded to 64
    gq = quantize(w, 64)
    real = w[:, 64:]
    assert torch.allclose(gq.scale[:, 1], (real.amax(1) - real.amin(1)) / 15, atol=1e-6)


def test_clipping_range_saturates_outside_values():
    w = torch.tensor([[-4.0, -1.0, 0.0, 1.0] * 8])
    gq = quantize(w, 32, wmin=torch.tensor([[-2.0]]), wmax=torch.tensor([[1.0]]))
    assert float(dequantize(gq).min()) == pytest.approx(-2.0, abs=1e-6)


@pytest.mark.parametrize("n,k,group", [(64, 64, 32), (128, 576, 64), (80, 128, 32), (48, 96, 64), (576, 576, 128)])
def test_cpu_kernel_matches_plain_torch_reference(n, k, group):
    lin = seeded_linear(k, n)
    layer = Int4Linear.from_linear(lin, group)
    assert layer.kernel == CPU_KERNEL and layer.act_dtype == torch.bfloat16
    gq = quantize(lin.weight, group, True, param_dtype_for(CPU_KERNEL))
    assert torch.equal(layer.codes(), gq.q)  # the unpacker knows the kernel's packed layout
    w = dequantize(gq)
    assert torch.equal(layer.dequantized_weight(), w)
    x = torch.randn(3, 5, k)
    y = layer(x)
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    assert rel(y, reference(layer, x, w, lin.bias)) < 1e-3
    # and against the float layer it replaces: int4 error, nothing worse
    with torch.no_grad():
        assert rel(y, lin(x)) < 0.15


def test_fallback_where_no_kernel_fits_is_exact_in_float32():
    lin = seeded_linear(64, 24)  # 24 output rows: the CPU kernel needs a multiple of 16
    kernel, reason = choose_kernel("cpu", 24, 64, 32)
    assert kernel == DEQUANT and "multiple of 16" in reason
    layer = Int4Linear.from_linear(lin, 32)
    assert layer.kernel == DEQUANT and layer.act_dtype is None
    w = dequantize(quantize(lin.weight, 32, True, torch.float32))
    assert torch.equal(layer.dequantized_weight(), w)
    x = torch.randn(4, 64)
    assert rel(layer(x), reference(layer, x, w, lin.bias)) < 1e-6


def test_model_bytes_sees_packed_storage():
    lin = seeded_linear(576, 576, bias=False)
    layer = Int4Linear.from_linear(lin, 64)
    groups = 576 // 64
    expected = 576 * 576 // 2 + groups * 576 * 2 * 2  # uint8 nibbles + bf16 (scale, zero) per group
    assert model_bytes(layer) == expected
    assert model_bytes(lin) / model_bytes(layer) > 7
    assert not list(layer.parameters())  # everything is a buffer: nothing for an optimizer to touch


def test_deepcopy_and_state_dict_round_trip():
    lin = seeded_linear(128, 64)
    layer = Int4Linear.from_linear(lin, 64)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 128)
    assert torch.equal(twin(x), layer(x))
    assert set(layer.state_dict()) == {"qweight", "scales_and_zeros", "bias"}


def test_bf16_model_input_gives_bf16_output():
    layer = Int4Linear.from_linear(seeded_linear(64, 32), 32)
    x = torch.randn(2, 64)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), layer(x)) < 1e-2


def test_wrong_device_for_packed_layout_is_a_clear_error():
    layer = Int4Linear.from_linear(seeded_linear(64, 32), 32)
    layer.kernel = CUDA_KERNEL  # pretend: weights packed for CUDA but sitting on the CPU
    with pytest.raises(RuntimeError, match="packed for cuda"):
        layer(torch.randn(1, 64))


@pytest.mark.slow
def test_torch_compile_runs_the_int4_kernel():
    model = nn.Sequential(Int4Linear.from_linear(seeded_linear(128, 64), 32), nn.ReLU(),
                          Int4Linear.from_linear(seeded_linear(64, 32, seed=1), 32))
    x = torch.randn(4, 128)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert rel(compiled(x), model(x)) < 1e-6


@pytest.mark.gpu
def test_cuda_kernel_matches_plain_torch_reference():
    lin = seeded_linear(256, 128).cuda()
    layer = Int4Linear.from_linear(lin, 64)
    assert layer.kernel == CUDA_KERNEL
    w = dequantize(quantize(lin.weight, 64, True, torch.bfloat16)).cuda()
    assert rel(layer.dequantized_weight(), w) < 1e-2  # via the kernel, in bf16
    x = torch.randn(8, 256, device="cuda")
    assert rel(layer(x), reference(layer, x, w, lin.bias)) < 1e-2


def test_spec_rebuilds_an_empty_layer_that_loads_the_state_dict():
    layer = Int4Linear.from_linear(seeded_linear(96, 32), 64)  # padded in_features too
    spec = layer.optistack_spec()
    assert spec == {"in_features": 96, "out_features": 32, "group_size": 64, "kernel": CPU_KERNEL, "bias": True}
    twin = Int4Linear.from_optistack_spec(spec)
    assert {k: (v.shape, v.dtype) for k, v in twin.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in layer.state_dict().items()}
    twin.load_state_dict(layer.state_dict(), strict=True, assign=True)
    x = torch.randn(3, 96)
    assert torch.equal(twin(x), layer(x))


@pytest.mark.parametrize("kernel,bias", [(CPU_KERNEL, True), (DEQUANT, False)])
def test_weight_property_is_the_dequantized_weight_read_only(kernel, bias):
    """Foreign model code reads `layer.weight` (T5: `self.wo.weight.dtype`): it must get [out, in], the
    replaced layer's dtype and device, and the values the kernel multiplies by."""
    lin = seeded_linear(96, 32, bias=bias)
    layer = Int4Linear.from_linear(lin, 32, kernel=kernel)
    w = layer.weight
    assert w.shape == (32, 96) and w.dtype == torch.float32 and w.device == lin.weight.device
    assert torch.equal(w, layer.dequantized_weight())
    assert (layer.in_features, layer.out_features) == (96, 32)
    with pytest.raises((AttributeError, KeyError), match="weight"):  # nn.Module refuses a Parameter by KeyError
        layer.weight = nn.Parameter(torch.zeros(32, 96))
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(32, 96)
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()
    x = torch.randn(3, 96)
    assert torch.allclose(layer(x), x @ layer.weight.t() + (lin.bias if bias else 0), atol=0.05, rtol=0.02)
    assert copy.deepcopy(layer).weight.dtype == torch.float32


def test_weight_property_follows_the_replaced_dtype():
    lin = seeded_linear(64, 32, bias=False).to(torch.bfloat16)
    assert Int4Linear.from_linear(lin, 32).weight.dtype == torch.bfloat16


def test_fused_int4_linear_weight_matches_the_int4_layer():
    from optistack.passes.kernels.fuse import fused_int4

    layer = Int4Linear.from_linear(seeded_linear(96, 32), 32, kernel=DEQUANT)
    fused = fused_int4(layer, "torch")
    assert fused.weight.shape == (32, 96) and torch.allclose(fused.weight, layer.weight, atol=1e-6)


def test_int8_head_linear_weight_is_dequantized_and_read_only():
    from optistack.layers.int8 import Int8Linear

    lin = seeded_linear(64, 32)
    head = Int8Linear.from_linear(lin)
    assert head.weight.shape == (32, 64) and head.weight.dtype == torch.float32
    assert torch.allclose(head.weight, lin.weight, atol=lin.weight.abs().max().item() / 127)
    with pytest.raises(AttributeError):
        head.weight = torch.zeros(32, 64)


@pytest.mark.parametrize("k,group", [(64, 32), (576, 64)])
def test_float_zero_grid_is_never_worse_than_the_integer_one(k, group):
    """zero_point="float" keeps each group's own offset: every weight within half a step (no extra
    clipping at the extremes), and a lower total error than the whole-step grid."""
    from optistack.layers.int4_grid import FLOAT_ZERO

    torch.manual_seed(3)
    w = torch.randn(48, k) * torch.rand(48, 1) * 3 + torch.rand(48, 1)  # off-centre groups
    fq, iq = quantize(w, group, FLOAT_ZERO), quantize(w, group, True)
    err_f, err_i = (dequantize(fq) - w).abs(), (dequantize(iq) - w).abs()
    step = fq.scale.repeat_interleave(group, dim=1)[:, :k]
    assert bool((err_f <= step / 2 + 1e-6).all())
    assert float(err_f.square().mean()) < float(err_i.square().mean())
    ratio = fq.zero / fq.scale
    assert not torch.allclose(ratio, ratio.round(), atol=1e-3)  # not whole steps: only result.save keeps it


def test_zero_grid_option_reaches_the_quantizer():
    from optistack.core.pipeline import Pipeline

    p = Pipeline.parse("rtn-int4{zero_grid=float}").passes[0]
    assert p.config.zero_mode == "float" and str(p) == "rtn-int4{zero_grid=float}"
    assert Pipeline.parse("rtn-int4").passes[0].config.zero_mode is True
    assert Pipeline.parse("rtn-int4{zero_point=false,zero_grid=float}").passes[0].config.zero_mode is False


def test_the_old_module_paths_are_gone():
    """The layer moved to optistack.layers; no module shim is left in passes (old saves load by name, below)."""
    import importlib

    for old in ("optistack.passes.quant.int4", "optistack.passes.quant.int4_linear"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)


@pytest.mark.parametrize("old", ["optistack.passes.quant.int4:Int4Linear", "optistack.passes.quant.int4_linear:Int4Linear"])
def test_a_folder_saved_under_an_old_class_path_still_loads(tmp_path, old):
    """New saves name `optistack.layers.int4:Int4Linear`; manifests naming the layer's old homes load too."""
    import json

    import optistack as ost
    from optistack.core.checksums import write_manifest

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(2, 64)
    result = ost.Pipeline.parse("rtn-int4{group_size=32}").run(
        ost.workloads.GenericWorkload(model, x), instruments=[], verbose=False)
    result.save(tmp_path)
    manifest = json.loads((tmp_path / "optistack.json").read_text())
    assert {e["class"] for e in manifest["replaced"].values()} == {"optistack.layers.int4:Int4Linear"}
    for entry in manifest["replaced"].values():
        entry["class"] = old
    files = list(manifest.pop("integrity")["files"])
    write_manifest(tmp_path, manifest, files)
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    loaded = ost.load_model(tmp_path, model=fresh)
    assert type(loaded[0]) is Int4Linear
    assert torch.equal(loaded(x), result.model(x))
