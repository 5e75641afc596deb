"""Shared test fixtures."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
# Without CUDA, Triton kernels (the hash-grid backend) run in Triton's CPU interpreter; Triton reads
# this when it is first imported, before any test module loads
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tiny tensors: a second intra-op thread only adds synchronisation cost."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
