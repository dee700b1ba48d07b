"""Fixtures for the search tests (helpers live in search_helpers.py, importable by subprocesses)."""
import pytest
from search_helpers import tiny_mlp_workload


@pytest.fixture
def tiny_workload():
    return tiny_mlp_workload()
