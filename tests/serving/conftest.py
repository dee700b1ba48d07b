"""What the serving tests share: a tiny random-weight Llama on one torch thread (a tiny model keeps its pace
when the machine's other cores are busy), as the `model` fixture of a test module that does not define its own."""
from __future__ import annotations

import pytest
import torch

from optistack.testing.models import tiny_llama


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama()
    torch.set_num_threads(threads)
