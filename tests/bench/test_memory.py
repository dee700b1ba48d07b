import torch

from optistack.bench.memory import model_bytes, peak_memory


def test_model_bytes_counts_parameters_and_buffers_once():
    m = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.BatchNorm1d(50))
    expected = sum(p.numel() * 4 for p in m.parameters()) + sum(b.numel() * b.element_size() for b in m.buffers())
    assert model_bytes(m) == expected
    tied = torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False), torch.nn.Linear(10, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert model_bytes(tied) == 400
    assert model_bytes(m.to(torch.bfloat16)) < expected


def test_peak_memory_sees_a_large_temporary_allocation():
    def allocate():
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        x.add_(1)
        return float(x[0])

    assert peak_memory(allocate) > 32 * 1024 * 1024


def test_peak_memory_still_sees_temporaries_under_the_steady_allocator():
    """The steady allocator keeps freed memory for reuse, so a repeated call's temporaries would come from
    pages RSS already counts; the probe hands free memory back first and still sees them, every time."""
    from optistack.bench.allocator import steady_allocator

    steady_allocator()

    def allocate():
        x = torch.ones(16 * 1024 * 1024 // 4)  # 16 MiB: below the steady mmap threshold, so from the heap
        x.add_(1)
        return float(x[0])

    peaks = [peak_memory(allocate) for _ in range(3)]
    assert min(peaks) > 8 * 1024 * 1024, peaks
