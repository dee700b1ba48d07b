"""`find_linears` is the one way passes find linear layers: skip regex, tied weights once, Conv1D too."""
import torch
from transformers.pytorch_utils import Conv1D

from optistack.passes.linears import find_linears


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.b.weight = self.a.weight  # tied
        self.head = torch.nn.Linear(8, 4)
        self.conv = Conv1D(8, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2)  # its out_proj is read directly, never a layer to rewrite
        self.norm = torch.nn.LayerNorm(8)


def test_finds_linear_and_conv1d_but_not_mha_out_proj():
    assert sorted(find_linears(Tied())) == ["a", "b", "conv", "head"]


def test_skip_is_a_regex_searched_in_names():
    assert sorted(find_linears(Tied(), skip="^(head|conv)$")) == ["a", "b"]


def test_one_per_weight_keeps_the_first_of_tied_layers():
    assert sorted(find_linears(Tied(), one_per_weight=True)) == ["a", "conv", "head"]


def test_quantized_weights_are_not_linear_layers():
    m = Tied()
    m.head.weight = torch.nn.Parameter(m.head.weight.detach().to(torch.int8), requires_grad=False)
    assert "head" not in find_linears(m)
