import os

import pytest
import torch

# No network in tests and CI: timm / huggingface must never try to download weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module whose tests assert exact equality between training runs:
    multi-threaded CPU kernels on a loaded machine can differ in the last bits between runs (and
    a subprocess started with OMP_NUM_THREADS=1 runs the same kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """A small synthetic RGBNT201 tree (12 identities, 2 views) for training-run tests."""
    from editor_reid.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("data")
    make_synthetic("rgbnt201", root, ids=12, views=2, seed=0)
    return root
