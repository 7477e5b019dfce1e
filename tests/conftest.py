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
