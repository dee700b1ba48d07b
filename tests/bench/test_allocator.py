"""The steady allocator: with glibc's thresholds fixed, a freed large tensor's pages are reused
instead of faulted in again on the next call (what made eager timings depend on the process's past)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from optistack.bench.allocator import _glibc, allocator_state, minor_faults, steady_allocator
from optistack.bench.timer import Samples, TimingConfig, TimingConfigError, interleaved, latency_summary

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="needs glibc malloc (Linux with glibc)")

# 64 MiB a call: above glibc's largest dynamic mmap threshold (32 MiB), so without fixed thresholds every
# call maps fresh pages; a fresh process, so this test's own process state does not matter
_PROBE = r"""
import json, torch
from optistack.bench.allocator import minor_faults, steady_allocator
def faults_per_call():  # the median of the last 5 of 16 calls: the heap settles within some (warm-up's job;
    out = []               # measured on a Zen 4 VM: 6 to 9 calls after the switch, so 8 calls were not enough)
    for _ in range(16):
        before = minor_faults()
        torch.empty(16 << 20).fill_(1.0)
        out.append(minor_faults() - before)
    return sorted(out[-5:])[2]
as_is = faults_per_call()
how = steady_allocator()
print(json.dumps({"as_is": as_is, "steady": faults_per_call(), "how": how}))
"""


@needs_glibc
def test_steady_allocator_stops_large_temporaries_from_faulting_in_every_call():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["as_is"] > 8000  # 64 MiB of fresh 4 KiB pages (16,384), give or take huge pages
    assert probe["steady"] < probe["as_is"] / 10
    assert "fixed thresholds" in probe["how"]


@needs_glibc
def test_steady_allocator_is_set_once_and_described():
    first = steady_allocator()
    assert steady_allocator() == first == allocator_state()
    assert "mmap 256 MiB" in first and "trim 512 MiB" in first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getrusage counts minor faults on Linux")
def test_minor_faults_counts_the_fresh_pages_a_call_touches():
    import mmap

    region = mmap.mmap(-1, 32 << 20)  # anonymous and new: every page faults in when first written
    before = minor_faults()
    for offset in range(0, len(region), 4096):
        region[offset] = 1
    touched = minor_faults() - before
    region.close()
    assert touched >= 16  # 8,192 small pages, or 16 huge ones where the kernel backs it with those


def test_a_bad_allocator_setting_is_refused_naming_the_valid_ones():
    with pytest.raises(TimingConfigError, match=r"allocator to be one of \('steady', 'as-is'\).*got 'jemalloc'"):
        TimingConfig(allocator="jemalloc")


def test_latency_summary_reports_page_faults_per_steady_call():
    def allocates():
        blob = bytearray(8 << 20)
        blob[::4096] = b"\x01" * len(blob[::4096])

    samples = interleaved({"a": allocates, "b": lambda: None},
                          TimingConfig(warmup=0, min_rounds=3, max_rounds=3, block=2, allocator="as-is"))
    summary = latency_summary(samples, "a")
    assert summary["page_faults_per_call"] is not None and summary["page_faults_per_call"] >= 0
    assert len(samples.faults["a"]) == 3  # one steady call per round (the block's first is kept apart)
    empty = Samples(["x"])
    empty.record("x", [1.0, 2.0], after_switch=False)
    assert latency_summary(empty, "x")["page_faults_per_call"] is None
