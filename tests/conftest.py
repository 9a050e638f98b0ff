import os

import pytest
import torch

# One CPU thread keeps the 2-core CI box responsive and timings comparable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
