import os
import warnings

import pytest
import torch

# Tests are CPU-only and small; keep them single-threaded-friendly and quiet.
os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """Every test runs in its own directory so `runs/` never leaks between tests."""
    monkeypatch.chdir(tmp_path)
    yield
