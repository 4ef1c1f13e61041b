import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Post-training layers in these tests are tiny: one intra-op thread avoids thread start-up
    costs that dominate on a shared machine (measured 20 s instead of 5 s for the OBS/OBC files at
    load 7 on 2 cores). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
