import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A warm Inductor cache makes torch.compile tests cheap after the first run (cold: 7-11 s).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
# tests/helpers.py holds the helpers the test files share (`from helpers import ...`).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import autokd  # noqa: E402,F401
from helpers import torch_threads  # noqa: E402 (importable via the sys.path entry above)

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


# One torch thread for tests that train small models: two threads per tiny model on a loaded
# shared machine make them many times slower. Files opt in with
# `pytestmark = pytest.mark.usefixtures("one_thread")` (per test) or "one_thread_module" (for
# the whole module, so that module-scoped fixtures run on one thread too).
@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    with torch_threads(1):
        yield
