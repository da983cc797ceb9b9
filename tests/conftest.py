import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A warm Inductor cache makes torch.compile tests cheap after the first run (cold: 7-11 s).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

import autokd  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available() and autokd.ops.WITH_CUDA


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and autokd built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
