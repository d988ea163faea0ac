"""Shared pytest set-up."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds contention (a digits UNet call was
    12x slower with 2 threads under load). Restored after each module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
