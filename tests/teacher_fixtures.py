"""Fixtures shared by the analytic-teacher / toy2d test files (import them by name to use them)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run the importing module's tests on one intra-op thread, restoring the count after."""
    # Tiny tensors: an explicit 2-thread intra-op pool (tests/conftest.py) costs ~10 ms per op
    # on a loaded 2-core machine (torch 2.13); one thread is ~1000x faster here.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
