import os
import random

import numpy as np
import pytest
import torch

# Triton kernels run through the interpreter on a CPU-only machine; this must be set
# before anything imports triton (house style section 5).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory):
    """The trainer tests' one synthetic-data cache (generated once per session)."""
    from tests.test_train import shared_cache

    return shared_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one intra-op thread for a trainer test module (see tests/test_train.py)."""
    from tests.test_train import one_thread

    with one_thread():
        yield
