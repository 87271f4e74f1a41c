import os
import warnings

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine, spinning threads of one
# process (or of the DDP/interrupt subprocesses, which inherit this) starve the others.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread; on a shared machine two spinning OpenMP threads
    are ~10x slower (measured: 17 s vs 1 s for a 2-epoch test_resnet fit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
